"""`fra ingest` on tiny QK-norm models against a brute force written with the per-pair reference:
Gemma-3-shaped layers with a window wider than every sample (so causal), and narrower (W = 5 on
samples of up to 12 tokens: needs the inner loop's window mask)."""

from __future__ import annotations

import pytest

from fra.ingest.core.decompose import Decomposer
from fra.ingest.index.build import IngestConfig, run
from fra.ingest.tools.testing import GEMMA3_WINDOW, tiny_inputs
from fra.queries import connect
from tests.test_ingest import brute_force  # the same brute force, over the layer's own mask


def check_against_brute_force(index, ref, examples):
    """tests/test_ingest.check_against_brute_force with tolerances relative to the values: QK-norm
    divides by a per-(position, head) RMS, so single feature-pair values reach O(50) here."""
    con = connect(index)
    got = {
        (l, h, i, j): v
        for l, h, i, j, *v in con.execute(
            "SELECT layer, head, feat_q, feat_k, count, sum, sumsq, ind_count, ind_sum, ind_sumsq FROM channels"
        ).fetchall()
    }
    assert set(got) == set(ref)
    scale = max(abs(v) for per_sample in examples.values() for e in per_sample.values() for v in e.values())
    tol = 1e-6 * scale  # ~10 float32 ulps of the largest value
    for key, (c, s, ss, ic, isum, issq) in got.items():
        rc, rs, rss, ric, risum, rissq = ref[key]
        assert (c, ic) == (rc, ric), key
        assert (s, isum) == pytest.approx((rs, risum), abs=10 * tol, rel=1e-5)
        assert (ss, issq) == pytest.approx((rss, rissq), abs=10 * tol * scale, rel=1e-5)
    ex = {}
    for l, h, i, j, r, smp, q, k, v in con.execute(
        "SELECT layer, head, feat_q, feat_k, rank, sample, q, k, value FROM examples ORDER BY ALL"
    ).fetchall():
        ex.setdefault((l, h, i, j), []).append((r, smp, q, k, v))
    assert set(ex) == set(got)
    for key, rows in ex.items():
        per_sample = {smp: max(abs(v) for v in e.values()) for smp, e in examples[key].items()}
        ranked = sorted(per_sample.items(), key=lambda x: (-x[1], x[0]))
        for _, smp, q, k, v in rows:  # each example is a real entry, the strongest of its sample
            assert examples[key][smp][q, k] == pytest.approx(v, abs=tol)
            assert abs(v) == pytest.approx(per_sample[smp], abs=tol)
        assert [abs(v) for *_, v in rows] == pytest.approx([a for _, a in ranked[: len(rows)]], abs=tol)


def build_and_check(tmp_path, window):
    inp = tiny_inputs(n_samples=5, family="gemma3", window_size=window)
    assert all(Decomposer(inp.lm.model, l, inp.saes[l]).sliding_window == window for l in inp.layers)
    out = tmp_path / "index"
    cfg = IngestConfig(out=out, model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4)
    run(IngestConfig(**{**cfg.__dict__, "progress": False}), inp)
    ref, examples = brute_force(inp)
    assert any(v[3] > 0 for v in ref.values())  # induction targets exist
    check_against_brute_force(out, ref, examples)


def test_qk_norm_index_with_a_window_wider_than_the_samples(tmp_path):
    build_and_check(tmp_path, window=32)  # samples have at most 12 tokens: the mask is causal


def test_qk_norm_index_with_a_window_narrower_than_the_samples(tmp_path):
    assert max(len(t) for t in tiny_inputs(n_samples=5).tokens) > GEMMA3_WINDOW
    build_and_check(tmp_path, window=GEMMA3_WINDOW)
