"""`fra query`, `fra sql` and `fra export`: the index from the command line (no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import connect
from .lib import QUERIES, channel_examples, feature_channels, head_summary, top_channels

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
    p = argparse.ArgumentParser(prog="fra query", description="Common questions over an FRA index.")
    p.add_argument("--index", type=Path, default=Path("runs/demo"))
    sub = p.add_subparsers(dest="q", required=True)
    s = sub.add_parser("top-channels", help="the top channels of a head, by |mean-when-active|")
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--head", type=int, required=True)
    s.add_argument("--n", type=int, default=20)
    s.add_argument("--min-count", type=int, default=8)
    s.add_argument("--drop-noise", action="store_true", help="drop BOS and punctuation features")
    s = sub.add_parser("feature", help="every channel a feature appears in")
    s.add_argument("feature", type=int)
    s.add_argument("--layer", type=int)
    s.add_argument("--n", type=int, default=30)
    s = sub.add_parser("channel", help="the top examples of one channel, with tokens")
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--head", type=int, required=True)
    s.add_argument("--feat-q", type=int, required=True)
    s.add_argument("--feat-k", type=int, required=True)
    s.add_argument("--n", type=int, default=20)
    sub.add_parser("heads", help="per head: score shares of the terms and induction behaviour")
    a = p.parse_args(argv)
    con = connect(a.index)
    if a.q == "top-channels":
        _print(top_channels(con, a.layer, a.head, a.n, a.min_count, a.drop_noise))
    elif a.q == "feature":
        _print(feature_channels(con, a.feature, a.layer, a.n))
    elif a.q == "channel":
        _print(channel_examples(con, a.layer, a.head, a.feat_q, a.feat_k, a.n))
    else:
        _print(head_summary(con), max_rows=500)


def sql_main(argv):
    p = argparse.ArgumentParser(prog="fra sql", description="SQL over an FRA index, views defined: " + ", ".join(VIEWS))
    p.add_argument("--index", type=Path, default=Path("runs/demo"))
    p.add_argument("query", nargs="?", help="SQL to run; without it, an interactive shell")
    a = p.parse_args(argv)
    con = connect(a.index)
    if a.query:
        _print(con.execute(a.query).df(), max_rows=200)
        return
    print(f"FRA SQL shell over {a.index}. Views: {', '.join(VIEWS)}. End a statement with ';', quit with Ctrl-D.")
    buf = ""
    for line in sys.stdin:
        buf += line
        if buf.strip().endswith(";"):
            try:
                _print(con.execute(buf).df(), max_rows=200)
            except Exception as exc:  # noqa: BLE001 - a shell reports and goes on
                print(f"error: {exc}")
            buf = ""


def export_main(argv):
    p = argparse.ArgumentParser(prog="fra export", description="Write a view, or filtered rows, to Parquet.")
    p.add_argument("--index", type=Path, default=Path("runs/demo"))
    p.add_argument("--view", default="rows", choices=VIEWS)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layer", type=int)
    p.add_argument("--head", type=int)
    p.add_argument("--feature", type=int, help="keep rows where feat_q or feat_k is this feature")
    p.add_argument("--partition-by", default="layer,head", help="comma-separated columns, or '' for none")
    p.add_argument(
        "--format",
        choices=["parquet", "neuronpedia-qk"],
        default="parquet",
        help="parquet: index rows; neuronpedia-qk: one prompt's QK attribution as Neuronpedia graph JSON "
        "(runs the model; see `fra export --format neuronpedia-qk --help`)",
    )
    a = p.parse_args(argv)
    n = export(connect(a.index), a.view, a.out, a.layer, a.head, a.feature, a.partition_by)
    print(f"wrote {n} rows to {a.out}")


def export(con, view, out, layer=None, head=None, feature=None, partition_by="layer,head") -> int:
    """Write `view` (filters bound as parameters) to hive-partitioned Parquet under `out`."""
    import pyarrow.dataset as ds

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
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
    Path(out).mkdir(parents=True, exist_ok=True)
    ds.write_dataset(
        table,
        out,
        format="parquet",
        partitioning=parts or None,
        partitioning_flavor="hive" if parts else None,
        existing_data_behavior="delete_matching",
    )
    return table.num_rows


__all__ = ["main", "sql_main", "export_main", "export", "QUERIES"]
