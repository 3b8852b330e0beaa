"""Shared fixtures: a tiny real index. Markers (pyproject.toml): `slow` marks tests that take
more than ~20 s on 2 CPUs (subprocess ingests, Ray); `pytest -m "not slow"` is the quick run,
and `.ci/run` runs everything."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory):
    """A small real index of the tiny model (2 layers, 4 heads, 5 samples), without the explain
    pass's tables (like an index of an older `fra ingest`)."""
    from fra.ingest.index.build import IngestConfig, run
    from fra.ingest.tools.testing import tiny_inputs

    out = tmp_path_factory.mktemp("tiny_index") / "index"
    run(
        IngestConfig(out=out, model="tiny", min_count=1, top_keys=2, top_pairs=3, explain_pairs=0, progress=False),
        tiny_inputs(n_samples=5),
    )
    return out


@pytest.fixture(scope="session")
def explained_index(tmp_path_factory):
    """A tiny index with min_count 4 (so that some stored pairs are below it), and the explain
    pass's example_terms (top 3 pairs), activations and channel_diag tables."""
    from fra.ingest.index.build import IngestConfig, run
    from fra.ingest.tools.testing import tiny_inputs

    out = tmp_path_factory.mktemp("explained") / "index"
    run(
        IngestConfig(out=out, model="tiny", min_count=4, top_keys=2, top_pairs=3, explain_pairs=3, progress=False),
        tiny_inputs(n_samples=5),
    )
    return out
