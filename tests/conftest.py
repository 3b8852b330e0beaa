"""Shared fixtures: tiny seeded random models of both families and random sae-lens SAEs."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory):
    """A small real index of the tiny model (2 layers, 4 heads, 5 samples)."""
    from fra.ingest.index.build import IngestConfig, run
    from fra.ingest.tools.testing import tiny_inputs

    out = tmp_path_factory.mktemp("tiny_index") / "index"
    run(
        IngestConfig(out=out, model="tiny", min_count=1, top_keys=2, top_pairs=3, progress=False),
        tiny_inputs(n_samples=5),
    )
    return out
