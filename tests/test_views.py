"""Each DuckDB view over a hand-written fixture index, with the expected rows inline."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fra.ingest.index.schema import Manifest
from fra.queries import connect
from fra.queries.cli import export
from fra.queries.lib import channel_ranking, feature_channels, feature_marginals, top_channels


def write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("views") / "idx"
    # one layer (5), one head (0); sample 0 has tokens BOS a b a b
    write(
        root / "samples/part-0.parquet",
        pa.table(
            {
                "sample": pa.array([0], pa.int32()),
                "text": ["a b a b"],
                "token_ids": [[0, 1, 2, 1, 2]],
                "tokens": [["<s>", "a", " b", " a", " b"]],
                "n_tokens": pa.array([5], pa.int16()),
            }
        ),
    )
    write(
        root / "features/part-0.parquet",
        pa.table(
            {
                "layer": [5, 5, 5],
                "feature": [1, 2, 3],
                "label": ['"a"', '"b"', '","'],
                "punct_or_bos": [False, False, True],
            }
        ),
    )
    # channels: (1,2) count 4 sum 8 sumsq 20 -> mean 2, var 20/4 - 4 = 1, std 1;
    #           induction: 2 pairs summing 6 -> ind_mean 3, other (8-6)/(4-2) = 1, diff 2.
    #           (3,2) count 10 sum -30 -> mean -3 (BOS/punct feature 3 on the query side).
    #           (2,1) count 2 sum 1 -> mean 0.5 (below min_count 3 in the test).
    write(
        root / "channels/layer=5/head=0/part-0.parquet",
        pa.table(
            {
                "feat_q": pa.array([1, 3, 2], pa.int32()),
                "feat_k": pa.array([2, 2, 1], pa.int32()),
                "count": [4, 10, 2],
                "sum": [8.0, -30.0, 1.0],
                "sumsq": [20.0, 100.0, 1.0],
                "ind_count": [2, 0, 0],
                "ind_sum": [6.0, 0.0, 0.0],
                "ind_sumsq": [18.0, 0.0, 0.0],
            }
        ),
    )
    # examples: the strongest entries of channel (1, 2)
    write(
        root / "examples/layer=5/head=0/part-0.parquet",
        pa.table(
            {
                "feat_q": pa.array([1, 1], pa.int32()),
                "feat_k": pa.array([2, 2], pa.int32()),
                "rank": pa.array([0, 1], pa.int8()),
                "sample": pa.array([0, 0], pa.int32()),
                "q": pa.array([3, 4], pa.int16()),
                "k": pa.array([2, 0], pa.int16()),
                "value": pa.array([3.0, 0.5], pa.float32()),
            }
        ),
    )
    # rows: the kept entries
    write(
        root / "rows/layer=5/head=0/part-0.parquet",
        pa.table(
            {
                "sample": pa.array([0, 0, 0], pa.int32()),
                "q": pa.array([3, 4, 4], pa.int16()),
                "k": pa.array([2, 3, 0], pa.int16()),
                "feat_q": pa.array([1, 3, 1], pa.int32()),
                "feat_k": pa.array([2, 2, 2], pa.int32()),
                "value": pa.array([3.0, -5.0, 0.5], pa.float32()),
                "induction": [True, False, False],
            }
        ),
    )
    # pairs: q=3 keys 0..3 (target k=2), q=4 keys 0..4 (target 3); other queries left out
    pairs = {"sample": [0] * 9, "q": [3, 3, 3, 3, 4, 4, 4, 4, 4], "k": [0, 1, 2, 3, 0, 1, 2, 3, 4]}
    score = [0.0, 0.0, math.log(3), 0.0, 0.0, 0.0, 0.0, math.log(4), 0.0]
    pairs.update(
        score=score,
        ff=[s / 2 for s in score],
        ff_abs=[1.0] * 9,
        kept=[0.5] * 9,
        kept_abs=[0.5] * 9,
        f_bdec=[0.0] * 9,
        f_err=[s / 4 for s in score],
        bdec_f=[0.0] * 9,
        err_f=[s / 4 for s in score],
        resid_resid=[0.0] * 9,
        bias=[0.0] * 9,
        induction=[False, False, True, False, False, False, False, True, False],
    )
    t = pa.table(pairs).cast(
        pa.schema(
            [("sample", pa.int32()), ("q", pa.int16()), ("k", pa.int16())]
            + [(c, pa.float64()) for c in list(pairs)[3:-1]]
            + [("induction", pa.bool_())]
        )
    )
    write(root / "pairs/layer=5/head=0/part-0.parquet", t)
    Manifest(
        model="fixture", sae={"5": "x"}, corpus="c", policy={}, layers=[5], heads=[0], n_samples=1, shard="0/1"
    ).write(root)
    return root


def test_channel_stats(index):
    rows = (
        connect(index)
        .execute(
            "SELECT feat_q, feat_k, count, mean, std, ind_mean, other_mean, ind_diff, share_of_head, self_pair "
            "FROM channel_stats ORDER BY feat_q"
        )
        .fetchall()
    )
    # head total ff over pairs = (log 3 + log 4) / 2; shares are sum / that total
    tot = (math.log(3) + math.log(4)) / 2
    expected = [
        (1, 2, 4, 2.0, 1.0, 3.0, 1.0, 2.0, 8.0 / tot, False),
        (2, 1, 2, 0.5, 0.5, None, 0.5, None, 1.0 / tot, False),
        (3, 2, 10, -3.0, 1.0, None, -3.0, None, -30.0 / tot, False),  # var 100/10 - 9 = 1
    ]
    for got, exp in zip(rows, expected):
        assert got[:3] == exp[:3] and got[-1] == exp[-1]
        for g, e in zip(got[3:-1], exp[3:-1]):
            assert (g is None and e is None) or g == pytest.approx(e)


def test_top_channels_ranks_by_abs_mean_and_filters_noise(index):
    con = connect(index)
    got = top_channels(con, 5, 0, n=10, min_count=3)[["feat_q", "feat_k"]].values.tolist()
    assert got == [[3, 2], [1, 2]]  # |-3| > |2|; (2,1) has count 2 < 3
    got = top_channels(con, 5, 0, n=10, min_count=3, drop_noise=True)[["feat_q", "feat_k"]].values.tolist()
    assert got == [[1, 2]]  # feature 3 is flagged punctuation
    assert top_channels(con, 5, 0, n=1, min_count=1)[["feat_q"]].values.tolist() == [[3]]


def test_feature_lookup_sides(index):
    df = feature_channels(connect(index), 2, 5, n=10)
    assert sorted(zip(df["side"], df["feat_q"], df["feat_k"])) == [("key", 1, 2), ("key", 3, 2), ("query", 2, 1)]
    assert feature_channels(connect(index), 2, 7, n=10).empty  # no layer 7


def test_top_entries_with_tokens(index):
    rows = connect(index).execute("SELECT q, k, value, token_q, token_k FROM top_entries LIMIT 2").fetchall()
    assert rows == [(4, 3, -5.0, " b", " a"), (3, 2, 3.0, " a", " b")]


def test_head_summary(index):
    r = connect(index).execute("SELECT * FROM head_summary").df().iloc[0]
    # every score is split ff 1/2, f_err 1/4, err_f 1/4: shares of summed |terms|
    assert r["ff_share"] == pytest.approx(0.5) and r["err_share"] == pytest.approx(0.5)
    assert r["bias_share"] == 0 and r["completeness_err"] == pytest.approx(0, abs=1e-12)
    # q=3: softmax over keys 0..3 with exp(score) = 1, 1, 3, 1 -> target prob 3/6;
    # q=4: exp = 1, 1, 1, 4, 1 -> 4/8. Mean 0.5.
    assert r["ind_attn"] == pytest.approx(0.5)
    # score gap: mean target score (log 3 + log 4)/2 minus mean of the other 7 scores (0)
    assert r["ind_score_gap"] == pytest.approx((math.log(3) + math.log(4)) / 2)
    assert r["kept_abs_share"] == pytest.approx(0.5)


def test_export_is_partitioned_and_filtered(index, tmp_path):
    n = export(connect(index), "rows", tmp_path / "out", layer=5, feature=1)
    assert n == 2
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet"))
    assert files and all(f.startswith("layer=5/head=0/") for f in files)
    with pytest.raises(ValueError, match="unknown view"):
        export(connect(index), "rows; DROP TABLE x", tmp_path / "o2")


@pytest.fixture(scope="module")
def marg_index(index, tmp_path_factory):
    """The fixture index with two heads of channels, their q = k parts (channel_diag) and pairs."""
    import shutil

    root = tmp_path_factory.mktemp("marg") / "idx"
    shutil.copytree(index, root)
    shutil.rmtree(root / "channels")

    def channels(head, rows):
        fq, fk, count, s = zip(*rows)
        z = [0] * len(rows)
        write(
            root / f"channels/layer=5/head={head}/part-0.parquet",
            pa.table(
                {
                    "feat_q": pa.array(fq, pa.int32()),
                    "feat_k": pa.array(fk, pa.int32()),
                    "count": pa.array(count, pa.int64()),
                    "sum": pa.array(s, pa.float64()),
                    "sumsq": pa.array([x * x for x in s], pa.float64()),
                    "ind_count": pa.array(z, pa.int64()),
                    "ind_sum": pa.array(z, pa.float64()),
                    "ind_sumsq": pa.array(z, pa.float64()),
                }
            ),
        )

    def diag(head, rows):
        fq, fk, count, s = zip(*rows)
        write(
            root / f"channel_diag/layer=5/head={head}/part-0.parquet",
            pa.table(
                {
                    "feat_q": pa.array(fq, pa.int32()),
                    "feat_k": pa.array(fk, pa.int32()),
                    "count": pa.array(count, pa.int64()),
                    "sum": pa.array(s, pa.float64()),
                }
            ),
        )

    # (feat_q, feat_k, count, sum); head 0 sums to 8 - 30 + 1 + 5 - 2 = -18, head 1 to 1 + 3 = 4
    channels(0, [(1, 2, 4, 8.0), (3, 2, 10, -30.0), (2, 1, 2, 1.0), (2, 2, 6, 5.0), (1, 1, 3, -2.0)])
    channels(1, [(1, 2, 4, 1.0), (2, 2, 6, 3.0)])
    diag(0, [(2, 2, 2, 4.0), (1, 2, 1, 0.5)])
    diag(1, [(2, 2, 6, 3.0)])  # every entry of (2, 2) is at q = k on head 1
    for table in root.glob("*/layer=5/head=0"):  # every other table gets the same data for head 1
        if not (table.parent / "head=1").exists():
            shutil.copytree(table, table.parent / "head=1")
    m = Manifest.read(root)
    Manifest(**{**m.__dict__, "heads": [0, 1]}).write(root)  # the second head is part of the index
    return root


def test_feature_marginals_against_hand_sums(marg_index):
    con = connect(marg_index)

    def got(view, feat):
        return con.execute(
            f"SELECT head, {feat}, n_channels, total, share_of_head FROM {view} ORDER BY head, {feat}"
        ).fetchall()

    # head 0: query features 1 -> (1,2) + (1,1) = 8 - 2 = 6; 2 -> (2,1) + (2,2) = 1 + 5 = 6; 3 -> -30;
    # shares of the head's -18. Head 1: 1 -> 1, 2 -> 3, shares of 4.
    want_q = [(0, 1, 2, 6.0, -1 / 3), (0, 2, 2, 6.0, -1 / 3), (0, 3, 1, -30.0, 5 / 3), (1, 1, 1, 1.0, 0.25)]
    want_q += [(1, 2, 1, 3.0, 0.75)]
    # key features, head 0: 1 -> (2,1) + (1,1) = -1; 2 -> (1,2) + (3,2) + (2,2) = -17. Head 1: 2 -> 4.
    want_k = [(0, 1, 2, -1.0, 1 / 18), (0, 2, 3, -17.0, 17 / 18), (1, 2, 2, 4.0, 1.0)]
    for view, feat, want in (
        ("query_feature_marginals", "feat_q", want_q),
        ("key_feature_marginals", "feat_k", want_k),
    ):
        rows = got(view, feat)
        assert [r[:3] for r in rows] == [w[:3] for w in want]
        assert [r[3:] for r in rows] == [pytest.approx(w[3:]) for w in want]
        # and generally: the marginals are the channels' sums grouped by one side
        by_side = {}
        for h, fq, fk, s in con.execute("SELECT head, feat_q, feat_k, sum FROM channels").fetchall():
            by_side[h, fq if feat == "feat_q" else fk] = by_side.get((h, fq if feat == "feat_q" else fk), 0.0) + s
        assert {(r[0], r[1]): r[3] for r in rows} == pytest.approx(by_side)
        assert con.execute(f"SELECT head, sum(share_of_head) FROM {view} GROUP BY head ORDER BY head").fetchall() == [
            (0, pytest.approx(1.0)),
            (1, pytest.approx(1.0)),
        ]


def test_feature_marginals_without_diagonal_or_self_pairs(marg_index):
    con = connect(marg_index)
    q = "SELECT feat, n_channels, count, total, share_of_head FROM feature_marginals_at('q', 5, 0, ?, ?) ORDER BY feat"
    # no_diag: (1,2) -> count 3 sum 7.5, (2,2) -> count 4 sum 1; head total -18 - 4.5 = -22.5
    assert con.execute(q, [True, False]).fetchall() == [
        (1, 2, 6, 5.5, pytest.approx(5.5 / -22.5)),
        (2, 2, 6, 2.0, pytest.approx(2 / -22.5)),
        (3, 1, 10, -30.0, pytest.approx(30 / 22.5)),
    ]
    # no_self: (1,1) and (2,2) dropped, shares still of the whole head (-18)
    assert con.execute(q, [False, True]).fetchall() == [
        (1, 1, 4, 8.0, pytest.approx(8 / -18)),
        (2, 1, 2, 1.0, pytest.approx(1 / -18)),
        (3, 1, 10, -30.0, pytest.approx(30 / 18)),
    ]
    df = feature_marginals(con, 5, 0, side="k", n=1)
    assert df[["feat", "label", "n_channels", "total"]].values.tolist() == [[2, '"b"', 3, -17.0]]  # largest |total|


def test_ranked_channels(marg_index):
    con = connect(marg_index)

    def rank(by, **kw):
        opts = dict(n=10, min_count=1, by=by) | kw
        return channel_ranking(con, 5, 0, **opts)[["feat_q", "feat_k"]].values.tolist()

    # |sum|: 30, 8, 5, 2, 1; |mean|: (3,2) 3, (1,2) 2, (2,2) 5/6, (1,1) 2/3, (2,1) 1/2
    assert rank("total") == [[3, 2], [1, 2], [2, 2], [1, 1], [2, 1]]
    assert rank("share") == rank("total")  # one head: share is sum over a constant
    assert rank("mean") == [[3, 2], [1, 2], [2, 2], [1, 1], [2, 1]][:2] + [[2, 2], [1, 1], [2, 1]]
    assert rank("total", drop_noise=True) == [[1, 2], [2, 2], [1, 1], [2, 1]]  # feature 3 is punctuation
    assert rank("total", no_self=True) == [[3, 2], [1, 2], [2, 1]]
    # no q = k: (1,2) 7.5 over 3, (2,2) 1 over 4; |mean| then 3, 2.5, 1 (the 2/3 of (1,1)), 0.5, 0.25
    assert rank("mean", no_diag=True) == [[3, 2], [1, 2], [1, 1], [2, 1], [2, 2]]
    df = channel_ranking(con, 5, 0, n=1, min_count=1, by="total", no_diag=True)
    tot = (math.log(3) + math.log(4)) / 2  # the pairs' ff total; the fixture's q = k pairs have ff 0
    assert df[["count", "sum", "mean", "share_of_head"]].values.tolist()[0] == pytest.approx([10, -30, -3, -30 / tot])
    # head 1 without q = k: channel (2, 2) has no entry left, so it is not ranked
    got = channel_ranking(con, 5, 1, n=10, min_count=1, by="total", no_diag=True)
    assert got[["feat_q", "feat_k", "count"]].values.tolist() == [[1, 2, 4]]
    assert rank("total", min_count=5) == [[3, 2], [2, 2]]


def test_no_diag_needs_the_explain_pass(index):
    from fra.ingest.index.schema import IndexFormatError

    with pytest.raises(IndexFormatError, match="run `fra explain --index INDEX` first"):
        feature_marginals(connect(index), 5, 0, no_diag=True)
    with pytest.raises(IndexFormatError, match="no channel_diag"):
        channel_ranking(connect(index), 5, 0, no_diag=True)
    assert len(feature_marginals(connect(index), 5, 0)) == 3  # the fixture's three query features


def test_every_view_and_column_describes_itself(index):
    """issue 19: every view of views.sql, every table view and every macro carries a DuckDB comment."""
    import re

    from fra.queries import sql_file

    con = connect(index)
    sql = sql_file("views")
    views = set(re.findall(r"CREATE OR REPLACE VIEW (\w+)", sql))
    macros = set(re.findall(r"CREATE OR REPLACE MACRO (\w+)", sql))
    assert {"query_feature_marginals", "key_feature_marginals"} <= views
    described = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
    from fra.ingest.index.schema import TABLES

    for v in views | set(TABLES):
        assert described.get(v), f"view {v} has no comment"
    blank = con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal AND (comment IS NULL OR comment = '')"
    ).fetchall()
    assert blank == []
    funcs = dict(
        con.execute(
            "SELECT function_name, comment FROM duckdb_functions() WHERE function_type = 'table_macro'"
        ).fetchall()
    )
    for m in macros:
        assert funcs.get(m), f"macro {m} has no comment"
    assert described["query_feature_marginals"].startswith("Head marginals by query feature")
