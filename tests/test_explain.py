"""The explain pass (fra/ingest/index/explain.py) on a tiny model: every example point's split
sums to the model's own hook_attn_scores, its pairs are the naive reference's strongest pairs,
and the activations and q = k sums match direct computations."""

from __future__ import annotations

import json

import pytest
import torch

from fra.ingest.core.decompose import decompose, run_hooks
from fra.ingest.core.reference import naive_fa
from fra.ingest.index.build import IngestConfig, run
from fra.ingest.index.explain import explain_index
from fra.ingest.index.schema import IndexFormatError
from fra.ingest.tools.testing import tiny_inputs
from fra.queries import connect

# the groups as the schema defines them, over decompose.TERM_NAMES
GROUPS = {
    "b_dec": ("feat_bdec", "bdec_feat", "bdec_bdec"),
    "error": ("feat_err", "err_feat", "err_err", "bdec_err", "err_bdec"),
    "bias": ("feat_bias", "bdec_bias", "err_bias", "bias_feat", "bias_bdec", "bias_err", "bias_bias"),
}
N_TOP = 4  # the tiny SAEs have k = 3, so 9 pairs per point: some examples fall outside the top 4


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    inp = tiny_inputs(n_samples=3)
    out = tmp_path_factory.mktemp("explain") / "index"
    opts = dict(model="tiny", min_count=2, top_keys=2, top_pairs=3, examples_per_channel=4, progress=False)
    run(IngestConfig(out=out, explain_pairs=N_TOP, **opts), inp)
    return inp, out


def _hooks(inp, layer, sample):
    toks = torch.tensor(inp.tokens[sample])[None]
    return run_hooks(inp.lm.model, layer, inp.saes[layer].cfg.metadata.hook_name, toks)


def _points(con):
    rows = con.execute(
        "SELECT layer, head, sample, q, k, list(struct_pack(rank, kind, feat_q, feat_k, value)) "
        "FROM example_terms GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    return {tuple(r[:5]): r[5] for r in rows}


def test_every_example_point_is_split_exactly(explained):
    inp, out = explained
    con = connect(out)
    points = _points(con)
    examples = con.execute("SELECT DISTINCT layer, head, sample, q, k FROM examples").fetchall()
    assert set(points) == set(examples) and len(points) > 100
    hooks = {(l, s): _hooks(inp, l, s) for l in inp.layers for s in range(len(inp.tokens))}
    # the groups against the dense 16-term decomposition (tested against the model in test_decompose)
    dense = {(l, s): decompose(inp.lm.model, l, inp.saes[l], torch.tensor(inp.tokens[s])) for l, s in hooks}
    for (l, h, s, q, k), terms in points.items():
        d = dense[l, s]
        for t in terms[-4:-1]:
            want = sum(d.term(n)[0, h, q, k].item() for n in GROUPS[t["kind"]])
            assert t["value"] == pytest.approx(want, rel=1e-5, abs=1e-5), t["kind"]
        kinds = [t["kind"] for t in terms]
        assert kinds[-5:] == ["ff_rest", "b_dec", "error", "bias", "score"]
        assert set(kinds[:-5]) <= {"pair"}
        score = hooks[l, s].model_scores_BHQK[0, h, q, k].item()
        assert terms[-1]["value"] == pytest.approx(score, rel=1e-6)
        # float32 terms of size ~10 (the tiny model's random weights) summed: a few float32 ulps of the largest
        total = sum(t["value"] for t in terms[:-1])
        assert total == pytest.approx(score, abs=2e-5 * max(abs(t["value"]) for t in terms))


def test_pairs_equal_the_naive_reference(explained):
    """The top pairs and ff_rest against naive_fa (float64 loops), and every example's channel
    either among them with its example's value, or smaller in |FA| than all of them."""
    inp, out = explained
    con = connect(out)
    points = _points(con)
    ex = {}
    for l, h, s, q, k, fq, fk, v in con.execute(
        "SELECT layer, head, sample, q, k, feat_q, feat_k, value FROM examples"
    ).fetchall():
        ex.setdefault((l, h, s, q, k), {})[fq, fk] = v
    hooks = {(l, s): _hooks(inp, l, s) for l in inp.layers for s in range(len(inp.tokens))}
    n_outside = 0
    for (l, h, s, q, k), terms in points.items():
        x, scale = hooks[l, s].x_BTD[0], hooks[l, s].norm_scale_BT[0]
        fq, fk, fa = naive_fa(inp.lm.model, l, inp.saes[l], x, scale, h, q, k)
        ref = sorted(
            ((fa[a, b].item(), int(i), int(j)) for a, i in enumerate(fq) for b, j in enumerate(fk)),
            key=lambda t: (-abs(t[0]), t[1], t[2]),
        )
        pairs = [t for t in terms if t["kind"] == "pair"]
        assert [(t["rank"], t["feat_q"], t["feat_k"]) for t in pairs] == [
            (r, i, j) for r, (_, i, j) in enumerate(ref[:N_TOP])
        ]
        # float32 matmul against float64 loops, values of size ~10
        assert [t["value"] for t in pairs] == pytest.approx([v for v, _, _ in ref[:N_TOP]], rel=1e-5, abs=1e-5)
        assert terms[-5]["value"] == pytest.approx(sum(v for v, _, _ in ref[N_TOP:]), abs=1e-5)
        shown = {(t["feat_q"], t["feat_k"]): t["value"] for t in pairs}
        for channel, v in ex[l, h, s, q, k].items():
            if channel in shown:
                assert shown[channel] == pytest.approx(v, rel=1e-5, abs=1e-6)
            else:
                n_outside += 1
                assert abs(v) <= abs(pairs[-1]["value"]) * (1 + 1e-6)
    assert n_outside > 10  # the fixture has examples outside the top pairs


def test_activations_are_the_saes_nonzeros(explained):
    inp, out = explained
    con = connect(out)
    for l in inp.layers:
        got = con.execute(
            "SELECT sample, pos, feat, act FROM activations WHERE layer = ? ORDER BY sample, pos, feat", [l]
        ).fetchall()
        want = []
        for s in range(len(inp.tokens)):
            acts = inp.saes[l].encode(_hooks(inp, l, s).x_BTD[0])
            for pos, feat in torch.nonzero(acts).tolist():
                want.append((s, pos, feat, acts[pos, feat].item()))
        assert [g[:3] for g in got] == [w[:3] for w in want]
        assert [g[3] for g in got] == pytest.approx([w[3] for w in want], rel=1e-6)


def test_channel_diag_is_the_q_equals_k_part_of_each_channel(explained):
    inp, out = explained
    con = connect(out)
    kept = {(l, h, i, j) for l, h, i, j in con.execute("SELECT layer, head, feat_q, feat_k FROM channels").fetchall()}
    ref = {}
    for l in inp.layers:
        for s in range(len(inp.tokens)):
            hk = _hooks(inp, l, s)
            for h in range(inp.lm.model.cfg.n_heads):
                for t in range(len(inp.tokens[s])):
                    fq, fk, fa = naive_fa(inp.lm.model, l, inp.saes[l], hk.x_BTD[0], hk.norm_scale_BT[0], h, t, t)
                    for a, i in enumerate(fq.tolist()):
                        for b, j in enumerate(fk.tolist()):
                            if (l, h, i, j) in kept:
                                c = ref.setdefault((l, h, i, j), [0, 0.0])
                                c[0] += 1
                                c[1] += fa[a, b].item()
    got = {
        (l, h, i, j): (c, v)
        for l, h, i, j, c, v in con.execute(
            "SELECT layer, head, feat_q, feat_k, count, sum FROM channel_diag"
        ).fetchall()
    }
    assert set(got) == set(ref) and len(got) > 50
    for key, (c, v) in got.items():
        assert c == ref[key][0] and v == pytest.approx(ref[key][1], rel=1e-5, abs=1e-5)
    # and the diagonal is part of the channel: its count never exceeds the channel's
    assert con.execute(
        "SELECT count(*) FROM channel_diag d JOIN channels c USING (layer, head, feat_q, feat_k) "
        "WHERE d.count > c.count"
    ).fetchall() == [(0,)]


def test_rerun_replaces_the_tables_and_records_the_policy(explained, tmp_path):
    import shutil

    inp, out = explained
    copy = tmp_path / "index"
    shutil.copytree(out, copy)
    before = {
        t: connect(copy).execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("activations", "channel_diag")
    }
    explain_index(copy, inp.lm.model, inp.saes, explain_pairs=2, progress=False)
    con = connect(copy)
    for t, rows in before.items():
        assert con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() == rows  # replaced, not appended
    assert con.execute("SELECT max(rank) FROM example_terms WHERE kind = 'pair'").fetchall() == [(1,)]
    n_top = con.execute(
        "SELECT max(n) FROM (SELECT count(*) FILTER (WHERE rank < 2) AS n FROM example_terms WHERE kind = 'pair' "
        "GROUP BY layer, head, sample, q, k)"
    ).fetchall()[0][0]
    assert n_top == 2
    assert json.loads((copy / "manifest.json").read_text())["policy"]["explain_pairs"] == 2
    assert not (tmp_path / "index.explain-staging").exists()
    with pytest.raises(IndexFormatError, match=r"no SAE given for layer\(s\) \[1\]"):
        explain_index(copy, inp.lm.model, {0: inp.saes[0]}, progress=False)


def test_an_index_without_the_pass_reads_empty_tables(tmp_path):
    out = tmp_path / "index"
    run(IngestConfig(out=out, model="tiny", min_count=2, explain_pairs=0, progress=False), tiny_inputs(n_samples=2))
    con = connect(out)
    for t in ("example_terms", "activations", "channel_diag"):
        assert not (out / t).exists()
        assert con.execute(f"SELECT count(*) FROM {t}").fetchall() == [(0,)]
    cols = [r[0] for r in con.execute("DESCRIBE example_terms").fetchall()]
    assert cols == ["sample", "q", "k", "rank", "kind", "feat_q", "feat_k", "value", "layer", "head"]
    assert "explain_pairs" not in json.loads((out / "manifest.json").read_text())["policy"]


def test_example_points_stream_in_sample_order_across_batches(explained):
    import duckdb

    from fra.ingest.index.explain import _example_points

    _, out = explained
    con = duckdb.connect()
    for layer in (0, 1):
        whole = [(s, p.tolist()) for s, p in _example_points(con, out, layer)]
        small = [(s, p.tolist()) for s, p in _example_points(con, out, layer, batch_rows=7)]
        assert small == whole and [s for s, _ in whole] == [0, 1, 2]
        want = con.execute(
            "SELECT DISTINCT sample, head, q, k FROM read_parquet(?, hive_partitioning = true) WHERE layer = ? "
            "ORDER BY ALL",
            [str(out / "examples/**/*.parquet"), layer],
        ).fetchall()
        assert [(s, *p) for s, pts in whole for p in pts] == want


def test_split_points_hand_worked_ties():
    """One head, query token 1 with features 5, 3, 7 (query vectors 1, 1, 1; d_head 1) and key token
    0 with features 4, 9, 1 (key vectors 2, 2, -2): all nine |FA| are 2, so the top 4 go by feat_q,
    then feat_k: (3, 1) -2, (3, 4) 2, (3, 9) 2, (5, 1) -2, summing to 0.
    ff = (1 + 1 + 1) * (2 + 2 - 2) = 6, so ff_rest = 6 - 0 = 6. With b_dec 1 (query) and 0.5 (key),
    error 0 (query) and 2 (key): b_dec group = 3 * 0.5 + 1 * 2 + 1 * 0.5 = 4 (feat x b_dec,
    b_dec x feat, b_dec x b_dec); error group = 3 * 2 + 1 * 2 = 8 (feat x err, b_dec x err)."""
    from fra.ingest.core.decompose import SideVectors
    from fra.ingest.index.explain import side_components, split_points

    feat_idx_TA = torch.tensor([[4, 9, 1], [5, 3, 7]])
    live_TA = torch.ones(2, 3, dtype=torch.bool)
    zeros = torch.zeros(1, 1, 2, 1)
    q = SideVectors(
        torch.tensor([0.0, 0, 0, 1, 1, 1]).view(1, 1, 2, 3, 1),
        torch.ones(1, 1, 2, 1),
        zeros,
        zeros,
    )
    k = SideVectors(
        torch.tensor([2.0, 2, -2, 0, 0, 0]).view(1, 1, 2, 3, 1),
        torch.full((1, 1, 2, 1), 0.5),
        torch.full((1, 1, 2, 1), 2.0),
        zeros,
    )
    scores_HQK = torch.full((1, 2, 2), 18.0)
    one = torch.tensor([1])
    sp = split_points(
        q, k, side_components(q), side_components(k), feat_idx_TA, live_TA, scores_HQK, one * 0, one, one * 0, 4, 10
    )
    pairs = list(zip(sp.top_fq_PN[0].tolist(), sp.top_fk_PN[0].tolist(), sp.top_value_PN[0].tolist()))
    assert pairs == [(3, 1, -2.0), (3, 4, 2.0), (3, 9, 2.0), (5, 1, -2.0)]
    assert sp.top_valid_PN.tolist() == [[True] * 4]
    assert sp.groups_PG[0].tolist() == [6.0, 4.0, 8.0, 0.0]
    assert sp.score_P.tolist() == [18.0]
    # all nine pairs stored: nothing is left for ff_rest
    sp = split_points(
        q, k, side_components(q), side_components(k), feat_idx_TA, live_TA, scores_HQK, one * 0, one, one * 0, 12, 10
    )
    assert sp.top_valid_PN[0].tolist() == [True] * 9 and sp.groups_PG[0, 0].item() == 0.0
    # key feature 1 not active (a padding slot, vector 0): 6 pairs, so 2 of 8 slots are invalid
    live_TA[0, 2] = False
    k.feat_BHTAE[0, 0, 0, 2] = 0.0
    sp = split_points(
        q, k, side_components(q), side_components(k), feat_idx_TA, live_TA, scores_HQK, one * 0, one, one * 0, 8, 10
    )
    assert sp.top_valid_PN[0].tolist() == [True] * 6 + [False] * 2
    assert list(zip(sp.top_fq_PN[0, :6].tolist(), sp.top_fk_PN[0, :6].tolist())) == [
        (3, 4),
        (3, 9),
        (5, 4),
        (5, 9),
        (7, 4),
        (7, 9),
    ]
    assert sp.groups_PG[0, 0].item() == 0.0  # ff = 3 * (2 + 2) = 12, all stored


def test_fra_explain_refuses_other_saes(explained, tmp_path):
    """`fra explain` loads the SAEs by name and refuses ones whose weights the manifest does not name."""
    from fra.ingest.index.explain import ExplainConfig
    from fra.ingest.index.explain import run as explain_run

    inp, out = explained
    for layer, sae in inp.saes.items():
        sae.save_model(tmp_path / "saes" / f"blocks.{layer}.ln1.hook_normalized")
    with pytest.raises(IndexFormatError, match="is not the one the index .* was built with"):
        explain_run(ExplainConfig(index=out, model="tiny", sae=str(tmp_path / "saes"), progress=False))
    with pytest.raises(ValueError, match="--explain-pairs must be at least 1"):
        ExplainConfig(explain_pairs=0)
