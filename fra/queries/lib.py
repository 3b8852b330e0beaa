"""Parameterised queries shared by the CLI and the app. Every user value is a bound parameter."""

from __future__ import annotations

import re
from pathlib import Path


def _load(path: Path) -> dict[str, str]:
    blocks = re.split(r"^-- name: (\w+)\s*$", path.read_text(), flags=re.M)
    return {name: body.strip().rstrip(";") for name, body in zip(blocks[1::2], blocks[2::2])}


QUERIES = _load(Path(__file__).parent / "named.sql")


def run(con, name: str, params: list):
    cur = con.cursor() if hasattr(con, "cursor") else con
    return cur.execute(QUERIES[name], params).df()


def top_channels(con, layer, head, n=20, min_count=8, drop_noise=False):
    return run(con, "top_channels", [layer, head, min_count, drop_noise, n])


def feature_channels(con, feature, layer=None, n=30, min_count=1):
    return run(con, "feature_channels", [feature, layer, min_count, n])


def channel_examples(con, layer, head, feat_q, feat_k, n=20):
    return run(con, "channel_examples", [layer, head, feat_q, feat_k, n])


def head_summary(con):
    return run(con, "head_summary", [])
