"""Each DuckDB view over a hand-written fixture index, with the expected rows inline."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fra.ingest.index.schema import Manifest
from fra.queries import connect
from fra.queries.cli import export
from fra.queries.lib import feature_channels, top_channels


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
