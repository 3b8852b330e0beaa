"""Load explorer pages in headless Chromium (Debian's) and check what a user would see.

    python scripts/browser_check.py --index runs/demo [--issue-urls] [--screenshots docs/screenshots]

Starts `fra app` over the index (its own process group, stopped at the end), starts Chromium with
a DevTools port, and drives it over the DevTools protocol with the `websockets` client (it
comes with streamlit, so nothing else is installed). For every URL it waits until the Streamlit
script has finished, then fails the URL if the page shows a traceback or an exception box, has no
header, is empty, lacks an expected text, or its address bar lacks an expected parameter (the URL
state written back by the app). It also clicks a sidebar page and checks that the address follows,
and walks the research journeys step by step in one tab: click a table cell (the same tab must
follow, no new tab may open), click a cell of the attention map, press Back.
Prints one JSON line per check (with `load_s`, the seconds until the page was drawn) and exits 1
if any failed; `--json` writes the report to a file.
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
    old: !!window.__fraOld,
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
    screenshot: str | None = None
    # then these steps, in the same tab: ("cell", table, row, col_x) clicks a table cell (col_x pixels
    # from the table's left edge); ("map", q, k) clicks that cell of the first attention map; ("back",)
    # presses Back. Each step is followed by (expected texts, expected address parts, absent texts).
    steps: list[tuple[tuple, list[str], list[str], list[str]]] = field(default_factory=list)


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

    async def settle(self, timeout: float = 45, t0: float | None = None) -> dict:
        """Wait until the script has run and the page stopped changing (plots drawn); `load_s` is the
        time from `t0` until the page reached the state it then kept."""
        t0 = t0 or time.time()
        last, stable, since = None, 0, None
        st = {}
        while time.time() - t0 < timeout:
            await asyncio.sleep(0.1)
            st = await self.state()
            done = (
                not st["old"]
                and st["script"] == "notRunning"
                and st["connection"] == "CONNECTED"
                and st["main"].strip()
                and st["plotsDrawn"] >= st["plots"]
            )
            sig = (st["main"], st["plotsDrawn"], st["tables"], st["search"])
            if done and sig == last:
                stable += 1
            else:
                stable, since = 0, time.time()
            last = sig
            if stable >= 5:
                st["load_s"] = round(since - t0, 2)
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


async def _rect(cdp: CDP, selector: str, index: int) -> dict | None:
    """The element's viewport rectangle after scrolling it to the middle of the window."""
    el = f"document.querySelectorAll({json.dumps(selector)})[{index}]"
    r = await cdp.call(
        "Runtime.evaluate",
        expression=f"(() => {{ const e = {el}; if (!e) return null; e.scrollIntoView({{block: 'center'}}); "
        "return JSON.stringify(e.getBoundingClientRect()); })()",
        returnByValue=True,
    )
    await asyncio.sleep(0.4)
    r = await cdp.call(
        "Runtime.evaluate", expression=f"JSON.stringify({el}.getBoundingClientRect())", returnByValue=True
    )
    return json.loads(r["result"]["value"]) if r["result"].get("value") else None


async def click_at(cdp: CDP, x: float, y: float) -> None:
    await cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x - 3, y=y)
    await asyncio.sleep(0.3)
    await cdp.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    await asyncio.sleep(0.2)
    for kind in ("mousePressed", "mouseReleased"):
        await cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


async def click_cell(cdp: CDP, table: int, row: int, col_x: int) -> list[str]:
    """Click a cell of a table (tables are drawn on a canvas, so by position: header row, then rows)."""
    rect = await _rect(cdp, '[data-testid="stDataFrame"]', table)
    if rect is None:
        return [f"no table {table} to click"]
    await click_at(cdp, rect["left"] + col_x, rect["top"] + 35 + 35 * row + 17)
    return []


async def click_map(cdp: CDP, qpos: int, kpos: int) -> list[str]:
    """Click cell (q, k) of the first attention map, found through Plotly's own axes."""
    rect = await _rect(cdp, ".js-plotly-plot", 0)
    if rect is None:
        return ["no attention map to click"]
    js = (
        "(() => { const gd = document.querySelectorAll('.js-plotly-plot')[0], fl = gd._fullLayout, "
        "b = gd.getBoundingClientRect(); return JSON.stringify({x: b.left + fl.xaxis._offset + "
        f"fl.xaxis.l2p({kpos}), y: b.top + fl.yaxis._offset + fl.yaxis.l2p({qpos})}}); }})()"
    )
    r = await cdp.call("Runtime.evaluate", expression=js, returnByValue=True)
    pt = json.loads(r["result"]["value"])
    await click_at(cdp, pt["x"], pt["y"])
    return []


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
            await cdp.call("Runtime.evaluate", expression="window.__fraOld = 1")  # settle waits for the new page
            await cdp.call("Page.navigate", url=f"{base}/?{c.query}")
            st = await cdp.settle(t0=t0)
            load_s = st.get("load_s")
            problems = judge(c, st)
            if c.click_sidebar and not problems:
                js = (
                    f"(() => {{ const l = Array.from(document.querySelectorAll('[data-testid=\"stSidebar\"] label'))"
                    f".find(e => e.innerText.trim() === {json.dumps(c.click_sidebar)}); if (l) "
                    "l.click(); return !!l; })()"
                )
                for _ in range(25):  # the sidebar may still be drawing
                    r = await cdp.call("Runtime.evaluate", expression=js, returnByValue=True)
                    if r["result"].get("value"):
                        break
                    await asyncio.sleep(0.2)
                else:
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
            step_times = []
            for i, (step, texts, parts, absent) in enumerate(c.steps):
                if problems:
                    break
                tabs = _pages(devtools_port)
                t1 = time.time()
                if step[0] == "cell":
                    problems += await click_cell(cdp, *step[1:])
                elif step[0] == "map":
                    problems += await click_map(cdp, *step[1:])
                elif step[0] == "back":
                    await cdp.call("Runtime.evaluate", expression="history.back()")
                await asyncio.sleep(0.3)
                st = await cdp.settle(t0=t1)
                step_times.append(st.get("load_s"))
                where = f"step {i + 1} {step}"
                problems += [f"{where}: {p}" for p in judge(Check(c.name, c.query, texts, parts), st)]
                problems += [f"{where}: the page shows {t!r}" for t in absent if t.lower() in st["main"].lower()]
                if set(_pages(devtools_port)) - set(tabs):
                    problems.append(f"{where}: a new tab opened (links must stay in the tab)")
            results.append(
                dict(
                    name=c.name,
                    url=f"?{c.query}",
                    ok=not problems,
                    problems=problems,
                    load_s=load_s,
                    step_load_s=step_times,
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
    # the journey: Home's first channel (the app's default ranking), its first example
    home = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM channel_stats s WHERE count >= 8 AND NOT self_pair "
        "AND feat_q NOT IN (SELECT feature FROM noise_features n WHERE n.layer = s.layer) "
        "AND feat_k NOT IN (SELECT feature FROM noise_features n WHERE n.layer = s.layer) "
        "ORDER BY abs(sum) DESC, layer, head, feat_q, feat_k LIMIT 1"
    ).fetchone()
    ex = (
        con.execute(
            "SELECT sample, q, k FROM examples WHERE layer = ? AND head = ? AND feat_q = ? AND feat_k = ? "
            "ORDER BY rank LIMIT 1",
            list(home),
        ).fetchone()
        if home
        else None
    )
    # a feature pair stored at some (q, k) whose channel is below min_count
    below = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM rows r ANTI JOIN channels c USING (layer, head, feat_q, feat_k) "
        "ORDER BY abs(value) DESC LIMIT 1"
    ).fetchone()
    layers = [r[0] for r in con.execute("SELECT DISTINCT layer FROM head_totals").fetchall()]
    # for the screenshots: the head that attends most to induction targets, its strongest channel, and
    # that channel's first example
    show = con.execute(
        "SELECT s.layer, s.head, s.feat_q, s.feat_k, e.sample, e.q, e.k FROM channel_stats s "
        "JOIN examples e USING (layer, head, feat_q, feat_k) "
        "JOIN (SELECT layer, head FROM head_summary ORDER BY ind_attn DESC NULLS LAST LIMIT 1) USING (layer, head) "
        "WHERE NOT s.self_pair AND e.rank = 0 ORDER BY abs(s.sum) DESC LIMIT 1"
    ).fetchone()
    return dict(
        layer=layer,
        head=head,
        fq=fq,
        fk=fk,
        sample=sample,
        q=qpos,
        k=k,
        n_feat=n_feat,
        labelled=labelled,
        home=home,
        example=ex,
        below=below,
        missing_layer=max(layers) + 1,
        show=show,
    )


def journeys(f: dict) -> list[Check]:
    """The research path in one tab: Home -> channel -> example -> the channel at its (q, k); a click
    on the attention map; Back; a pair below min_count; a layer the index lacks."""
    out = []
    if f["home"] and f["example"]:
        l, h, fq, fk = f["home"]
        s, qpos, kpos = f["example"]
        k2 = qpos - 1 if qpos - 1 != kpos and qpos >= 1 else qpos
        out.append(
            Check(
                "journey",
                "",
                ["Strongest channels across heads"],
                ["page=Home"],
                steps=[
                    (
                        ("cell", 0, 0, 20),
                        ["Strongest examples"],
                        [f"page=Channel&layer={l}&head={h}&fq={fq}&fk={fk}"],
                        [],
                    ),
                    (
                        ("cell", 0, 0, 20),
                        [f"The channel {fq} → {fk} you came from gives FA", f"attends to key {kpos}"],
                        ["page=Head", f"sample={s}&q={qpos}&k={kpos}&", f"fq={fq}&fk={fk}"],
                        [],
                    ),
                    (("map", qpos, k2), [f"attends to key {k2}"], [f"&q={qpos}&k={k2}&"], []),
                    (("back",), [f"attends to key {kpos}"], [f"&q={qpos}&k={kpos}&"], [f"attends to key {k2} "]),
                    (("back",), ["Strongest examples"], [f"page=Channel&layer={l}&head={h}&fq={fq}&fk={fk}"], []),
                    (("back",), ["Strongest channels across heads"], ["page=Home"], []),
                ],
            )
        )
    if f["below"]:
        l, h, fq, fk = f["below"]
        out.append(
            Check(
                "pair below min_count",
                f"page=Channel&layer={l}&head={h}&fq={fq}&fk={fk}",
                [f"Channel ({fq} → {fk}) of head {l}.{h} is not stored", "min_count"],
                [f"fq={fq}&fk={fk}"],
            )
        )
    ml = f["missing_layer"]
    out.append(
        Check(
            "layer not indexed",
            f"page=Feature+search&layer={ml}&feature=1",
            [f"layer={ml} is not indexed"],
            [f"layer={ml}"],
        )
    )
    return out


def checks_for(index: Path, issue_urls: bool = False) -> list[Check]:
    """Every page, and every bad URL of issue 15 (on the demo index with its exact numbers; on another
    index with that index's first layer and head in their place)."""
    f = index_facts(index)
    L, H = (18, 6) if issue_urls else (f["layer"], f["head"])
    H0 = 0 if issue_urls else f["head"]
    feat = 1372 if issue_urls else (f["show"][2] if f["show"] else f["fq"])
    chan = f"page=Channel&layer={L}&head={H}"
    # the channel page shown (and clicked through): on the demo, the first 'open' link of head 18.6
    cl, ch, cq, ck = (
        (18, 6, 316, 316)
        if issue_urls
        else tuple(f["show"][:4])
        if f["show"]
        else (f["layer"], f["head"], f["fq"], f["fk"])
    )
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
        Check("head", f"page=Head&layer={L}&head={H}", ["Why query"], ["q=", "k=", "sample="]),
        Check(
            "head at an example",
            (
                "page=Head&layer={}&head={}&sample={}&q={}&k={}&fq={}&fk={}".format(
                    *f["show"][:2], *f["show"][4:], *f["show"][2:4]
                )
                if f["show"]
                else f"page=Head&layer={L}&head={H}"
            ),
            ["Why query"],
            ["q=", "k=", "sample="],
            screenshot="head",
        ),
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
        Check("layer=3", f"page=Channel&layer=3&head={H}", ["layer=3 is not indexed"]),
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
        *journeys(f),
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
