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

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import opt
from .schema import IndexFormatError, code_version
from .store import IndexWriter, check_can_write, partials_dir


@dataclass(frozen=True)
class IngestConfig:
    out: Path = opt(Path("runs/demo"), "directory the index is written to (staged in OUT.staging, then renamed)")
    model: str = opt("smollm2-135m", "a preset (smollm2-135m, gpt2) or any model name TransformerLens can load")
    sae: str | None = opt(
        None,
        "SAEs: a sae-lens directory (or a directory of them, one per hook), or "
        "RELEASE:ID of a sae-lens release ({layer} in ID is filled in); default: the preset's",
    )
    hook: str | None = opt(
        None, "the hook the SAEs must read, e.g. blocks.{layer}.hook_resid_pre; checked against each SAE's own"
    )
    corpus: Path | None = opt(
        None, "corpus Parquet with a `text` column; default: the shipped public-domain demo corpus"
    )
    split: str | None = opt(None, "keep only rows of this `split` value (e.g. heldout); default: every row")
    layers: tuple[int, ...] | None = opt(None, "layers to index; default: the layers the SAEs are for")
    heads: tuple[int, ...] | None = opt(None, "heads to index; default: all")
    max_samples: int | None = opt(None, "index at most this many samples (the first ones); default: all")
    max_tokens: int = opt(128, "truncate each sample to this many tokens, BOS included")
    engine: str = opt(
        "local",
        "who runs the blocks: local (this process) or ray (actors on a Ray cluster, "
        "`pip install 'fra[ray]'`); the index is identical",
    )
    address: str | None = opt(
        None,
        "--engine ray: the cluster to join (`auto`, or the head node's HOST:6379); default: start a local Ray instance",
    )
    workers: int | None = opt(
        None, "--engine ray: number of actors; default: one per GPU of the cluster, else one per CPU"
    )
    block_size: int = opt(
        64,
        "samples per block, the unit of work, retry and resume (part of the policy: "
        "the float sums are added block by block)",
    )
    shard: str = opt(
        "0/1",
        "i/n, for clusters without Ray: compute only the blocks b with b mod n == i into "
        "OUT.staging (shared by all shards); recipe: every shard, `fra merge --out OUT` "
        "(selects the channels), every shard again, `fra merge --out OUT` (writes the index)",
    )
    min_count: int = opt(128, "keep a channel only if its features co-occur in at least this many causal (q, k) pairs")
    top_keys: int = opt(4, "rows: per (head, query), the most-attended keys whose feature pairs are stored")
    top_pairs: int = opt(8, "rows: per such (query, key), the feature pairs of largest |FA| stored")
    examples_per_channel: int = opt(8, "examples stored per kept channel and head (largest |FA|, one per sample)")
    memory_budget_gb: float = opt(
        1.0,
        "memory for channel statistics and buffers; past it they spill to disk "
        "or take several sweeps (the model and one sample's work come on top)",
    )
    q_block: int = opt(
        32, "queries whose pair values are formed at once (memory ~ heads x q_block x T x k^2 x 4 bytes)"
    )
    explain_pairs: int = opt(
        16,
        "example_terms: feature pairs stored at each example's (q, k), largest |FA| first (the explain "
        "pass, `explain.py`); 0 skips it; --engine ray and --shard runs skip it too (run `fra explain` after them)",
    )
    device: str | None = opt(None, "torch device; default: cuda when available, else cpu")
    progress: bool = opt(True, "show progress bars and a summary")

    def __post_init__(self):
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n, got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {self.shard}: need 0 <= i < n")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError("--max-samples must be positive")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"--engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray" and self.shard != "0/1":
            raise ValueError("--shard is for clusters without Ray; with --engine ray, Ray schedules the blocks")
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be at least 1")
        for name in ("min_count", "top_keys", "top_pairs", "examples_per_channel", "q_block", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 2 <= self.max_tokens <= 32768:
            raise ValueError("--max-tokens must be in [2, 32768] (positions are stored as int16)")
        if self.explain_pairs < 0:
            raise ValueError("--explain-pairs must be 0 (no explain pass) or more")
        if self.memory_budget_gb <= 0:
            raise ValueError("--memory-budget-gb must be positive")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n

    @property
    def policy(self) -> dict:
        return {
            "min_count": self.min_count,
            "top_keys": self.top_keys,
            "top_pairs": self.top_pairs,
            "examples_per_channel": self.examples_per_channel,
            "max_tokens": self.max_tokens,
            "split": self.split,
            "max_samples": self.max_samples,
            "block_size": self.block_size,
            "memory_budget_gb": self.memory_budget_gb,
        }


@dataclass
class Inputs:
    """What a job reads: built by `load_inputs` from names, or by `Inputs.of` from objects."""

    lm: object  # registry.LoadedModel
    saes: dict  # layer -> sae-lens SAE
    sample_ids: list
    texts: list
    tokens: list
    corpus_hash: str
    sae_ids: dict  # str(layer) -> identity of the SAE's weights
    feature_table: Path | None = None  # the SAEs' features.parquet (labels), if they ship one
    layers: tuple = field(init=False)

    def __post_init__(self):
        self.layers = tuple(sorted(self.saes))

    @classmethod
    def of(
        cls,
        model,
        saes: dict,
        tokens: list[list[int]],
        texts: list[str] | None = None,
        tokenizer=None,
        name: str = "custom",
    ) -> "Inputs":
        """Inputs from a HookedTransformer and {layer: SAE} already in memory."""
        from ..registry import LoadedModel

        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        ids = {str(l): _weights_hash(s) for l, s in saes.items()}
        corpus = hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]
        return cls(
            LoadedModel(name, model, tokenizer, tokens[0][0] if tokens and tokens[0] else 0),
            saes,
            list(range(len(tokens))),
            texts or ["" for _ in tokens],
            tokens,
            corpus,
            ids,
        )


def _weights_hash(sae) -> str:
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_inputs(cfg: IngestConfig, device: str) -> Inputs:
    """Model, SAEs and tokenised samples (the first max_samples), from the config's names."""
    from ..corpus import DEMO_CORPUS, read_corpus, tokenize_samples
    from ..registry import PRESETS, file_hash, load_model, sae_source

    corpus = Path(cfg.corpus or DEMO_CORPUS)
    table = read_corpus(corpus, cfg.split)  # raises on missing / empty
    ids = list(range(min(table.num_rows, cfg.max_samples or table.num_rows)))
    source = sae_source(cfg.model, cfg.sae)
    layers = cfg.layers or source.layers() or (PRESETS[cfg.model].default_layers if cfg.model in PRESETS else None)
    if not layers:
        raise ValueError(f"cannot tell which layers the SAEs {cfg.sae!r} are for; pass --layers")
    lm = load_model(cfg.model, device=device)
    saes, sae_ids = {}, {}
    for layer in layers:
        if not 0 <= layer < lm.model.cfg.n_layers:
            raise IndexFormatError(f"layer {layer} out of range: the model has layers 0..{lm.model.cfg.n_layers - 1}")
        saes[layer], sae_ids[str(layer)] = source.load(layer, device)
        check_hook(saes[layer], cfg.hook, layer)
    texts = [table["text"][s].as_py() for s in ids]
    sample_ids = [int(table["sample_id"][s].as_py()) if "sample_id" in table.column_names else s for s in ids]
    tokens = tokenize_samples(texts, lm.tokenizer, lm.bos_id, min(cfg.max_tokens, lm.model.cfg.n_ctx))
    return Inputs(lm, saes, sample_ids, texts, tokens, file_hash(corpus), sae_ids, source.feature_table())


def check_hook(sae, hook: str | None, layer: int) -> None:
    """`--hook`, when given, must be the hook the SAE itself says it reads."""
    if hook is None:
        return
    want = hook.format(layer=layer)
    have = sae.cfg.metadata.hook_name
    if want != have:
        raise IndexFormatError(f"--hook {want} but the layer-{layer} SAE reads {have}; drop --hook or pick another SAE")


def job_heads(cfg: IngestConfig, model) -> tuple[int, ...]:
    """The heads to index (all by default), checked against the model."""
    n_heads = model.cfg.n_heads
    for h in cfg.heads or ():
        if not 0 <= h < n_heads:
            raise IndexFormatError(f"head {h} out of range: the model has heads 0..{n_heads - 1}")
    return tuple(cfg.heads) if cfg.heads else tuple(range(n_heads))


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
    import torch

    from . import merge
    from .blocks import BlockWorker, kept_path

    if cfg.engine == "ray":
        from .ray_engine import import_ray

        import_ray()  # before anything is loaded: says how to install Ray when it is missing
    # with Ray the actors compute, so this process keeps its copy of the model on the CPU
    device = cfg.device or ("cuda" if torch.cuda.is_available() and cfg.engine == "local" else "cpu")
    t0 = time.time()
    inp = inputs or load_inputs(cfg, device)
    if not inp.tokens:
        raise IndexFormatError("no samples to index")
    heads = job_heads(cfg, inp.lm.model)
    identity = {"model": cfg.model, "sae": inp.sae_ids, "corpus": inp.corpus_hash}
    check_can_write(cfg.out, identity)
    # the decomposition is validated here (Decomposer), on the path users run, before anything is written
    worker = BlockWorker(cfg, inp, device, partials_dir(cfg.out))
    job = {
        **identity,
        "code_version": code_version(),
        "policy": cfg.policy,
        "layers": list(inp.layers),
        "heads": list(heads),
        "n_samples": len(inp.tokens),
        "d_sae": {str(l): int(inp.saes[l].cfg.d_sae) for l in inp.layers},
        "feature_table": str(inp.feature_table) if inp.feature_table is not None else None,
    }
    i, n = cfg.shard_index
    writer = IndexWriter(cfg.out, job, keep_other=n > 1)
    _write_samples(inp, writer.partials / "samples.parquet")
    if cfg.engine == "ray":
        from .ray_engine import RayEngine

        engine = RayEngine(cfg, inputs, writer.partials)
    else:
        engine = LocalEngine(worker, cfg.progress)
    stats = {}
    try:
        for layer in inp.layers:
            stats[str(layer)] = writer.layer_stats(layer)
            if stats[str(layer)] is not None:
                continue
            engine.run([t for t in merge.tasks(job, "count", layer) if t.block % n == i], f"layer {layer}: count pass")
            if n == 1 and not kept_path(writer.partials, layer).exists():
                merge.select_channels(writer.partials, job, layer)
            if kept_path(writer.partials, layer).exists():
                engine.run(
                    [t for t in merge.tasks(job, "stats", layer) if t.block % n == i], f"layer {layer}: statistics pass"
                )
            if n == 1:
                stats[str(layer)] = merge.merge_layer(writer, job, layer)
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
            shares = [st[str(h)]["kept_abs_share"] for h in heads]
            print(
                f"  layer {layer}: {st['samples_per_s']:.2f} samples/s per worker, {st['channels_kept']} channels "
                f"kept of {st['channels_seen']} seen (min_count {cfg.min_count}), {st['blocks']} block(s), "
                f"{st['count_runs_spilled']} count run(s) spilled; rows carry "
                f"{min(shares):.1%}-{max(shares):.1%} of |FA|"
            )
    return out


class LocalEngine:
    """Runs the blocks one after another in this process."""

    def __init__(self, worker, progress: bool):
        self.worker, self.progress = worker, progress

    def run(self, tasks: list, desc: str) -> None:
        from tqdm import tqdm

        from .blocks import missing

        for task in tqdm(missing(self.worker.partials, tasks), desc=desc, unit="block", disable=not self.progress):
            self.worker.run(task)

    def close(self) -> None:
        pass


def _write_samples(inp: Inputs, path: Path) -> None:
    """The samples table, for `merge.finish` (every shard writes the same one)."""
    import os
    import uuid

    import pyarrow as pa

    from .store import conform, write_parquet

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
