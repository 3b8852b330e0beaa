"""The one config of the CIH study (`fra report cih` maps onto it flag by flag)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ...config import opt


@dataclass(frozen=True)
class CIHConfig:
    model: str = opt("smollm2-135m", "the model (a preset of fra.ingest.registry) whose shipped SAEs are studied")
    layers: tuple[int, ...] = opt((17, 18), "layers whose SAEs and heads are studied")
    out: Path = opt(Path("reports/cih"), "directory for report.md, cih.json and the figures")
    relations: tuple[str, ...] = opt(
        ("identity", "synonym", "translation", "plural", "capitalised", "placebo"),
        "relations between A and B to test (identity is the positive control, placebo the negative one)",
    )
    n_pairs: int = opt(100, "word pairs per relation and seed, split in halves: selection pairs and test pairs")
    seeds: tuple[int, ...] = opt((0, 1, 2, 3, 4), "seeds; each draws its own pairs, templates split and controls")
    n_select: int = opt(5, "units selected per head on the selection half, by conceptual-minus-control contrast")
    n_perm: int = opt(20000, "sign-flip permutations per test (p-values resolve down to 1 / (n_perm + 1))")
    n_random_draws: int = opt(10, "random channel sets of matched magnitude per causal test")
    fdr: float = opt(0.05, "Benjamini-Hochberg false discovery rate, per relation and seed")
    min_pass: int = opt(4, "a headline finding must hold in at least this many seeds")
    gate_ratio: float = opt(
        0.5,
        "a finding is 'gated query' when its query feature's activation at B on the control "
        "is below this fraction of the conceptual one",
    )
    min_pairs_relation: int = opt(20, "a relation with fewer model-validated pairs is skipped (and reported)")
    batch_size: int = opt(16, "prompts per forward pass")
    quick: bool = opt(False, "1 seed, 40 pairs, 10000 permutations: a smoke run of the whole pipeline in minutes")
    device: str = opt("cpu", "torch device")
    threads: int = opt(1, "torch intra-op threads (on a shared 2-core machine 2 threads ran 35x slower than 1)")

    def __post_init__(self):
        if self.n_pairs < 8:
            raise ValueError("n_pairs must be >= 8: pairs are split in halves and each half is tested")
        if not 0 < self.fdr < 1:
            raise ValueError("fdr must lie in (0, 1)")
        if not self.seeds:
            raise ValueError("give at least one seed (--seeds 0 1 2 3 4)")
        if self.n_select < 1 or self.n_perm < 100 or self.n_random_draws < 1:
            raise ValueError("n_select >= 1, n_perm >= 100 and n_random_draws >= 1 are needed")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 < self.gate_ratio < 1:
            raise ValueError("gate_ratio must lie in (0, 1)")
        if self.min_pass > len(self.seeds) and not self.quick:
            raise ValueError(f"min_pass {self.min_pass} > number of seeds {len(self.seeds)}")

    def effective(self) -> "CIHConfig":
        """The config that actually runs: `quick` shrinks seeds, pairs and permutations."""
        if not self.quick:
            return self
        return replace(
            self,
            seeds=self.seeds[:1],
            n_pairs=min(self.n_pairs, 40),
            n_perm=10000,
            n_random_draws=5,
            min_pass=1,
            quick=False,
        )
