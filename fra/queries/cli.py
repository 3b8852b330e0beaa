"""`fra query`, `fra sql` and `fra export`: the index from the command line (no torch).

Each first finishes an interrupted commit of the index, if one is pending (`store.recover`),
and says so on stderr. `fra sql` runs read statements only on a connection that can read the
index's files and no others (`fra.queries.connect`). `fra export` writes only into an --out
that is empty or holds an earlier export (`--overwrite`), never inside the index, and deletes
only the files an earlier export recorded in `OUT/_fra_export.json`.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

from fra.errors import Parser
from fra.ingest.index.schema import IndexFormatError
from fra.ingest.index.store import open_index, recover

from . import connect, manifest, read_only_statements
from .lib import (
    QUERIES,
    RANK_BY,
    channel_examples,
    channel_ranking,
    feature_channels,
    feature_marginals,
    head_summary,
    top_channels,
)

EXPORT_RECORD = "_fra_export.json"  # the files an export wrote: the only ones a later --overwrite deletes

VIEWS = (
    "rows",
    "pairs",
    "channels",
    "samples",
    "features",
    "channel_stats",
    "head_totals",
    "head_summary",
    "top_entries",
    "pattern",
    "example_terms",
    "activations",
    "channel_diag",
    "query_feature_marginals",
    "key_feature_marginals",
)


def _print(df, max_rows=50):
    import pandas as pd

    with pd.option_context(
        "display.max_rows",
        max_rows,
        "display.width",
        200,
        "display.max_columns",
        30,
        "display.float_format",
        "{:.4g}".format,
    ):
        print(df.to_string(index=False) if len(df) else "(no rows)")


def main(argv):
    p = Parser(prog="fra query", description="Common questions over an FRA index.")
    p.add_argument("--index", type=Path, default=Path("runs/demo"), help="the index directory (default: runs/demo)")
    sub = p.add_subparsers(dest="q", required=True, parser_class=Parser)
    s = sub.add_parser("top-channels", help="the top channels of a head, by |mean-when-active|")
    s.add_argument("--layer", type=int, required=True, help="the layer (one the index holds)")
    s.add_argument("--head", type=int, required=True, help="the head (one the index holds)")
    s.add_argument("--n", type=int, default=20, help="rows to show (default: 20)")
    s.add_argument(
        "--min-count", type=int, default=8, help="only channels with at least this many (q, k) pairs (default: 8)"
    )
    s.add_argument("--drop-noise", action="store_true", help="drop BOS and punctuation features")
    s.add_argument(
        "--by",
        choices=RANK_BY,
        default="mean",
        help="rank by |mean-when-active| (default), |total contribution| = |count * mean| (total) "
        "or |share of the head's feature x feature sum| (share)",
    )
    s.add_argument("--no-diag", action="store_true", help="leave out q = k entries (needs `fra explain`)")
    s.add_argument("--no-self", action="store_true", help="leave out self pairs (feat_q = feat_k)")
    s = sub.add_parser("marginals", help="a head's query or key features by summed channel contribution")
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--head", type=int, required=True)
    s.add_argument("--side", choices=("q", "k"), default="q", help="group the channels by their query or key feature")
    s.add_argument("--n", type=int, default=20, help="features shown (largest |total| first)")
    s.add_argument("--no-diag", action="store_true", help="leave out q = k entries (needs `fra explain`)")
    s.add_argument("--no-self", action="store_true", help="leave out self pairs (feat_q = feat_k)")
    s = sub.add_parser("feature", help="every channel a feature appears in")
    s.add_argument("feature", type=int, help="the SAE feature id")
    s.add_argument("--layer", type=int, help="only this layer (default: every indexed layer)")
    s.add_argument("--n", type=int, default=30, help="rows to show (default: 30)")
    s = sub.add_parser("channel", help="the top examples of one channel, with tokens")
    s.add_argument("--layer", type=int, required=True, help="the layer (one the index holds)")
    s.add_argument("--head", type=int, required=True, help="the head (one the index holds)")
    s.add_argument("--feat-q", type=int, required=True, help="query-side feature")
    s.add_argument("--feat-k", type=int, required=True, help="key-side feature")
    s.add_argument("--n", type=int, default=20, help="examples to show (default: 20)")
    sub.add_parser("heads", help="per head: score shares of the terms and induction behaviour")
    sub.add_parser(
        "verify",
        help="check every file of the index against the sha256 and row count its manifest recorded "
        "(opening checks presence, sizes and partitions only)",
    )
    a = p.parse_args(argv)
    if a.q == "verify":
        recovered = recover(a.index)
        if recovered is not None:
            print(recovered, file=sys.stderr)
        m = open_index(a.index, full=True)
        print(f"{a.index}: all {len(m.files)} files match the sha256 and row counts in its manifest")
        return
    con = open_cli(a.index)
    _check_indexed(a.index, getattr(a, "layer", None), getattr(a, "head", None))
    if a.q == "top-channels" and (a.by != "mean" or a.no_diag or a.no_self):
        _print(channel_ranking(con, a.layer, a.head, a.n, a.min_count, a.drop_noise, a.by, a.no_diag, a.no_self))
    elif a.q == "top-channels":
        _print(top_channels(con, a.layer, a.head, a.n, a.min_count, a.drop_noise))
    elif a.q == "marginals":
        _print(feature_marginals(con, a.layer, a.head, a.side, a.n, a.no_diag, a.no_self))
    elif a.q == "feature":
        _print(feature_channels(con, a.feature, a.layer, a.n))
    elif a.q == "channel":
        _print(channel_examples(con, a.layer, a.head, a.feat_q, a.feat_k, a.n))
    else:
        _print(head_summary(con), max_rows=500)


def open_cli(index: Path):
    """Finish an interrupted commit of `index` (saying so), then connect."""
    done = recover(index)
    if done is not None:
        print(done, file=sys.stderr)
    return connect(index)


def _check_indexed(index: Path, layer: int | None, head: int | None) -> None:
    """A layer or head the index does not hold is named, with the ones it does, instead of an
    empty answer."""
    m = manifest(index)
    if layer is not None and layer not in m["layers"]:
        raise IndexFormatError(f"--layer {layer} is not indexed in {index}; its layers are {m['layers']}")
    if head is not None and head not in m["heads"]:
        raise IndexFormatError(f"--head {head} is not indexed in {index}; its heads are {m['heads']}")


def _run_read_only(con, sql: str):
    for statement in read_only_statements(sql)[:-1]:
        con.execute(statement)
    return con.execute(read_only_statements(sql)[-1]).df()


def sql_main(argv):
    p = Parser(
        prog="fra sql",
        description="Read-only SQL over an FRA index, views defined: " + ", ".join(VIEWS) + ". Only SELECT "
        "(with DESCRIBE, SHOW, SUMMARIZE) and EXPLAIN run, and no file outside the index can be read; "
        "write results with `fra export`.",
    )
    p.add_argument("--index", type=Path, default=Path("runs/demo"), help="the index directory (default: runs/demo)")
    p.add_argument("query", nargs="?", help="SQL to run; without it, an interactive shell")
    a = p.parse_args(argv)
    con = open_cli(a.index)
    if a.query:
        _print(_run_read_only(con, a.query), max_rows=200)
        return
    print(f"FRA SQL shell over {a.index}. Views: {', '.join(VIEWS)}. End a statement with ';', quit with Ctrl-D.")
    buf = ""
    for line in sys.stdin:
        buf += line
        if buf.strip().endswith(";"):
            try:
                _print(_run_read_only(con, buf), max_rows=200)
            except Exception as exc:  # noqa: BLE001 - a shell reports and goes on
                print(f"error: {str(exc).splitlines()[0]}")
            buf = ""


def export_main(argv):
    p = Parser(
        prog="fra export",
        description="Write a view, or filtered rows, to Parquet. --out must be empty or new, or hold an earlier "
        "export (replaced with --overwrite); it may not be inside the index. Only files an earlier export "
        "wrote (listed in OUT/_fra_export.json) are ever deleted.",
    )
    p.add_argument("--index", type=Path, default=Path("runs/demo"), help="the index directory (default: runs/demo)")
    p.add_argument("--view", default="rows", choices=VIEWS, help="the view or table to write (default: rows)")
    p.add_argument("--out", type=Path, required=True, help="directory to write; new or empty unless --overwrite")
    p.add_argument("--layer", type=int, help="only this layer")
    p.add_argument("--head", type=int, help="only this head")
    p.add_argument("--feature", type=int, help="keep rows where feat_q or feat_k is this feature")
    p.add_argument("--partition-by", default="layer,head", help="comma-separated columns, or '' for none")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out (its recorded files only; other files are kept and named)",
    )
    p.add_argument(
        "--format",
        choices=["parquet", "neuronpedia-qk"],
        default="parquet",
        help="parquet: index rows; neuronpedia-qk: one prompt's QK attribution as Neuronpedia graph JSON "
        "(runs the model; see `fra export --format neuronpedia-qk --help`)",
    )
    a = p.parse_args(argv)
    con = open_cli(a.index)
    _check_indexed(a.index, a.layer, a.head)
    n = export(con, a.view, a.out, a.layer, a.head, a.feature, a.partition_by, overwrite=a.overwrite, index=a.index)
    print(f"wrote {n} rows to {a.out}")


def _check_export_out(out: Path, index: Path | None, overwrite: bool) -> list[str]:
    """The files of an earlier export in `out` that --overwrite replaces; refuses an --out inside
    the index, and a non-empty one without --overwrite."""
    out = Path(out)
    if index is not None:
        idx, dest = Path(index).resolve(), out.resolve()
        if dest == idx or idx in dest.parents:
            raise IndexFormatError(f"--out {out} is inside the index {index}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise IndexFormatError(f"--out {out} is a file; choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return []
    record = out / EXPORT_RECORD
    if not overwrite:
        raise IndexFormatError(
            f"--out {out} is not empty; choose an empty or new directory, or pass --overwrite to replace an "
            "earlier export there"
        )
    if not record.exists():
        raise IndexFormatError(
            f"--out {out} is not empty and holds no earlier export ({EXPORT_RECORD}); --overwrite only replaces "
            "files fra export wrote, so choose an empty or new directory"
        )
    return json.loads(record.read_text())["files"]


def export(
    con,
    view,
    out,
    layer=None,
    head=None,
    feature=None,
    partition_by="layer,head",
    overwrite: bool = False,
    index: Path | None = None,
) -> int:
    """Write `view` (filters bound as parameters) to hive-partitioned Parquet under `out`. The
    files are written into a temporary directory beside `out` and moved in, then recorded in
    `out/_fra_export.json`; with `overwrite`, the previous export's recorded files are deleted
    first, and nothing else is."""
    import pyarrow.dataset as ds

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
    out = Path(out)
    previous = _check_export_out(out, index, overwrite)
    cols = [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]
    where, params = [], []
    for col, val in (("layer", layer), ("head", head)):
        if val is not None:
            if col not in cols:
                raise ValueError(f"view {view} has no column {col}")
            where.append(f"{col} = ?")
            params.append(val)
    if feature is not None:
        if "feat_q" not in cols:
            raise ValueError(f"view {view} has no feature columns")
        where.append("(feat_q = ? OR feat_k = ?)")
        params += [feature, feature]
    sql = f"SELECT * FROM {view}" + (" WHERE " + " AND ".join(where) if where else "")
    result = con.execute(sql, params)
    table = result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()
    parts = [c for c in partition_by.split(",") if c] if partition_by else []
    parts = [c for c in parts if c in table.column_names]
    tmp = out.with_name(f"{out.name}.export-{uuid.uuid4().hex[:8]}")
    try:
        ds.write_dataset(
            table,
            tmp,
            format="parquet",
            partitioning=parts or None,
            partitioning_flavor="hive" if parts else None,
            existing_data_behavior="error",
        )
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        for rel in previous:
            (out / rel).unlink(missing_ok=True)
        for rel in written:
            dest = out / rel
            if dest.exists():
                raise IndexFormatError(f"{dest} exists and was not written by fra export; move it away")
            dest.parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).replace(dest)
        (out / EXPORT_RECORD).write_text(json.dumps({"view": view, "sql": sql, "params": params, "files": written}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    others = [
        p for p in out.rglob("*") if p.is_file() and p.relative_to(out).as_posix() not in {*written, EXPORT_RECORD}
    ]
    if others:
        print(
            f"note: {len(others)} file(s) in {out} were not written by this export, e.g. {others[0]}", file=sys.stderr
        )
    return table.num_rows


__all__ = ["main", "sql_main", "export_main", "export", "QUERIES"]
