"""`fra merge`: combine the indexes of `fra ingest --shard i/n` runs into one index.

Rows and pairs are concatenated (shards hold disjoint samples). Channel statistics are added,
which is exact only when no shard dropped channels, so shards must be built with
`--min-count 1`; the merged index then applies `--min-count`. Examples are re-ranked over the
union (each shard kept its channel's strongest samples, so the union holds the strongest of
all). Merging is idempotent: the output depends only on the set of shards, a shard given twice
or overlapping another is refused, and a re-run replaces the output whole (staging + rename).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from .schema import IndexFormatError, Manifest, code_version, now, table_glob
from .store import IndexWriter


@dataclass(frozen=True)
class MergeConfig:
    out: Path = opt(Path("runs/merged"), "directory of the merged index")
    shards: tuple[Path, ...] = opt((), "the shard indexes to merge (built with --shard i/n and --min-count 1)")
    min_count: int = opt(64, "keep a channel only if its merged count reaches this")

    def __post_init__(self):
        if len(self.shards) < 1:
            raise ValueError("give the shard indexes to merge with --shards DIR [DIR ...]")


def _shard_set(m: Manifest) -> tuple[set[int], int]:
    ids, n = m.shard.split("/")
    return {int(i) for i in ids.split("+")}, int(n)


def check_shards(manifests: list[Manifest]) -> tuple[list[int], int]:
    first = manifests[0]
    seen: set[int] = set()
    n_all = None
    for m in manifests:
        for key in ("model", "sae", "corpus", "layers", "heads"):
            if getattr(m, key) != getattr(first, key):
                raise IndexFormatError(f"shards disagree on {key}: {getattr(m, key)} vs {getattr(first, key)}")
        if m.policy["min_count"] != 1:
            raise IndexFormatError("a shard dropped rare channels (min_count > 1), so its channel statistics "
                                   "cannot be merged exactly; rebuild the shards with --min-count 1")
        ids, n = _shard_set(m)
        if n_all is not None and n != n_all:
            raise IndexFormatError(f"shards split the corpus differently: /{n} vs /{n_all}")
        n_all = n
        if ids & seen:
            raise IndexFormatError(f"shard(s) {sorted(ids & seen)} given more than once")
        seen |= ids
    return sorted(seen), n_all


def run(cfg: MergeConfig) -> Path:
    import duckdb

    manifests = [Manifest.read(s) for s in cfg.shards]
    ids, n = check_shards(manifests)
    first = manifests[0]
    order = sorted(range(len(cfg.shards)), key=lambda i: min(_shard_set(manifests[i])[0]))
    shards = [Path(cfg.shards[i]) for i in order]
    writer = IndexWriter(Path(cfg.out), {"merge": [str(s) for s in shards], "min_count": cfg.min_count})
    con = duckdb.connect()
    n_examples = first.policy["examples_per_channel"]
    for layer in first.layers:
        writer.begin_layer(layer)
        for head in first.heads:
            part = f"layer={layer}/head={head}"
            for name in ("rows", "pairs"):
                for j, s in enumerate(shards):
                    for k, f in enumerate(sorted((s / name / part).glob("*.parquet"))):
                        dest = writer.work_dir(layer) / name / part / f"part-{j:03d}{k:05d}.parquet"
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(f, dest)
            files = lambda name: [str(f) for s in shards for f in sorted((s / name / part).glob("*.parquet"))]  # noqa: E731
            chan = con.execute(
                """SELECT feat_q, feat_k, sum(count)::BIGINT AS count, sum(sum) AS sum, sum(sumsq) AS sumsq,
                          sum(ind_count)::BIGINT AS ind_count, sum(ind_sum) AS ind_sum, sum(ind_sumsq) AS ind_sumsq
                   FROM read_parquet(?) GROUP BY feat_q, feat_k HAVING sum(count) >= ? ORDER BY feat_q, feat_k""",
                [files("channels"), cfg.min_count]).to_arrow_table()
            writer.write("channels", chan, layer, head)
            ex = con.execute(
                """SELECT e.feat_q, e.feat_k, (row_number() OVER w - 1)::TINYINT AS rank, e.sample, e.q, e.k, e.value
                   FROM read_parquet(?) e
                   SEMI JOIN (SELECT feat_q, feat_k FROM read_parquet(?) GROUP BY ALL HAVING sum(count) >= ?) c
                     USING (feat_q, feat_k)
                   WINDOW w AS (PARTITION BY e.feat_q, e.feat_k ORDER BY abs(e.value) DESC, e.sample)
                   QUALIFY row_number() OVER w <= ? ORDER BY e.feat_q, e.feat_k, rank""",
                [files("examples"), files("channels"), cfg.min_count, n_examples]).to_arrow_table()
            writer.write("examples", ex, layer, head)
        writer.finish_layer(layer, {})
    samples = [table_glob(s, "samples") for s in shards]
    writer.write("samples", con.execute("SELECT * FROM read_parquet(?) ORDER BY sample", [samples]).to_arrow_table())
    feats = [table_glob(s, "features") for s in shards]
    n_tokens = [con.execute("SELECT sum(n_tokens) FROM read_parquet(?)", [f]).fetchone()[0] for f in samples]
    con.execute("CREATE TEMP TABLE w (file VARCHAR, n_tok DOUBLE, n DOUBLE)")
    con.executemany("INSERT INTO w VALUES (?, ?, ?)", [
        (str(next(Path(s / "features").glob("*.parquet"))), t, manifests[i].n_samples)
        for s, t, i in zip(shards, n_tokens, order)])
    # index_frequency (per token) and bos_rate (per sample) are per-shard rates: weight them
    features = con.execute(
        """SELECT f.* EXCLUDE (index_frequency, bos_rate, punct_or_bos, filename),
                  sum(f.index_frequency * w.n_tok) OVER k / sum(w.n_tok) OVER k AS index_frequency,
                  sum(f.bos_rate * w.n) OVER k / sum(w.n) OVER k AS bos_rate,
                  bool_or(f.punct_or_bos) OVER k AS punct_or_bos
           FROM read_parquet(?, filename = true) f JOIN w ON f.filename = w.file
           WINDOW k AS (PARTITION BY f.layer, f.feature)
           QUALIFY row_number() OVER (PARTITION BY f.layer, f.feature ORDER BY f.filename) = 1
           ORDER BY layer, feature""", [feats]).to_arrow_table()
    writer.write("features", features)
    return writer.commit(dataclasses.replace(
        first, policy={**first.policy, "min_count": cfg.min_count},
        n_samples=sum(m.n_samples for m in manifests), shard="+".join(map(str, ids)) + f"/{n}",
        stats={"merged_from": [str(s) for s in cfg.shards]}, code_version=code_version(), created=now(),
    ))
