"""Naive per-pair reference for FA, written independently of fra.ingest.decompose.

For one head h, one query position q and one key position k: take the SAE features active at
each position, map each active feature's decoder row through the norm and W_Q (query side) or
W_K (key side), rotate it with an explicitly built RoPE matrix, take the [n_q, n_k] matrix of
dot products and multiply it elementwise by the outer product of the two activation vectors.
With QK-norm, each mapped row is multiplied by the norm's weight and divided by the model's RMS
of that (position, head), before rotary. Slow loops, no batching, float64.
"""

from __future__ import annotations

import math

import torch


def rope_matrix(pos: int, d_head: int, rotary_dim: int, base: float) -> torch.Tensor:
    """The GPT-NeoX ("rotate half") rotation applied at position `pos`, as a [E, E] matrix R
    such that rotated = R @ x."""
    R = torch.eye(d_head, dtype=torch.float64)
    half = rotary_dim // 2
    for j in range(half):
        angle = pos * base ** (-2.0 * j / rotary_dim)
        c, s = math.cos(angle), math.sin(angle)
        R[j, j], R[j, j + half] = c, -s
        R[j + half, j], R[j + half, j + half] = s, c
    return R


def to_attn_input(v: torch.Tensor, model, layer: int, hook_name: str, scale: float) -> torch.Tensor:
    """The linear part of hook value -> attention input (no bias)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    ln = model.blocks[layer].ln1
    v = v.double()
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:  # ln1 acts on the attention's output
        return v
    if hook_name.endswith("hook_resid_pre"):
        if cfg.normalization_type in ("LN", "LNPre"):
            v = v - v.mean()
        v = v / scale
    if cfg.normalization_type in ("LN", "RMS"):
        v = v * ln.w.double()
    return v


def naive_fa(model, layer: int, sae, x_TD, scale_T, h: int, q: int, k: int, q_scale_TH=None, k_scale_TH=None):
    """Returns (feat_q, feat_k, FA) for one head and one (q, k) pair. `q_scale_TH` / `k_scale_TH`:
    the model's QK-norm RMS per position and query head (keys: of the head's key-value head)."""
    cfg = model.cfg
    attn = model.blocks[layer].attn
    hook = sae.cfg.metadata.hook_name
    acts_q = sae.encode(x_TD[q : q + 1])[0].double()
    acts_k = sae.encode(x_TD[k : k + 1])[0].double()
    fq = torch.nonzero(acts_q).flatten()
    fk = torch.nonzero(acts_k).flatten()
    W_Q = attn.W_Q[h].double()
    W_K = attn.W_K[h].double()  # TransformerLens repeats key-value heads for us
    rotary = cfg.positional_embedding_type == "rotary"
    local = getattr(attn, "attn_type", "global") == "local" and cfg.rotary_base_local is not None
    base = cfg.rotary_base_local if local else cfg.rotary_base
    E = cfg.d_head
    w_q = w_k = None
    if q_scale_TH is not None:
        # the norm's weight: one per d_head element (Gemma 3, Qwen3) or per (head, element) (OLMo-2)
        w_q = attn.q_norm.w.double().reshape(-1, E)
        w_k = attn.k_norm.w.double().reshape(-1, E)
        g = h // (cfg.n_heads // w_k.shape[0]) if w_k.shape[0] > 1 else 0
        w_q, w_k = w_q[h if w_q.shape[0] > 1 else 0], w_k[g]

    def mapped(i, pos, W, w_qk, qk_scale_TH):
        v = to_attn_input(sae.W_dec[i], model, layer, hook, float(scale_T[pos])) @ W
        if qk_scale_TH is not None:
            v = v * w_qk / float(qk_scale_TH[pos, h])
        if rotary:
            v = rope_matrix(pos, E, cfg.rotary_dim, base) @ v
        return v

    Qmap = torch.stack([mapped(i, q, W_Q, w_q, q_scale_TH) for i in fq]) if len(fq) else torch.zeros(0, E)
    Kmap = torch.stack([mapped(j, k, W_K, w_k, k_scale_TH) for j in fk]) if len(fk) else torch.zeros(0, E)
    dots = Qmap @ Kmap.T
    fa = dots * torch.outer(acts_q[fq], acts_k[fk]) / attn.attn_scale
    return fq, fk, fa
