"""`fra merge`: combine the indexes of `fra ingest --shard i/n` runs into one index.

Rows and pairs are concatenated (shards hold disjoint samples); channel statistics are added
(count, sum, sumsq) or combined (min, max), which is exact only when no shard dropped channels,
so shards must be built with `--min-count 1`; the merged index then applies `--min-count`.
Merging is idempotent: the output depends only on the set of shards, a shard given twice or
overlapping another is refused, and a re-run replaces the output whole (staging + rename).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .runner import IndexError_, read_manifest


@dataclass(frozen=True)
class MergeConfig:
    out: Path = Path("runs/merged")
    shards: tuple[Path, ...] = ()
    min_count: int = 64

    def __post_init__(self):
        if len(self.shards) < 1:
            raise ValueError("give the shard indexes to merge with --shards DIR [DIR ...]")


def _shard_set(m: dict) -> tuple[set[int], int]:
    ids, n = m["shard"].split("/")
    return {int(i) for i in ids.split("+")}, int(n)


def check_shards(manifests: list[dict]) -> tuple[list[int], int]:
    first = manifests[0]
    same = ("model", "sae", "corpus", "layers", "heads")
    seen: set[int] = set()
    n_all = None
    for m in manifests:
        for key in same:
            if m[key] != first[key]:
                raise IndexError_(f"shards disagree on {key}: {m[key]} vs {first[key]}")
        if m["policy"]["min_count"] != 1:
            raise IndexError_("a shard dropped rare channels (min_count > 1), so its channel statistics "
                              "cannot be merged exactly; rebuild the shards with --min-count 1")
        ids, n = _shard_set(m)
        if n_all is not None and n != n_all:
            raise IndexError_(f"shards split the corpus differently: /{n} vs /{n_all}")
        n_all = n
        if ids & seen:
            raise IndexError_(f"shard(s) {sorted(ids & seen)} given more than once")
        seen |= ids
    return sorted(seen), n_all


def run(cfg: MergeConfig) -> Path:
    import duckdb

    from .runner import SCHEMA_VERSION, code_version

    manifests = [read_manifest(s) for s in cfg.shards]
    ids, n = check_shards(manifests)
    out = Path(cfg.out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    con = duckdb.connect()
    first = manifests[0]
    order = sorted(range(len(cfg.shards)), key=lambda i: min(_shard_set(manifests[i])[0]))
    for layer in first["layers"]:
        for head in first["heads"]:
            part = f"layer={layer}/head={head}"
            for table in ("rows", "pairs"):
                dest = staging / table / part
                dest.mkdir(parents=True)
                for j, i in enumerate(order):
                    shutil.copy(Path(cfg.shards[i]) / table / part / "part-0.parquet", dest / f"part-{j}.parquet")
            files = [str(Path(cfg.shards[i]) / "channels" / part / "part-0.parquet") for i in order]
            dest = staging / "channels" / part
            dest.mkdir(parents=True)
            con.execute(
                """COPY (
                     SELECT feat_q, feat_k, sum(count)::BIGINT AS count, sum(sum) AS sum, sum(sumsq) AS sumsq,
                            min(min) AS min, max(max) AS max, sum(ind_count)::BIGINT AS ind_count,
                            sum(ind_sum) AS ind_sum, sum(ind_sumsq) AS ind_sumsq,
                            min(ind_min) AS ind_min, max(ind_max) AS ind_max
                     FROM read_parquet(?) GROUP BY feat_q, feat_k HAVING sum(count) >= ?
                     ORDER BY feat_q, feat_k
                   ) TO '""" + str(dest / "part-0.parquet").replace("'", "''") + "' (FORMAT parquet, COMPRESSION zstd)",
                [files, cfg.min_count],
            )
    samples = [str(Path(cfg.shards[i]) / "samples" / "part-0.parquet") for i in order]
    (staging / "samples").mkdir()
    con.execute("COPY (SELECT * FROM read_parquet(?) ORDER BY sample) TO '"
                + str(staging / "samples" / "part-0.parquet").replace("'", "''") + "' (FORMAT parquet)", [samples])
    feats = [str(Path(cfg.shards[i]) / "features" / "part-0.parquet") for i in order]
    n_tokens = [con.execute("SELECT sum(n_tokens) FROM read_parquet(?)", [samples[j]]).fetchone()[0]
                for j in range(len(order))]
    n_samples = [manifests[i]["n_samples"] for i in order]
    (staging / "features").mkdir()
    # index_frequency (per token) and bos_rate (per sample) are per-shard rates: weight them
    con.execute("CREATE TEMP TABLE w (file VARCHAR, n_tok DOUBLE, n DOUBLE)")
    con.executemany("INSERT INTO w VALUES (?, ?, ?)", list(zip(feats, n_tokens, n_samples)))
    con.execute(
        """COPY (
             SELECT f.* EXCLUDE (index_frequency, bos_rate, punct_or_bos, filename),
                    sum(f.index_frequency * w.n_tok) OVER k / sum(w.n_tok) OVER k AS index_frequency,
                    sum(f.bos_rate * w.n) OVER k / sum(w.n) OVER k AS bos_rate,
                    bool_or(f.punct_or_bos) OVER k AS punct_or_bos
             FROM read_parquet(?, filename = true) f JOIN w ON f.filename = w.file
             WINDOW k AS (PARTITION BY f.layer, f.feature)
             QUALIFY row_number() OVER (PARTITION BY f.layer, f.feature ORDER BY f.filename) = 1
             ORDER BY layer, feature
           ) TO '""" + str(staging / "features" / "part-0.parquet").replace("'", "''") + "' (FORMAT parquet)",
        [feats],
    )
    manifest = {
        "schema_version": SCHEMA_VERSION, **{k: first[k] for k in ("model", "sae", "corpus", "layers", "heads")},
        "code_version": code_version(), "policy": {**first["policy"], "min_count": cfg.min_count},
        "n_samples": sum(m["n_samples"] for m in manifests), "shard": "+".join(map(str, ids)) + f"/{n}",
        "stats": {"merged_from": [str(s) for s in cfg.shards]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out
