"""What an index job is: the config a user gives (`IngestConfig`), the objects it reads
(`Inputs`), the frozen `Job` that every stage takes (blocks, merge, Ray actors, the staging
directory), and the one `Budget` that splits `--memory-budget-gb` between them.

A `Job` identifies the work: the same `Job` gives the same index, bit for bit (`blocks.py` says
why). It is written to `<out>.staging/job.json` (`to_json`), so that a resumed run, another
shard or `fra merge` can tell whether the staged blocks are theirs (`from_json`).

Every input check that needs no model runs in `IngestConfig.__post_init__` or in `load_inputs`
before the model loads: the flags, the memory floor, the SAEs' layers and hooks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import opt
from .schema import IndexFormatError, code_version

COUNT_ROW_BYTES = 16  # an int64 key and an int64 count, as `channels.CountAggregator` holds them


@dataclass(frozen=True)
class Budget:
    """Every split of `--memory-budget-gb`, in bytes. The splits overlap in time only where a
    block's count buffer and its DuckDB sum run one after the other, so they add up to more than
    the whole on paper."""

    total_bytes: int

    @classmethod
    def of_gb(cls, gb: float) -> "Budget":
        return cls(int(gb * 1e9))

    @property
    def count_bytes(self) -> int:
        """A count block's (key, count) buffer and its out-of-core sum (`CountAggregator`)."""
        return self.total_bytes // 4

    @property
    def sweep_bytes(self) -> int:
        """A statistics sweep's channel accumulators (`ChannelChunk`); more channels take more sweeps."""
        return self.total_bytes * 3 // 4

    @property
    def flush_bytes(self) -> int:
        """Rows and pairs buffered before a block writes them as a part file."""
        return self.total_bytes // 8

    @property
    def forward_bytes(self) -> int:
        """Per layer, the memo of the samples' forward passes, kept from the count pass for the
        statistics pass (`blocks.SharedForward`, which holds every layer's)."""
        return self.total_bytes // 8

    @property
    def select_bytes(self) -> int:
        """DuckDB's memory limit when the count partials are summed (`merge.select_channels`)."""
        return self.total_bytes // 4

    @property
    def merge_bytes(self) -> int:
        """DuckDB's memory limit when the statistics partials are merged and the index finished."""
        return self.total_bytes

    def channels_per_sweep(self, bytes_per_channel: int) -> int:
        return max(1, self.sweep_bytes // bytes_per_channel)

    @staticmethod
    def floor_bytes(max_tokens: int) -> int:
        """The smallest budget whose count share holds one sample's causal (q, k) pairs, one
        channel each, without spilling: below it every sample spills, and the statistics take
        one sweep per handful of channels, so a run does not end in any useful time."""
        pairs = max_tokens * (max_tokens + 1) // 2
        return 4 * 3 * COUNT_ROW_BYTES * pairs  # count share = 1/4; the buffer is a third of it


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
        None,
        "the hook the SAEs must read, e.g. blocks.{layer}.hook_resid_pre; checked against each SAE's own "
        "(and used for an SAE whose cfg names none)",
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
        "or take several sweeps (the model and one sample's work come on top); "
        "refused below a floor that grows with --max-tokens",
    )
    q_block: int = opt(
        32, "queries whose pair values are formed at once (memory ~ heads x q_block x T x k^2 x 4 bytes)"
    )
    explain_pairs: int = opt(
        0,
        "N > 0: end with the explain pass (`fra explain`): at each example's (q, k) the N feature pairs of "
        "largest |FA| and the exact rest of the score (example_terms), every SAE activation (activations), each "
        "channel's q = k part (channel_diag); it visits every sample again, so it is off by default; --engine ray "
        "and --shard runs skip it (run `fra explain --index OUT` after them)",
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
        floor = Budget.floor_bytes(self.max_tokens)
        if Budget.of_gb(self.memory_budget_gb).total_bytes < floor:
            raise ValueError(
                f"--memory-budget-gb {self.memory_budget_gb:g} is below the floor of {floor / 1e9:.2g} GB at "
                f"--max-tokens {self.max_tokens} (the count pass's quarter of the budget must hold one sample's "
                f"{self.max_tokens * (self.max_tokens + 1) // 2} causal (q, k) pairs); give at least that"
            )
        for name in ("layers", "heads"):
            if any(x < 0 for x in getattr(self, name) or ()):
                raise ValueError(f"--{name} must be non-negative, got {' '.join(map(str, getattr(self, name)))}")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n

    @property
    def policy(self) -> "Policy":
        return Policy(
            min_count=self.min_count,
            top_keys=self.top_keys,
            top_pairs=self.top_pairs,
            examples_per_channel=self.examples_per_channel,
            max_tokens=self.max_tokens,
            split=self.split,
            max_samples=self.max_samples,
            block_size=self.block_size,
            memory_budget_gb=self.memory_budget_gb,
        )


@dataclass(frozen=True)
class Policy:
    """The options that decide what an index holds (and its float sums: `block_size`); the
    manifest's `policy`."""

    min_count: int
    top_keys: int
    top_pairs: int
    examples_per_channel: int
    max_tokens: int
    split: str | None
    max_samples: int | None
    block_size: int
    memory_budget_gb: float

    @property
    def budget(self) -> Budget:
        return Budget.of_gb(self.memory_budget_gb)


@dataclass(frozen=True)
class Job:
    """One index job: what is computed (identity, policy, layers, heads, samples) and by which code."""

    model: str
    sae: dict  # str(layer) -> identity of the SAE's weights
    corpus: str  # identity of the samples
    policy: Policy
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_samples: int
    d_sae: dict  # str(layer) -> SAE width
    feature_table: str | None = None  # the SAEs' features.parquet, if they ship one
    code_version: str = field(default_factory=code_version)

    @property
    def identity(self) -> dict:
        return {"model": self.model, "sae": self.sae, "corpus": self.corpus}

    @property
    def budget(self) -> Budget:
        return self.policy.budget

    @property
    def n_blocks(self) -> int:
        return -(-self.n_samples // self.policy.block_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise IndexFormatError(f"job file: keys {sorted(data)}, expected {sorted(names)}")
        return cls(
            **{
                **data,
                "policy": Policy(**data["policy"]),
                "layers": tuple(data["layers"]),
                "heads": tuple(data["heads"]),
            }
        )

    def differences(self, other: "Job") -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


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

    def job(self, cfg: IngestConfig) -> Job:
        """The job of indexing these inputs with `cfg` (heads checked against the model)."""
        return Job(
            model=cfg.model,
            sae=dict(self.sae_ids),
            corpus=self.corpus_hash,
            policy=cfg.policy,
            layers=tuple(self.layers),
            heads=job_heads(cfg, self.lm.model),
            n_samples=len(self.tokens),
            d_sae={str(l): int(self.saes[l].cfg.d_sae) for l in self.layers},
            feature_table=str(self.feature_table) if self.feature_table is not None else None,
        )


def _weights_hash(sae) -> str:
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def ingest_layers(cfg: IngestConfig, fixed: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The layers to index: --layers; else a preset's default layers when its own SAEs are used
    (its SAE directory also ships other studies' layers: SmolLM2's 3 and 24, for `fra report
    cot`); else the layers of the SAEs given (`fixed`)."""
    from ..registry import PRESETS

    preset = PRESETS[cfg.model].default_layers if cfg.sae is None and cfg.model in PRESETS else None
    return cfg.layers or preset or fixed


def load_inputs(cfg: IngestConfig, device: str, check_saes=None) -> Inputs:
    """SAEs (their layers and hooks checked), then the model, then the tokenised samples (the
    first max_samples). Everything that can be checked without the model is checked first,
    `check_saes({str(layer): SAE identity})` too (e.g. that --out is not another SAE's index)."""
    from ..corpus import DEMO_CORPUS, read_corpus, tokenize_samples
    from ..registry import file_hash, load_model, sae_source

    corpus = Path(cfg.corpus or DEMO_CORPUS)
    table = read_corpus(corpus, cfg.split)  # raises on missing / empty
    ids = list(range(min(table.num_rows, cfg.max_samples or table.num_rows)))
    source = sae_source(cfg.model, cfg.sae)
    try:
        fixed = source.layers()
    except ValueError as exc:  # a cfg.json that names no hook: the layer comes from --layers
        if not cfg.layers:
            raise IndexFormatError(
                f"cannot tell the layer of the SAEs at {source.path or source.sae_id} ({exc}); pass --layers, "
                "and --hook when their cfg.json names no hook"
            ) from None
        fixed = None
    layers = ingest_layers(cfg, fixed)
    if not layers:
        raise ValueError(f"cannot tell which layers the SAEs {cfg.sae!r} are for; pass --layers")
    if fixed is not None and set(layers) - set(fixed):
        raise IndexFormatError(
            f"--layers {' '.join(map(str, layers))}: the SAEs at {source.path or source.sae_id} are for layers "
            f"{', '.join(map(str, fixed)) or 'none'}"
        )
    saes, sae_ids = {}, {}
    for layer in layers:
        try:
            saes[layer], sae_ids[str(layer)] = source.load(layer, device)
        except ValueError as exc:  # e.g. a corrupt cfg.json, whose JSON error names no file
            where = source.path or source.sae_id
            raise IndexFormatError(f"the layer-{layer} SAE at {where} cannot be read: {exc}") from None
        check_hook(saes[layer], cfg.hook, layer)
    if check_saes is not None:
        check_saes(sae_ids)
    lm = load_model(cfg.model, device=device)
    for layer in layers:
        if not 0 <= layer < lm.model.cfg.n_layers:
            raise IndexFormatError(f"layer {layer} out of range: the model has layers 0..{lm.model.cfg.n_layers - 1}")
    texts = [table["text"][s].as_py() for s in ids]
    sample_ids = [int(table["sample_id"][s].as_py()) if "sample_id" in table.column_names else s for s in ids]
    tokens = tokenize_samples(texts, lm.tokenizer, lm.bos_id, min(cfg.max_tokens, lm.model.cfg.n_ctx))
    return Inputs(lm, saes, sample_ids, texts, tokens, file_hash(corpus), sae_ids, source.feature_table())


def check_hook(sae, hook: str | None, layer: int) -> None:
    """`--hook`, when given, must be the hook the SAE itself says it reads; an SAE whose cfg names
    no hook (sae-lens leaves it None for cfgs without `sae_lens_training_version`) takes `--hook`."""
    have = sae.cfg.metadata.hook_name
    if hook is None:
        if have is None:
            raise IndexFormatError(
                f"the layer-{layer} SAE's cfg names no hook (no hook_name in its cfg.json); pass --hook, "
                "e.g. --hook 'blocks.{layer}.hook_resid_pre'"
            )
        return
    want = hook.format(layer=layer)
    if have is None:
        sae.cfg.metadata.hook_name = want
        return
    if want != have:
        raise IndexFormatError(f"--hook {want} but the layer-{layer} SAE reads {have}; drop --hook or pick another SAE")


def job_heads(cfg: IngestConfig, model) -> tuple[int, ...]:
    """The heads to index (all by default), checked against the model."""
    n_heads = model.cfg.n_heads
    for h in cfg.heads or ():
        if not 0 <= h < n_heads:
            raise IndexFormatError(f"head {h} out of range: the model has heads 0..{n_heads - 1}")
    return tuple(cfg.heads) if cfg.heads else tuple(range(n_heads))
