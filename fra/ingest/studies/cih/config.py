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
    pairs: Path | None = opt(
        None,
        'a JSON list of {"A", "B", "relation"} pairs to study instead of the shipped ones; they go '
        "through the same validation by the model (the report says how many passed)",
    )
    n_pairs: int = opt(10, "word pairs per relation and seed (split into word-disjoint selection and test pairs)")
    n_templates: int = opt(4, "templates per pair in each half (selection and held-out); a quarter are function-X ones")
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds; each draws its own pairs, template split, fillers and controls")
    group_size: int = opt(20, "units per head in a pair's group (its top channels or feature marginals)")
    n_perm: int = opt(20000, "permutations per test (p-values resolve down to 1 / (n_perm + 1))")
    n_random_draws: int = opt(3, "random channel sets, matched on their contribution at X, per causal test")
    fdr: float = opt(0.05, "Benjamini-Hochberg false discovery rate, over the heads of a relation, unit and seed")
    min_pass: int = opt(2, "a headline answer must hold in at least this many seeds")
    share_floor: float = opt(0.05, "effect-size floor: a unit's held-out share of its head's contrast")
    attn_floor: float = opt(0.02, "head gate: conceptual-minus-control attention on X must be at least this")
    act_floor: float = opt(0.3, "activation floor of the gating labels (a feature below it counts as not firing)")
    gate_ratio: float = opt(
        0.5, "a feature 'depends on A' when its activation without A is below this fraction of the one with A"
    )
    min_pairs_relation: int = opt(8, "a relation with fewer model-validated pairs is skipped (and reported)")
    batch_size: int = opt(24, "prompts per forward pass")
    atlas_index: Path | None = opt(
        None, "an index (fra ingest) to build the interesting-interactions atlas from (reports/atlas)"
    )
    quick: bool = opt(False, "1 seed, 8 pairs, 3 templates per half, 2000 permutations: a smoke run in minutes")
    device: str = opt("cpu", "torch device")
    threads: int = opt(1, "torch intra-op threads (on a shared 2-core machine 2 threads ran 35x slower than 1)")

    def __post_init__(self):
        if self.n_pairs < 4:
            raise ValueError("n_pairs must be >= 4: pairs are split into selection and test pairs")
        if self.n_templates < 2:
            raise ValueError("n_templates must be >= 2 (one noun-X and one function-X template per half at least)")
        if not 0 < self.fdr < 1:
            raise ValueError("fdr must lie in (0, 1)")
        if not self.seeds:
            raise ValueError("give at least one seed (--seeds 0 1 2)")
        if self.group_size < 1 or self.group_size > 100 or self.n_perm < 100 or self.n_random_draws < 1:
            raise ValueError("1 <= group_size <= 100, n_perm >= 100 and n_random_draws >= 1 are needed")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 < self.gate_ratio < 1 or self.act_floor < 0 or not 0 <= self.share_floor < 1:
            raise ValueError("gate_ratio in (0, 1), act_floor >= 0 and share_floor in [0, 1) are needed")
        if self.min_pass > len(self.seeds) and not self.quick:
            raise ValueError(f"min_pass {self.min_pass} > number of seeds {len(self.seeds)}")

    def effective(self) -> "CIHConfig":
        """The config that actually runs: `quick` shrinks seeds, pairs, templates and permutations."""
        if not self.quick:
            return self
        return replace(
            self,
            seeds=self.seeds[:1],
            n_pairs=min(self.n_pairs, 8),
            n_templates=min(self.n_templates, 3),
            n_perm=2000,
            n_random_draws=2,
            min_pass=1,
            quick=False,
        )
