"""DuckDB access to an FRA index: `connect(index)` checks the manifest against the data
(`fra.ingest.index.store.open_index`) and defines one view per table of the index (names and
layouts from `fra.ingest.index.schema`) and the views of views.sql.

The connection reads the index only: after the views are defined, DuckDB's external access is
limited to the index directory (`allowed_directories`, `enable_external_access = false`) and the
configuration is locked, so no statement run on it can read or write another file. `fra sql`
also refuses every statement but SELECT and EXPLAIN (`read_only_statements`), which keeps
COPY ... TO out of the index itself. Never imports torch."""

from __future__ import annotations

from pathlib import Path

import duckdb

from fra.ingest.index.schema import TABLES, IndexFormatError, Manifest, table_glob
from fra.ingest.index.store import open_index

HERE = Path(__file__).parent
IndexNotFound = IndexFormatError  # the name the app and CLI catch
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


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
    """A DuckDB connection with every view defined over `index`. A connection made here can read
    the index's files and no others, and write none; a connection passed in as `con` is left
    as configured."""
    root = Path(index).resolve()
    open_index(root)  # raises IndexFormatError naming the file that does not match
    own = con is None
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
    if own:
        con.execute("SET allowed_directories = ?", [[str(root) + "/"]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def read_only_statements(sql: str) -> list[str]:
    """The statements of `sql`, if each is a SELECT (DESCRIBE, SHOW, SUMMARIZE and WITH are
    SELECTs) or an EXPLAIN; else `IndexFormatError` naming the first other statement."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise IndexFormatError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    for st in statements:
        if st.type not in READ_STATEMENTS:
            raise IndexFormatError(
                f"fra sql runs read statements only (SELECT, EXPLAIN); refused {st.type.name}: {st.query.strip()[:80]}"
                " (to write results use `fra export`)"
            )
    return [st.query for st in statements]


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
