"""Configs of `fra cot` (traces) and `fra report cot` (the study); the CLI maps onto them flag by flag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import opt

SHIPPED_TRACES = Path(__file__).resolve().parents[2] / "assets" / "cot" / "traces_smollm2-135m.jsonl"


@dataclass(frozen=True)
class CotConfig:
    out: Path = opt(Path("runs/cot/traces.jsonl"), "JSONL file to write the traces to")
    model: str = opt(
        "smollm2-135m",
        "smollm2-135m (offline), or a Hugging Face causal LM by name, e.g. "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (needs the hub)",
    )
    from_jsonl: Path | None = opt(
        None, 'read traces from this JSONL of {"problem", "trace", "answer"} instead of generating them'
    )
    tasks: tuple[str, ...] = opt(
        ("basic_arithmetic", "chain_sum", "gsm_symbolic"), "reasoning-gym datasets to draw problems from"
    )
    n_per_task: int = opt(16, "problems per task")
    seed: int = opt(0, "reasoning-gym seed")
    max_new_tokens: int = opt(160, "generation budget per trace (greedy decoding)")
    batch_size: int = opt(8, "traces generated together")
    threads: int = opt(1, "torch intra-op threads")

    def __post_init__(self):
        if self.n_per_task < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("n_per_task, max_new_tokens and batch_size must be >= 1")


@dataclass(frozen=True)
class CotReportConfig:
    traces: Path = opt(SHIPPED_TRACES, "traces JSONL (from `fra cot`); default: the shipped SmolLM2 traces")
    model: str = opt("smollm2-135m", "model that produced the traces (a preset or a TransformerLens name)")
    out: Path = opt(Path("reports/cot"), "directory for report.md, the figures and the explorer's tables")
    sae_layers: tuple[int, ...] | None = opt(
        None,
        "layers whose shipped SAEs resolve receiver heads into channels (default: every layer with a shipped "
        "SAE: 3 and 24, the layers holding the most receiver heads, and 17 and 18)",
    )
    max_tokens: int = opt(256, "prompt + trace tokens kept per trace (cut at a sentence boundary)")
    max_sentences: int = opt(24, "traces are cut after this many sentences (the cost grows with its square)")
    min_sentences: int = opt(
        7, "traces with fewer sentences are left out (the rankings compare sentences that have rows 4 later)"
    )
    proximity: int = opt(4, "vertical scores use rows at least this many sentences later (Thought Anchors: 4)")
    top_receivers: int = opt(20, "receiver heads: the top heads by mean kurtosis (Thought Anchors: 20)")
    fa_heads: int = opt(3, "strongest receiver heads in the SAE layers that are resolved into channels")
    anchors: int = opt(3, "anchor sentences per trace resolved into channels (top receiver scores)")
    n_shuffles: int = opt(1, "null draws per trace: the same tokens with the sentence lengths shuffled")
    n_perm: int = opt(10000, "label permutations of the correct-vs-incorrect test")
    max_traces: int | None = opt(None, "use at most this many traces (default: all)")
    top_channels: int = opt(10, "channels kept per sentence pair for the explorer")
    seed: int = opt(0, "seed of the null draws and permutations")
    quick: bool = opt(False, "6 traces: a smoke run of the whole pipeline in a few minutes")
    threads: int = opt(1, "torch intra-op threads")

    def __post_init__(self):
        if self.proximity < 1:
            raise ValueError("proximity must be >= 1")
        if self.min_sentences < self.proximity + 3:
            raise ValueError(
                f"min_sentences must be >= proximity + 3 = {self.proximity + 3}: a rank correlation needs "
                "3 sentences with rows `proximity` later"
            )
        if self.max_sentences < self.min_sentences:
            raise ValueError("max_sentences must be >= min_sentences")
        if self.n_shuffles < 1:
            raise ValueError("n_shuffles must be >= 1: the null needs at least one draw per trace")
