"""`fra ingest`: corpus -> exact feature-pair index (hive-partitioned Parquet + manifest).

Per layer, two passes over the samples (one sequence at a time, so nothing is padded):
  1. count pass: forward pass to the layer, SAE encode, exact channel co-activation counts
     (`reduce.cooccurrence`); channels with count >= min_count over the corpus are kept;
  2. statistics pass: the validated decomposition (`Decomposer.prepare`), the per-sample
     reduction (`reduce.reduce_sample`) into exact per-channel accumulators
     (`channels.ChannelChunk`), the rows and the pairs.
Each pass is cut into blocks of `block_size` samples whose partial results go to disk
(`blocks.py`), and one merge adds them up exactly (`merge.py`), so the index is the same
whoever runs the blocks: this process (`--engine local`), Ray actors (`--engine ray`,
`ray_engine.py`), or Slurm-style shards (`--shard i/n`, then `fra merge`). Then the layer's
partitions move into place (`store.IndexWriter`). Table layouts are in `schema.py` and
docs/INDEX_SCHEMA.md.

Entry points: `run(IngestConfig)` (the CLI), and `ingest(model, saes, texts_or_tokens, ...)` for
a HookedTransformer and sae-lens SAEs that a user already holds.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa

from . import merge
from .blocks import BlockWorker, describe, kept_path, missing, tasks, verify
from .job import IngestConfig, Inputs, Job, load_inputs
from .schema import IndexFormatError
from .store import IndexWriter, OutLock, check_out, conform, partials_dir, recover, write_parquet

__all__ = ["IngestConfig", "Inputs", "Job", "LocalEngine", "ingest", "load_inputs", "run"]


def ingest(model, saes: dict, samples: list, out: Path, *, tokenizer=None, name: str = "custom", **options) -> Path:
    """Python API: index `samples` (token id lists, or strings when the model has a tokenizer)
    with a HookedTransformer and {layer: SAE} already in memory; `name` is recorded as the
    manifest's model. `options` are IngestConfig's fields."""
    if samples and isinstance(samples[0], str):
        from ..corpus import tokenize_samples

        tok = tokenizer if tokenizer is not None else model.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        texts = list(samples)
        tokens = tokenize_samples(texts, tok, bos, min(options.get("max_tokens", 128), model.cfg.n_ctx))
    else:
        texts, tokens = None, [list(map(int, s)) for s in samples]
    cfg = IngestConfig(out=Path(out), model=name, **options)
    return run(cfg, Inputs.of(model, saes, tokens, texts, tokenizer, name=cfg.model))


def run(cfg: IngestConfig, inputs: Inputs | None = None) -> Path | None:
    """Index the corpus. Returns the index's path, or None after a `--shard i/n` run (its blocks
    are done; `fra merge` takes the next step once every shard's are)."""
    i, n = cfg.shard_index
    done = recover(cfg.out) if n == 1 else None
    if done is not None:
        print(done, file=sys.stderr)
    check_out(cfg.out)  # before anything loads: OUT can be written and published
    if cfg.engine == "ray":
        from .ray_engine import import_ray

        import_ray()  # before anything is loaded: says how to install Ray when it is missing
    import torch

    with OutLock(cfg.out, (i, n)):
        # with Ray the actors compute, so this process keeps its copy of the model on the CPU
        device = cfg.device or ("cuda" if torch.cuda.is_available() and cfg.engine == "local" else "cpu")
        t0 = time.time()
        inp = inputs or load_inputs(cfg, device, lambda sae: check_out(cfg.out, {"model": cfg.model, "sae": sae}))
        if not inp.tokens:
            raise IndexFormatError(f"no samples to index in --corpus {cfg.corpus or '(the demo corpus)'}")
        job = inp.job(cfg)
        check_out(cfg.out, job.identity)
        # the decomposition is validated here (Decomposer), on the path users run, before anything is written
        worker = BlockWorker(job, inp, device, partials_dir(cfg.out), cfg.q_block, cfg.progress)
        writer = IndexWriter(cfg.out, job, keep_other=n > 1)
        _write_samples(inp, writer.partials / "samples.parquet")
        if cfg.engine == "ray":
            from .ray_engine import RayEngine

            engine = RayEngine(cfg, job, inputs, writer.partials)
        else:
            engine = LocalEngine(worker, cfg.progress)
        stats = {}
        try:
            for layer in job.layers:
                stats[str(layer)] = writer.layer_stats(layer)
                if stats[str(layer)] is not None:
                    continue
                mine = [t for t in tasks(job, "count", layer) if t.block % n == i]
                _run_verified(engine, writer.partials, mine, f"layer {layer}: count pass")
                if n == 1 and not kept_path(writer.partials, layer).exists():
                    merge.select_channels(writer.partials, job, layer, check=False)
                if kept_path(writer.partials, layer).exists():
                    mine = [t for t in tasks(job, "stats", layer) if t.block % n == i]
                    _run_verified(engine, writer.partials, mine, f"layer {layer}: statistics pass")
                if n == 1:
                    stats[str(layer)] = merge.merge_layer(writer, job, layer, check=False)
        finally:
            engine.close()
        if n > 1:
            if cfg.progress:
                print(
                    f"shard {cfg.shard}: its blocks are done in {writer.partials}; once every shard's are, run "
                    f"`fra merge --out {cfg.out}`"
                )
            return None
        out = merge.finish(writer, job)
        if cfg.explain_pairs and cfg.engine == "local":
            from .explain import explain_index

            explain_index(out, inp.lm.model, inp.saes, cfg.explain_pairs, cfg.progress)
    if cfg.progress:
        print(f"index written to {out} in {time.time() - t0:.0f} s ({cfg.engine} engine)")
        for layer, st in stats.items():
            shares = [st[str(h)]["kept_abs_share"] for h in job.heads]
            print(
                f"  layer {layer}: {st['samples_per_s']:.2f} samples/s per worker, {st['channels_kept']} channels "
                f"kept of {st['channels_seen']} seen (min_count {cfg.min_count}), {st['blocks']} block(s), "
                f"{st['count_runs_spilled']} count run(s) spilled; rows carry "
                f"{min(shares):.1%}-{max(shares):.1%} of |FA|"
            )
    return out


def _run_verified(engine, partials: Path, todo: list, desc: str) -> None:
    """Run the missing blocks, then check every partial against its file record; a corrupt one
    (a resumed run's, or a disk's) is removed, named, and computed again."""
    for _ in range(3):
        engine.run(todo, desc)
        bad = verify(partials, todo)
        if not bad:
            return
        print(f"{desc}: recomputing corrupt partial(s): {describe(bad)}", file=sys.stderr)
    raise IndexFormatError(f"{desc}: partials still fail verification after recomputing them: {describe(bad)}")


class LocalEngine:
    """Runs the blocks one after another in this process."""

    def __init__(self, worker, progress: bool):
        self.worker, self.progress = worker, progress

    def run(self, todo: list, desc: str) -> None:
        from tqdm import tqdm

        for task in tqdm(missing(self.worker.partials, todo), desc=desc, unit="block", disable=not self.progress):
            self.worker.run(task)

    def close(self) -> None:
        pass


def _write_samples(inp: Inputs, path: Path) -> None:
    """The samples table, for `merge.finish` (every shard writes the same one)."""
    decode = inp.lm.tokenizer.decode if inp.lm.tokenizer is not None else (lambda ids: f"<{ids[0]}>")
    table = pa.table(
        {
            "sample": pa.array(inp.sample_ids, pa.int32()),
            "text": inp.texts,
            "token_ids": pa.array(inp.tokens, pa.list_(pa.int32())),
            "tokens": [[decode([t]) for t in ids] for ids in inp.tokens],
            "n_tokens": pa.array([len(t) for t in inp.tokens], pa.int16()),
        }
    )
    tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
    write_parquet(conform("samples", table), tmp)
    os.replace(tmp, path)
