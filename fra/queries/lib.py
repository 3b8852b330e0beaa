"""Parameterised queries shared by the CLI and the app. Every user value is a bound parameter."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from . import IndexNotFound


def _load(path: Path) -> dict[str, str]:
    blocks = re.split(r"^-- name: (\w+)\s*$", path.read_text(), flags=re.M)
    return {name: body.strip().rstrip(";") for name, body in zip(blocks[1::2], blocks[2::2])}


RANK_BY = ("mean", "total", "share")
QUERIES = _load(Path(__file__).parent / "named.sql")

# The failures that mean "this index cannot answer this query" (a table, view or column it lacks,
# files that are missing or unreadable). Anything else is a bug and must surface as one.
INDEX_LACKS = (duckdb.CatalogException, duckdb.BinderException, duckdb.IOException)

# Tables written by the explain pass (`fra explain`); `fra.queries.connect` defines them as empty
# views on an index without them, so the app asks `attach_optional` whether they hold data.
OPTIONAL_TABLES = ("example_terms", "activations", "channel_diag")
MARGINAL_VIEWS = ("query_feature_marginals", "key_feature_marginals")


def relations(con) -> set[str]:
    cur = con.cursor() if hasattr(con, "cursor") else con
    return {r[0] for r in cur.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()} | {
        r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()
    }


def attach_optional(con, index: str | Path) -> set[str]:
    """The optional tables that hold data in the index at `index` (their Parquet files exist), and
    the marginal views the connection defines."""
    root = Path(index).resolve()
    have = {name for name in OPTIONAL_TABLES if any(root.glob(f"{name}/**/*.parquet"))}
    return have | (set(MARGINAL_VIEWS) & relations(con))


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


def _check_diag(con, no_diag: bool) -> None:
    if no_diag and not bool(run(con, "has_channel_diag", [])["present"].iloc[0]):
        raise IndexNotFound(
            "this index has no channel_diag table (the q = k part of each channel), so q = k entries "
            "cannot be left out; run `fra explain --index INDEX` first"
        )


def feature_marginals(con, layer, head, side="q", n=20, no_diag=False, no_self=False):
    """A head's query (side 'q') or key ('k') features ranked by |summed channel contribution|."""
    if side not in ("q", "k"):
        raise ValueError(f"side must be 'q' or 'k', got {side!r}")
    _check_diag(con, no_diag)
    return run(con, "feature_marginals", [side, layer, head, no_diag, no_self, n])


def channel_ranking(con, layer, head, n=20, min_count=8, drop_noise=False, by="total", no_diag=False, no_self=False):
    """A head's channels ranked by |mean| ('mean'), |sum| ('total') or |share of the head| ('share')."""
    if by not in RANK_BY:
        raise ValueError(f"rank by one of {RANK_BY}, got {by!r}")
    _check_diag(con, no_diag)
    return run(con, "channel_ranking", [layer, head, min_count, drop_noise, no_diag, no_self, by, n])
