"""The Streamlit explorer on a tiny real index, through streamlit.testing.v1.AppTest, and its pure
helpers (URL parameters, readable tokens and labels, Markdown escaping).

The real-browser test of the same pages is tests/test_browser.py."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fra.app.state import pick_int, pick_page
from fra.app.text import BYTE, md_context, md_text, readable_label, readable_tokens

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "fra" / "app" / "main.py")
PAGES = ("Home", "Feature search", "Head", "Channel", "Sample", "CIH")


def make_app(index, monkeypatch, cih: Path, **params) -> AppTest:
    monkeypatch.setenv("FRA_INDEX", str(index))
    monkeypatch.setenv("FRA_CIH_REPORT", str(cih))
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at.run()


@pytest.fixture
def open_app(tiny_index, monkeypatch, tmp_path):
    """open_app(**url_params): the app as loaded from that URL."""
    return lambda index=tiny_index, **params: make_app(index, monkeypatch, tmp_path / "missing.json", **params)


@pytest.fixture
def con(tiny_index):
    from fra.queries import connect

    return connect(tiny_index)


@pytest.fixture(scope="session")
def labelled_index(tiny_index, tmp_path_factory):
    """The tiny index with labels and contexts on three layer-0 features (one a byte token)."""
    import pandas as pd

    out = tmp_path_factory.mktemp("labelled") / "index"
    shutil.copytree(tiny_index, out)
    path = out / "features" / "part-0.parquet"
    df = pd.read_parquet(path)
    df["label"] = None
    df["top_contexts"] = [[] for _ in range(len(df))]
    rows = {
        3: ('"\ufffd" (prev: "\ufffd")', ["影\ufffd[[\ufffd]]\ufffd。"]),
        5: ('" the" / "a"', [" of either side[[ the]] green,", "cost $5 and[[ the]] *rest*"]),
        7: ('"cat"', [" the[[ cat]] sat"]),
    }
    for f, (label, ctx) in rows.items():
        i = df.index[(df["layer"] == 0) & (df["feature"] == f)][0]
        df.at[i, "label"], df.at[i, "top_contexts"] = label, ctx
    df.to_parquet(path, index=False)
    return out


def errors(at):
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


def warnings(at):
    return " ".join(w.value for w in at.warning)


def all_text(at):
    return " ".join(
        [m.value for m in at.markdown]
        + [c.value for c in at.caption]
        + [i.value for i in at.info]
        + [w.value for w in at.warning]
        + [s.value for s in at.subheader]
        + [h.value for h in at.header]
    )


# ------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    "raw, value, problem",
    [
        (None, 7, None),
        ("", 7, None),
        ("3", 3, None),
        ("-1", 7, "fq=-1 is not one of the features of layer 18 (0 to 9)"),
        ("99999999999999999999", 7, "fq=99999999999999999999 is not one of"),
        ("abc", 7, "fq='abc' is not a whole number; features of layer 18: 0 to 9"),
        ("1.5", 7, "is not a whole number"),
    ],
)
def test_pick_int_checks_and_explains(raw, value, problem):
    c = pick_int(raw, "fq", range(10), 7, "features of layer 18")
    assert c.value == value
    assert (c.problem is None) if problem is None else (problem in c.problem and "Showing fq 7" in c.problem)


def test_pick_int_lists_non_contiguous_choices_and_page_names():
    assert "(17, 18)" in pick_int("3", "layer", [17, 18], 17, "layers of this index").problem
    assert pick_page("Feature+search", PAGES, "Home").value == "Feature search"
    bogus = pick_page("Bogus", PAGES, "Home")
    assert bogus.value == "Home" and "Home, Feature search, Head, Channel, Sample, CIH" in bogus.problem


def test_byte_tokens_are_aligned_with_the_text():
    # 響 is three UTF-8 bytes, split over three tokens that each decode to U+FFFD
    toks = ["<s>", " the", " \ufffd", "\ufffd", "\ufffd", " end\n"]
    assert readable_tokens(toks, "the 響 end\n") == ["<s>", " the", " 響[1/3]", " 響[2/3]", " 響[3/3]", " end⏎"]
    # no text to align with: the token is still named, never shown as a bare U+FFFD
    assert readable_tokens([" \ufffd"], None) == [" " + BYTE]


def test_byte_labels_show_their_neighbours():
    lab = readable_label('"\ufffd" (prev: "\ufffd")', ["影\ufffd[[\ufffd]]\ufffd。"])
    assert "\ufffd" not in lab and lab == f'"{BYTE}" (prev: "{BYTE}") in 影{BYTE}。'
    assert readable_label('" the"', None) == '" the"' and readable_label(None) == ""


def test_contexts_bold_the_token_without_literal_stars():
    # Markdown does not bold "** the**", so the leading space stays outside the <b>
    assert md_context("side[[ the]] green") == "side <b>the</b> green"
    escaped = md_context("cost $5 and[[ *x*]] _y_")
    assert "$" not in escaped and "*" not in escaped and "_" not in escaped and "<b>&#42;x&#42;</b>" in escaped
    assert md_text("a\nb") == "a⏎b"


# ------------------------------------------------------------------------------ pages


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_from_its_url(open_app, page):
    at = open_app(page=page)
    assert not errors(at) and not at.warning
    assert at.sidebar.radio(key="page").value == page
    assert at.header[0].value.split(":")[0] == page
    assert at.query_params["page"] == page


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(page="Feature search", layer=0, feature=5),
        dict(page="Feature search", layer=0, feature="the"),
        dict(page="Head"),
        dict(page="Channel"),
        dict(page="Sample"),
        dict(page="CIH"),
    ],
)
def test_every_table_has_help_on_every_column(labelled_index, monkeypatch, tmp_path, params):
    from tests.test_cih_page import write_cih_json

    write_cih_json(tmp_path / "cih.json", layers=(0, 17))
    at = make_app(labelled_index, monkeypatch, tmp_path / "cih.json", **params)
    assert at.dataframe, "no table to check"
    for df in at.dataframe:
        cfg = json.loads(df.proto.columns or "{}")
        missing = [c for c in df.value.columns if not cfg.get(c, {}).get("help")]
        assert not missing, f"{params}: no help for {missing}"


def test_home_lists_the_strongest_channels_with_links(open_app, con):
    at = open_app()
    top = at.dataframe[0].value
    want = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM top_channels(NULL, NULL, 8, true, 5) "
        "ORDER BY abs(mean) DESC, layer, head LIMIT 1"
    ).fetchone()
    l, h, fq, fk = want
    assert top["open"].iloc[0] == f"?page=Channel&layer={l}&head={h}&fq={fq}&fk={fk}"
    assert top["feat_q"].iloc[0] == f"?page=Feature+search&layer={l}&feature={fq}"  # ids are links to features
    assert {"label_q", "label_k"} <= set(top.columns)
    assert len(at.get("download_button")) >= 2


@pytest.mark.parametrize(
    "params, bad, message",
    [
        (
            dict(page="Channel", layer=1, head=0, fq=-1, fk=2),
            "fq",
            "fq=-1 is not one of the features of layer 1 (0 to 23)",
        ),
        (dict(page="Channel", layer=1, head=0, fq=2, fk=-3), "fk", "fk=-3 is not one of the features"),
        (
            dict(page="Channel", layer=1, head=0, fq="99999999999999999999", fk=1),
            "fq",
            "fq=99999999999999999999 is not one of",
        ),
        (dict(page="Channel", layer=1, head=0, fq="abc", fk=1), "fq", "fq='abc' is not a whole number"),
        (
            dict(page="Channel", layer=3, head=0),
            "layer",
            "layer=3 is not one of the layers of this index (0, 1). Showing layer 0.",
        ),
        (
            dict(page="Head", layer=1, head=42),
            "head",
            "head=42 is not one of the heads of layer 1 (0 to 3). Showing head 0.",
        ),
        (
            dict(page="Head", layer=1, head=0, sample=999),
            "sample",
            "sample=999 is not one of the samples of this index (0 to 4)",
        ),
        (
            dict(page="Sample", layer=1, head=0, sample=1, q=500),
            "q",
            "q=500 is not one of the positions of sample 1 (0 to 12)",
        ),
        (dict(page="Bogus"), "page", "page='Bogus' is not a page of the explorer (pages: Home, Feature search"),
        (dict(page="Head", scale="rainbow"), "scale", "scale='rainbow' is not one of log, clipped, linear"),
    ],
)
def test_bad_url_values_are_explained_and_replaced(open_app, params, bad, message):
    at = open_app(**params)
    assert not errors(at)
    assert message in warnings(at)
    assert at.query_params[bad] != str(params[bad])  # the address now holds the value shown
    replaced = {"fq", "fk"} if bad in ("fq", "fk") else {bad}  # a bad feature id replaces the whole channel
    assert all(at.query_params[k] == str(v) for k, v in params.items() if k not in replaced)


def test_a_bad_feature_id_opens_the_heads_top_channel_not_half_of_it(open_app, con):
    fq, fk = con.execute("SELECT feat_q, feat_k FROM top_channels(1, 0, 8, true, 1)").fetchone()
    at = open_app(page="Channel", layer=1, head=0, fq=-1, fk=2)
    assert (at.number_input(key="chan_fq").value, at.number_input(key="chan_fk").value) == (fq, fk)
    assert (at.query_params["fq"], at.query_params["fk"]) == (str(fq), str(fk))


def test_url_sets_the_widgets_and_the_widgets_set_the_url(open_app, con):
    l, h, fq, fk = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM channels ORDER BY count DESC LIMIT 1"
    ).fetchone()
    at = open_app(page="Channel", layer=l, head=h, fq=fq, fk=fk)
    assert not errors(at) and not at.warning
    assert (at.selectbox(key="chan_layer").value, at.selectbox(key="chan_head").value) == (l, h)
    assert (at.number_input(key="chan_fq").value, at.number_input(key="chan_fk").value) == (fq, fk)
    at.selectbox(key="chan_head").set_value((h + 1) % 4).run()
    at.number_input(key="chan_fq").set_value((fq + 1) % 24).run()
    assert at.query_params["head"] == str((h + 1) % 4) and at.query_params["fq"] == str((fq + 1) % 24)
    # switching pages keeps the layer and head, and the address follows
    at.sidebar.radio(key="page").set_value("Head").run()
    assert at.query_params["page"] == "Head" and at.query_params["head"] == str((h + 1) % 4)
    assert "fq" not in at.query_params and {"sample", "q", "k"} <= set(at.query_params)


def test_default_channel_is_the_heads_top_channel(open_app, con):
    fq, fk = con.execute("SELECT feat_q, feat_k FROM top_channels(0, 2, 8, true, 1)").fetchone()
    at = open_app(page="Channel", layer=0, head=2)
    assert (at.number_input(key="chan_fq").value, at.number_input(key="chan_fk").value) == (fq, fk)


def test_channel_examples_link_to_the_attention_of_their_sample(open_app, con):
    l, h, fq, fk, smp, q, k = con.execute(
        "SELECT layer, head, feat_q, feat_k, sample, q, k FROM examples WHERE rank = 0 ORDER BY abs(value) DESC LIMIT 1"
    ).fetchone()
    at = open_app(page="Channel", layer=l, head=h, fq=fq, fk=fk)
    ex = at.dataframe[0].value
    assert ex["open"].iloc[0] == f"?page=Head&layer={l}&head={h}&sample={smp}&q={q}&k={k}"


def test_every_stored_channel_has_examples(con):
    missing = con.execute(
        "SELECT count(*) FROM channels c ANTI JOIN examples e USING (layer, head, feat_q, feat_k)"
    ).fetchone()[0]
    assert missing == 0


def test_channel_without_examples_says_so(open_app, con, tiny_index, tmp_path):
    """An index whose examples of a head are missing (a partial copy) gets a message, not a blank."""
    l, h, fq, fk = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM channels ORDER BY count DESC LIMIT 1"
    ).fetchone()
    partial = tmp_path / "partial"
    shutil.copytree(tiny_index, partial)
    shutil.rmtree(partial / "examples" / f"layer={l}" / f"head={h}")
    at = open_app(index=partial, page="Channel", layer=l, head=h, fq=fq, fk=fk)
    assert not errors(at) and any("mean" in m.label for m in at.metric)
    assert any("no stored examples of this channel" in i.value for i in at.info)


def test_channel_not_in_the_index_names_the_top_channel(open_app, con):
    stored = {tuple(r) for r in con.execute("SELECT feat_q, feat_k FROM channels WHERE layer=0 AND head=1").fetchall()}
    fq, fk = next((a, b) for a in range(24) for b in range(24) if (a, b) not in stored)
    at = open_app(page="Channel", layer=0, head=1, fq=fq, fk=fk)
    assert f"Channel ({fq} → {fk}) of head 0.1 is not in the index" in warnings(at)
    assert "The head's top channel is" in warnings(at)


def test_head_page_explains_a_score_with_its_feature_pairs(open_app, con):
    l, h, s, qpos, kpos = con.execute(
        "SELECT layer, head, sample, q, k FROM rows GROUP BY ALL ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    kept, score = con.execute(
        "SELECT sum(r.value), any_value(p.score) FROM rows r JOIN pairs p USING "
        "(layer, head, sample, q, k) WHERE layer=? AND head=? AND sample=? AND q=? AND k=?",
        [l, h, s, qpos, kpos],
    ).fetchone()
    at = open_app(page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos)
    assert not errors(at) and not at.warning
    assert at.subheader[0].value.startswith(f"Why query {qpos} ")
    assert f"sum to {kept:.3f}: {kept / score:.1%} of the score" in all_text(at)
    pairs = at.dataframe[0].value
    assert pairs["value"].sum() == pytest.approx(kept, rel=1e-5)
    assert (pairs["open"].str.startswith(f"?page=Channel&layer={l}&head={h}&fq=")).all()
    assert at.query_params["q"] == str(qpos) and at.query_params["k"] == str(kpos)


def test_head_map_marks_induction_targets_and_the_selected_cell(open_app, con):
    l, h, s, qpos, kpos = con.execute("SELECT layer, head, sample, q, k FROM pairs WHERE induction LIMIT 1").fetchone()
    at = open_app(page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos, scale="clipped", w=16)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    traces = {t.get("name"): t for t in fig["data"]}
    assert traces["selected (q, k)"]["x"] == [kpos] and traces["selected (q, k)"]["y"] == [qpos]
    ind = set(zip(traces["induction target"]["y"], traces["induction target"]["x"]))
    assert (qpos, kpos) in ind
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and heat["zmax"] is not None  # clipped colour range


def test_feature_search_by_label_and_token_text(open_app, labelled_index):
    at = open_app(labelled_index, page="Feature search", layer=0, feature="cat")
    hits = at.dataframe[0].value
    assert hits["feature"].tolist() == ["?page=Feature+search&layer=0&feature=7"]
    at = open_app(labelled_index, page="Feature search", layer=0, feature="the")  # a token of feature 5's contexts
    assert "?page=Feature+search&layer=0&feature=5" in at.dataframe[0].value["feature"].tolist()
    assert "is not a feature ID" in all_text(at)


def test_feature_page_shows_readable_labels_and_contexts(open_app, labelled_index):
    at = open_app(labelled_index, page="Feature search", layer=0, feature=3)
    assert "\ufffd" not in at.subheader[0].value and f"in 影{BYTE}。" in at.subheader[0].value
    at = open_app(labelled_index, page="Feature search", layer=0, feature=5)
    ctx = next(m.value for m in at.markdown if "either side" in m.value)
    assert "**" not in ctx and "side <b>the</b> green" in ctx and "$" not in ctx


@pytest.mark.parametrize("bad", ["999999", "-3"])
def test_bad_feature_id_is_a_friendly_message(open_app, bad):
    at = open_app(page="Feature search", feature=bad)
    assert not errors(at)
    assert "does not exist in layer 0: this SAE has features 0 to 23" in warnings(at)


@pytest.mark.parametrize("evil", ["1; DROP TABLE rows; --", "1 OR 1=1", "'); DELETE FROM channels; --"])
def test_sql_injection_strings_do_no_harm(open_app, tiny_index, con, monkeypatch, evil):
    """Typed text reaches the index only as a bound parameter of a fixed named query: every SQL
    statement the page runs is one of queries/named.sql, and the app never calls execute itself."""
    import fra.app.ui as ui
    from fra.queries import connect
    from fra.queries.lib import QUERIES

    executed = []
    real = ui.run
    monkeypatch.setattr(
        ui, "run", lambda c, name, params: executed.append((name, list(params))) or real(c, name, params)
    )
    import streamlit as st

    st.cache_data.clear()  # so the queries of this page really run
    before = con.execute("SELECT count(*) FROM channels").fetchone()[0]
    at = open_app(page="Feature search", feature=evil)
    assert not errors(at)
    assert "is not a feature ID" in warnings(at) + all_text(at)
    assert executed and all(name in QUERIES for name, _ in executed)
    assert not any(evil in QUERIES[name] for name, _ in executed)
    for path in (ROOT / "fra" / "app").glob("*.py"):
        calls = [
            n.func.attr
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        ]
        assert "execute" not in calls and "sql" not in calls, path
    assert connect(tiny_index).execute("SELECT count(*) FROM channels").fetchone()[0] == before


def test_app_never_imports_torch_and_uses_no_deprecated_arguments():
    for path in (ROOT / "fra" / "app").glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] in ("torch", "transformer_lens", "sae_lens") for m in mods), path
        assert "use_container_width" not in path.read_text(), path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def test_killing_fra_app_stops_the_server(tiny_index, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fra.cli", "app", "--index", str(tiny_index), "--port", str(port)],
        stdout=(tmp_path / "log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        t0 = time.time()
        while not _healthy(port):
            assert proc.poll() is None and time.time() - t0 < 60, (tmp_path / "log").read_text()
            time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)  # what a user's Ctrl-C / kill does to `fra app`
        proc.wait(20)
        t0 = time.time()
        while _healthy(port) and time.time() - t0 < 5:
            time.sleep(0.2)
        assert not _healthy(port), "the streamlit server outlived `fra app`"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only our own process group, whatever happened
        except ProcessLookupError:
            pass


def test_typing_a_feature_and_changing_the_head_map_update_the_address(open_app):
    at = open_app(page="Feature search")
    at.text_input(key="feature_id").set_value("5").run()
    at.selectbox(key="feature_layer").set_value(1).run()
    assert (at.query_params["feature"], at.query_params["layer"]) == ("5", "1")
    assert at.subheader[0].value.startswith("Feature 5 (layer 1)")
    at = open_app(page="Head", layer=0, head=1)
    at.radio(key="head_scale").set_value("clipped").run()
    at.selectbox(key="head_w").set_value(16).run()
    assert (at.query_params["scale"], at.query_params["w"]) == ("clipped", "16")
