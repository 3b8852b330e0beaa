"""The C++ kernel and the PyTorch loop (the GPU path, run here on the CPU) give the same index on
real SmolLM2-135M activations with the shipped k=64 SAEs, every channel kept (--min-count 1)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fra.ingest.core import fused
from fra.ingest.index.build import IngestConfig, load_inputs, run
from fra.queries import connect

pytestmark = pytest.mark.slow  # loads the real model (about a minute on 2 CPUs)

QUERIES = {
    "channels": "SELECT layer, head, feat_q, feat_k, count, ind_count, sum, sumsq, ind_sum, ind_sumsq FROM channels",
    "examples": "SELECT layer, head, feat_q, feat_k, rank, sample, q, k, value FROM examples",
    "rows": "SELECT layer, head, sample, q, k, feat_q, feat_k, value FROM rows",
    "pairs": "SELECT layer, head, sample, q, k, ff, kept, kept_abs, ff_abs FROM pairs",
}


def _table(index, name):
    con = connect(index)
    cols = con.execute(QUERIES[name] + " ORDER BY ALL").fetchnumpy()
    return {c: np.asarray(v) for c, v in cols.items()}


def test_kernel_and_pytorch_loop_give_the_same_index(tmp_path, monkeypatch):
    if not fused.available():
        pytest.skip("no C++ compiler for the kernel")
    cfg = IngestConfig(
        out=tmp_path / "kernel", max_samples=2, max_tokens=24, min_count=1, layers=(17,), progress=False, device="cpu"
    )
    inp = load_inputs(cfg, "cpu")
    run(cfg, inp)
    monkeypatch.setattr(fused, "_lib", None)  # as where no compiler is found: the PyTorch path
    monkeypatch.setattr(fused, "_tried", True)
    assert not fused.available()
    run(replace(cfg, out=tmp_path / "torch"), inp)

    for name in QUERIES:
        a, b = _table(tmp_path / "kernel", name), _table(tmp_path / "torch", name)
        assert len(a["layer"]) > 0 and a.keys() == b.keys()
        for col in a:
            if col == "ff_abs":  # float32 sums of |FA|, added in another order by the kernel
                np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-5, err_msg=f"{name}.{col}")
            elif col in ("sum", "sumsq", "ind_sum", "ind_sumsq"):  # float64 sums of the same float32 values
                np.testing.assert_allclose(a[col], b[col], rtol=1e-12, atol=1e-12, err_msg=f"{name}.{col}")
            else:  # integers, and values read from the same matmul output
                np.testing.assert_array_equal(a[col], b[col], err_msg=f"{name}.{col}")
    n = connect(tmp_path / "kernel").execute("SELECT count(*), sum(ind_count) FROM channels").fetchone()
    assert n[0] > 10_000 and n[1] > 0  # every channel kept, and induction targets present
