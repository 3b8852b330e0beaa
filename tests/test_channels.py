"""The count aggregator: the dense counter, the in-memory buffer and the spilled runs give the
same exact counts as a plain sum."""

from __future__ import annotations

import numpy as np
import pytest

from fra.ingest.index.channels import DENSE_MIN_KEYS, CountAggregator


@pytest.mark.parametrize(
    "budget, n_keys, mode",
    [(10**8, DENSE_MIN_KEYS, "dense"), (10**8, None, "memory"), (3000, None, "spilled")],
)
def test_count_aggregator_modes_agree(tmp_path, budget, n_keys, mode):
    rng = np.random.default_rng(0)
    agg = CountAggregator(budget, tmp_path / "runs", n_keys=n_keys)
    want = np.zeros(DENSE_MIN_KEYS, np.int64)
    for _ in range(20):  # samples: distinct keys each, as cooccurrence gives them
        keys = np.sort(rng.choice(DENSE_MIN_KEYS, size=300, replace=False))
        counts = rng.integers(1, 50, size=300)
        agg.add(keys, counts)
        want[keys] += counts
    keys, counts = agg.finish()
    assert (agg.dense is not None) == (mode == "dense")
    assert (len(agg.runs) > 0) == (mode == "spilled")
    assert np.array_equal(keys, np.flatnonzero(want)) and np.array_equal(counts, want[keys])
