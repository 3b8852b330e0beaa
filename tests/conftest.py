"""Shared fixtures: a tiny real index. Markers (pyproject.toml): `slow` marks tests that take
more than ~20 s on 2 CPUs (subprocess ingests, Ray); `pytest -m "not slow"` is the quick run,
and `.ci/run` runs everything."""

from __future__ import annotations

import pytest


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
