"""The one merge of block partials into an index (see `blocks.py` for the partials), and
`fra merge`, which runs it for the Slurm-style path (`fra ingest --shard i/n` on each node).

Every engine ends here, so there is no second implementation. Per layer:

- `select_channels`: the count partials of all blocks, summed by channel in DuckDB (integers,
  exact in any order, out of core under the memory budget); channels with count >= min_count
  are kept (`kept.parquet`), which the statistics blocks read.
- `merge_layer`: per head, the statistics partials are added up by channel in DuckDB. Counts
  are integer sums. The float64 sums of the blocks are added as 128-bit fixed-point integers
  (units of 2^-60, `FIXED_POINT`): each block's sum rounded to that unit, then added exactly,
  so the total does not depend on the order of addition; it depends only on the partials, never
  on the engine, the schedule or DuckDB's threads. (2^-60 is finer than the float32 rounding of any
  term above 1e-11; the range, |sum| < 2^66, is far above any score statistic.) Examples are
  re-ranked over the union of the blocks' top examples by |value| descending, then sample
  ascending (each block kept its strongest samples of each channel, so the union holds the
  strongest of all). Rows and pairs are the blocks' part files, in block order. A partial is
  written in the index's own schema, its sums already in fixed point, so with a single block
  its channels and examples are the answer: their files are linked into the index as they are.
- `finish`: the samples table, the features table (fire counts summed over blocks), the
  manifest, and the commit that publishes the index (`store.IndexWriter.commit`, which survives
  a kill at any step).

`fra merge --out DIR` takes whatever step is due, layer by layer, and says what is missing:
with the count blocks all present it selects the channels (the shards then run again for the
statistics); with the statistics blocks all present it finishes the layer, and with every layer
finished it writes the index. Every partial is checked against its file record first (a
corrupt one is removed and named, for its shard to compute again). Merging is idempotent: a
finished block is never recomputed, and a re-run replaces the output whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from .blocks import FIXED_POINT, Task, describe, kept_path, layer_dir, missing, partial_dir, tasks, verify
from .job import Job
from .schema import IndexFormatError, Manifest
from .store import IndexWriter, OutLock, recover, write_parquet


@dataclass(frozen=True)
class MergeConfig:
    out: Path = opt(
        Path("runs/demo"),
        "the --out of the `fra ingest --shard i/n` runs: selects the channels once "
        "every shard's count pass is done, writes the index once every "
        "shard's statistics pass is done",
    )


def _connect(budget_bytes: int, tmp: Path):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{max(budget_bytes // 2**20, 64)}MB'")
    con.execute("SET temp_directory = ?", [str(tmp)])
    return con


def _files(partials: Path, job: Job, phase: str, layer: int, name: str) -> list[str]:
    return [str(partial_dir(partials, t) / name) for t in tasks(job, phase, layer)]


def _require(partials: Path, todo: list[Task], what: str, check: bool = True) -> None:
    """Every block of `todo` done, and (with `check`) its partial as written; a corrupt partial
    is removed and named, so that its shard computes it again."""
    bad = verify(partials, todo) if check else []
    if bad:
        raise IndexFormatError(
            f"{what}: {len(bad)} partial(s) failed verification and were removed ({describe(bad)}); "
            "run the shards that own those blocks again (`fra ingest` recomputes them by itself)"
        )
    absent = missing(partials, todo)
    if absent:
        shown = ", ".join(str(t.block) for t in absent[:20]) + (" ..." if len(absent) > 20 else "")
        raise IndexFormatError(
            f"{what}: {len(absent)} of {len(todo)} blocks are not done yet ({shown}); `fra ingest --shard i/n` "
            f"computes the blocks b with b mod n == i, so run the shards that own them"
        )


def select_channels(partials: Path, job: Job, layer: int, check: bool = True) -> None:
    """Sum the count partials of all blocks and keep channels with count >= min_count
    (`check=False`: the caller has just verified the partials)."""
    todo = tasks(job, "count", layer)
    _require(partials, todo, f"layer {layer}: cannot select channels", check)
    t0 = time.time()
    con = _connect(job.budget.select_bytes, layer_dir(partials, layer) / "_duckdb")
    con.execute(
        "CREATE TEMP TABLE agg AS SELECT key, sum(count)::BIGINT AS count FROM read_parquet(?) GROUP BY key",
        [_files(partials, job, "count", layer, "counts.parquet")],
    )
    n_seen = con.execute("SELECT count(*) FROM agg").fetchall()[0][0]
    # every statistics block reads the whole kept set, so it fits in memory
    kept = con.sql(
        "SELECT key, count FROM agg WHERE count >= ? ORDER BY key", params=[job.policy.min_count]
    ).to_arrow_table()
    con.close()
    (layer_dir(partials, layer) / "seen.json").write_text(
        json.dumps({"channels_seen": int(n_seen), "select_seconds": time.time() - t0})
    )
    dest = kept_path(partials, layer)
    tmp = dest.with_suffix(".tmp")
    write_parquet(kept, tmp)
    tmp.replace(dest)


# The blocks' float64 sums (already rounded to units of 2^-60, `blocks.fixed_point`) are added as
# 128-bit integers: integer addition is exact, so the total does not depend on the order DuckDB's
# threads add in. Range: |x| < 2^66.
def _exact_sum(column: str) -> str:
    unit = f"{int(FIXED_POINT)}::DOUBLE"
    return f"sum(({column} * {unit})::HUGEINT)::DOUBLE / {unit}"


def _channels_sql() -> str:
    """One head's channels, summed over the blocks' partials (counts as integers, sums in fixed point)."""
    return f"""SELECT feat_q, feat_k, sum(count)::BIGINT AS count, {_exact_sum("sum")} AS sum,
                      {_exact_sum("sumsq")} AS sumsq, sum(ind_count)::BIGINT AS ind_count,
                      {_exact_sum("ind_sum")} AS ind_sum, {_exact_sum("ind_sumsq")} AS ind_sumsq
               FROM read_parquet(?) GROUP BY feat_q, feat_k ORDER BY feat_q, feat_k"""


def _examples_sql() -> str:
    """One head's examples: the strongest `?` of each channel over the blocks' top examples, by
    |value| descending, then sample ascending."""
    return """SELECT feat_q, feat_k, (row_number() OVER w - 1)::TINYINT AS rank, sample, q, k, value
              FROM read_parquet(?)
              WINDOW w AS (PARTITION BY feat_q, feat_k ORDER BY abs(value) DESC, sample)
              QUALIFY row_number() OVER w <= ? ORDER BY feat_q, feat_k, rank"""


def _as_is(todo: list[Task]) -> bool:
    """Whether the blocks' channels and examples need no merging: there is one block."""
    return len(todo) == 1


def _link(src: Path, dest: Path) -> None:
    """`dest` as a hard link to the (immutable) partial file `src`, or a copy across file systems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy(src, dest)


def merge_layer(writer: IndexWriter, job: Job, layer: int, check: bool = True) -> dict:
    """Add up the statistics partials of all blocks into the layer's tables; returns its stats
    (`check=False`: the caller has just verified the partials)."""
    import pyarrow.parquet as pq

    partials = writer.partials
    todo = tasks(job, "stats", layer)
    _require(partials, todo, f"layer {layer}: cannot merge", check)
    if check:
        _require(partials, tasks(job, "count", layer), f"layer {layer}: cannot merge")
    t0 = time.time()
    writer.begin_layer(layer)
    con = _connect(job.budget.merge_bytes, writer.work_dir(layer) / "_duckdb")
    for head in job.heads:
        parts = {
            name: [
                (t, f)
                for t in todo
                for f in sorted((partial_dir(partials, t) / name / f"head={head}").glob("*.parquet"))
            ]
            for name in ("channels", "examples", "rows", "pairs")
        }
        # a block's partial is in the index's schema: with one block, channels and examples are
        # the answer as they are; with several they are added up and re-ranked
        single = _as_is(todo)
        linked = ("channels", "examples", "rows", "pairs") if single else ("rows", "pairs")
        if not single:
            files = {name: [str(f) for _, f in parts[name]] for name in ("channels", "examples")}
            writer.write("channels", con.sql(_channels_sql(), params=[files["channels"]]).to_arrow_table(), layer, head)
            ex = con.sql(_examples_sql(), params=[files["examples"], job.policy.examples_per_channel])
            writer.write("examples", ex.to_arrow_table(), layer, head)
        for name in linked:
            dest = writer.work_dir(layer) / name / f"layer={layer}" / f"head={head}"
            dest.mkdir(parents=True, exist_ok=True)
            for t, f in parts[name]:
                _link(f, dest / f"part-{t.block:06d}-{f.stem[5:]}.parquet")
    con.close()

    def block_stats(phase):
        return [json.loads((partial_dir(partials, t) / "stats.json").read_text()) for t in tasks(job, phase, layer)]

    counted, measured = block_stats("count"), block_stats("stats")
    stats = {}
    for j, h in enumerate(job.heads):
        ff_abs = sum(b["ff_abs"][j] for b in measured)
        stats[str(h)] = {
            "rows": sum(b["rows"][j] for b in measured),
            "kept_abs_share": sum(b["kept_abs"][j] for b in measured) / ff_abs if ff_abs else 0.0,
        }
    seconds = sum(b["seconds"] for b in counted + measured)
    stats.update(
        {
            **json.loads((layer_dir(partials, layer) / "seen.json").read_text()),
            "channels_kept": pq.read_metadata(kept_path(partials, layer)).num_rows,
            "count_runs_spilled": sum(b["count_runs_spilled"] for b in counted),
            "sweeps": max(b["sweeps"] for b in measured),
            "kept_channels_per_sweep": max(b["kept_channels_per_sweep"] for b in measured),
            "blocks": len(todo),
            "block_seconds": seconds,
            "samples_per_s": job.n_samples / seconds if seconds else 0.0,
            "merge_seconds": time.time() - t0,
        }
    )
    writer.finish_layer(layer, stats)
    return stats


def finish(writer: IndexWriter, job: Job) -> Path:
    """The samples and features tables, the manifest, and the commit that publishes the index."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..registry import FeatureLabel

    partials = writer.partials
    stats = {str(layer): writer.layer_stats(layer) for layer in job.layers}
    samples = pq.read_table(partials / "samples.parquet")
    writer.write("samples", samples)
    n_tok = pa.compute.sum(samples["n_tokens"].cast(pa.int64())).as_py()
    con = _connect(job.budget.merge_bytes, partials / "_duckdb")
    frames = []
    for layer in job.layers:
        fired = con.execute(
            "SELECT feature, sum(fires)::BIGINT AS fires, sum(bos)::BIGINT AS bos FROM read_parquet(?) "
            "GROUP BY feature",
            [_files(partials, job, "count", layer, "features.parquet")],
        ).df()
        df = pd.DataFrame({"layer": layer, "feature": range(job.d_sae[str(layer)])})
        df = df.merge(fired, on="feature", how="left").fillna({"fires": 0, "bos": 0})
        df["index_frequency"] = df["fires"] / n_tok
        df["bos_rate"] = df["bos"] / samples.num_rows
        frames.append(df.drop(columns=["fires", "bos"]))
    con.close()
    df = pd.concat(frames)
    table = job.feature_table
    if table is not None and Path(table).exists():
        df = df.merge(pq.read_table(table).to_pandas(), on=["layer", "feature"], how="left")
    for col in ("label", "top_tokens", "prev_token", "frequency", "mean_act_when_active", "max_act", "top_contexts"):
        if col not in df:
            df[col] = None
    punct = df["top_tokens"].apply(lambda ts: ts is not None and FeatureLabel(tuple(ts)).is_punctuation)
    df["punct_or_bos"] = punct | (df["bos_rate"] > 0.5)
    writer.write("features", pa.Table.from_pandas(df, preserve_index=False))
    manifest = Manifest(
        model=job.model,
        sae=job.sae,
        corpus=job.corpus,
        policy=dataclasses.asdict(job.policy),
        layers=list(job.layers),
        heads=list(job.heads),
        n_samples=job.n_samples,
        shard="0/1",
        stats=stats,
        code_version=job.code_version,
    )
    return writer.commit(manifest)


def advance(writer: IndexWriter, job: Job) -> Path | None:
    """Take every step that is due: select channels where all count blocks are done, merge
    layers where all statistics blocks are done, and write the index when every layer is
    merged (its path is returned; None while blocks are missing)."""
    partials = writer.partials
    for layer in job.layers:
        if writer.layer_stats(layer) is not None:
            continue
        if not kept_path(partials, layer).exists():
            select_channels(partials, job, layer)
            print(f"layer {layer}: channels selected; run the shards again for the statistics pass")
        elif not missing(partials, tasks(job, "stats", layer)):
            merge_layer(writer, job, layer)
            print(f"layer {layer}: merged")
        else:
            _require(partials, tasks(job, "stats", layer), f"layer {layer}: cannot merge")
    if all(writer.layer_stats(layer) is not None for layer in job.layers):
        return finish(writer, job)
    return None


def run(cfg: MergeConfig) -> Path | None:
    """`fra merge`: finish an interrupted commit if there is one, else take the step that is due."""
    done = recover(Path(cfg.out))
    if done is not None:
        print(done)
        return Path(cfg.out)
    with OutLock(Path(cfg.out)):
        writer = IndexWriter.resume(Path(cfg.out))
        return advance(writer, writer.job)
