"""Parameterised queries shared by the CLI and the app. Every user value is a bound parameter."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb


def _load(path: Path) -> dict[str, str]:
    blocks = re.split(r"^-- name: (\w+)\s*$", path.read_text(), flags=re.M)
    return {name: body.strip().rstrip(";") for name, body in zip(blocks[1::2], blocks[2::2])}


QUERIES = _load(Path(__file__).parent / "named.sql")

# The failures that mean "this index cannot answer this query" (a table, view or column it lacks,
# files that are missing or unreadable). Anything else is a bug and must surface as one.
INDEX_LACKS = (duckdb.CatalogException, duckdb.BinderException, duckdb.IOException)

# Tables of the example-explanation contract (docs: fra/ingest/index/schema.py) and their hive
# partition columns; older indexes lack them, and the app says so instead of failing.
OPTIONAL_TABLES = {"example_terms": "layer=*/head=*", "activations": "layer=*"}
OPTIONAL_VIEWS = {
    "query_feature_marginals": """
        SELECT layer, head, feat_q, count(*) AS n_channels, sum(sum) AS total,
               sum(sum) / nullif(sum(sum(sum)) OVER (PARTITION BY layer, head), 0) AS share_of_head
        FROM channels GROUP BY layer, head, feat_q""",
    "key_feature_marginals": """
        SELECT layer, head, feat_k, count(*) AS n_channels, sum(sum) AS total,
               sum(sum) / nullif(sum(sum(sum)) OVER (PARTITION BY layer, head), 0) AS share_of_head
        FROM channels GROUP BY layer, head, feat_k""",
}


def relations(con) -> set[str]:
    cur = con.cursor() if hasattr(con, "cursor") else con
    return {r[0] for r in cur.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()} | {
        r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()
    }


def attach_optional(con, index: str | Path) -> set[str]:
    """Defines each optional table or view that `fra.queries.connect` left undefined and the index can
    serve (its Parquet files exist); returns the optional names now defined."""
    root = Path(index).resolve()
    have = relations(con)
    for name, parts in OPTIONAL_TABLES.items():
        files = sorted(root.glob(f"{name}/{parts}/*.parquet"))
        if name not in have and files:
            glob = str(root / name / "**" / "*.parquet").replace("'", "''")
            con.execute(
                f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)"
            )
    for name, body in OPTIONAL_VIEWS.items():
        if name not in have:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
    return relations(con) & (set(OPTIONAL_TABLES) | set(OPTIONAL_VIEWS))


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
