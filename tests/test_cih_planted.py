"""The CIH pipeline (measure -> per-pair selection -> held-out tests -> criterion) on planted models.

A one-layer attention-only HookedTransformer with one-hot token residuals and an SAE whose features
are exactly the tokens (zero error, zero b_dec), so each channel is one (query token, key token)
pair and its contribution is that pair's whole score. A one-layer model cannot move A's identity
into X, so the token at X stands for "X after A": conceptual prompts carry XA_p there, controls and
anchor swaps XU_p.

- concept-specific: only pair 0's query token B_0 is aligned with the key of XA_0 in head 0;
- token induction: every pair's B_p is aligned with XA_p in head 0 (the positive control);
- structural: the query token is BA_p whenever A_p occurs anywhere before B (conceptual prompts and
  anchor swaps) and head 0 aligns BA_p with a generic X token: it passes everything but the swap.
Head 1 has W_Q = 0: its scores are all 0, so it must never count.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fra.ingest.core.decompose import build_projector
from fra.ingest.studies.cih import analysis as A
from fra.ingest.studies.cih.config import CIHConfig
from fra.ingest.studies.cih.prompts import Prompt
from fra.ingest.studies.cih.study import run_relation

N_PAIRS = 10
BOS, X = 0, 1
FILL = tuple(range(2, 10))
FIRST = 10  # pair p owns tokens FIRST + 6p .. FIRST + 6p + 5: A, XA, U, XU, B, BA
V = FIRST + 6 * N_PAIRS
T = 14


def tok(p: int, name: str) -> int:
    return FIRST + 6 * p + ("A", "XA", "U", "XU", "B", "BA").index(name)


def planted_setup(kind: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=V, d_head=8, n_heads=2, n_layers=1, n_ctx=32, d_vocab=V, act_fn="relu",
        normalization_type="RMSPre", attn_only=True, device="cpu", seed=seed,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(V))
        model.W_pos.zero_()
        # RMS-normalised one-hot residuals have norm sqrt(V): scale so random scores stay about 0.3
        W_Q = 0.3 * V**-0.5 * torch.randn(2, V, 8, generator=g)
        W_K = 0.3 * V**-0.5 * torch.randn(2, V, 8, generator=g)
        W_Q[1] = 0.0
        plants = {
            "concept-specific": [(tok(0, "B"), tok(0, "XA"))],
            "token": [(tok(p, "B"), tok(p, "XA")) for p in range(N_PAIRS)],
            "structural": [(tok(p, "BA"), X) for p in range(N_PAIRS)],
            "none": [],
        }[kind]
        for q_tok, k_tok in plants:
            k = W_K[0, k_tok]
            W_Q[0, q_tok] += 8 * 8**0.5 / V * k / (k @ k)  # adds 8 to the score of the planted pair
        attn = model.blocks[0].attn
        attn.W_Q.copy_(W_Q)
        attn.W_K.copy_(W_K)
        attn.b_Q.zero_()
        attn.b_K.zero_()
    sae = StandardSAE(StandardSAEConfig(d_in=V, d_sae=V))
    sae.cfg.metadata.hook_name = "blocks.0.ln1.hook_normalized"
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(V))
        sae.W_enc.copy_(torch.eye(V))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    model, sae = model.eval(), sae.eval()
    return SimpleNamespace(model=model, layers=(0,), saes={0: sae}, projs={0: build_projector(model, 0, sae)})


def planted_prompts(kind: str, relation: str, seed: int = 0) -> list[Prompt]:
    """Per pair, 3 selection and 3 held-out templates (a template fixes the A and N positions);
    conceptual, control and (held-out) anchor-swap prompts share every position."""
    rng = random.Random(seed)
    out = []
    for p in range(N_PAIRS):
        for half in (0, 1):
            for t in range(3 * half, 3 * half + 3):
                a_pos, n_pos = 1 + t % 3, 6 + t % 4
                base = [BOS] + [rng.choice(FILL) for _ in range(T - 1)]
                b_tok = tok(p, "B")
                roles = {
                    "concept": {a_pos: tok(p, "A"), a_pos + 1: tok(p, "XA")},
                    "control": {a_pos: tok(p, "U"), a_pos + 1: tok(p, "XU")},
                    "swap": {a_pos: tok(p, "U"), a_pos + 1: tok(p, "XU"), n_pos: tok(p, "A")},
                }
                if kind == "structural":  # X is generic; the query token says "A occurred before me"
                    for r in roles.values():
                        r[a_pos + 1] = X
                if kind == "none":  # placebo: A and U from the same pool, the rest identical
                    a, u = rng.sample((tok(p, "A"), tok(p, "U")), 2)
                    roles["concept"][a_pos], roles["control"][a_pos] = a, u
                    roles["concept"][a_pos + 1] = roles["control"][a_pos + 1] = X
                    roles["swap"].update({a_pos: u, a_pos + 1: X})
                for role, edits in roles.items():
                    if role == "swap" and half == 0:
                        continue
                    toks = list(base)
                    for i, v in edits.items():
                        toks[i] = v
                    has_a = tok(p, "A") in toks
                    toks[-1] = tok(p, "BA") if kind == "structural" and has_a else b_tok
                    out.append(
                        Prompt(tuple(toks), a_pos, a_pos + 1, (n_pos,), relation, role, p, half, t,
                               ("a", "x", "n", "b"), p % 2)
                    )  # fmt: skip
    return out


CFG = CIHConfig(group_size=3, n_perm=1000, n_random_draws=2, batch_size=30, act_floor=0.1, seeds=(0,), min_pass=1)
CRIT = A.Criteria(CFG.fdr, CFG.attn_floor, CFG.share_floor, 1, CFG.n_perm)


def run_planted(kind: str, relation: str):
    setup = planted_setup(kind)
    rec, resid = run_relation(setup, CFG, planted_prompts(kind, relation), 0, torch.Generator().manual_seed(0))
    return setup, rec, resid


def frames(*recs) -> dict:
    return {k: pd.DataFrame([r for rec in recs for r in rec[k]]) for k in ("heads", "groups", "curves", "members")}


@pytest.fixture(scope="module")
def placebo():
    return run_planted("none", "placebo")[1]


def analysed(rec, placebo_rec):
    f = frames(rec, placebo_rec)
    ht = A.head_tests(f["heads"], {"0.0"}, CRIT)
    ut = A.unit_tests(f["groups"], f["heads"], ht, CRIT)
    return f, ht, ut


def test_concept_specific_channel_is_found_by_the_per_pair_unit_and_not_by_the_fixed_one(placebo):
    setup, rec, resid = run_planted("concept-specific", "synonym")
    assert resid < 1e-4  # identity SAE: the term groups sum to the model's scores (fp32)
    f, ht, ut = analysed(rec, placebo)
    g = f["groups"][f["groups"].relation == "synonym"]
    ch = g[(g.unit == "channel") & (g["head"] == 0)]
    # pair 0's own group, selected on its selection templates, carries the planted channel's
    # contrast on its held-out templates; no other pair's group carries anything like it
    by_pair = ch.groupby("pair_id")["contrast"].mean()
    assert by_pair[0] > 4 and by_pair.drop(0).abs().max() < 0.2 * by_pair[0]
    top = f["members"][(f["members"].relation == "synonym") & (f["members"].unit == "channel")]
    top0 = top[(top.pair_id == 0) & (top["head"] == 0) & (top["rank"] == 0)]
    assert set(zip(top0.feat_q, top0.feat_k)) == {(tok(0, "B"), tok(0, "XA"))}
    assert (top0.label == "matching").all()  # B fires either way; XA_0 only after A_0
    # reference for the contrast: the model's own score at (B, X) on pair 0's held-out conceptual
    # prompts (XA_0 occurs nowhere else, and the margin weight at X is +1) ...
    ref = []
    for p in planted_prompts("concept-specific", "synonym"):
        if p.pair_id == 0 and p.half == 1 and p.role == "concept":
            _, cache = setup.model.run_with_cache(torch.tensor([p.tokens]))
            ref.append(float(cache["blocks.0.attn.hook_attn_scores"][0, 0, p.q_pos, p.x_pos]))
    mine = float(top0.contrast.mean())
    assert mine == pytest.approx(sum(ref) / len(ref), rel=1e-4)
    # ... while the fixed unit, selected on other pairs, carries nothing on the test pairs
    fx = g[(g.unit == "fixed") & (g["head"] == 0)]
    assert fx["contrast"].abs().max() < 0.2 * by_pair[0]
    assert fx.pair_id.isin([p for p in range(N_PAIRS) if p % 2 == 1]).all()  # test pairs only


def test_positive_control_passes_on_planted_token_induction_and_fails_without_it(placebo):
    _, rec, _ = run_planted("token", "identity")
    f, ht, ut = analysed(rec, placebo)
    v = A.verdicts(ut, 1, CRIT)
    ans = A.answers(v, ["0.0"])
    cv = A.curve_table(f["curves"], CFG.group_size)
    pc = A.positive_control(ans, cv, CFG.group_size, ["0.0"]).set_index("unit")
    assert bool(pc.loc["channel", "passes"]) and bool(pc.loc["channel", "passes_matching"])
    assert A.chosen_unit(pc.reset_index()) is not None
    h1 = ut[(ut["head"] == 1) & (ut.relation == "identity")]
    assert not h1.passes.any()  # W_Q = 0 in head 1: no gate, nothing counts
    # the same pipeline on a model with nothing planted: identity must fail the positive control
    _, rec0, _ = run_planted("none", "identity")
    f0, ht0, ut0 = analysed(rec0, placebo)
    ans0 = A.answers(A.verdicts(ut0, 1, CRIT), ["0.0"])
    pc0 = A.positive_control(ans0, A.curve_table(f0["curves"], CFG.group_size), CFG.group_size, ["0.0"])
    assert not pc0.passes.any() and A.chosen_unit(pc0) is None


def test_anchor_swap_rejects_a_structural_unit(placebo):
    _, rec, _ = run_planted("structural", "synonym")
    f, ht, ut = analysed(rec, placebo)
    u = ut[(ut["head"] == 0) & (ut.unit == "channel") & (ut.relation == "synonym")].iloc[0]
    assert u.contrast > 1 and u.p_sign < 0.01  # it looks like a finding on contrast alone
    # but A anywhere does the same (up to the margin's mean over other keys, where A now sits)
    assert u.swap_contrast == pytest.approx(u.contrast, rel=0.05)
    assert u.p_swap > 0.5 and not u.passes
    # its top channel is labelled gated query: BA_p fires at B only when A_p occurred
    top = f["members"][(f["members"].relation == "synonym") & (f["members"].unit == "channel")]
    assert (top[(top["head"] == 0) & (top["rank"] == 0)].label == "gated query").all()


def test_placebo_passes_nothing(placebo):
    f, ht, ut = analysed(placebo, placebo)
    assert len(ut) and not ut.passes.any()


def test_causal_removal_matches_a_by_hand_edit_of_the_planted_score():
    setup, rec, _ = run_planted("token", "identity")
    g = pd.DataFrame(rec["groups"])
    ch = g[(g.unit == "channel") & (g["head"] == 0)]
    # reference: the planted channel's contribution is the model's whole score at (B, X), and the
    # other two channels of the group add little; removing the whole group by hand
    drops = []
    for p in planted_prompts("token", "identity"):
        if p.half != 1 or p.role != "concept":
            continue
        _, cache = setup.model.run_with_cache(torch.tensor([p.tokens]))
        row = cache["blocks.0.attn.hook_attn_scores"][0, 0, p.q_pos].clone()
        before = row.softmax(-1)[p.x_pos]
        row[p.x_pos] = 0.0
        drops.append(float(before - row.softmax(-1)[p.x_pos]))
    ref = sum(drops) / len(drops)
    assert ref > 0.5
    assert ch["attn_drop"].mean() == pytest.approx(ref, abs=0.05)  # the group's other channels are small
    assert (ch["attn_drop_error"] == 0).all()  # identity SAE: no error terms
