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
from fra.ingest.index.store import reseal

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
    reseal(out)  # the manifest records every file; this edit is on purpose
    return out


def add_explain_tables(index: Path, top_n: int = 8) -> None:
    """Writes `example_terms` and `activations` into an index, with exactly the columns of the
    explain contract, from what the index already holds (a fixture until ingest writes them):

    - example_terms: at every (layer, head, sample, q, k) of `examples`, the candidate pairs are the
      exact FA values the index stores there (examples and rows); the `top_n` of largest |value|
      are the 'pair' rows, and ff_rest = pairs.ff - their sum, b_dec = f_bdec + bdec_f,
      error = f_err + err_f + resid_resid, bias, score from `pairs`, so the point sums to its score.
    - activations: every (sample, position, feature) at which a stored FA shows the feature active,
      with a made-up positive activation (a deterministic function of the ids)."""
    from fra.queries import connect

    con = connect(index)
    out = str(index).replace("'", "''")
    con.execute(f"""
        COPY (
          WITH pts AS (SELECT DISTINCT layer, head, sample, q, k FROM examples),
          cand AS (
            SELECT layer, head, sample, q, k, feat_q, feat_k, value FROM examples
            UNION ALL
            SELECT r.layer, r.head, r.sample, r.q, r.k, r.feat_q, r.feat_k, r.value FROM rows r
            SEMI JOIN pts USING (layer, head, sample, q, k)
          ), uniq AS (
            SELECT layer, head, sample, q, k, feat_q, feat_k, any_value(value) AS value FROM cand GROUP BY ALL
          ), ranked AS (
            SELECT *, row_number() OVER (PARTITION BY layer, head, sample, q, k
                                         ORDER BY abs(value) DESC, feat_q, feat_k) - 1 AS rank FROM uniq
          ), top AS (SELECT * FROM ranked WHERE rank < {int(top_n)}),
          tsum AS (SELECT layer, head, sample, q, k, sum(value::DOUBLE) AS s FROM top GROUP BY ALL),
          groups AS (
            SELECT p.layer, p.head, p.sample, p.q, p.k,
                   unnest(['ff_rest', 'b_dec', 'error', 'bias', 'score']) AS kind,
                   unnest([p.ff - t.s, p.f_bdec + p.bdec_f, p.f_err + p.err_f + p.resid_resid, p.bias, p.score])
                     AS value
            FROM pairs p JOIN tsum t USING (layer, head, sample, q, k)
          )
          SELECT sample::INTEGER AS sample, q::SMALLINT AS q, k::SMALLINT AS k, rank::SMALLINT AS rank,
                 'pair' AS kind, feat_q::INTEGER AS feat_q, feat_k::INTEGER AS feat_k, value::FLOAT AS value,
                 layer, head
          FROM top
          UNION ALL
          SELECT sample::INTEGER, q::SMALLINT, k::SMALLINT, -1::SMALLINT, kind, -1::INTEGER, -1::INTEGER,
                 value::FLOAT, layer, head
          FROM groups
        ) TO '{out}/example_terms' (FORMAT parquet, PARTITION_BY (layer, head), OVERWRITE_OR_IGNORE)""")
    con.execute(f"""
        COPY (
          WITH pos AS (
            SELECT layer, sample, q AS pos, feat_q AS feat FROM rows
            UNION SELECT layer, sample, k, feat_k FROM rows
            UNION SELECT layer, sample, q, feat_q FROM examples
            UNION SELECT layer, sample, k, feat_k FROM examples
          )
          SELECT sample::INTEGER AS sample, pos::SMALLINT AS pos, feat::INTEGER AS feat,
                 (0.5 + ((feat * 31 + pos * 17 + sample * 7) % 97) / 20.0)::FLOAT AS act, layer
          FROM pos
        ) TO '{out}/activations' (FORMAT parquet, PARTITION_BY (layer), OVERWRITE_OR_IGNORE)""")
    from fra.ingest.index import store

    if hasattr(store, "reseal"):  # an index that records its files: these two tables are added on purpose
        store.reseal(index)


@pytest.fixture
def xcon(explained_index):
    from fra.queries import connect
    from fra.queries.lib import attach_optional

    con = connect(explained_index)
    attach_optional(con, explained_index)
    return con


def targets(at, key):
    """Where a click on each cell of table `key` goes: {(row, column): URL parameters}."""
    return at.session_state[f"_targets_{key}"]


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
    # default ranking: |summed FA|, count >= 8, no self pairs, no BOS / punctuation features
    want = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM channels c WHERE count >= 8 AND feat_q <> feat_k "
        "AND feat_q NOT IN (SELECT feature FROM features f WHERE f.layer = c.layer AND punct_or_bos) "
        "AND feat_k NOT IN (SELECT feature FROM features f WHERE f.layer = c.layer AND punct_or_bos) "
        "ORDER BY abs(sum) DESC LIMIT 1"
    ).fetchone()
    l, h, fq, fk = want
    assert (top["layer"].iloc[0], top["head"].iloc[0], top["feat_q"].iloc[0], top["feat_k"].iloc[0]) == want
    t = targets(at, "strongest_channels")
    channel = {"page": "Channel", "layer": str(l), "head": str(h), "fq": str(fq), "fk": str(fk)}
    assert t[(0, "open")] == t[(0, "count")] == channel  # any cell of the row opens the channel ...
    assert t[(0, "feat_q")] == {
        "page": "Feature search",
        "layer": str(l),
        "feature": str(fq),
    }  # ... a feature id its page
    assert {"label_q", "label_k"} <= set(top.columns) and top["open"].iloc[0] == "open ▸"
    assert len(at.get("download_button")) >= 2


def test_home_ranks_by_total_share_or_mean_and_can_keep_self_pairs(open_app, con):
    at = open_app(rank="mean", noself=0)
    top = at.dataframe[0].value
    best = con.execute("SELECT max(abs(mean)) FROM top_channels(NULL, NULL, 8, true, 1000)").fetchone()[0]
    assert abs(top["mean"]).max() == pytest.approx(best) and abs(top["mean"].iloc[0]) == pytest.approx(best)
    assert at.query_params["rank"] == "mean" and at.query_params["noself"] == "0"
    at = open_app(rank="share")
    shares = at.dataframe[0].value["share_of_head"].abs().tolist()
    assert shares == sorted(shares, reverse=True)
    top = at.dataframe[0].value
    assert (top["feat_q"] != top["feat_k"]).all()  # self pairs dropped by default


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


@pytest.mark.parametrize("page", ["Channel", "Head", "Sample", "Feature search"])
def test_a_layer_the_index_lacks_is_refused_never_replaced(open_app, page):
    at = open_app(page=page, layer=3, head=0, feature=1)
    assert not errors(at)
    assert "layer=3 is not indexed: this index has layers 0, 1. Nothing is shown in its place" in warnings(at)
    assert not at.subheader and not at.dataframe and not at.get("plotly_chart")  # no other layer's page
    assert at.query_params["layer"] == "3"  # the address keeps what was asked
    assert [b.label for b in at.button] == ["layer 0", "layer 1"]
    at.button[1].click().run()  # a link to an indexed layer, in the same session
    assert at.query_params["layer"] == "1" and not at.warning


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
    assert {"sample", "q", "k"} <= set(at.query_params)
    # the channel the user was on follows to the Head page, shown at the selected (q, k)
    assert (at.query_params["fq"], at.query_params["fk"]) == (str((fq + 1) % 24), str(fk))


def test_default_channel_is_the_heads_top_channel(open_app, con):
    fq, fk = con.execute("SELECT feat_q, feat_k FROM top_channels(0, 2, 8, true, 1)").fetchone()
    at = open_app(page="Channel", layer=0, head=2)
    assert (at.number_input(key="chan_fq").value, at.number_input(key="chan_fk").value) == (fq, fk)


def test_channel_examples_link_to_the_attention_of_their_sample(open_app, con):
    l, h, fq, fk, smp, q, k = con.execute(
        "SELECT layer, head, feat_q, feat_k, sample, q, k FROM examples WHERE rank = 0 ORDER BY abs(value) DESC LIMIT 1"
    ).fetchone()
    at = open_app(page="Channel", layer=l, head=h, fq=fq, fk=fk)
    t = targets(at, f"examples_{l}_{h}_{fq}_{fk}")
    want = dict(page="Head", layer=l, head=h, sample=smp, q=q, k=k, fq=fq, fk=fk)
    assert t[(0, "open")] == t[(0, "value")] == {a: str(b) for a, b in want.items()}


def test_every_stored_channel_has_examples(con):
    missing = con.execute(
        "SELECT count(*) FROM channels c ANTI JOIN examples e USING (layer, head, feat_q, feat_k)"
    ).fetchone()[0]
    assert missing == 0


def test_channel_without_examples_says_so(open_app, con, tiny_index, tmp_path):
    """An index whose examples of a head are missing (a partial copy) is refused on open, with
    the missing partition named (fra.ingest.index.store.open_index), not shown blank."""
    l, h, fq, fk = con.execute(
        "SELECT layer, head, feat_q, feat_k FROM channels ORDER BY count DESC LIMIT 1"
    ).fetchone()
    partial = tmp_path / "partial"
    shutil.copytree(tiny_index, partial)
    shutil.rmtree(partial / "examples" / f"layer={l}" / f"head={h}")
    at = open_app(index=partial, page="Channel", layer=l, head=h, fq=fq, fk=fk)
    assert any(f"lacks the partition {partial}/examples/layer={l}/head={h}" in e for e in errors(at)), errors(at)


def test_channel_not_in_the_index_names_the_top_channel(open_app, con):
    stored = {tuple(r) for r in con.execute("SELECT feat_q, feat_k FROM channels WHERE layer=0 AND head=1").fetchall()}
    fq, fk = next((a, b) for a in range(24) for b in range(24) if (a, b) not in stored)
    at = open_app(page="Channel", layer=0, head=1, fq=fq, fk=fk)
    # the tiny index has no activations table: it cannot count the pair, and says so
    assert f"Channel ({fq} → {fk}) of head 0.1 is not stored: it was seen fewer than the index's min_count (1)" in (
        warnings(at)
    )
    assert "no `activations` table to count it" in warnings(at) and "The head's top channel is" in warnings(at)


def test_a_pair_below_min_count_says_so_with_its_count(open_app, explained_index, xcon):
    """A feature pair stored at some (q, k) whose channel is below min_count: the page gives its
    count (causal pairs where both fire, from the activations) and the index's min_count."""
    import pandas as pd

    acts = pd.read_parquet(explained_index / "activations")
    acts["layer"] = acts["layer"].astype(int)

    def counts(l, fq, fk):
        a = acts[(acts["layer"] == l) & (acts["feat"] == fq)]
        b = acts[(acts["layer"] == l) & (acts["feat"] == fk)]
        both = a.merge(b, on="sample")  # _x: the query side, _y: the key side
        return int((both["pos_y"] <= both["pos_x"]).sum()), len(both)

    below = xcon.execute(
        "SELECT DISTINCT layer, head, feat_q, feat_k FROM rows ANTI JOIN channels USING (layer, head, feat_q, feat_k) "
        "ORDER BY ALL"
    ).fetchall()
    # one whose features also fire in the wrong order (key after query), so that the count must be causal
    l, h, fq, fk = next(r for r in below if counts(r[0], r[2], r[3])[0] != counts(r[0], r[2], r[3])[1])
    n = counts(l, fq, fk)[0]
    assert 1 <= n < 4
    at = open_app(explained_index, page="Channel", layer=l, head=h, fq=fq, fk=fk)
    assert (
        f"Channel ({fq} → {fk}) of head {l}.{h} is not stored: its features are active together at {n} causal "
        "(q, k) pairs of the indexed samples, fewer than the index's min_count of 4"
    ) in warnings(at)
    assert "never active together" not in warnings(at)


def _pairs_table(at):
    return next(d.value for d in at.dataframe if "channel_count" in d.value.columns)


def _waterfall(at) -> dict:
    return next(t for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"] if t["type"] == "waterfall")


def test_an_older_index_explains_a_score_with_its_kept_rows_and_says_what_it_lacks(open_app, con):
    l, h, s, qpos, kpos = con.execute(
        "SELECT layer, head, sample, q, k FROM rows GROUP BY ALL ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    kept, score, ff = con.execute(
        "SELECT sum(r.value), any_value(p.score), any_value(p.ff) FROM rows r JOIN pairs p USING "
        "(layer, head, sample, q, k) WHERE layer=? AND head=? AND sample=? AND q=? AND k=?",
        [l, h, s, qpos, kpos],
    ).fetchone()
    at = open_app(page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos)
    assert not errors(at) and not at.warning
    assert any(h.value.startswith(f"Why query {qpos} ") for h in at.subheader)
    assert "This index has no `example_terms` table (`fra explain --index PATH` adds it)" in all_text(at)
    assert "spread over smaller terms" not in all_text(at)
    pairs = _pairs_table(at)
    assert pairs["value"].sum() == pytest.approx(kept, rel=1e-5)
    # the split of the score: absolute terms that add up to it (the last bar is the score itself)
    w = _waterfall(at)
    assert w["y"][-1] == pytest.approx(score, abs=1e-6) and w["measure"][-1] == "total"
    assert sum(w["y"][:-1]) == pytest.approx(score, abs=1e-4) and w["y"][0] == pytest.approx(ff, abs=1e-6)
    assert at.query_params["q"] == str(qpos) and at.query_params["k"] == str(kpos)


def test_an_example_shows_the_channel_it_came_from_with_its_fa_and_rank(open_app, explained_index, xcon):
    """Channel -> example: at the example's (q, k) the page shows the channel's own FA and rank among
    the strongest pairs there, and the waterfall of the exact terms that sum to the score."""
    l, h, fq, fk, s, qpos, kpos, value, rank = xcon.execute(
        "SELECT e.layer, e.head, e.feat_q, e.feat_k, e.sample, e.q, e.k, t.value, t.rank FROM examples e "
        "JOIN example_terms t USING (layer, head, sample, q, k, feat_q, feat_k) WHERE t.kind = 'pair' AND t.rank = 1 "
        "ORDER BY abs(e.value) DESC LIMIT 1"
    ).fetchone()
    score, n_pairs = xcon.execute(
        "SELECT sum(value) FILTER (kind = 'score'), count(*) FILTER (kind = 'pair') FROM example_terms "
        "WHERE layer=? AND head=? AND sample=? AND q=? AND k=?",
        [l, h, s, qpos, kpos],
    ).fetchone()
    at = open_app(explained_index, page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos, fq=fq, fk=fk)
    assert not errors(at)
    msg = at.success[0].value
    assert f"The channel {fq} → {fk} you came from gives FA = {value:+.4f} here: rank 2 of the {n_pairs}" in msg
    w = _waterfall(at)
    assert w["y"][-1] == pytest.approx(score, abs=1e-6) and sum(w["y"][:-1]) == pytest.approx(score, abs=1e-4)
    assert w["x"][rank] == f"{fq}→{fk}" and w["y"][rank] == pytest.approx(value)
    assert at.query_params["fq"] == str(fq) and at.query_params["fk"] == str(fk)


def test_an_example_outside_the_stored_top_pairs_gives_its_fa_truthfully(open_app, explained_index, xcon):
    l, h, fq, fk, s, qpos, kpos, value = xcon.execute(
        "SELECT e.layer, e.head, e.feat_q, e.feat_k, e.sample, e.q, e.k, e.value FROM examples e "
        "ANTI JOIN (SELECT * FROM example_terms WHERE kind = 'pair') t "
        "USING (layer, head, sample, q, k, feat_q, feat_k) LIMIT 1"
    ).fetchone()
    smallest = xcon.execute(
        "SELECT min(abs(value)) FROM example_terms WHERE kind = 'pair' AND layer=? AND head=? AND sample=? AND q=? "
        "AND k=?",
        [l, h, s, qpos, kpos],
    ).fetchone()[0]
    assert abs(value) <= smallest + 1e-6  # the fixture keeps the largest; the page must not claim otherwise
    at = open_app(explained_index, page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos, fq=fq, fk=fk)
    assert f"The channel {fq} → {fk} you came from gives FA = {value:+.4f} here; it is not among the 3 strongest" in (
        all_text(at)
    )


def test_a_score_that_is_no_example_says_exactly_what_the_index_stores(open_app, explained_index, xcon):
    l, h, s, qpos, kpos = xcon.execute(
        "SELECT layer, head, sample, q, k FROM pairs ANTI JOIN examples USING (layer, head, sample, q, k) "
        "ANTI JOIN rows USING (layer, head, sample, q, k) WHERE q > 3 LIMIT 1"
    ).fetchone()
    at = open_app(explained_index, page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos)
    assert "This (q, k) is not a stored example of any channel, so the index stores its feature pairs only if k " in (
        all_text(at)
    )
    assert "it stores none for this (q, k)" in all_text(at)


def test_pairs_below_min_count_have_no_link_but_say_why(open_app, explained_index, xcon):
    l, h, s, qpos, kpos, fq, fk = xcon.execute(
        "SELECT layer, head, sample, q, k, feat_q, feat_k FROM example_terms t WHERE kind = 'pair' "
        "AND NOT EXISTS (SELECT 1 FROM channels c WHERE c.layer = t.layer AND c.head = t.head AND c.feat_q = t.feat_q "
        "AND c.feat_k = t.feat_k) LIMIT 1"
    ).fetchone()
    at = open_app(explained_index, page="Head", layer=l, head=h, sample=s, q=qpos, k=kpos)
    key = f"pairs_{l}_{h}_{s}_{qpos}_{kpos}"
    table = _pairs_table(at)
    row = table.index[(table["feat_q"] == fq) & (table["feat_k"] == fk)][0]
    assert table.at[row, "open"] == "not stored (count < 4)" and table["channel_count"].isna()[row]
    t = targets(at, key)
    assert (row, "open") not in t and (row, "value") not in t  # no link to a page that does not exist
    assert t[(row, "feat_q")]["page"] == "Feature search"


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
    # every causal cell of the window can be clicked (an invisible marker carrying its q and k)
    cells = {tuple(c[:2]) for c in traces["cells"]["customdata"]}
    assert (qpos, kpos) in cells and all(k <= q for q, k in cells)


def test_feature_search_by_label_and_token_text(open_app, labelled_index):
    at = open_app(labelled_index, page="Feature search", layer=0, feature="cat")
    hits = at.dataframe[0].value
    assert hits["feature"].tolist() == [7]
    assert targets(at, "search_0")[(0, "feature")] == {"page": "Feature search", "layer": "0", "feature": "7"}
    at = open_app(labelled_index, page="Feature search", layer=0, feature="the")  # a token of feature 5's contexts
    assert 5 in at.dataframe[0].value["feature"].tolist()
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


class _Recorder:
    """A DuckDB connection whose cursors record every statement they execute, with its parameters."""

    def __init__(self, con, log):
        self.con, self.log = con, log

    def cursor(self):
        return _Recorder(self.con.cursor(), self.log)

    def execute(self, sql, params=None):
        self.log.append((sql, list(params or [])))
        self.con.execute(sql, params)
        return self

    def df(self):
        return self.con.df()


@pytest.mark.parametrize("evil", ["1; DROP TABLE rows; --", "1 OR 1=1", "'); DELETE FROM channels; --"])
@pytest.mark.parametrize("page", ["Feature search", "Head", "Channel"])
def test_sql_injection_strings_do_no_harm(open_app, tiny_index, con, monkeypatch, evil, page):
    """Text from the URL reaches the index only as a bound parameter of a fixed named query: every
    statement the page executes is, character for character, one of queries/named.sql, none holds
    the typed text, and the app never calls execute itself."""
    import streamlit as st

    import fra.app.ui as ui
    from fra.queries import connect
    from fra.queries.lib import QUERIES

    executed = []
    real = ui.connection
    monkeypatch.setattr(ui, "connection", lambda path: _Recorder(real(path), executed))
    st.cache_data.clear()  # so the queries of this page really run
    before = con.execute("SELECT count(*) FROM channels").fetchone()[0]
    at = open_app(page=page, feature=evil, layer=0, head=evil, sample=evil, q=evil, fq=evil, fk=evil, rank=evil)
    assert not errors(at)
    assert executed, "the page ran no statement through the connection"
    named = set(QUERIES.values())
    assert all(sql in named for sql, _ in executed), [sql for sql, _ in executed if sql not in named][:1]
    assert not any(evil in sql or any(evil == p for p in params) for sql, params in executed)
    for path in (ROOT / "fra" / "app").glob("*.py"):
        calls = [
            n.func.attr
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        ]
        assert "execute" not in calls and "sql" not in calls, path
    assert connect(tiny_index).execute("SELECT count(*) FROM channels").fetchone()[0] == before


def test_a_bug_in_a_query_is_not_dressed_up_as_an_old_index(open_app, monkeypatch):
    """Only the errors that mean "the index lacks this" become the rebuild message; a broken query
    (a bug) surfaces as one."""
    import streamlit as st

    from fra.queries import lib

    monkeypatch.setitem(lib.QUERIES, "head_summary", "SELEC broken")
    st.cache_data.clear()
    at = open_app()
    assert at.exception and "Parser Error" in at.exception[0].value
    assert not any("another version" in e.value for e in at.error)


def test_an_index_that_lacks_a_column_gets_a_message_not_a_traceback(open_app, tiny_index, tmp_path, con):
    import pyarrow.parquet as pq
    import streamlit as st

    from fra.ingest.index.store import reseal

    def without(table, column):
        out = tmp_path / f"{table}_{column}"
        shutil.copytree(tiny_index, out)
        for f in (out / table).rglob("*.parquet"):
            pq.write_table(pq.read_table(f).drop([column]), f)
        reseal(out)  # an edit on purpose: the manifest vouches for the files as they are now
        return out

    st.cache_data.clear()
    at = open_app(index=without("pairs", "kept_abs"))  # the views need it: the index cannot be opened
    assert not at.exception and "Cannot open the index" in at.error[0].value and "kept_abs" in at.error[0].value
    l, h, fq, fk = con.execute("SELECT layer, head, feat_q, feat_k FROM channels LIMIT 1").fetchone()
    at = open_app(index=without("examples", "rank"), page="Channel", layer=l, head=h, fq=fq, fk=fk)
    msg = " ".join(e.value for e in at.error)
    assert not at.exception
    assert "This page needs something the index does not have: query `channel_examples` failed" in msg
    assert "rebuild it with `fra ingest`" in msg


def test_cell_targets_send_feature_ids_to_features_and_other_cells_to_the_row():
    import pandas as pd

    from fra.app.ui import cell_targets

    df = pd.DataFrame(
        {"feat_q": [3, 4], "value": [0.5, 0.1], "open": ["?page=Channel&layer=1&head=2&fq=3&fk=9", "not stored"]}
    )
    t = cell_targets(df, ["feat_q", "value", "open"], ("feat_q",), 1, "open")
    assert t[(0, "feat_q")] == {"page": "Feature search", "layer": "1", "feature": "3"}
    assert t[(0, "value")] == t[(0, "open")] == {"page": "Channel", "layer": "1", "head": "2", "fq": "3", "fk": "9"}
    assert (1, "value") not in t and (1, "open") not in t and t[(1, "feat_q")]["feature"] == "4"


def _most_attended(con, l, h, s, qpos):
    return con.execute(
        "SELECT k FROM pattern WHERE layer=? AND head=? AND sample=? AND q=? AND k > 0 ORDER BY prob DESC, k LIMIT 1",
        [l, h, s, qpos],
    ).fetchone()[0]


def test_back_restores_the_previous_view_and_a_new_query_opens_on_its_most_attended_key(open_app, con):
    l, h = 1, 2
    s, n = con.execute("SELECT sample, n_tokens FROM samples ORDER BY n_tokens DESC, sample LIMIT 1").fetchone()
    q1, q2, k1 = n - 4, n - 1, 2
    at = open_app(page="Head", layer=l, head=h, sample=s, q=q1, k=k1, scale="clipped")
    first = at.query_params.to_dict() if hasattr(at.query_params, "to_dict") else dict(at.query_params)
    assert (first["q"], first["k"]) == (str(q1), str(k1))
    at.selectbox(key="head_q").set_value(q2).run()
    k2 = _most_attended(con, l, h, s, q2)
    assert (at.query_params["q"], at.query_params["k"]) == (str(q2), str(k2))
    assert at.selectbox(key="head_k").value == k2
    # Back: the browser restores the previous address and Streamlit reruns the script with it
    for key in list(at.query_params):
        del at.query_params[key]
    for key, v in first.items():
        at.query_params[key] = v
    at.run()
    assert (at.selectbox(key="head_q").value, at.selectbox(key="head_k").value) == (q1, k1)
    assert (at.query_params["q"], at.query_params["k"], at.query_params["scale"]) == (str(q1), str(k1), "clipped")
    assert at.subheader[-2].value.startswith(f"Why query {q1} ") or any(
        h.value.startswith(f"Why query {q1} ") for h in at.subheader
    )


def test_head_marginals_are_the_channel_sums_of_one_side(open_app, explained_index):
    import pandas as pd

    ch = pd.read_parquet(explained_index / "channels")
    ch = ch[(ch["layer"].astype(int) == 1) & (ch["head"].astype(int) == 2)]
    at = open_app(explained_index, page="Head", layer=1, head=2)
    for i, side in enumerate(("feat_q", "feat_k")):
        want = ch.groupby(side)["sum"].agg(["sum", "count"])
        want["share"] = want["sum"] / ch["sum"].sum()
        got = at.dataframe[i].value
        top = want.loc[want["sum"].abs().sort_values(ascending=False).index[: len(got)]]
        assert got[side].tolist() == top.index.tolist()
        assert got["total"].to_numpy() == pytest.approx(top["sum"].to_numpy())
        assert got["n_channels"].tolist() == top["count"].tolist()
        assert got["share_of_head"].to_numpy() == pytest.approx(top["share"].to_numpy())


def _array(v):
    """A Plotly data array as the figure JSON holds it (a list, or base64 bytes with a dtype)."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]) if isinstance(v, dict) else np.asarray(v)


def test_feature_page_shows_its_activations(open_app, explained_index):
    import pandas as pd

    acts = pd.read_parquet(explained_index / "activations")
    acts = acts[acts["layer"].astype(int) == 0]
    feat = int(acts["feat"].value_counts().index[0])
    mine = acts[acts["feat"] == feat].sort_values("act", ascending=False)
    at = open_app(explained_index, page="Feature search", layer=0, feature=feat)
    assert not errors(at)
    hist = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert hist["type"] == "histogram" and sorted(_array(hist["x"])) == pytest.approx(sorted(mine["act"]))
    assert f"fires on {len(mine)} of " in all_text(at) and f"in {mine['sample'].nunique()} samples" in all_text(at)
    top = mine.iloc[0]
    ctx = next(m.value for m in at.markdown if "Top activations" not in m.value and "<span" in m.value)
    assert f"sample {int(top['sample'])}, position {int(top['pos'])}, act {top['act']:.3g}" in ctx
    assert f"<sub>{top['act']:.2g}</sub>".replace(".", "&#46;") in ctx  # the value printed on the token


def test_feature_page_ranks_its_channels_by_total_on_each_side(open_app, con):
    (f,) = con.execute(
        "SELECT feat_q FROM channels WHERE layer = 0 AND feat_q <> feat_k GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    ).fetchone()
    at = open_app(page="Feature search", layer=0, feature=f)
    for i, side in enumerate(("feat_q", "feat_k")):
        want = con.execute(
            f"SELECT head, feat_q, feat_k, sum FROM channels WHERE layer = 0 AND {side} = ? "
            "ORDER BY abs(sum) DESC, head, feat_q, feat_k LIMIT 15",
            [f],
        ).df()
        got = at.dataframe[i].value
        assert got[["head", "feat_q", "feat_k"]].values.tolist() == want[["head", "feat_q", "feat_k"]].values.tolist()
        assert got["sum"].to_numpy() == pytest.approx(want["sum"].to_numpy())


def test_older_index_feature_page_says_it_has_no_activations(open_app):
    at = open_app(page="Feature search", layer=0, feature=5)
    assert "This index has no `activations` table (`fra explain --index PATH` adds it)" in all_text(at)


def test_sample_page_colours_the_text_by_attention(open_app, con):
    l, h = 1, 0
    s, n = con.execute("SELECT sample, n_tokens FROM samples ORDER BY n_tokens DESC, sample LIMIT 1").fetchone()
    qpos = n - 1
    at = open_app(page="Sample", layer=l, head=h, sample=s, q=qpos)
    probs = dict(
        con.execute(
            "SELECT k, prob FROM pattern WHERE layer=? AND head=? AND sample=? AND q=?", [l, h, s, qpos]
        ).fetchall()
    )
    body = max(v for k, v in probs.items() if k > 0)
    html = next(m.value for m in at.markdown if "<span" in m.value and "outline" in m.value)
    for k in (1, qpos):
        assert (
            f'title="key {k}: attention {probs[k]:.4f}" style="background: rgba(33,113,181,{probs[k] / body:.3f})'
            in html
        )


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
