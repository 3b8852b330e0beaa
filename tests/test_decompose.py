"""The exact decomposition core: completeness, naive reference, a hand-worked case, the sae-lens
file format, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from fra.ingest.core.decompose import (
    TERM_NAMES,
    DecompositionInputError,
    build_projector,
    decompose,
    pair_terms,
    project_tokens,
    run_hooks,
)
from fra.ingest.core.reference import naive_fa
from fra.ingest.tools.testing import make_model, make_sae

HOOKS = ("blocks.1.ln1.hook_normalized", "blocks.1.hook_resid_pre")
CASES = list(itertools.product(("gpt2", "llama"), HOOKS, (False, True)))


def tokens(T=12, B=2, seed=0, vocab=50):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,hook,processed", CASES)
@pytest.mark.parametrize("k", [4, None], ids=["topk", "relu"])
def test_completeness_matches_hook_attn_scores(family, hook, processed, k):
    model = make_model(family, processed=processed)
    sae = make_sae(model.cfg.d_model, hook, k=k)
    dec = decompose(model, 1, sae, tokens())
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    total = dec.total_BHQK[..., causal]
    scores = dec.model_scores_BHQK[..., causal]
    # fp32 throughout: the terms are 16 sums of d_head-long dot products of vectors that were
    # themselves accumulated over d_model, so rounding is ~1e-7 relative per operation times a
    # few dozen operations; 2e-5 of the largest score leaves a factor of ~10 margin.
    tol = 2e-5 * scores.abs().max().item()
    torch.testing.assert_close(total, scores, atol=tol, rtol=0)
    # the feature terms are real, not zeros that leave everything to the error term
    assert dec.term("feat_feat").abs().max() > 0.05 * scores.abs().max()
    assert dec.sparse.n_active_BT.float().mean() > 0


@pytest.mark.parametrize("family,hook,processed", CASES)
def test_fast_path_agrees_with_naive_per_pair_reference(family, hook, processed):
    model = make_model(family, processed=processed, seed=1)
    sae = make_sae(model.cfg.d_model, hook, k=3, seed=2)
    toks = tokens(T=7, B=1, seed=3)
    dec = decompose(model, 1, sae, toks)
    hooks = run_hooks(model, 1, hook, toks)
    x_TD, scale_T = hooks.x_BTD[0], hooks.norm_scale_BT[0]
    idx = dec.sparse.feat_idx_BTA[0]
    n_active = dec.sparse.n_active_BT[0]
    for h in range(model.cfg.n_heads):
        for q in range(7):
            for k in range(q + 1):
                fq, fk, ref = naive_fa(model, 1, sae, x_TD, scale_T, h, q, k)
                fast = dec.fa_block(0, h, q, k)[: n_active[q], : n_active[k]]
                # map the fast path's slot order onto the reference's feature order
                oq = torch.argsort(idx[q, : n_active[q]])
                ok = torch.argsort(idx[k, : n_active[k]])
                assert torch.equal(idx[q, : n_active[q]][oq], fq)
                assert torch.equal(idx[k, : n_active[k]][ok], fk)
                # fp32 fast path against the float64 reference: values are O(1), and each is a
                # d_head-long dot product of d_model-long sums, so 1e-5 absolute is ~50 ulps.
                torch.testing.assert_close(fast[oq][:, ok].double(), ref, atol=1e-5, rtol=1e-5)


def test_hand_worked_case():
    """1 layer, d_model 2, one head with d_head 2, RMSPre norm (no weight), no attn scale,
    W_Q = I, W_K = diag(2, 1), no biases; an SAE with 3 features:
        d0 = (1, 0), d1 = (0, 1), d2 = (1, 1), b_dec = (0.5, 0).
    Token 0: x0 = (2, 1), acts (1, 0, 1) -> x_hat = d0 + d2 + b_dec = (2.5, 1), err0 = (-0.5, 0).
    Token 1: x1 = (0, 3), acts (0, 2, 0) -> x_hat = 2 d1 + b_dec = (0.5, 2),   err1 = (-0.5, 1).
    Query side maps v -> v, key side v -> (2 v_0, v_1).
      FA[q=0,k=0]: i=0,j=0: (1,0).(2,0) = 2; i=0,j=2: (1,0).(2,1) = 2;
                   i=2,j=0: (1,1).(2,0) = 2; i=2,j=2: (1,1).(2,1) = 3.       (sum 9)
      FA[q=1,k=0]: i=1 (a=2): (0,2).(2,0) = 0; (0,2).(2,1) = 2.               (sum 2)
      FA[q=1,k=1]: (0,2).(2*(0,1)) = (0,2).(0,2) = 4.
    Other terms at (1, 0), with Q-side vectors feat (0,2), bdec (0.5,0), err (-0.5,1) and
    K-side vectors feat (4,1), bdec (1,0), err (-1,0):
      feat_bdec 0, feat_err 0, bdec_feat 2, bdec_bdec 0.5, bdec_err -0.5,
      err_feat -2+1 = -1, err_bdec -0.5, err_err 0.5.
    Total 2 + 0 + 0 + 2 + 0.5 - 0.5 - 1 - 0.5 + 0.5 = 3 = Q(x1).K(x0) = (0,3).(4,1).
    """
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=2,
        d_head=2,
        n_heads=1,
        n_layers=1,
        n_ctx=4,
        d_vocab=3,
        act_fn="relu",
        normalization_type="RMSPre",
        attn_only=True,
        use_attn_scale=False,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.copy_(torch.eye(2)[None])
        model.blocks[0].attn.W_K.copy_(torch.diag(torch.tensor([2.0, 1.0]))[None])
        model.blocks[0].attn.b_Q.zero_()
        model.blocks[0].attn.b_K.zero_()
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=3))
    sae.cfg.metadata.hook_name = "blocks.0.ln1.hook_normalized"
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    proj = build_projector(model, 0, sae)
    x = torch.tensor([[[2.0, 1.0], [0.0, 3.0]]])
    acts = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]])
    sparse, q, k, err = project_tokens(proj, x, acts, sae.W_dec, sae.b_dec)
    torch.testing.assert_close(err[0], torch.tensor([[-0.5, 0.0], [-0.5, 1.0]]))
    idx = sparse.feat_idx_BTA[0].tolist()

    def fa(qp, kp):
        block = q.feat_BHTAE[0, 0, qp] @ k.feat_BHTAE[0, 0, kp].T
        return {
            (idx[qp][a], idx[kp][b]): block[a, b].item()
            for a in range(sparse.n_active_BT[0, qp])
            for b in range(sparse.n_active_BT[0, kp])
        }

    assert fa(0, 0) == pytest.approx({(0, 0): 2.0, (0, 2): 2.0, (2, 0): 2.0, (2, 2): 3.0})
    assert fa(1, 0) == pytest.approx({(1, 0): 0.0, (1, 2): 2.0})
    assert fa(1, 1) == pytest.approx({(1, 1): 4.0})
    terms = pair_terms(q, k)[:, 0, 0, 1, 0]
    expected = {
        "feat_feat": 2.0,
        "feat_bdec": 0.0,
        "feat_err": 0.0,
        "feat_bias": 0.0,
        "bdec_feat": 2.0,
        "bdec_bdec": 0.5,
        "bdec_err": -0.5,
        "bdec_bias": 0.0,
        "err_feat": -1.0,
        "err_bdec": -0.5,
        "err_err": 0.5,
        "err_bias": 0.0,
        "bias_feat": 0.0,
        "bias_bdec": 0.0,
        "bias_err": 0.0,
        "bias_bias": 0.0,
    }
    assert dict(zip(TERM_NAMES, terms.tolist())) == pytest.approx(expected)
    assert terms.sum().item() == pytest.approx(3.0)


def test_sae_lens_file_format_round_trip(tmp_path):
    from sae_lens import SAE

    model = make_model("llama")
    sae = make_sae(model.cfg.d_model, HOOKS[0], k=4)
    sae.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert loaded.cfg.metadata.hook_name == HOOKS[0]
    toks = tokens()
    a, b = decompose(model, 1, sae, toks), decompose(model, 1, loaded, toks)
    assert torch.equal(a.sparse.feat_idx_BTA, b.sparse.feat_idx_BTA)
    torch.testing.assert_close(a.terms_CBHQK, b.terms_CBHQK, atol=0, rtol=0)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.mark.parametrize(
    "layer,d_in,hook,toks,match",
    [
        (5, 16, "blocks.5.ln1.hook_normalized", tokens(), "layer 5 out of range"),
        (-1, 16, "blocks.1.ln1.hook_normalized", tokens(), "out of range"),
        (1, 12, "blocks.1.ln1.hook_normalized", tokens(), "d_in 12 does not match"),
        (1, 16, "blocks.0.ln1.hook_normalized", tokens(), "does not feed the attention of layer 1"),
        (1, 16, "blocks.1.hook_resid_mid", tokens(), "does not feed"),
        (1, 16, "blocks.1.ln1.hook_normalized", tokens(T=40), "longer than the model's n_ctx 32"),
        (1, 16, "blocks.1.ln1.hook_normalized", torch.zeros(1, 0, dtype=torch.long), "empty input"),
        (1, 16, "blocks.1.ln1.hook_normalized", torch.full((1, 3), 99), r"token ids must lie"),
    ],
    ids=["layer-high", "layer-negative", "d_in", "wrong-layer-hook", "wrong-hook", "too-long", "empty", "bad-token"],
)
def test_bad_input_names_the_problem(llama, layer, d_in, hook, toks, match):
    sae = make_sae(d_in, hook)
    with pytest.raises(DecompositionInputError, match=match):
        decompose(llama, layer, sae, toks)


# --------------------------------------------------------------------------------------------
# QK-norm (Qwen3, Gemma 3 per head; OLMo-2 over all heads) and sliding windows (Gemma 3)

QK_CASES = [
    (family, layer, hook)
    for family, n_layers in (("qwen3", 2), ("gemma3", 3), ("olmo2", 2))
    for layer in range(n_layers)
    for hook in (("hook_resid_pre",) if family == "olmo2" else ("ln1.hook_normalized", "hook_resid_pre"))
]


def k_scale_per_query_head(model, hooks):
    """The QK-norm RMS of each query head's key-value head, [T, H] (batch 0)."""
    H, G = model.cfg.n_heads, hooks.k_scale_BTG.shape[-1]
    return hooks.k_scale_BTG[0][:, torch.arange(H) // (H // G)]


@pytest.mark.parametrize("family,layer,hook", QK_CASES)
def test_qk_norm_and_window_completeness(family, layer, hook):
    """The 16 terms sum to hook_attn_scores, with QK-norm frozen and 12 > W = 5 positions (gemma3's
    local layers 0 and 1 mask keys 5 or more back); zero exactly where the model masks."""
    from fra.ingest.core.decompose import Decomposer

    model = make_model(family)
    sae = make_sae(model.cfg.d_model, f"blocks.{layer}.{hook}", k=4)
    dec = Decomposer(model, layer, sae)
    d = dec.decompose(tokens())
    raw = run_hooks(model, layer, f"blocks.{layer}.{hook}", tokens()).model_scores_BHQK
    visible = ~torch.isneginf(raw)
    assert torch.equal(visible, dec.mask(12).expand_as(visible))
    tol = 2e-5 * raw[visible].abs().max().item()  # as in test_completeness_matches_hook_attn_scores
    torch.testing.assert_close(d.total_BHQK[visible], raw[visible], atol=tol, rtol=0)
    assert d.terms_CBHQK[:, ~visible].abs().max() == 0
    assert d.term("feat_feat").abs().max() > 0.05 * raw[visible].abs().max()
    assert dec.proj.qk_norm == ("flat" if family == "olmo2" else "head")


def test_sliding_window_is_transformer_lens_mask():
    """Decomposer.sliding_window and .mask against TransformerLens' own mask of each layer."""
    from fra.ingest.core.decompose import Decomposer
    from fra.ingest.tools.testing import GEMMA3_WINDOW

    model = make_model("gemma3")
    for layer, window in ((0, GEMMA3_WINDOW), (1, GEMMA3_WINDOW), (2, None)):
        dec = Decomposer(model, layer, make_sae(16, f"blocks.{layer}.ln1.hook_normalized"))
        assert dec.sliding_window == window
        theirs = model.blocks[layer].attn._make_causal_mask(12, 12, 0, torch.device("cpu"))[0, 0]
        assert torch.equal(dec.mask(12), theirs)
        q, k = 11, 11 - GEMMA3_WINDOW  # W back: masked by a local layer only
        assert bool(dec.mask(12)[q, k]) == (window is None) and bool(dec.mask(12)[q, k + 1])


@pytest.mark.parametrize("family,layer", [("qwen3", 1), ("gemma3", 0), ("gemma3", 2), ("olmo2", 1)])
def test_qk_norm_fast_path_agrees_with_naive_reference(family, layer):
    """FA blocks against the float64 per-pair reference, which applies the norm weight and the
    model's RMS itself (and gemma3's local rotary base on layer 0)."""
    from fra.ingest.core.decompose import Decomposer

    model = make_model(family, seed=1)
    hook = f"blocks.{layer}.hook_resid_pre"
    sae = make_sae(model.cfg.d_model, hook, k=3, seed=2)
    toks = tokens(T=8, B=1, seed=3)
    dec = Decomposer(model, layer, sae)
    d = dec.decompose(toks)
    hooks = run_hooks(model, layer, hook, toks)
    q_TH, k_TH = hooks.q_scale_BTH[0], k_scale_per_query_head(model, hooks)
    idx, n_active = d.sparse.feat_idx_BTA[0], d.sparse.n_active_BT[0]
    mask = dec.mask(8)
    for h in range(model.cfg.n_heads):
        for q in range(8):
            for k in range(q + 1):
                if not mask[q, k]:
                    continue
                fq, fk, ref = naive_fa(model, layer, sae, hooks.x_BTD[0], hooks.norm_scale_BT[0], h, q, k, q_TH, k_TH)
                fast = d.fa_block(0, h, q, k)[: n_active[q], : n_active[k]]
                oq, ok = torch.argsort(idx[q, : n_active[q]]), torch.argsort(idx[k, : n_active[k]])
                assert torch.equal(idx[q, : n_active[q]][oq], fq) and torch.equal(idx[k, : n_active[k]][ok], fk)
                torch.testing.assert_close(fast[oq][:, ok].double(), ref, atol=1e-5, rtol=1e-5)


def test_refuses_what_cannot_be_frozen(monkeypatch):
    """A QK-norm that is not an RMSNorm, an SAE before ln1 of a post-norm model, and a model that
    masks more than its config says are refused with the reason."""
    from fra.ingest.core.decompose import Decomposer

    model = make_model("qwen3")
    model.blocks[1].attn.q_norm = torch.nn.LayerNorm(model.cfg.d_head)
    with pytest.raises(DecompositionInputError, match="layer 1 q_norm is a LayerNorm, not an RMSNorm"):
        Decomposer(model, 1, make_sae(16, "blocks.1.ln1.hook_normalized"))
    olmo = make_model("olmo2")
    with pytest.raises(DecompositionInputError, match="post-norm.*must read blocks.0.hook_resid_pre"):
        Decomposer(olmo, 0, make_sae(16, "blocks.0.ln1.hook_normalized"))
    gemma = make_model("gemma3")
    dec = Decomposer(gemma, 2, make_sae(16, "blocks.2.ln1.hook_normalized"))

    def mask_one_more(scores, hook):
        scores[..., 7, 0] = float("-inf")  # a key the causal mask of global layer 2 lets through
        return scores

    gemma.blocks[2].attn.hook_attn_scores.add_hook(mask_one_more)
    try:
        with pytest.raises(DecompositionInputError, match="masks other scores than the causal mask"):
            dec.decompose(tokens())
    finally:
        gemma.reset_hooks()
