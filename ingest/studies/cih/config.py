"""The one config of the CIH study (`fra report cih` maps onto it flag by flag)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class CIHConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, ...] = (17, 18)
    out: Path = Path("reports/cih")
    relations: tuple[str, ...] = ("identity", "synonym", "translation", "plural", "capitalised", "placebo")
    n_pairs: int = 100  # per relation and seed, split in halves: selection pairs / test pairs
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_select: int = 5  # units selected per head on the selection half, by conceptual-minus-control
    n_perm: int = 20000  # sign-flip permutations (p-values resolve down to 1 / (n_perm + 1))
    n_random_draws: int = 10  # random channel sets of matched magnitude per causal test
    fdr: float = 0.05  # Benjamini-Hochberg, per relation and seed
    min_pass: int = 4  # a headline finding holds in at least this many seeds
    gate_ratio: float = 0.5  # query feature's mean activation at B, control / conceptual, below which: gated
    min_pairs_relation: int = 20  # a relation with fewer validated pairs is skipped (and reported)
    batch_size: int = 16
    quick: bool = False  # 1 seed, 40 pairs, 10000 permutations: a smoke run of the whole pipeline
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads; on a shared 2-core machine 2 threads ran 35x slower than 1

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
        return replace(self, seeds=self.seeds[:1], n_pairs=min(self.n_pairs, 40), n_perm=10000,
                       n_random_draws=5, min_pass=1, quick=False)
