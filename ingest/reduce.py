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

STATS = ("count", "sum", "sumsq", "min", "max")


@dataclass
class ChannelAccumulator:
    """Exact channel statistics over a corpus for one layer: count is head-independent."""

    d_sae: int
    n_heads: int
    count_P: Tensor  # [F*F] int64
    sum_HP: Tensor
    sumsq_HP: Tensor
    min_HP: Tensor
    max_HP: Tensor

    @classmethod
    def zeros(cls, d_sae: int, n_heads: int, device="cpu", dtype=torch.float32):
        P = d_sae * d_sae
        return cls(
            d_sae, n_heads,
            torch.zeros(P, dtype=torch.int64, device=device),
            torch.zeros(n_heads, P, dtype=dtype, device=device),
            torch.zeros(n_heads, P, dtype=dtype, device=device),
            torch.full((n_heads, P), float("inf"), dtype=dtype, device=device),
            torch.full((n_heads, P), float("-inf"), dtype=dtype, device=device),
        )

    def add_local(self, glob_keys_S: Tensor, local: "ChannelAccumulator", sel_S: Tensor) -> None:
        """Merge local slots `sel_S` (which map to global channel keys `glob_keys_S`)."""
        self.count_P.index_add_(0, glob_keys_S, local.count_P[sel_S])
        self.sum_HP.index_add_(1, glob_keys_S, local.sum_HP[:, sel_S])
        self.sumsq_HP.index_add_(1, glob_keys_S, local.sumsq_HP[:, sel_S])
        self.min_HP[:, glob_keys_S] = torch.minimum(self.min_HP[:, glob_keys_S], local.min_HP[:, sel_S])
        self.max_HP[:, glob_keys_S] = torch.maximum(self.max_HP[:, glob_keys_S], local.max_HP[:, sel_S])

    def add_entries(self, keys_N: Tensor, vals_HN: Tensor) -> None:
        self.count_P.index_add_(0, keys_N, torch.ones_like(keys_N))
        self.sum_HP.index_add_(1, keys_N, vals_HN)
        self.sumsq_HP.index_add_(1, keys_N, vals_HN * vals_HN)
        idx = keys_N.expand(vals_HN.shape[0], -1)
        self.min_HP.scatter_reduce_(1, idx, vals_HN, "amin")
        self.max_HP.scatter_reduce_(1, idx, vals_HN, "amax")

    def nonzero(self, min_count: int = 1):
        """(feat_q, feat_k, count, sum_H, sumsq_H, min_H, max_H) of channels seen >= min_count."""
        keep = torch.nonzero(self.count_P >= min_count).flatten()
        return (
            keep // self.d_sae, keep % self.d_sae, self.count_P[keep],
            self.sum_HP[:, keep], self.sumsq_HP[:, keep], self.min_HP[:, keep], self.max_HP[:, keep],
        )

    def n_seen(self) -> int:
        return int((self.count_P > 0).sum())


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
    q = torch.arange(T)[:, None]
    p = torch.arange(T)[None, :]
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
    q_block: int = 16,
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
    local = ChannelAccumulator.zeros(U1, H, device=dev, dtype=acc.sum_HP.dtype)
    local_ind = ChannelAccumulator.zeros(U1, H, device=dev, dtype=acc.sum_HP.dtype)

    ff = torch.zeros(H, T, T, device=dev, dtype=qfeat_HTAE.dtype)
    ff_abs, kept, kept_abs = torch.zeros_like(ff), torch.zeros_like(ff), torch.zeros_like(ff)
    rows = []
    kpos = torch.arange(T, device=dev)
    for q0 in range(0, T, q_block):
        q1 = min(T, q0 + q_block)
        nq, nk = q1 - q0, q1  # keys beyond the last query of the block are never causal
        V = torch.einsum("hqae,hkbe->hqkab", qfeat_HTAE[:, q0:q1], kfeat_HTAE[:, :nk])
        causal = kpos[None, :nk] <= torch.arange(q0, q1, device=dev)[:, None]  # [nq, nk]
        valid = causal[:, :, None, None] & live_TA[q0:q1, None, :, None] & live_TA[None, :nk, None, :]
        V = V * valid  # exact zeros off the causal / live set
        ff[:, q0:q1, :nk] = V.sum((-1, -2))
        absV = V.abs()
        ff_abs[:, q0:q1, :nk] = absV.sum((-1, -2))
        keys = local_TA[q0:q1, None, :, None] * U1 + local_TA[None, :nk, None, :]  # [nq,nk,A,A]
        flat_valid = valid.flatten()
        keys_N = keys.flatten()[flat_valid]
        vals_HN = V.flatten(1)[:, flat_valid]
        local.add_entries(keys_N, vals_HN)
        ind = (ind_mask_QK[q0:q1, :nk][:, :, None, None] & valid).flatten()
        if ind.any():
            local_ind.add_entries(keys.flatten()[ind], V.flatten(1)[:, ind])
        # top-m rows per (head, query) over all keys and feature pairs
        m = min(top_m, nk * A * A)
        top_abs, top_i = absV.flatten(2).topk(m, dim=-1)  # [H, nq, m]
        top_val = V.flatten(2).gather(-1, top_i)
        nz = top_abs > 0
        k_i, rem = top_i // (A * A), top_i % (A * A)
        a_i, b_i = rem // A, rem % A
        h_i = torch.arange(H, device=dev)[:, None, None].expand_as(top_i)
        q_i = torch.arange(q0, q1, device=dev)[None, :, None].expand_as(top_i)
        fq = feat_idx_TA[q_i, a_i]
        fk = feat_idx_TA[k_i, b_i]
        rows.append(torch.stack([h_i[nz], q_i[nz], k_i[nz], fq[nz], fk[nz]]))
        rows_val = top_val[nz]
        rows.append(rows_val)
        kept.index_put_((h_i[nz], q_i[nz], k_i[nz]), rows_val, accumulate=True)
        kept_abs.index_put_((h_i[nz], q_i[nz], k_i[nz]), rows_val.abs(), accumulate=True)

    # local -> global channel keys
    for loc, glob in ((local, acc), (local_ind, ind_acc)):
        sel = torch.nonzero(loc.count_P).flatten()
        u, w = sel // U1, sel % U1
        glob.add_local(uniq_U[u] * F + uniq_U[w], loc, sel)

    ints = torch.cat(rows[0::2], 1)
    vals = torch.cat(rows[1::2])
    return SampleResult(ff, ff_abs, kept, kept_abs, *ints, vals)
