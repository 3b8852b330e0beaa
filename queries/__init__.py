"""DuckDB access to an FRA index: `connect(index)` defines the base views over the index's
Parquet and the views of views.sql. Reads only; never imports torch."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

HERE = Path(__file__).parent
TABLES = ("rows", "pairs", "channels", "samples", "features")
PARTITIONED = ("rows", "pairs", "channels")


class IndexNotFound(FileNotFoundError):
    pass


def _literal(s: str) -> str:
    """A SQL string literal (the index path is the operator's, but quote it properly anyway)."""
    return "'" + s.replace("'", "''") + "'"


def sql_file(name: str) -> str:
    return (HERE / f"{name}.sql").read_text()


def connect(index: str | Path, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with every view defined over `index` (read-only on the files)."""
    root = Path(index).resolve()
    if not (root / "manifest.json").exists():
        raise IndexNotFound(f"{index} is not an FRA index (no manifest.json); build one with `fra ingest`")
    con = con or duckdb.connect(":memory:")
    for table in TABLES:
        hive = table in PARTITIONED
        pattern = str(root / table / ("**/*.parquet" if hive else "*.parquet"))
        con.execute(
            f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({_literal(pattern)}"
            f"{', hive_partitioning = true' if hive else ''})"
        )
    con.execute(sql_file("views"))
    return con


def manifest(index: str | Path) -> dict:
    return json.loads((Path(index) / "manifest.json").read_text())
