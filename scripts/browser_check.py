"""Load explorer pages in headless Chromium (Debian's) and check what a user would see.

    python scripts/browser_check.py --index runs/demo [--issue-urls] [--screenshots docs/screenshots]

Starts `fra app` over the index (its own process group, stopped at the end), starts Chromium with
a DevTools port, and drives it over the DevTools protocol with the `websockets` client (it
comes with streamlit, so nothing else is installed). For every URL it waits until the Streamlit
script has finished, then fails the URL if the page shows a traceback or an exception box, has no
header, is empty, lacks an expected text, or its address bar lacks an expected parameter (the URL
state written back by the app). It also clicks a sidebar page and checks that the address follows.
Prints one JSON line per check and exits 1 if any failed; `--json` writes the report to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]

# What the page shows, read in the page (Streamlit's own test ids).
STATE_JS = r"""(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const main = document.querySelector('[data-testid="stMain"]') || document.querySelector('section.main');
  const txt = (sel) => Array.from(document.querySelectorAll(sel)).map(e => e.innerText.trim()).filter(Boolean);
  return JSON.stringify({
    script: app ? app.getAttribute('data-test-script-state') : null,
    connection: app ? app.getAttribute('data-test-connection-state') : null,
    body: document.body ? document.body.innerText : '',
    main: main ? main.innerText : '',
    mainHeight: main ? main.scrollHeight : 0,
    exceptions: txt('[data-testid="stException"]'),
    errors: txt('[data-testid="stAlertContentError"]'),
    warnings: txt('[data-testid="stAlertContentWarning"]'),
    headers: txt('[data-testid="stHeading"] h1, [data-testid="stHeading"] h2, h1, h2'),
    plots: document.querySelectorAll('[data-testid="stPlotlyChart"]').length,
    plotsDrawn: document.querySelectorAll('[data-testid="stPlotlyChart"] .main-svg').length,
    tables: document.querySelectorAll('[data-testid="stDataFrame"]').length,
    downloads: document.querySelectorAll('[data-testid="stDownloadButton"]').length,
    search: location.search,
  });
})()"""


@dataclass
class Check:
    name: str
    query: str  # the part after '?'
    expect: list[str] = field(default_factory=list)  # texts the page must show
    expect_url: list[str] = field(default_factory=list)  # substrings the address bar must hold after load
    click_sidebar: str | None = None  # then click this page in the sidebar ...
    expect_url_after_click: list[str] = field(default_factory=list)  # ... and the address must follow
    click_open_in_table: int | None = None  # click the first row's 'open' link (last column) of this table ...
    expect_new_tab: list[str] = field(default_factory=list)  # ... and a tab with these in its address must open
    screenshot: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def start_app(index: Path, port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`fra app` in its own process group (so that the whole group can be stopped)."""
    cmd = [sys.executable, "-m", "fra.cli", "app", "--index", str(index), "--port", str(port)]
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the app did not answer on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class CDP:
    """The few DevTools protocol calls we need, over one page target."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    @classmethod
    async def open(cls, devtools_port: int) -> "CDP":
        from websockets.asyncio.client import connect

        with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10) as r:
            targets = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        ws = await connect(targets[0]["webSocketDebuggerUrl"], max_size=256 * 2**20, ping_interval=None)
        return cls(ws)

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            data = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if data.get("id") == self.n:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def state(self) -> dict:
        r = await self.call("Runtime.evaluate", expression=STATE_JS, returnByValue=True)
        return json.loads(r["result"]["value"])

    async def settle(self, timeout: float = 45) -> dict:
        """Wait until the script has run and the page stopped changing (plots drawn)."""
        t0, last, stable = time.time(), None, 0
        st = {}
        while time.time() - t0 < timeout:
            await asyncio.sleep(0.2)
            st = await self.state()
            done = (
                st["script"] == "notRunning"
                and st["connection"] == "CONNECTED"
                and st["main"].strip()
                and st["plotsDrawn"] >= st["plots"]
            )
            sig = (st["main"], st["plotsDrawn"], st["tables"])
            stable = stable + 1 if done and sig == last else 0
            last = sig
            if stable >= 3:
                return st
        st["timeout"] = True
        return st


def judge(c: Check, st: dict) -> list[str]:
    problems = []
    if st.get("timeout"):
        problems.append(f"page did not settle (script state {st.get('script')}, connection {st.get('connection')})")
    if "Traceback" in st["body"]:
        problems.append("the page shows a traceback")
    for e in st["exceptions"]:
        problems.append(f"exception box: {e[:300]}")
    for e in st["errors"]:
        problems.append(f"error box: {e[:300]}")
    if not st["headers"]:
        problems.append("no header: the page is empty or did not render")
    if len(st["main"].strip()) < 40:
        problems.append(f"the page is (nearly) empty: {st['main'][:80]!r}")
    if "**" in st["main"]:
        problems.append("literal ** in the page (Markdown bold that did not render)")
    if "\ufffd" in st["main"]:
        problems.append("a raw U+FFFD byte token in the page")
    for text in c.expect:
        if text.lower() not in st["main"].lower():
            problems.append(f"expected text missing: {text!r}")
    for part in c.expect_url:
        if part not in st["search"]:
            problems.append(f"address bar lacks {part!r}: {st['search']}")
    return problems


def _pages(devtools_port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10) as r:
        return {t["id"]: t["url"] for t in json.loads(r.read()) if t.get("type") == "page"}


async def click_open(cdp: CDP, devtools_port: int, table: int, expect: list[str]) -> list[str]:
    """Click the 'open' link of a table's first row (tables are drawn on a canvas, so by position)."""
    js = f"JSON.stringify(document.querySelectorAll('[data-testid=\"stDataFrame\"]')[{table}].getBoundingClientRect())"
    r = await cdp.call("Runtime.evaluate", expression=js, returnByValue=True)
    if "value" not in r["result"]:
        return [f"no table {table} to click"]
    rect = json.loads(r["result"]["value"])
    await cdp.call(
        "Runtime.evaluate",
        expression=f"document.querySelectorAll('[data-testid=\"stDataFrame\"]')[{table}]"
        ".scrollIntoView({block: 'center'})",
    )
    await asyncio.sleep(0.5)
    r = await cdp.call("Runtime.evaluate", expression=js, returnByValue=True)
    rect = json.loads(r["result"]["value"])
    x, y = rect["right"] - 40, rect["top"] + 35 + 17  # header row, then the middle of the first row
    before = _pages(devtools_port)
    await cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x - 5, y=y)
    await asyncio.sleep(0.5)
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        await cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    for _ in range(50):
        await asyncio.sleep(0.2)
        new = {i: u for i, u in _pages(devtools_port).items() if i not in before}
        if new:
            break
    if not new:
        return ["clicking the first 'open' link opened no tab"]
    url = next(iter(new.values()))
    for i in new:
        urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/close/{i}", timeout=10).read()
    return [f"the 'open' link went to {url}, which lacks {part!r}" for part in expect if part not in url]


async def run_checks(base: str, checks: list[Check], chromium: str, shots: Path | None) -> list[dict]:
    profile = tempfile.mkdtemp(prefix="fra-chromium-")
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = []
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        devtools_port = int(port_file.read_text().split()[0])
        cdp = await CDP.open(devtools_port)
        await cdp.call("Page.enable")
        await cdp.call("Runtime.enable")
        for c in checks:
            t0 = time.time()
            await cdp.call("Page.navigate", url=f"{base}/?{c.query}")
            st = await cdp.settle()
            problems = judge(c, st)
            if c.click_sidebar and not problems:
                js = (
                    f"(() => {{ const l = Array.from(document.querySelectorAll('[data-testid=\"stSidebar\"] label'))"
                    f".find(e => e.innerText.trim() === {json.dumps(c.click_sidebar)}); if (l) "
                    "l.click(); return !!l; }})()"
                )
                r = await cdp.call("Runtime.evaluate", expression=js, returnByValue=True)
                if not r["result"].get("value"):
                    problems.append(f"no sidebar entry {c.click_sidebar!r}")
                await asyncio.sleep(0.5)
                st = await cdp.settle()
                problems += [f"after clicking {c.click_sidebar!r}: {p}" for p in judge(Check(c.name, c.query), st)]
                for part in c.expect_url_after_click:
                    if part not in st["search"]:
                        problems.append(
                            f"after clicking {c.click_sidebar!r} the address bar lacks {part!r}: {st['search']}"
                        )
            if shots is not None and c.screenshot and not problems:  # never photograph a broken page
                h = int(min(max(st.get("mainHeight", 1000) + 40, 900), 6000))
                await cdp.call(
                    "Emulation.setDeviceMetricsOverride", width=1400, height=h, deviceScaleFactor=1, mobile=False
                )
                await asyncio.sleep(1.0)
                await cdp.settle()
                png = await cdp.call("Page.captureScreenshot", format="png")
                import base64

                (shots / f"{c.screenshot}.png").write_bytes(base64.b64decode(png["data"]))
                await cdp.call("Emulation.clearDeviceMetricsOverride")
            if c.click_open_in_table is not None and not problems:
                problems += await click_open(cdp, devtools_port, c.click_open_in_table, c.expect_new_tab)
            results.append(
                dict(
                    name=c.name,
                    url=f"?{c.query}",
                    ok=not problems,
                    problems=problems,
                    seconds=round(time.time() - t0, 2),
                    warnings=st.get("warnings", []),
                    headers=st.get("headers", [])[:2],
                    address=st.get("search"),
                )
            )
    finally:
        try:
            os.killpg(browser.pid, signal.SIGTERM)
            browser.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(profile, ignore_errors=True)
    return results


def index_facts(index: Path) -> dict:
    """A valid layer, head, sample, channel and feature of the index (for URLs that must work)."""
    from fra.queries import connect

    con = connect(index)
    layer, head = con.execute("SELECT layer, head FROM head_totals ORDER BY layer DESC, head LIMIT 1").fetchone()
    # a channel with stored examples (rows), so that its page has an 'open' link to click
    fq, fk = con.execute(
        "SELECT feat_q, feat_k FROM rows WHERE layer = ? AND head = ? GROUP BY ALL "
        "ORDER BY count(*) DESC, feat_q, feat_k LIMIT 1",
        [layer, head],
    ).fetchone()
    sample, k, qpos = con.execute(
        "SELECT sample, k, q FROM rows WHERE layer = ? AND head = ? ORDER BY abs(value) DESC LIMIT 1", [layer, head]
    ).fetchone()
    n_feat = con.execute("SELECT count(*) FROM features WHERE layer = ?", [layer]).fetchone()[0]
    labelled = (
        con.execute("SELECT count(label) FROM features").fetchone()[0]
        if "label" in [r[0] for r in con.execute("DESCRIBE features").fetchall()]
        else 0
    )
    return dict(layer=layer, head=head, fq=fq, fk=fk, sample=sample, q=qpos, k=k, n_feat=n_feat, labelled=labelled)


def checks_for(index: Path, issue_urls: bool = False) -> list[Check]:
    """Every page, and every bad URL of issue 15 (on the demo index with its exact numbers; on another
    index with that index's first layer and head in their place)."""
    f = index_facts(index)
    L, H = (18, 6) if issue_urls else (f["layer"], f["head"])
    H0 = 0 if issue_urls else f["head"]
    feat = 1372 if issue_urls else f["fq"]
    chan = f"page=Channel&layer={L}&head={H}"
    # the channel page shown (and clicked through): on the demo, the first 'open' link of head 18.6
    cl, ch, cq, ck = (18, 6, 316, 316) if issue_urls else (f["layer"], f["head"], f["fq"], f["fk"])
    return [
        Check("home", "", ["Strongest channels across heads"], ["page=Home"], screenshot="home"),
        Check(
            "feature",
            f"page=Feature+search&feature={feat}&layer={L}",
            [f"Feature {feat}"],
            [f"feature={feat}"],
            screenshot="feature",
        ),
        Check(
            "feature text search",
            f"page=Feature+search&feature=the&layer={L}",
            ["is not a feature ID"],
            ["feature=the"],
        ),
        Check("head", f"page=Head&layer={L}&head={H}", ["Why query"], ["q=", "k=", "sample="], screenshot="head"),
        Check(
            "head with q and k",
            f"page=Head&layer={f['layer']}&head={f['head']}&sample={f['sample']}&q={f['q']}&k={f['k']}",
            [f"Why query {f['q']}"],
            [f"q={f['q']}", f"k={f['k']}"],
        ),
        Check("channel default", f"page=Channel&layer={L}&head={H}", ["Strongest examples"], ["fq=", "fk="]),
        Check(
            "channel",
            f"page=Channel&layer={cl}&head={ch}&fq={cq}&fk={ck}",
            ["mean", "Strongest examples"],
            [f"fq={cq}"],
            screenshot="channel",
            click_open_in_table=0,
            expect_new_tab=["page=Head", "sample=", "&q=", "&k="],
        ),
        Check("sample", f"page=Sample&layer={L}&head={H}", ["Most-attended keys"], ["q="], screenshot="sample"),
        Check("cih", "page=CIH", ["CIH"], ["page=CIH"], screenshot="cih"),
        Check("cot", "page=CoT", ["CoT: thought anchors"], ["page=CoT"], screenshot="cot"),
        # issue 15, bug 1: numbers out of range
        Check("fq=-1", f"{chan}&fq=-1&fk=1289", ["fq=-1 is not one of the features"], ["fq="]),
        Check("fk=-3", f"{chan}&fq=316&fk=-3", ["fk=-3 is not one of the features"]),
        Check(
            "fq huge", f"{chan}&fq=99999999999999999999&fk=1", ["fq=99999999999999999999 is not one of the features"]
        ),
        # bug 2: contexts (no literal ** in the page)
        # bug 3 / 4: the first 'open' link of head 18.6, and a CIH channel with statistics only
        Check("channel 316->316", f"{chan}&fq=316&fk=316", ["Channel"]),
        Check("channel 1372->1289", f"page=Channel&layer={L}&head={H0}&fq=1372&fk=1289", ["Channel"]),
        # bug 5: invalid parameters are explained
        Check("layer=3", f"page=Channel&layer=3&head={H}", ["layer=3 is not one of the layers"]),
        Check("head=42", f"page=Head&layer={L}&head=42", ["head=42 is not one of the heads"]),
        Check("fq=abc", f"{chan}&fq=abc&fk=1", ["fq='abc' is not a whole number"]),
        Check("sample=999", f"page=Head&layer={L}&head={H}&sample=999", ["sample=999 is not one of the samples"]),
        Check("page=Bogus", "page=Bogus", ["page='Bogus' is not a page"], ["page=Home"]),
        Check(
            "q out of range",
            f"page=Sample&layer={L}&head={H}&sample={f['sample']}&q=100000",
            ["q=100000 is not one of"],
        ),
        # bug 6: the address follows the user
        Check(
            "switch page",
            f"page=Head&layer={L}&head={H}",
            [],
            [],
            click_sidebar="Channel",
            expect_url_after_click=["page=Channel", f"layer={L}", f"head={H}", "fq="],
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--issue-urls", action="store_true", help="use issue 15's exact numbers (for runs/demo)")
    p.add_argument("--screenshots", type=Path, help="write <name>.png of the main pages here")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--app-log", type=Path, default=None)
    args = p.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found (install Debian's chromium: apt-get install -y chromium)", file=sys.stderr)
        return 2
    checks = checks_for(args.index, args.issue_urls)
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = args.app_log or Path(tempfile.mkdtemp(prefix="fra-app-")) / "app.log"
    app = start_app(args.index, port, log)
    try:
        wait_healthy(port, app)
        results = asyncio.run(run_checks(f"http://127.0.0.1:{port}", checks, chromium, args.screenshots))
    finally:
        stop(app)
    app_log = log.read_text(errors="replace")
    noise = [
        l
        for l in app_log.splitlines()
        if any(w in l.lower() for w in ("deprecat", "please replace", "will be removed", "traceback", "warning"))
    ]
    report = dict(results=results, app_log_noise=noise[:20], ok=all(r["ok"] for r in results) and not noise)
    for r in results:
        print(json.dumps(r))
    if noise:
        print(json.dumps(dict(app_log_noise=noise[:20])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
