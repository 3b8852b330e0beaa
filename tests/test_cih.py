"""CIH machinery: the exact margin decomposition, a planted induction channel, and the nulls."""

from __future__ import annotations

import random

import pytest
import torch

from fra.ingest.cih import (
    Prompt,
    analyse_prompt,
    benjamini_hochberg,
    margin_weights,
    prompt_margins,
    random_prompts,
    shifted_targets,
    sign_flip_pvalue,
)
from fra.ingest.core.decompose import build_projector
from fra.ingest.tools.testing import make_model, make_sae


def test_margin_weights_hand_worked():
    # T=4, one query q=3 with target k=1: keys 0..3 are causal; +1 at k=1, -1/3 at 0, 2, 3.
    W = margin_weights(4, {3: 1})
    assert W[3].tolist() == pytest.approx([-1 / 3, 1.0, -1 / 3, -1 / 3])
    assert W[:3].abs().sum() == 0
    # two queries: each row is divided by 2 so the margin is a mean over queries
    W = margin_weights(4, {2: 1, 3: 1})
    assert W[2].tolist() == pytest.approx([-0.25, 0.5, -0.25, 0.0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_channel_margins_sum_to_the_heads_margin(family):
    model = make_model(family, processed=False)
    sae = make_sae(16, "blocks.1.ln1.hook_normalized", d_sae=24, k=4)
    proj = build_projector(model, 1, sae)
    p = random_prompts(1, 6, 50, 0, random.Random(0))[0]
    sh = shifted_targets(p, [5, 4, 3], random.Random(1))
    r = analyse_prompt(model, sae, proj, p, sh)
    for m, name in enumerate(("real", "shifted")):
        ht = r.head_terms[name]
        # sum over channels = the feature x feature part of the head's margin
        torch.testing.assert_close(r.vals[m].sum(-1), torch.tensor(ht["ff"]), atol=1e-4, rtol=1e-4)
        # ff + b_dec + error + bias terms = the head's own margin from hook_attn_scores
        parts = torch.tensor([ht[g] for g in ("ff", "bdec", "err", "bias")]).sum(0)
        torch.testing.assert_close(parts, torch.tensor(ht["total"]), atol=1e-4, rtol=1e-4)


def planted(with_channel: bool, n_prompts=20, seed=0):
    """Factored FA of a one-head 'model' whose feature 0 marks the query token and feature 1
    marks 'the previous token equals the query token' (the induction target). With the channel
    planted, <q_0, k_1> = 2; otherwise all query/key vectors are random noise."""
    g = torch.Generator().manual_seed(seed)
    F, E, T, A = 8, 4, 10, 2
    out = []
    for _ in range(n_prompts):
        qf = 0.3 * torch.randn(1, T, A, E, generator=g)
        kf = 0.3 * torch.randn(1, T, A, E, generator=g)
        idx = torch.randint(2, F, (T, A), generator=g)
        q, k = T - 1, int(torch.randint(1, T - 2, (1,), generator=g))
        idx[q, 0], idx[k, 0] = 0, 1
        if with_channel:
            qf[0, q, 0] = torch.tensor([2.0, 0, 0, 0])
            kf[0, k, 0] = torch.tensor([1.0, 0, 0, 0])
            kf[0, :, 1, 0] = 0.0  # keep other keys' second slot off the planted direction
        out.append((qf, kf, idx, q, k))
    return out, F


@pytest.mark.parametrize("with_channel", [True, False])
def test_method_finds_planted_channel_and_only_it(with_channel):
    data, F = planted(with_channel)
    rng = random.Random(0)
    sums, per_prompt = torch.zeros(F * F), []
    for i, (qf, kf, idx, q, k) in enumerate(data):
        live = torch.ones(idx.shape, dtype=torch.bool)
        p = Prompt([0] * idx.shape[0], {q: k}, "concept:test", i % 2, {})
        sh = shifted_targets(p, [q - k for *_, q, k in data], rng)
        W = torch.stack([margin_weights(idx.shape[0], p.targets), margin_weights(idx.shape[0], sh)])
        keys, vals = prompt_margins(qf, kf, idx, live, W, F)
        if i % 2 == 0:
            sums.index_add_(0, keys, vals[0, 0])
        per_prompt.append(dict(zip(keys.tolist(), vals[:, 0].T.tolist())))
    selected = sums.topk(3).indices.tolist()  # selection on half A
    pvals = []
    for key in selected:  # test on half B against the shifted-target null
        diffs = [d.get(key, [0, 0])[0] - d.get(key, [0, 0])[1] for d in per_prompt[1::2]]
        pvals.append(sign_flip_pvalue(diffs, 2000, rng))
    qvals = benjamini_hochberg(pvals)
    found = {selected[i] for i, q in enumerate(qvals) if q < 0.05}
    if with_channel:
        assert found == {0 * F + 1}  # channel (feat_q 0, feat_k 1) and nothing else
    else:
        assert found == set()


def test_sign_flip_pvalue_null_and_effect():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    null_ps = [sign_flip_pvalue(torch.randn(20, generator=g), 500, rng) for _ in range(200)]
    # under the null, p-values are roughly uniform: about 5% fall below 0.05
    assert 0.0 <= sum(p < 0.05 for p in null_ps) / 200 <= 0.12
    assert sign_flip_pvalue(torch.randn(20, generator=g) + 2.0, 500, rng) < 0.01


def test_benjamini_hochberg_hand_worked():
    # p sorted: 0.01, 0.02, 0.03, 0.5 with n=4 -> raw p*n/rank: 0.04, 0.04, 0.04, 0.5; monotone from the top
    assert benjamini_hochberg([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.04, 0.5, 0.04, 0.04])


def test_shifted_targets_never_hit_the_real_target():
    rng = random.Random(0)
    p = random_prompts(1, 10, 50, 0, rng)[0]
    sh = shifted_targets(p, [q - k for q, k in p.targets.items()], rng)
    assert set(sh) == set(p.targets)
    assert all(sh[q] != p.targets[q] and 1 <= sh[q] < q for q in sh)


A_TOK, M_TOK, BOS_TOK = 1, 2, 3  # the planted channel reads "query is A" x "key is M" (M follows A)


def planted_transformer(planted: bool, seed: int = 0):
    """A one-layer attention-only HookedTransformer whose residual stream is the one-hot token
    (no positional embedding) and an SAE whose features are exactly the tokens. Planted: the query
    vector of A and the key vector of M align (q_A . k_M = 4 x the largest other |q . k|). Not
    planted: the same random weights with q_A . k_M set to exactly 0."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=16, d_head=8, n_heads=1, n_layers=1, n_ctx=32, d_vocab=12,
                                  act_fn="relu", normalization_type="RMSPre", attn_only=True, device="cpu")
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(16)[:12])
        model.W_pos.zero_()
        attn = model.blocks[0].attn
        W_Q = 0.3 * torch.randn(16, 8, generator=g)
        W_K = 0.3 * torch.randn(16, 8, generator=g)
        k_M = W_K[M_TOK]
        W_Q[A_TOK] -= (W_Q[A_TOK] @ k_M) / (k_M @ k_M) * k_M  # q_A . k_M = 0
        if planted:
            others = (W_Q @ W_K.T).abs().max()
            W_Q[A_TOK] += 4 * others * k_M / (k_M @ k_M)
        attn.W_Q.copy_(W_Q[None])
        attn.W_K.copy_(W_K[None])
        attn.b_Q.zero_()
        attn.b_K.zero_()
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=12))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(16)[:12])
        sae.W_enc.copy_(torch.eye(16)[:, :12])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return model.eval(), sae.eval()


def planted_prompts(n: int, seed: int = 0):
    """[BOS] fillers A M fillers A: the final A's induction target is M."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        before, after = rng.randint(1, 4), rng.randint(2, 6)
        toks = ([BOS_TOK] + [rng.randint(4, 11) for _ in range(before)] + [A_TOK, M_TOK]
                + [rng.randint(4, 11) for _ in range(after)] + [A_TOK])
        out.append(Prompt(toks, {len(toks) - 1: before + 2}, "concept:planted", i % 2, {}))
    return out


@pytest.mark.parametrize("planted", [True, False])
def test_study_finds_the_planted_channel_in_a_transformer(planted):
    """Selection on half A, shifted-target null on half B, BH: the planted model yields exactly
    the channel (A -> M); the same model without it yields none."""
    model, sae = planted_transformer(planted)
    proj = build_projector(model, 0, sae)
    prompts = planted_prompts(24)
    rng = random.Random(0)
    dists = [q - k for p in prompts for q, k in p.targets.items()]
    F = sae.cfg.d_sae
    sums, per_prompt = torch.zeros(1, F * F), []
    for p in prompts:
        r = analyse_prompt(model, sae, proj, p, shifted_targets(p, dists, rng))
        if p.half == 0:
            sums.index_add_(1, r.keys, r.vals[0])
        per_prompt.append(dict(zip(r.keys.tolist(), r.vals[:, 0].T.tolist())))
    selected = sums[0].topk(5).indices.tolist()
    pvals = []
    for key in selected:
        diffs = [d.get(key, [0, 0])[0] - d.get(key, [0, 0])[1] for p, d in zip(prompts, per_prompt) if p.half == 1]
        pvals.append(sign_flip_pvalue(diffs, 2000, rng))
    qvals = benjamini_hochberg(pvals)
    found = {(selected[i] // F, selected[i] % F) for i, q in enumerate(qvals)
             if q < 0.05 and sums[0, selected[i]] > 0}
    assert found == ({(A_TOK, M_TOK)} if planted else set())
