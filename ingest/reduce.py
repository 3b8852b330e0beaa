"""The ingest inner loop: exact per-channel statistics, kept rows and per-pair totals for one
sample and one layer, computed from the factored FA representation without materialising the
whole [H, T, T, A, A] value tensor at once (queries are processed in blocks).

Per block of queries, values V[h, q, k, a, b] = <q_feat[h, q, a], k_feat[h, k, b]> are formed
for all causal (q, k), then
  - reduced into a *local* accumulator indexed by the sample's own distinct features
    (U x U slots, small enough to stay in cache), with one index for every head;
  - the top-m |V| per (head, query) are kept as rows;
  - |V| and V are summed per (head, q, k) for coverage.
The local accumulators are then added into the layer's global [H, F*F] accumulators.

Shape key as in `decompose`: H heads, T positions, A active slots, E d_head, F d_sae,
U distinct features in the sample (+1 dummy slot for padding), N flattened entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .decompose import causal_mask

@dataclass
class ChannelAccumulator:
    """Exact channel statistics over a corpus for one layer, channel-major ([F*F, H]) so that
    merging a sample touches each channel's heads in one cache line. Count is head-independent."""

    d_sae: int
    n_heads: int
    count_P: Tensor  # [F*F] int64
    sum_PH: Tensor
    sumsq_PH: Tensor
    min_PH: Tensor
    max_PH: Tensor

    @classmethod
    def zeros(cls, d_sae: int, n_heads: int, device="cpu", dtype=torch.float32):
        P = d_sae * d_sae
        return cls(
            d_sae, n_heads,
            torch.zeros(P, dtype=torch.int64, device=device),
            torch.zeros(P, n_heads, dtype=dtype, device=device),
            torch.zeros(P, n_heads, dtype=dtype, device=device),
            torch.full((P, n_heads), float("inf"), dtype=dtype, device=device),
            torch.full((P, n_heads), float("-inf"), dtype=dtype, device=device),
        )

    def add_local(self, glob_keys_S: Tensor, local: "LocalAccumulator", sel_S: Tensor) -> None:
        """Merge local slots `sel_S` (which map to global channel keys `glob_keys_S`)."""
        self.count_P.index_add_(0, glob_keys_S, local.count_P[sel_S])
        self.sum_PH.index_add_(0, glob_keys_S, local.sum_HP[:, sel_S].T)
        self.sumsq_PH.index_add_(0, glob_keys_S, local.sumsq_HP[:, sel_S].T)
        self.min_PH[glob_keys_S] = torch.minimum(self.min_PH[glob_keys_S], local.min_HP[:, sel_S].T)
        self.max_PH[glob_keys_S] = torch.maximum(self.max_PH[glob_keys_S], local.max_HP[:, sel_S].T)

    def add_entries(self, keys_N: Tensor, vals_HN: Tensor) -> None:
        """Add raw entries straight into the global accumulators (for the few induction pairs)."""
        vals_NH = vals_HN.T
        self.count_P.index_add_(0, keys_N, torch.ones_like(keys_N))
        self.sum_PH.index_add_(0, keys_N, vals_NH)
        self.sumsq_PH.index_add_(0, keys_N, vals_NH * vals_NH)
        idx = keys_N[:, None].expand_as(vals_NH)
        self.min_PH.scatter_reduce_(0, idx, vals_NH, "amin")
        self.max_PH.scatter_reduce_(0, idx, vals_NH, "amax")

    def nonzero(self, min_count: int = 1):
        """(feat_q, feat_k, count, sum_H, sumsq_H, min_H, max_H) of channels seen >= min_count;
        per-head statistics come back head-major, [H, n]."""
        keep = torch.nonzero(self.count_P >= min_count).flatten()
        return (
            keep // self.d_sae, keep % self.d_sae, self.count_P[keep],
            self.sum_PH[keep].T, self.sumsq_PH[keep].T, self.min_PH[keep].T, self.max_PH[keep].T,
        )

    def n_seen(self) -> int:
        return int((self.count_P > 0).sum())


@dataclass
class LocalAccumulator:
    """One sample's channel statistics over its own U distinct features (U1 = U + 1 with a dummy
    for dead slots) plus one trash slot, head-major so that a block of values adds in place."""

    n_slots: int  # U1 * U1; slot n_slots is the trash
    count_P: Tensor
    sum_HP: Tensor
    sumsq_HP: Tensor
    min_HP: Tensor
    max_HP: Tensor

    @classmethod
    def zeros(cls, n_slots: int, n_heads: int, device="cpu", dtype=torch.float32):
        P = n_slots + 1
        return cls(
            n_slots,
            torch.zeros(P, dtype=torch.int64, device=device),
            torch.zeros(n_heads, P, dtype=dtype, device=device),
            torch.zeros(n_heads, P, dtype=dtype, device=device),
            torch.full((n_heads, P), float("inf"), dtype=dtype, device=device),
            torch.full((n_heads, P), float("-inf"), dtype=dtype, device=device),
        )

    def add_entries(self, keys_N: Tensor, vals_HN: Tensor) -> None:
        self.count_P.index_add_(0, keys_N, torch.ones_like(keys_N))
        self.sum_HP.index_add_(1, keys_N, vals_HN)
        self.sumsq_HP.index_add_(1, keys_N, vals_HN * vals_HN)
        idx = keys_N.expand(vals_HN.shape[0], -1)
        self.min_HP.scatter_reduce_(1, idx, vals_HN, "amin")
        self.max_HP.scatter_reduce_(1, idx, vals_HN, "amax")

    def used_slots(self) -> Tensor:
        return torch.nonzero(self.count_P[: self.n_slots]).flatten()  # the trash slot is dropped


@dataclass(frozen=True)
class SampleResult:
    """Everything one sample contributes, besides the global channel accumulators."""

    ff_HQK: Tensor  # sum of all feature x feature terms per (h, q, k)
    ff_abs_HQK: Tensor  # sum of |FA| per (h, q, k)
    kept_HQK: Tensor  # sum of the kept rows per (h, q, k)
    kept_abs_HQK: Tensor
    rows_h: Tensor  # kept rows: head, q, k, feat_q, feat_k, value
    rows_q: Tensor
    rows_k: Tensor
    rows_fq: Tensor
    rows_fk: Tensor
    rows_val: Tensor


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


@torch.no_grad()
def reduce_sample(
    qfeat_HTAE: Tensor,
    kfeat_HTAE: Tensor,
    feat_idx_TA: Tensor,
    live_TA: Tensor,
    ind_mask_QK: Tensor,
    acc: ChannelAccumulator,
    ind_acc: ChannelAccumulator,
    top_m: int = 32,
    q_block: int = 32,
    use_fused: bool = True,
) -> SampleResult:
    """Add one sample's exact channel statistics to `acc` (all causal pairs) and `ind_acc`
    (induction targets only); return its per-pair totals and top-`top_m` rows per (head, q)."""
    H, T, A, E = qfeat_HTAE.shape
    F = acc.d_sae
    dev = qfeat_HTAE.device
    uniq_U, inv = torch.unique(feat_idx_TA[live_TA], return_inverse=True)
    U = uniq_U.shape[0]
    U1 = U + 1  # slot U is the dummy for padded (dead) slots
    local_TA = torch.full((T, A), U, dtype=torch.long, device=dev)
    local_TA[live_TA] = inv
    ff_abs = torch.zeros(H, T, T, device=dev, dtype=qfeat_HTAE.dtype)
    kept, kept_abs = torch.zeros_like(ff_abs), torch.zeros_like(ff_abs)
    # local accumulators get one extra "trash" slot that receives every non-causal or dead entry,
    # so no entry is ever compacted out with a boolean mask (that copy dominated the run time)
    trash = U1 * U1
    local = LocalAccumulator.zeros(U1 * U1, H, device=dev, dtype=acc.sum_PH.dtype)
    rows = []
    kpos = torch.arange(T, device=dev)
    all_live = bool(live_TA.all())
    kernel = None
    if use_fused and dev.type == "cpu" and qfeat_HTAE.dtype == torch.float32:
        from . import fused

        kernel = fused.load()
    # the feature x feature total per (q, k) needs no pass over the values: it is the dot product
    # of the summed feature vectors (dead slots hold zero vectors)
    ff = torch.einsum("hqe,hke->hqk", qfeat_HTAE.sum(2), kfeat_HTAE.sum(2)) * causal_mask(T, dev)
    for q0 in range(0, T, q_block):
        q1 = min(T, q0 + q_block)
        nq, nk = q1 - q0, q1  # keys beyond the last query of the block are never causal
        # V[h, q, a, k, b]: one batched matmul, laid out so that no copy is needed
        V = torch.matmul(qfeat_HTAE[:, q0:q1].reshape(H, nq * A, E),
                         kfeat_HTAE[:, :nk].reshape(H, nk * A, E).transpose(1, 2)).view(H, nq, A, nk, A)
        causal = kpos[None, :nk] <= torch.arange(q0, q1, device=dev)[:, None]  # [nq, nk]
        valid = causal[:, None, :, None] & live_TA[q0:q1, :, None, None] & live_TA[None, None, :nk, :]
        # exact zeros off the causal / live set; keys before q0 are causal for the whole block,
        # so only the diagonal block needs the causal mask
        V[:, :, :, q0:q1, :].mul_(causal[:, None, q0:q1, None])
        if not all_live:
            V.mul_(live_TA[q0:q1, :, None, None] & live_TA[None, None, :nk, :])
        keys = local_TA[q0:q1, :, None, None] * U1 + local_TA[None, None, :nk, :]  # [nq, A, nk, A]
        keys_N = torch.where(valid, keys, trash)
        if kernel is not None:  # one fused pass (ingest/fused.py)
            ffa = torch.zeros(H, nq, nk, dtype=V.dtype)
            blk_max = torch.zeros(H, nq, nk, dtype=V.dtype)
            kernel.fused_block(V, keys_N.contiguous(), local.count_P, local.sum_HP, local.sumsq_HP,
                               local.min_HP, local.max_HP, ffa, blk_max)
            ff_abs[:, q0:q1, :nk] = ffa
            absV = None
        else:
            absV = V.abs()
            ff_abs[:, q0:q1, :nk] = absV.sum((2, 4))
            blk_max = absV.amax(dim=(2, 4))  # [H, nq, nk]
            local.add_entries(keys_N.flatten(), V.view(H, -1))
        ind = ind_mask_QK[q0:q1, :nk][:, None, :, None] & valid
        if ind.any():  # few entries: straight into the global induction accumulators
            ind = ind.flatten()
            gkeys = feat_idx_TA[q0:q1, :, None, None] * F + feat_idx_TA[None, None, :nk, :]
            ind_acc.add_entries(gkeys.flatten()[ind], V.view(H, -1)[:, ind])
        # Top-m rows per (head, query) over all keys and feature pairs. Exact shortcut: the top-m
        # entries lie in the m (q, k) blocks with the largest block maximum (any entry outside
        # them is beaten by the m block maxima).
        m = min(top_m, nk * A * A)
        mb = min(m, nk)
        top_blk = blk_max.topk(mb, dim=-1).indices  # [H, nq, mb]
        cand = V.gather(3, top_blk[:, :, None, :, None].expand(-1, -1, A, -1, A)).abs_()  # [H, nq, A, mb, A]
        top_abs, ci = cand.reshape(H, nq, A * mb * A).topk(m, dim=-1)  # [H, nq, m]
        a_i, rem = ci // (mb * A), ci % (mb * A)
        j_i, b_i = rem // A, rem % A
        k_i = top_blk.gather(2, j_i)
        h_i = torch.arange(H, device=dev)[:, None, None].expand_as(k_i)
        q_i = torch.arange(q0, q1, device=dev)[None, :, None].expand_as(k_i)
        top_val = V.view(-1)[(((h_i * nq + (q_i - q0)) * A + a_i) * nk + k_i) * A + b_i]
        nz = top_abs > 0
        fq = feat_idx_TA[q_i, a_i]
        fk = feat_idx_TA[k_i, b_i]
        rows.append(torch.stack([h_i[nz], q_i[nz], k_i[nz], fq[nz], fk[nz]]))
        rows_val = top_val[nz]
        rows.append(rows_val)
        kept.index_put_((h_i[nz], q_i[nz], k_i[nz]), rows_val, accumulate=True)
        kept_abs.index_put_((h_i[nz], q_i[nz], k_i[nz]), rows_val.abs(), accumulate=True)
        del V, absV

    # local -> global channel keys
    sel = local.used_slots()
    u, w = sel // U1, sel % U1
    glob = uniq_U[u] * F + uniq_U[w]
    if kernel is not None and acc.sum_PH.dtype == torch.float32:
        kernel.fused_merge(glob, sel, local.count_P, local.sum_HP, local.sumsq_HP, local.min_HP, local.max_HP,
                           acc.count_P, acc.sum_PH, acc.sumsq_PH, acc.min_PH, acc.max_PH)
    else:
        acc.add_local(glob, local, sel)

    ints = torch.cat(rows[0::2], 1)
    vals = torch.cat(rows[1::2])
    return SampleResult(ff, ff_abs, kept, kept_abs, *ints, vals)
