"""The ingest inner loop, for one sample at one layer, from the factored FA representation.

Two functions, one per pass of the ingest:

- `cooccurrence`: which channels (feat_q, feat_k) a sample touches and how often, exactly,
  without any FA value: with X[t, u] = 1 where the sample's u-th distinct feature is active at
  t, count[u, w] = sum_q X[q, u] * sum_{k <= q} X[k, w] = (X^T cumsum(X))[u, w]. The count
  does not depend on the head.
- `reduce_sample`: the values V[h, q, a, k, b] = <q_feat[h, q, a], k_feat[h, k, b]>, formed
  block by block of queries (never the whole [H, T, A, T, A] tensor), reduced into one slot
  per *kept* channel present in the sample (sum, sum of squares, the strongest entry, and the
  same restricted to induction targets), plus per-(h, q, k) totals and the rows: for each
  (head, query) the feature pairs of largest |FA| at its most-attended keys.

Shape key as in `decompose`: H heads, T positions, A active slots, E d_head, U distinct
features in the sample (+1 dummy slot for padding), S kept channels present in the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .decompose import causal_mask

# an entry's position (q, k) is stored as one int64: (q << 16) | k
POS_SHIFT = 16


def induction_mask(tokens_T: Tensor) -> Tensor:
    """[T, T] bool: k is an induction target of q, i.e. k = p + 1 with token[p] == token[q] and
    p < q - 1 (so k < q). Position 0 (BOS) is never a query with a target."""
    T = tokens_T.shape[0]
    same = tokens_T[:, None] == tokens_T[None, :]  # [q, p]
    q = torch.arange(T, device=tokens_T.device)[:, None]
    p = torch.arange(T, device=tokens_T.device)[None, :]
    prev_occ = same & (p < q - 1)
    mask = torch.zeros(T, T, dtype=torch.bool, device=tokens_T.device)
    mask[:, 1:] = prev_occ[:, :-1]
    mask[0] = False
    return mask


@dataclass(frozen=True)
class Cooccurrence:
    """A sample's distinct features and the exact co-activation count of each pair of them."""

    feats_U: Tensor  # sorted distinct active features
    local_TA: Tensor  # slot -> index into feats_U (U for dead slots)
    count_UU: Tensor  # int64: causal (q, k) pairs with feats_U[u] active at q and feats_U[w] at k

    def present(self) -> tuple[Tensor, Tensor]:
        """(u, w): the local index pairs that co-occur, in ascending (u, w) order."""
        return torch.nonzero(self.count_UU, as_tuple=True)

    def channel_keys(self, d_sae: int, present: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(keys, counts) of the channels present: key = feat_q * d_sae + feat_k, ascending."""
        u, w = present if present is not None else self.present()
        return self.feats_U[u] * d_sae + self.feats_U[w], self.count_UU[u, w]


def cooccurrence(feat_idx_TA: Tensor, live_TA: Tensor) -> Cooccurrence:
    T, A = feat_idx_TA.shape
    feats_U, inv = torch.unique(feat_idx_TA[live_TA], return_inverse=True)
    U = feats_U.shape[0]
    local_TA = torch.full((T, A), U, dtype=torch.long, device=feat_idx_TA.device)
    local_TA[live_TA] = inv
    # float matmuls count exactly while every partial sum stays below 2^24 (float32) / 2^53
    dtype = torch.float32 if T * (T + 1) // 2 < 2**24 else torch.float64
    X_TU = torch.zeros(T, U + 1, dtype=dtype, device=feat_idx_TA.device)
    X_TU.scatter_(1, local_TA, 1.0)
    X_TU = X_TU[:, :U]
    count_UU = (X_TU.T @ X_TU.cumsum(0)).round().long()
    return Cooccurrence(feats_U, local_TA, count_UU)


@dataclass(frozen=True)
class SampleReduction:
    """Everything one sample contributes at one layer."""

    ff_HQK: Tensor  # sum of all feature x feature terms per (h, q, k)
    ff_abs_HQK: Tensor  # sum of |FA| per (h, q, k)
    kept_HQK: Tensor  # sum of the rows per (h, q, k)
    kept_abs_HQK: Tensor
    rows_h: Tensor  # rows: head, q, k, feat_q, feat_k, value
    rows_q: Tensor
    rows_k: Tensor
    rows_fq: Tensor
    rows_fk: Tensor
    rows_val: Tensor
    slot_keys_S: Tensor  # global channel key of each slot (only kept channels get a slot)
    sum_HS: Tensor
    sumsq_HS: Tensor
    best_HS: Tensor  # the slot's entry of largest |value| (signed), 0 if none
    best_pos_HS: Tensor  # its (q << 16) | k
    ind_count_S: Tensor
    ind_sum_HS: Tensor
    ind_sumsq_HS: Tensor


def _slot_table(co: Cooccurrence, d_sae: int, kept_keys: Tensor | None) -> tuple[Tensor, Tensor]:
    """A [(U+1)^2] table local pair -> slot (S = trash), and the global key of each slot."""
    U = co.feats_U.shape[0]
    U1 = U + 1
    u, w = co.present()
    keys, _ = co.channel_keys(d_sae, (u, w))
    if kept_keys is not None:
        kept_keys = kept_keys.contiguous()
        pos = torch.searchsorted(kept_keys, keys).clamp(max=max(len(kept_keys) - 1, 0))
        keep = (kept_keys[pos] == keys) if len(kept_keys) else torch.zeros_like(keys, dtype=torch.bool)
        keys, u, w = keys[keep], u[keep], w[keep]
    S = keys.shape[0]
    table = torch.full((U1 * U1,), S, dtype=torch.long, device=keys.device)
    table[u * U1 + w] = torch.arange(S, device=keys.device)
    return table, keys


@torch.no_grad()
def reduce_sample(
    qfeat_HTAE: Tensor,
    kfeat_HTAE: Tensor,
    feat_idx_TA: Tensor,
    live_TA: Tensor,
    ind_mask_QK: Tensor,
    attn_HQK: Tensor,
    d_sae: int,
    kept_keys: Tensor | None = None,
    top_keys: int = 4,
    top_pairs: int = 8,
    q_block: int = 32,
    use_fused: bool = True,
    with_rows: bool = True,
) -> SampleReduction:
    """One sample's channel slots (for the channels in sorted `kept_keys`, or all when None),
    per-(h, q, k) totals and rows. `attn_HQK` (the model's attention pattern) picks each query's
    `top_keys` most-attended keys; `with_rows=False` skips the rows and totals."""
    H, T, A, E = qfeat_HTAE.shape
    dev = qfeat_HTAE.device
    co = cooccurrence(feat_idx_TA, live_TA)
    U1 = co.feats_U.shape[0] + 1
    table, slot_keys = _slot_table(co, d_sae, kept_keys)
    S = slot_keys.shape[0]
    P = S + 1  # + the trash slot, which takes every masked or not-kept entry
    f32 = torch.float32
    sum_HP, sumsq_HP = torch.zeros(H, P, dtype=f32, device=dev), torch.zeros(H, P, dtype=f32, device=dev)
    best_HP = torch.zeros(H, P, dtype=f32, device=dev)
    best_pos_HP = torch.zeros(H, P, dtype=torch.long, device=dev)
    ind_count_P = torch.zeros(P, dtype=torch.long, device=dev)
    ind_sum_HP, ind_sumsq_HP = torch.zeros(H, P, dtype=f32, device=dev), torch.zeros(H, P, dtype=f32, device=dev)
    ff_abs = torch.zeros(H, T, T, device=dev, dtype=f32)
    kept, kept_abs = torch.zeros_like(ff_abs), torch.zeros_like(ff_abs)
    rows = []
    kpos = torch.arange(T, device=dev)
    all_live = bool(live_TA.all())
    kernel = None
    if use_fused and dev.type == "cpu" and qfeat_HTAE.dtype == f32:
        from . import fused

        kernel = fused.load()
    # the feature x feature total per (q, k) needs no pass over the values: it is the dot product
    # of the summed feature vectors (dead slots hold zero vectors)
    ff = torch.einsum("hqe,hke->hqk", qfeat_HTAE.sum(2), kfeat_HTAE.sum(2)) * causal_mask(T, dev)
    for q0 in range(0, T, q_block):
        q1 = min(T, q0 + q_block)
        nq, nk = q1 - q0, q1  # keys beyond the last query of the block are never causal
        # V[h, q, a, k, b]: one batched matmul, laid out so that no copy is needed
        V = torch.matmul(
            qfeat_HTAE[:, q0:q1].reshape(H, nq * A, E), kfeat_HTAE[:, :nk].reshape(H, nk * A, E).transpose(1, 2)
        ).view(H, nq, A, nk, A)
        causal = kpos[None, :nk] <= torch.arange(q0, q1, device=dev)[:, None]  # [nq, nk]
        valid = causal[:, None, :, None] & live_TA[q0:q1, :, None, None] & live_TA[None, None, :nk, :]
        # exact zeros off the causal / live set; keys before q0 are causal for the whole block,
        # so only the diagonal block needs the causal mask
        V[:, :, :, q0:q1, :].mul_(causal[:, None, q0:q1, None])
        if not all_live:
            V.mul_(live_TA[q0:q1, :, None, None] & live_TA[None, None, :nk, :])
        local = co.local_TA[q0:q1, :, None, None] * U1 + co.local_TA[None, None, :nk, :]  # [nq, A, nk, A]
        slots = torch.where(valid, table[local], S)
        if kernel is not None:  # one fused pass (fused.py)
            ffa = torch.zeros(H, nq, nk, dtype=f32)
            kernel.fused_block(V, slots.contiguous(), sum_HP, sumsq_HP, best_HP, best_pos_HP, ffa, q0)
            ff_abs[:, q0:q1, :nk] = ffa
        else:
            ff_abs[:, q0:q1, :nk] = _torch_block(V, slots, q0, sum_HP, sumsq_HP, best_HP, best_pos_HP)
        ind = ind_mask_QK[q0:q1, :nk][:, None, :, None] & valid
        if ind.any():  # few entries
            ind = ind.flatten()
            s_ind = slots.flatten()[ind]
            v_ind = V.view(H, -1)[:, ind]
            ind_count_P.index_add_(0, s_ind, torch.ones_like(s_ind))
            ind_sum_HP.index_add_(1, s_ind, v_ind)
            ind_sumsq_HP.index_add_(1, s_ind, v_ind * v_ind)
        if with_rows:
            _rows_block(V, attn_HQK[:, q0:q1, :nk], causal, feat_idx_TA, q0, top_keys, top_pairs, rows, kept, kept_abs)
        del V

    if rows:
        ints = torch.cat(rows[0::2], 1)
        vals = torch.cat(rows[1::2])
    else:
        ints, vals = torch.zeros(5, 0, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
    return SampleReduction(
        ff,
        ff_abs,
        kept,
        kept_abs,
        *ints,
        vals,
        slot_keys,
        sum_HP[:, :S],
        sumsq_HP[:, :S],
        best_HP[:, :S],
        best_pos_HP[:, :S],
        ind_count_P[:S],
        ind_sum_HP[:, :S],
        ind_sumsq_HP[:, :S],
    )


def _torch_block(V, slots, q0, sum_HP, sumsq_HP, best_HP, best_pos_HP) -> Tensor:
    """The fused kernel's work in PyTorch (same results, ties to the first entry in scan order)."""
    H, nq, A, nk, _ = V.shape
    dev = V.device
    flat = V.reshape(H, -1)
    keys = slots.flatten()
    absV = flat.abs()
    sum_HP.index_add_(1, keys, flat)
    sumsq_HP.index_add_(1, keys, flat * flat)
    P = sum_HP.shape[1]
    idx = keys.expand(H, -1)
    blk_best = torch.zeros(H, P, device=dev).scatter_reduce_(1, idx, absV, "amax")
    n = flat.shape[1]
    is_best = (absV == blk_best.gather(1, idx)) & (absV > 0)
    entry = torch.where(is_best, torch.arange(n, device=dev).expand(H, -1), n)
    first = torch.full((H, P), n, device=dev).scatter_reduce_(1, idx, entry, "amin")
    better = (blk_best > best_HP.abs()) & (first < n)
    e = first.clamp(max=n - 1)
    q = q0 + e // (A * nk * A)
    k = (e // A) % nk
    best_HP.copy_(torch.where(better, flat.gather(1, e), best_HP))
    best_pos_HP.copy_(torch.where(better, (q << POS_SHIFT) | k, best_pos_HP))
    return absV.view(H, nq, A, nk, A).sum((2, 4))


def _rows_block(V, attn_HQK, causal_QK, feat_idx_TA, q0, top_keys, top_pairs, rows, kept, kept_abs):
    """Rows of one query block: the `top_pairs` largest |FA| at each query's `top_keys` keys."""
    H, nq, A, nk, _ = V.shape
    dev = V.device
    tk = min(top_keys, nk)
    attn = torch.where(causal_QK[None], attn_HQK, -1.0)  # never pick a non-causal key
    top_k = attn.topk(tk, dim=-1).indices  # [H, nq, tk]
    blocks = V.gather(3, top_k[:, :, None, :, None].expand(H, nq, A, tk, A))  # [H, nq, A, tk, A]
    blocks = blocks.permute(0, 1, 3, 2, 4).reshape(H, nq, tk, A * A)
    tp = min(top_pairs, A * A)
    top_abs, ci = blocks.abs().topk(tp, dim=-1)  # [H, nq, tk, tp]
    val = blocks.gather(3, ci)
    a_i, b_i = ci // A, ci % A
    k_i = top_k[..., None].expand_as(ci)
    q_i = torch.arange(q0, q0 + nq, device=dev)[None, :, None, None].expand_as(ci)
    h_i = torch.arange(H, device=dev)[:, None, None, None].expand_as(ci)
    nz = (top_abs > 0) & causal_QK.expand(H, -1, -1).gather(2, top_k)[..., None]
    h_i, q_i, k_i, val = h_i[nz], q_i[nz], k_i[nz], val[nz]
    rows.append(torch.stack([h_i, q_i, k_i, feat_idx_TA[q_i, a_i[nz]], feat_idx_TA[k_i, b_i[nz]]]))
    rows.append(val)
    kept.index_put_((h_i, q_i, k_i), val, accumulate=True)
    kept_abs.index_put_((h_i, q_i, k_i), val.abs(), accumulate=True)
