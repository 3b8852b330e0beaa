"""Shared fixtures: tiny seeded random models of both families and random sae-lens SAEs."""

from __future__ import annotations

import pytest
import torch

from fra.ingest.testing import make_cfg, make_model, make_sae  # noqa: F401  (re-exported)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
