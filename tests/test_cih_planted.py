"""The whole CIH pipeline (measure -> select -> test -> BH -> criterion -> label) on a planted model.

A one-layer attention-only HookedTransformer with one-hot token residuals and an SAE whose features
are exactly the tokens (zero error, zero b_dec), so each channel is one (query token, key token) pair
and its contribution is that pair's whole score. A one-layer model cannot move A's identity into X,
so the token at X itself stands for "X after A": conceptual prompts carry XA there, controls XU.

- matching: head 0's query of B is aligned with the key of XA (the key side differs with A);
- gated: the conceptual prompt's query token is BA, the control's is B (the A -> B match happened
  upstream, in what switched the query feature on), and head 0 aligns BA with a generic X;
- placebo: nothing planted; A and U are drawn from the same pool, X is the same in both prompts.
Head 1 has W_Q = 0: its scores are all 0, so its contrast is exactly 0 and it must never count.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fra.ingest.core.decompose import build_projector
from fra.ingest.studies.cih.analysis import seed_findings
from fra.ingest.studies.cih.config import CIHConfig
from fra.ingest.studies.cih.prompts import Prompt
from fra.ingest.studies.cih.study import run_relation

BOS, A, XA, U, XU, B, BA, X = range(8)
FILL = tuple(range(8, 16))
T = 12


def planted_setup(kind: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=16,
        d_head=8,
        n_heads=2,
        n_layers=1,
        n_ctx=32,
        d_vocab=16,
        act_fn="relu",
        normalization_type="RMSPre",
        attn_only=True,
        device="cpu",
        seed=seed,
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(16))
        model.W_pos.zero_()
        attn = model.blocks[0].attn
        W_Q = 0.3 * torch.randn(2, 16, 8, generator=g)
        W_K = 0.3 * torch.randn(2, 16, 8, generator=g)
        W_Q[1] = 0.0
        if kind in ("matching", "gated"):
            q_tok, k_tok = (B, XA) if kind == "matching" else (BA, X)
            k = W_K[0, k_tok]
            others = (W_Q[0] @ W_K[0].T).abs().max()
            W_Q[0, q_tok] += 4 * others * k / (k @ k)
        attn.W_Q.copy_(W_Q)
        attn.W_K.copy_(W_K)
        attn.b_Q.zero_()
        attn.b_K.zero_()
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=16))
    sae.cfg.metadata.hook_name = "blocks.0.ln1.hook_normalized"
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(16))
        sae.W_enc.copy_(torch.eye(16))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    model, sae = model.eval(), sae.eval()
    return SimpleNamespace(model=model, layers=(0,), saes={0: sae}, projs={0: build_projector(model, 0, sae)})


def planted_prompts(kind: str, n_pairs: int = 40, seed: int = 0):
    """[BOS] fillers A X fillers N fillers B, length T; the control differs as the kind says."""
    rng = random.Random(seed)
    out = []
    for i in range(n_pairs):
        a_pos = rng.randint(1, 4)
        n_pos = rng.randint(a_pos + 2, T - 2)
        toks = [BOS] + [rng.choice(FILL) for _ in range(T - 1)]
        ctrl = list(toks)
        if kind == "matching":
            toks[a_pos], toks[a_pos + 1], toks[-1] = A, XA, B
            ctrl[a_pos], ctrl[a_pos + 1], ctrl[-1] = U, XU, B
        elif kind == "gated":
            toks[a_pos], toks[a_pos + 1], toks[-1] = A, X, BA
            ctrl[a_pos], ctrl[a_pos + 1], ctrl[-1] = U, X, B
        else:  # placebo: A and U from the same pool, same X and B
            toks[a_pos], toks[a_pos + 1], toks[-1] = rng.choice((A, U)), X, B
            ctrl[a_pos], ctrl[a_pos + 1], ctrl[-1] = rng.choice((A, U)), X, B
        for role, tk in (("concept", toks), ("control", ctrl)):
            out.append(Prompt(tuple(tk), a_pos, a_pos + 1, (n_pos,), kind, role, i, i % 2, 0, ("a", "x", "n", "b")))
    return out


CFG = CIHConfig(n_select=3, n_perm=2000, n_random_draws=5, batch_size=16)


def run_planted(kind: str):
    setup = planted_setup(kind)
    heads, tests, resid = run_relation(
        setup, CFG, planted_prompts(kind), kind, set(), 0, torch.Generator().manual_seed(0)
    )
    return setup, heads, tests, resid, seed_findings(tests, heads, CFG.fdr, CFG.gate_ratio)


def test_planted_matching_channel_is_found_and_labelled_matching():
    setup, heads, tests, resid, found = run_planted("matching")
    assert resid < 1e-4  # identity SAE: the groups sum to the model's scores (fp32)
    assert [(f.feat_q, f.feat_k, f.heads, f.kind) for f in found] == [(B, XA, (0,), "matching")]
    h0, h1 = sorted(heads, key=lambda h: h.head)
    assert h0.q < 0.05 and h0.contrast > 0
    assert h1.contrast == 0.0 and h1.p == 1.0  # W_Q = 0: nothing to count in head 1
    assert h0.err == pytest.approx(0, abs=1e-5) and h0.bdec == pytest.approx(0, abs=1e-5)  # identity SAE
    # reference for the unit's contrast: XA occurs only at X in conceptual prompts and never in
    # controls, and the margin weight at X is +1, so the contrast is the mean model score at (B, X)
    t = next(t for t in tests if (t.feat_q, t.feat_k, t.head) == (B, XA, 0))
    ref = []
    for p in planted_prompts("matching"):
        if p.half == 1 and p.role == "concept":
            _, cache = setup.model.run_with_cache(torch.tensor([p.tokens]))
            ref.append(float(cache["blocks.0.attn.hook_attn_scores"][0, 0, p.q_pos, p.x_pos]))
    assert t.contrast == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    assert t.share == pytest.approx(t.contrast / h0.contrast, rel=1e-6) and 0.5 < t.share < 1.5


def test_planted_causal_removal_removes_the_planted_attention_and_random_channels_do_not():
    setup, heads, tests, _, _ = run_planted("matching")
    t = next(t for t in tests if (t.feat_q, t.feat_k, t.head) == (B, XA, 0))
    # independent reference: the channel's contribution is the model's whole score at (B, X), so
    # removing it sets that score to 0; re-softmax the model's own row
    drops = []
    for p in planted_prompts("matching"):
        if p.half != 1 or p.role != "concept":
            continue
        _, cache = setup.model.run_with_cache(torch.tensor([p.tokens]))
        row = cache["blocks.0.attn.hook_attn_scores"][0, 0, p.q_pos].clone()
        before = row.softmax(-1)[p.x_pos]
        row[p.x_pos] = 0.0
        drops.append(float(before - row.softmax(-1)[p.x_pos]))
    ref = sum(drops) / len(drops)
    assert ref > 0.5  # the planted attention is large and removal takes it away
    assert t.attn_drop == pytest.approx(ref, abs=1e-5)
    assert abs(t.attn_drop_random) < 0.1 * t.attn_drop  # matched random channels barely move it


def test_planted_gated_query_is_labelled_gated():
    _, heads, tests, _, found = run_planted("gated")
    assert [(f.feat_q, f.feat_k, f.heads, f.kind) for f in found] == [(BA, X, (0,), "gated query")]
    t = next(t for t in tests if (t.feat_q, t.feat_k, t.head) == (BA, X, 0))
    assert t.q_act > 0 and t.q_act_control == 0.0  # BA never occurs at B in the control


def test_planted_placebo_finds_nothing():
    _, heads, tests, _, found = run_planted("placebo")
    assert tests  # units were selected and tested
    assert found == []


def test_logprob_check_edits_the_planted_head_at_b_and_matches_the_analytic_removal():
    from fra.ingest.studies.cih.causal import logprob_effects
    from fra.ingest.studies.cih.results import Finding

    setup = planted_setup("matching")
    prompts = planted_prompts("matching")
    f = Finding(
        "matching", "", 0, B, XA, "0.0", "0.0", "matching", 1, 1, 1.0, 0.2, 1.0, True, 0.9, 0.001, 0.5, 0.0, 0.0, "", ""
    )
    e = logprob_effects(setup, CFG, f, prompts)
    test = [p for p in prompts if p.half == 1 and p.role == "concept"]
    assert e.n_prompts == len(test) and e.head == 0
    assert e.delta_error == 0.0  # identity SAE: the error terms are exactly zero, removing them changes nothing
    # reference: the same edit by hand (score at (B, X) set to 0 in head 0), through the model's own softmax
    p = test[0]

    def edit(scores, hook):
        scores[:, 0, p.q_pos, p.x_pos] = 0.0
        return scores

    toks = torch.tensor([p.tokens])
    lp = lambda lg: float(lg[0, -1].log_softmax(-1)[p.tokens[p.x_pos]])  # noqa: E731
    ref = lp(setup.model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_attn_scores", edit)])) - lp(
        setup.model(toks)
    )
    one = logprob_effects(setup, CFG, f, [p] + [q for q in prompts if q.pair_id == p.pair_id and q.role == "control"])
    assert one.delta_channel == pytest.approx(ref, abs=1e-5) and ref != 0.0
