"""Frozen result records of the CIH study. Everything the report and cih.json show is one of these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadStat:
    """One head's held-out conceptual-minus-control contrast for one relation and seed.

    contrast = mean over test pairs of [margin(conceptual) - margin(control)], where margin is the
    score on X minus the mean score on the other causal keys. ff + bdec + err + bias = contrast."""

    relation: str
    layer: int
    head: int
    tih: bool
    n_pairs: int
    contrast: float
    ci_lo: float
    ci_hi: float
    p: float
    q: float  # BH over the heads of this relation and seed
    ff: float
    bdec: float
    err: float
    bias: float
    x_minus_a: float  # score(B, X) - score(B, A), conceptual prompts
    x_minus_n: float  # score(B, X) - mean score(B, N), conceptual prompts
    attn_x: float  # attention probability on X, conceptual prompts
    attn_x_control: float
    attn_x_no_error: float  # conceptual, after removing the SAE-error terms from the scores


@dataclass(frozen=True)
class UnitTest:
    """One unit (layer, feat_q, feat_k) tested in one head on the test half."""

    relation: str
    layer: int
    feat_q: int
    feat_k: int
    head: int
    selected_here: bool  # selected in this head (top n_select on the selection half)
    contrast_sel: float  # mean conceptual-minus-control margin on the selection half
    contrast: float  # the same on the test half
    ci_lo: float
    ci_hi: float
    p: float
    q: float  # BH over every unit test of this relation and seed
    x_contrast: float  # the channel's contribution at X itself, conceptual minus control
    x_minus_a: float  # the channel's contribution at X minus at A, conceptual test prompts
    x_minus_n: float
    share: float  # contrast / the head's contrast
    n_present: int  # test pairs whose conceptual row contains the channel
    attn_drop: float  # mean drop of attention on X when the channel is removed (conceptual)
    attn_drop_random: float  # the same for random channels of the same total magnitude
    q_act: float  # mean activation of feat_q at B, conceptual
    q_act_control: float  # ... and on the control (B without A)
    k_act_x: float  # mean activation of feat_k at X, conceptual
    k_act_x_control: float
    k_rate_elsewhere: float  # fraction of other positions where feat_k is active (conceptual)


@dataclass(frozen=True)
class SeedFinding:
    """A unit that passes the combined criterion in at least one head, for one relation and seed."""

    relation: str
    layer: int
    feat_q: int
    feat_k: int
    heads: tuple[int, ...]
    best_head: int  # the passing head where its share is largest
    kind: str  # "matching", "gated query" or "ungated" (analysis.gating_label)
    share: float  # largest share among its passing heads
    q_value: float  # smallest q among its passing heads
    attn_drop: float  # in the head with the largest share
    attn_drop_random: float
    attn_drop_error: float  # removing the SAE-error terms instead, same head


@dataclass(frozen=True)
class SeedResult:
    seed: int
    selection_templates: tuple[int, ...]
    test_templates: tuple[int, ...]
    n_pairs: tuple[tuple[str, int, int], ...]  # (relation, selection pairs, test pairs)
    heads: tuple[HeadStat, ...]
    tests: tuple[UnitTest, ...]
    findings: tuple[SeedFinding, ...]
    max_abs_residual: float  # |sum of term groups - hook_attn_scores|, largest over every row
    seconds: float


@dataclass(frozen=True)
class Finding:
    """A unit aggregated over seeds: the explorer's row (flat fields only)."""

    relation: str
    relation_kind: str
    layer: int
    feat_q: int
    feat_k: int
    heads: str  # "18.6,17.3": heads where it passes, most seeds first
    best_head: str  # the head where its share is largest, most often over the passing seeds
    kind: str
    n_pass: int
    n_seeds: int
    pass_rate: float
    pass_ci_lo: float
    pass_ci_hi: float
    headline: bool  # holds in at least min_pass seeds
    share: float  # mean over passing seeds
    q_value: float  # median over passing seeds
    attn_drop: float
    attn_drop_random: float
    attn_drop_error: float
    label_q: str
    label_k: str


@dataclass(frozen=True)
class Answer:
    """H1 / H2 for one relation, over seeds."""

    relation: str
    relation_kind: str
    h1: str  # "yes", "no" or "not applicable"; counts "matching" findings only
    h1_detail: str
    h2_heads: tuple[str, ...]  # non-TIH heads that carry a matching finding in >= min_pass seeds
    gated_heads: tuple[str, ...]  # heads that carry only gated-query / ungated findings in >= min_pass seeds
    contrast_heads: tuple[str, ...]  # heads whose own contrast is significant in >= min_pass seeds
    n_headline_matching: int
    n_headline_gated: int  # gated query or ungated
    findings_per_seed: tuple[int, ...]  # all kinds
    matching_per_seed: tuple[int, ...]
    share_findings: float  # all headline findings together / head contrast: mean over TIH with a
    share_err: float  # significant positive contrast, and seeds; error terms / head contrast
    share_bdec: float
