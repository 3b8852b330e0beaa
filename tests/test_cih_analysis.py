"""The combined CIH criterion, gating labels, aggregation over seeds and answers(), on hand-made
inputs; the statistics on hand-worked and simulated numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fra.ingest.studies.cih.analysis import aggregate, answers, gating_label, passes, seed_findings
from fra.ingest.studies.cih.results import HeadStat, SeedResult, UnitTest
from fra.ingest.studies.cih.stats import benjamini_hochberg, mean_ci, sign_flip_pvalues, wilson


def head(layer=17, h=3, contrast=2.0, q=0.001, tih=True, rel="synonym", err=1.0, bdec=0.2):
    return HeadStat(
        rel,
        layer,
        h,
        tih,
        40,
        contrast,
        contrast - 0.5,
        contrast + 0.5,
        q,
        q,
        contrast - err - bdec,
        bdec,
        err,
        0.0,
        1.0,
        1.0,
        0.3,
        0.1,
        0.2,
    )


def unit(
    layer=17,
    h=3,
    fq=10,
    fk=20,
    contrast=0.2,
    q=0.001,
    x_contrast=0.2,
    x_minus_a=0.3,
    rel="synonym",
    q_act=2.0,
    q_act_control=1.8,
    head_contrast=2.0,
    k_act_x=1.0,
    k_act_x_control=0.2,
):
    return UnitTest(
        rel,
        layer,
        fq,
        fk,
        h,
        True,
        0.25,
        contrast,
        contrast - 0.1,
        contrast + 0.1,
        q,
        q,
        x_contrast,
        x_minus_a,
        0.2,
        contrast / head_contrast,
        30,
        0.05,
        0.005,
        q_act,
        q_act_control,
        k_act_x,
        k_act_x_control,
        0.01,
    )


def test_passes_needs_every_part_of_the_criterion():
    h, t = head(), unit()
    assert passes(t, h, 0.05)
    assert not passes(replace(t, q=0.06), h, 0.05)  # channel not significant
    assert not passes(replace(t, contrast=-0.1), h, 0.05)  # channel contrast negative
    assert not passes(replace(t, x_contrast=-0.1), h, 0.05)  # does not raise the score on X itself
    assert not passes(replace(t, x_minus_a=-0.1), h, 0.05)  # points at A rather than X
    assert not passes(t, replace(h, q=0.2), 0.05)  # head's own contrast not significant
    assert not passes(t, replace(h, head=4), 0.05)  # another head's statistics


def test_a_head_with_a_negative_margin_never_counts():
    # head 17.1: its channel is significant and positive, but the head's own contrast is negative
    # (and 'significant' by a one-sided test would be impossible; q is set low to make the point)
    neg = head(h=1, contrast=-0.4, q=0.001, tih=False)
    t = unit(h=1, head_contrast=-0.4)
    assert not passes(t, neg, 0.05)
    found = seed_findings([t, unit(h=3)], [neg, head(h=3)], 0.05, 0.5)
    assert [(f.feat_q, f.feat_k, f.heads) for f in found] == [(10, 20, (3,))]


def test_gating_label():
    # query fires at B either way, key at X only after A: the pair matches
    assert gating_label(2.0, 1.8, 0.5, 1.0, 0.2) == "matching"
    assert gating_label(2.0, 0.0, 0.5, 1.0, 0.2) == "gated query"
    assert gating_label(2.0, 0.99, 0.5, 1.0, 1.0) == "gated query"  # 0.99 < 0.5 x 2.0
    assert gating_label(2.0, 1.8, 0.5, 1.0, 0.9) == "ungated"  # neither side depends on A
    found = seed_findings([unit(q_act=2.0, q_act_control=0.1)], [head()], 0.05, 0.5)
    assert found[0].kind == "gated query"
    found = seed_findings([unit(q_act=2.0, q_act_control=1.9, k_act_x=1.0, k_act_x_control=0.95)], [head()], 0.05, 0.5)
    assert found[0].kind == "ungated"


def seed_result(seed, tests, heads):
    return SeedResult(
        seed,
        (0,),
        (1,),
        (("synonym", 20, 20),),
        tuple(heads),
        tuple(tests),
        tuple(seed_findings(tests, heads, 0.05, 0.5)),
        0.0,
        1.0,
    )


def test_aggregate_and_answers_on_hand_made_seeds():
    tih = ["17.3", "18.6"]
    # unit (17, 10, 20) passes in head 17.3 in seeds 0-3 and fails in seed 4 (q = 0.2): 4/5
    # unit (18, 5, 6) passes in head 18.6 in seed 0 only: 1/5
    # head 17.1 (not TIH, negative own margin) has a significant channel in every seed: never counts
    seeds = []
    for s in range(5):
        hs = [head(17, 3), head(18, 6), head(17, 1, contrast=-0.4, tih=False)]
        ts = [
            unit(17, 3, q=0.001 if s < 4 else 0.2),
            unit(18, 6, 5, 6, q=0.001 if s == 0 else 0.3),
            unit(17, 1, 10, 20, head_contrast=-0.4),
        ]
        seeds.append(seed_result(s, ts, hs))
    fs = aggregate(seeds, {"synonym": "conceptual"}, 4, {})
    assert [(f.layer, f.feat_q, f.feat_k, f.n_pass, f.headline, f.heads) for f in fs] == [
        (17, 10, 20, 4, True, "17.3"),
        (18, 5, 6, 1, False, "18.6"),
    ]
    lo, hi = wilson(4, 5)
    assert (fs[0].pass_rate, fs[0].pass_ci_lo, fs[0].pass_ci_hi) == (0.8, lo, hi)
    (a,) = answers(seeds, fs, tih, ["synonym"], {"synonym": "conceptual"}, 4, 0.05)
    # 17.3 carries a headline finding in 4 seeds, 18.6 in only 1: H1 is "no"
    assert a.h1 == "no" and a.h1_detail.startswith("1 of 2 TIH")
    assert a.h2_heads == ()  # 17.1 has a negative margin and must not count
    assert a.contrast_heads == ("17.3", "18.6")
    assert a.findings_per_seed == (2, 1, 1, 1, 0) and a.n_headline_matching == 1  # seed 0: both units
    assert a.matching_per_seed == a.findings_per_seed and a.n_headline_gated == 0
    # shares over TIH contrasts (2.0 each), both TIH and all 5 seeds: findings 0.2 / 2.0 in 17.3 (the
    # headline unit is tested there) and 0 in 18.6 -> mean 0.05; error 1.0 / 2.0 = 0.5; b_dec 0.1
    assert a.share_findings == pytest.approx(0.05)
    assert a.share_err == pytest.approx(0.5) and a.share_bdec == pytest.approx(0.1)
    # if 18.6 also carries it in 4 seeds, H1 becomes "yes"
    seeds2 = [
        seed_result(s, [unit(17, 3), unit(18, 6, 5, 6, q=0.001 if s < 4 else 0.3)], [head(17, 3), head(18, 6)])
        for s in range(5)
    ]
    fs2 = aggregate(seeds2, {}, 4, {})
    assert answers(seeds2, fs2, tih, ["synonym"], {}, 4, 0.05)[0].h1 == "yes"
    # ... but not when its finding in 18.6 is a gated query: gated findings do not count for H1/H2
    seeds3 = [
        seed_result(
            s,
            [unit(17, 3), unit(18, 6, 5, 6, q_act_control=0.0, q=0.001 if s < 4 else 0.3)],
            [head(17, 3), head(18, 6)],
        )
        for s in range(5)
    ]
    a3 = answers(seeds3, aggregate(seeds3, {}, 4, {}), tih, ["synonym"], {}, 4, 0.05)[0]
    assert (a3.h1, a3.gated_heads, a3.n_headline_gated) == ("no", ("18.6",), 1)
    # a head whose non-matching findings are gated in some seeds and ungated in others still counts
    # its seeds together: gated in seeds 0-1, ungated in seeds 2-3 -> 4 of 5
    seeds4 = [
        seed_result(
            s,
            [
                unit(17, 3),
                unit(18, 6, 5, 6, q_act_control=0.0 if s < 2 else 1.9, k_act_x_control=1.0, q=0.001 if s < 4 else 0.3),
            ],
            [head(17, 3), head(18, 6)],
        )
        for s in range(5)
    ]
    a4 = answers(seeds4, aggregate(seeds4, {}, 4, {}), tih, ["synonym"], {}, 4, 0.05)[0]
    assert a4.gated_heads == ("18.6",)


def test_sign_flip_pvalues_null_and_effect():
    g = torch.Generator().manual_seed(0)
    null = sign_flip_pvalues(torch.randn(20, 400, generator=g), 1000, 0)
    # under the null the p-values are about uniform: about 5% below 0.05
    assert 0.02 <= float((null < 0.05).double().mean()) <= 0.09
    # an effect of 1.5 sd over 20 pairs: p at the floor 1 / (n + 1)
    eff = sign_flip_pvalues(torch.randn(20, 1, generator=g) + 1.5, 1000, 0)
    assert float(eff[0]) == pytest.approx(1 / 1001)
    # exactly zero differences: p = 1 (the observed mean 0 ties every permutation)
    assert float(sign_flip_pvalues(torch.zeros(10, 1), 500, 0)[0]) == 1.0


def test_benjamini_hochberg_hand_worked():
    # sorted 0.01, 0.02, 0.03, 0.5 with n = 4: p * n / rank = 0.04, 0.04, 0.04, 0.5
    assert benjamini_hochberg([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.04, 0.5, 0.04, 0.04])


def test_intervals_hand_worked():
    m, lo, hi = mean_ci([1.0, 3.0])  # mean 2, sd sqrt(2), half-width 1.96 * sqrt(2) / sqrt(2) = 1.96
    assert (m, lo, hi) == pytest.approx((2.0, 0.04, 3.96))
    lo, hi = wilson(5, 5)  # p = 1: the upper bound is 1, the lower 1 / (1 + z^2 / n) = 5 / 8.8416
    assert hi == pytest.approx(1.0) and lo == pytest.approx(5 / (5 + 1.96**2))
