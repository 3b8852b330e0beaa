"""Naive per-pair reference for FA, written independently of fra.ingest.decompose.

For one head h, one query position q and one key position k: take the SAE features active at
each position, map each active feature's decoder row through the norm and W_Q (query side) or
W_K (key side), rotate it with an explicitly built RoPE matrix, take the [n_q, n_k] matrix of
dot products and multiply it elementwise by the outer product of the two activation vectors.
Slow loops, no batching, float64.
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
    cfg = model.cfg
    ln = model.blocks[layer].ln1
    v = v.double()
    if hook_name.endswith("hook_resid_pre"):
        if cfg.normalization_type in ("LN", "LNPre"):
            v = v - v.mean()
        v = v / scale
    if cfg.normalization_type in ("LN", "RMS"):
        v = v * ln.w.double()
    return v


def naive_fa(model, layer: int, sae, x_TD, scale_T, h: int, q: int, k: int):
    """Returns (feat_q, feat_k, FA) for one head and one (q, k) pair."""
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

    def mapped(i, pos, W):
        v = to_attn_input(sae.W_dec[i], model, layer, hook, float(scale_T[pos])) @ W
        if rotary:
            v = rope_matrix(pos, cfg.d_head, cfg.rotary_dim, cfg.rotary_base) @ v
        return v

    Qmap = torch.stack([mapped(i, q, W_Q) for i in fq]) if len(fq) else torch.zeros(0, cfg.d_head)
    Kmap = torch.stack([mapped(j, k, W_K) for j in fk]) if len(fk) else torch.zeros(0, cfg.d_head)
    dots = Qmap @ Kmap.T
    fa = dots * torch.outer(acts_q[fq], acts_k[fk]) / attn.attn_scale
    return fq, fk, fa
