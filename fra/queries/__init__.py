"""DuckDB access to an FRA index: `connect(index)` validates the manifest and defines one view per
table of the index (names and layouts from `fra.ingest.index.schema`) and the views of
views.sql. Reads only; never imports torch."""

from __future__ import annotations

from pathlib import Path

import duckdb

from fra.ingest.index.schema import TABLES, IndexFormatError, Manifest, table_glob

HERE = Path(__file__).parent
IndexNotFound = IndexFormatError  # the name the app and CLI catch


def _literal(s: str) -> str:
    """A SQL string literal (the index path is the operator's, but quote it properly anyway)."""
    return "'" + s.replace("'", "''") + "'"


def sql_file(name: str) -> str:
    return (HERE / f"{name}.sql").read_text()


DUCKDB_TYPES = {"int16": "SMALLINT", "int32": "INTEGER", "int64": "BIGINT", "float": "FLOAT", "double": "DOUBLE"}
DUCKDB_TYPES |= {"string": "VARCHAR", "bool": "BOOLEAN"}


def _empty(table) -> str:
    """A SELECT of no rows with the columns a read of `table`'s Parquet files would have."""
    cols = [(f.name, DUCKDB_TYPES[str(f.type)]) for f in table.schema]
    cols += [(c, "BIGINT") for c in table.by] if table.partitioned else []
    return "SELECT " + ", ".join(f'NULL::{t} AS "{c}"' for c, t in cols) + " WHERE false"


def connect(index: str | Path, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with every view defined over `index` (read-only on the files)."""
    root = Path(index).resolve()
    Manifest.read(root)  # raises IndexFormatError with the reason
    con = con or duckdb.connect(":memory:")
    for name, table in TABLES.items():
        if table.optional and not list(root.glob(f"{name}/**/*.parquet")):
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {_empty(table)}")  # `fra explain` not run yet
            continue
        con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_literal(table_glob(root, name))}"
            f"{', hive_partitioning = true' if table.partitioned else ''})"
        )
    _describe_tables(con)
    con.execute(sql_file("views"))
    return con


def _describe_tables(con) -> None:
    """The tables' descriptions from the schema, as DuckDB comments (duckdb_views(), duckdb_columns())."""
    for name, table in TABLES.items():
        con.execute(f'COMMENT ON VIEW "{name}" IS {_literal(table.about)}')
        parts = [(c, f"{c} (hive partition)") for c in table.by] if table.partitioned else []
        present = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        for col, meaning in [(c, m) for c, _, m in table.columns if c in present] + parts:
            con.execute(f'COMMENT ON COLUMN "{name}"."{col}" IS {_literal(meaning)}')


def manifest(index: str | Path) -> dict:
    """The validated manifest as a dict."""
    import dataclasses

    return dataclasses.asdict(Manifest.read(Path(index)))
