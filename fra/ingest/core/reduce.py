"""The ingest inner loop, for one sample at one layer, from the factored FA representation.

Two functions, one per pass of the ingest:

- `cooccurrence`: which channels (feat_q, feat_k) a sample touches and how often, exactly,
  without any FA value: with X[t, u] = 1 where the sample's u-th distinct feature is active at
  t, count[u, w] = sum_q X[q, u] * sum_{k visible from q} X[k, w], one [U x T] @ [T x U]
  product. The count does not depend on the head.
- `reduce_sample`: the values V[h, q, a, k, b] = <q_feat[h, q, a], k_feat[h, k, b]>, formed by
  torch.matmul block by block of queries (never the whole [H, T, A, T, A] tensor), each block
  reduced at once into one slot per *kept* channel present in the sample (`SlotStats`: sum, sum
  of squares, the strongest entry, and the same restricted to induction targets), plus
  per-(h, q, k) totals (`PairTotals`) and the rows (`Rows`: for each (head, query) the feature
  pairs of largest |FA| at its most-attended keys).

The reduction of a block runs in the C++ kernel (`fused.py`, `fa_kernel.cpp`) on the CPU, or as
PyTorch ops (`_torch_block`) on any device (the GPU path, and the CPU path without a compiler).
Both read the same matmul output and give the same slots: sums in float64, the strongest entry
first in (q, k) order on ties.

Keys visible from a query: k <= q, and q - k < W for a layer with a sliding window of W
(`Decomposer.sliding_window`, None for full causal attention). Every quantity here uses that mask.

Shape key as in `decompose`: H heads, T positions, A active slots, E d_head, U distinct
features in the sample, S kept channels present in the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# an entry's position (q, k) is stored as one integer: (q << 16) | k
POS_SHIFT = 16
# slot work items per head in the kernel (query-feature ranges); any value gives the same result
SLOT_GROUPS = 4


def visible_mask(T: int, window: int | None = None, device=None) -> Tensor:
    """[T, T] bool: key k is visible from query q (k <= q, and q - k < window when one is set)."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    mask = k <= q
    return mask & (q - k < window) if window is not None else mask


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
    count_UU: Tensor  # int64: visible (q, k) pairs with feats_U[u] active at q and feats_U[w] at k

    def present(self) -> tuple[Tensor, Tensor]:
        """(u, w): the local index pairs that co-occur, in ascending (u, w) order."""
        return torch.nonzero(self.count_UU, as_tuple=True)

    def channel_keys(self, d_sae: int, present: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(keys, counts) of the channels present: key = feat_q * d_sae + feat_k, ascending."""
        u, w = present if present is not None else self.present()
        return self.feats_U[u] * d_sae + self.feats_U[w], self.count_UU[u, w]


def cooccurrence(feat_idx_TA: Tensor, live_TA: Tensor, window: int | None = None) -> Cooccurrence:
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
    seen_TU = X_TU.cumsum(0)  # [q, w]: keys k <= q with w active
    if window is not None and window < T:
        seen_TU[window:] -= seen_TU[:-window].clone()  # ... and q - k < window
    count_UU = (X_TU.T @ seen_TU).round().long()
    return Cooccurrence(feats_U, local_TA, count_UU)


@dataclass(frozen=True)
class SampleFA:
    """What the inner loop reads of one sample at one layer (the heads already selected)."""

    qfeat_HTAE: Tensor
    kfeat_HTAE: Tensor
    feat_idx_TA: Tensor
    live_TA: Tensor
    ind_QK: Tensor  # induction targets among the visible keys
    attn_HQK: Tensor  # the model's attention pattern: picks the rows' keys
    scores_HQK: Tensor  # the model's scores (0 where not visible)
    window: int | None = None

    @classmethod
    def of(cls, p, head_pos: Tensor, window: int | None = None) -> "SampleFA":
        """From `Decomposer.prepare`'s output for one sample, at the heads `head_pos`."""
        tokens_T = p.tokens_BT[0]
        visible = visible_mask(tokens_T.shape[0], window, tokens_T.device)
        scores = p.hooks.model_scores_BHQK[0][head_pos].float()
        attn = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return cls(
            p.q.feat_BHTAE[0][head_pos],
            p.k.feat_BHTAE[0][head_pos],
            p.sparse.feat_idx_BTA[0],
            p.live_BTA[0],
            induction_mask(tokens_T) & visible,
            attn,
            torch.where(visible, scores, 0.0),
            window,
        )

    @property
    def visible_QK(self) -> Tensor:
        return visible_mask(self.feat_idx_TA.shape[0], self.window, self.feat_idx_TA.device)


@dataclass(frozen=True)
class ReduceOptions:
    top_keys: int = 4  # rows: per (head, query), the most-attended keys
    top_pairs: int = 8  # rows: per such (query, key), the pairs of largest |FA|
    q_block: int = 32  # queries whose values one matmul forms
    with_rows: bool = True  # False: slots only, no rows or totals (later sweeps over the same block)
    backend: str = "auto"  # "kernel" (C++ on the CPU), "torch" (any device), "auto": kernel where it can


# entries of no kept channel go to one of TRASH scratch slots after the S real ones (by their key
# feature, so that consecutive entries rarely share one and the kernel's updates do not queue)
TRASH = 16


@dataclass
class SlotStats:
    """One sample's statistics of the kept channels it touches, one slot per channel.

    The kernel's per-value record (sum, sum of squares, and the strongest entry as one integer
    key) lies in one 24-byte record per (head, slot), `record_HP3` [H, S + TRASH, 3] float64, so
    that one value touches one cache line; sum_HS and sumsq_HS are views of it, and the kernel
    writes best_HS and best_pos_HS out of the keys when it is done."""

    keys_S: Tensor  # global channel key of each slot (feat_q * d_sae + feat_k), ascending
    sum_HS: Tensor  # float64
    sumsq_HS: Tensor  # float64
    best_HS: Tensor  # float32: the entry of largest |value| (signed), 0 if none
    best_pos_HS: Tensor  # int32: its (q << 16) | k
    ind_count_S: Tensor  # int64: entries on induction targets (the same for every head)
    ind_sum_HS: Tensor  # float64
    ind_sumsq_HS: Tensor  # float64
    record_HP3: Tensor  # float64 [H, S + TRASH, 3]: sum, sumsq, the kernel's key of the strongest entry

    @classmethod
    def zeros(cls, keys_S: Tensor, H: int) -> "SlotStats":
        S, dev = keys_S.shape[0], keys_S.device
        f64 = torch.float64
        rec = torch.zeros(H, S + TRASH, 3, dtype=f64, device=dev)
        ind = torch.zeros(2, H, S + TRASH, dtype=f64, device=dev)
        return cls(
            keys_S,
            rec[:, :S, 0],
            rec[:, :S, 1],
            torch.zeros(H, S, dtype=torch.float32, device=dev),
            torch.zeros(H, S, dtype=torch.int32, device=dev),
            torch.zeros(S + TRASH, dtype=torch.long, device=dev)[:S],
            ind[0, :, :S],
            ind[1, :, :S],
            rec,
        )

    @property
    def n_slots(self) -> int:
        return self.keys_S.shape[0]


@dataclass(frozen=True)
class Rows:
    """The rows of one sample: (head index, q, k, feat_q, feat_k, value), one entry each."""

    h: Tensor
    q: Tensor
    k: Tensor
    feat_q: Tensor
    feat_k: Tensor
    value: Tensor

    @classmethod
    def cat(cls, parts: list["Rows"], device=None) -> "Rows":
        if not parts:
            ints = [torch.zeros(0, dtype=torch.long, device=device) for _ in range(5)]
            return cls(*ints, torch.zeros(0, device=device))
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("h", "q", "k", "feat_q", "feat_k", "value")))

    def per_pair(self, H: int, T: int, absolute: bool = False) -> Tensor:
        """[H, T, T]: the rows' values (or |values|) summed per (h, q, k)."""
        out = torch.zeros(H, T, T, dtype=self.value.dtype, device=self.value.device)
        return out.index_put_((self.h, self.q, self.k), self.value.abs() if absolute else self.value, accumulate=True)


@dataclass(frozen=True)
class PairTotals:
    """Per (h, q, k) totals of one sample (0 where k is not visible from q)."""

    ff_HQK: Tensor  # sum of all feature x feature terms
    ff_abs_HQK: Tensor  # sum of |FA|
    kept_HQK: Tensor  # sum of the rows
    kept_abs_HQK: Tensor


@dataclass(frozen=True)
class SampleReduction:
    """Everything one sample contributes at one layer."""

    slots: SlotStats
    totals: PairTotals | None  # None without rows (ReduceOptions.with_rows)
    rows: Rows | None
    ff_abs_HQK: Tensor | None = None  # sum of |FA| over the query slots of `abs_features` (None: none)


@dataclass(frozen=True)
class _SlotTable:
    """Local feature pair (u, w) -> slot: table[u * U1 + w], or a trash slot S + w % TRASH (>= S:
    no slot) where the channel is not kept or u or w is a dead slot's U."""

    table: Tensor  # int32 [U1 * U1]
    local_TA: Tensor  # int32
    U1: int


def _slot_table(co: Cooccurrence, d_sae: int, kept_keys: Tensor | None) -> tuple[_SlotTable, Tensor]:
    """The table, and the global key of each slot (ascending, so slots are sorted by (u, w))."""
    U = co.feats_U.shape[0]
    U1 = U + 1
    if kept_keys is None:
        u, w = co.present()
        keys, _ = co.channel_keys(d_sae, (u, w))
    else:  # the kept channels whose features both occur here, and that co-occur
        local_F = torch.full((d_sae,), -1, dtype=torch.long, device=kept_keys.device)
        local_F[co.feats_U] = torch.arange(U, device=kept_keys.device)
        u, w = local_F[kept_keys // d_sae], local_F[kept_keys % d_sae]
        here = (u >= 0) & (w >= 0)
        keys, u, w = kept_keys[here], u[here], w[here]
        here = co.count_UU[u, w] > 0
        keys, u, w = keys[here], u[here], w[here]
    S = keys.shape[0]
    dev = co.feats_U.device
    table = (S + torch.arange(U1, dtype=torch.int32, device=dev) % TRASH).repeat(U1)
    table[u * U1 + w] = torch.arange(S, dtype=torch.int32, device=co.feats_U.device)
    return _SlotTable(table, co.local_TA.to(torch.int32).contiguous(), U1), keys


def _use_kernel(x: SampleFA, backend: str) -> bool:
    if backend == "torch":
        return False
    from . import fused

    ok = x.qfeat_HTAE.device.type == "cpu" and x.qfeat_HTAE.dtype == torch.float32
    if backend == "kernel":
        if not (ok and fused.available()):
            raise RuntimeError("backend='kernel' needs float32 CPU tensors and the built C++ kernel (fused.py)")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be auto, kernel or torch, got {backend!r}")
    return ok and fused.available()


def query_blocks(T: int, q_block: int, window: int | None):
    """(q0, q1, k0): each block of queries and the first key any of them sees."""
    for q0 in range(0, T, q_block):
        yield q0, min(T, q0 + q_block), 0 if window is None else max(0, q0 - window + 1)


@torch.no_grad()
def reduce_sample(
    x: SampleFA,
    d_sae: int,
    kept_keys: Tensor | None = None,
    opts: ReduceOptions = ReduceOptions(),
    abs_features: Tensor | None = None,
) -> SampleReduction:
    """One sample's channel slots (for the channels in sorted `kept_keys`, or all when None), the
    sum of |FA| per (h, q, k) over the query slots whose feature is in `abs_features` (bool [d_sae];
    None: every feature), and with `opts.with_rows` its per-(h, q, k) totals and rows (whose
    ff_abs is that sum). Sweeps over chunks of the kept channels split the |FA| sum by feature, so
    that each value is formed in one sweep only."""
    H, T, A, E = x.qfeat_HTAE.shape
    dev = x.qfeat_HTAE.device
    st, keys_S = _slot_table(cooccurrence(x.feat_idx_TA, x.live_TA, x.window), d_sae, kept_keys)
    slots = SlotStats.zeros(keys_S, H)
    visible = x.visible_QK
    abs_TA = x.live_TA if abs_features is None else x.live_TA & abs_features[x.feat_idx_TA]
    loop = _kernel_loop if _use_kernel(x, opts.backend) else _torch_loop
    ff_abs, rows = loop(x, st, slots, visible, opts, abs_TA)
    if not opts.with_rows:
        return SampleReduction(slots, None, None, ff_abs)
    # the feature x feature total per (q, k) needs no pass over the values: it is the dot product
    # of the summed feature vectors (dead slots hold zero vectors)
    ff = torch.einsum("hqe,hke->hqk", x.qfeat_HTAE.sum(2), x.kfeat_HTAE.sum(2)) * visible
    rows = Rows.cat(rows, dev)
    ff_abs = torch.zeros(H, T, T, device=dev) if ff_abs is None else ff_abs
    totals = PairTotals(ff, ff_abs, rows.per_pair(H, T), rows.per_pair(H, T, absolute=True))
    return SampleReduction(slots, totals, rows, ff_abs)


def _kernel_loop(x: SampleFA, st: _SlotTable, slots: SlotStats, visible, opts: ReduceOptions, abs_TA):
    """The sample's values formed and reduced by the C++ kernel: (ff_abs [H, T, T] or None, rows).
    Only the query features with a kept channel here or in `abs_TA` are formed, so a sweep over a
    chunk of the kept channels costs about its share of the values."""
    from . import fused

    H, T, A, E = x.qfeat_HTAE.shape
    U = st.U1 - 1
    A16 = -(-A // 16) * 16  # key slots padded to whole vectors (zero values, dead local ids)
    KT = torch.zeros(H, T, E, A16)
    KT[..., :A] = x.kfeat_HTAE.transpose(-1, -2)
    local = torch.full((T, A16), U, dtype=torch.int32)
    local[:, :A] = st.local_TA
    # mode per query feature: 2 its |FA| totals (and slots), 1 its slots only, 0 nothing to form
    with_abs = torch.zeros(U + 1, dtype=torch.bool)
    with_abs[st.local_TA[abs_TA].long()] = True
    mode = (st.table.view(st.U1, st.U1)[:U] < slots.n_slots).any(1).to(torch.uint8)  # the dead U has none
    mode[with_abs[:U]] = 2
    ffabs = torch.zeros(SLOT_GROUPS, H, T, T) if bool(with_abs.any()) else None
    fused.fused_sample(
        x.qfeat_HTAE.contiguous(), KT, torch.arange(H), local, st.table, x.window,
        x.ind_QK.to(torch.uint8).contiguous(), mode.contiguous(), slots, ffabs, SLOT_GROUPS, torch.get_num_threads(),
    )  # fmt: skip
    ff_abs = None if ffabs is None else ffabs.sum(0)
    return ff_abs, [_rows(x, visible, opts)] if opts.with_rows else []


def _torch_loop(x: SampleFA, st: _SlotTable, slots: SlotStats, visible, opts: ReduceOptions, abs_TA):
    """The same blocks reduced by PyTorch ops, on any device: (ff_abs [H, T, T], rows per block)."""
    H, T, A, E = x.qfeat_HTAE.shape
    ff_abs = torch.zeros(H, T, T, dtype=torch.float32, device=x.qfeat_HTAE.device)
    for q0, q1, k0 in query_blocks(T, opts.q_block, x.window):
        nq, nk = q1 - q0, q1 - k0
        V = torch.matmul(
            x.qfeat_HTAE[:, q0:q1].reshape(H, nq * A, E), x.kfeat_HTAE[:, k0:q1].reshape(H, nk * A, E).transpose(1, 2)
        ).view(H, nq, A, nk, A)
        _torch_block(V, q0, k0, st, visible, x.ind_QK, slots, ff_abs, abs_TA[q0:q1])
        del V
    return ff_abs if bool(abs_TA.any()) else None, [_rows(x, visible, opts)] if opts.with_rows else []


def _torch_block(V, q0, k0, st: _SlotTable, visible_QK, ind_QK, slots: SlotStats, ff_abs_HQK, abs_QA) -> None:
    """The kernel's work on one block in PyTorch ops (any device; same results)."""
    H, nq, A, nk, _ = V.shape
    dev, S = V.device, slots.n_slots
    q1 = q0 + nq
    vis = visible_QK[q0:q1, k0:q1]  # [nq, nk]
    ff_abs_HQK[:, q0:q1, k0:q1] += (V.abs() * (abs_QA[:, :, None, None] & vis[:, None, :, None])).sum((2, 4))
    local = st.local_TA.long()
    slot = st.table.long()[local[q0:q1, :, None, None] * st.U1 + local[None, None, k0:q1, :]]  # [nq, A, nk, A]
    keep = (slot < S) & vis[:, None, :, None]
    # entries in (q, a, k, b) order; for one slot that is (q, k) order, since a is set by feat_q at q
    entry = torch.nonzero(keep.flatten())[:, 0]
    if len(entry) == 0:
        return
    idx = slot.flatten()[entry]
    val = V.reshape(H, -1)[:, entry]
    vd = val.double()
    slots.sum_HS.index_add_(1, idx, vd)
    slots.sumsq_HS.index_add_(1, idx, vd * vd)
    ind = ind_QK[q0:q1, k0:q1][:, None, :, None].expand(nq, A, nk, A).flatten()[entry]
    if ind.any():
        i_idx, i_vd = idx[ind], vd[:, ind]
        slots.ind_count_S.index_add_(0, i_idx, torch.ones_like(i_idx))
        slots.ind_sum_HS.index_add_(1, i_idx, i_vd)
        slots.ind_sumsq_HS.index_add_(1, i_idx, i_vd * i_vd)
    # the strongest entry per slot in this block, the first in scan order on ties
    absV = val.abs()
    idx_H = idx.expand(H, -1)
    blk_best = torch.zeros(H, S, device=dev).scatter_reduce_(1, idx_H, absV, "amax")
    n = len(entry)
    is_best = (absV == blk_best.gather(1, idx_H)) & (absV > 0)
    order = torch.where(is_best, torch.arange(n, device=dev).expand(H, -1), n)
    first = torch.full((H, S), n, device=dev).scatter_reduce_(1, idx_H, order, "amin")
    better = (blk_best > slots.best_HS.abs()) & (first < n)  # earlier blocks come first in (q, k) order
    e = entry[first.clamp(max=n - 1)]
    q = q0 + e // (A * nk * A)
    k = k0 + (e // A) % nk
    slots.best_HS.copy_(torch.where(better, V.reshape(H, -1).gather(1, e), slots.best_HS))
    slots.best_pos_HS.copy_(torch.where(better, ((q << POS_SHIFT) | k).int(), slots.best_pos_HS))


def _rows(x: SampleFA, visible_QK, opts: ReduceOptions) -> Rows:
    """The rows: at each (head, query)'s `top_keys` most-attended visible keys, the `top_pairs`
    feature pairs of largest |FA|. Only those keys' values are formed, block by block of queries."""
    H, T, A, E = x.qfeat_HTAE.shape
    dev = x.qfeat_HTAE.device
    tk, tp = min(opts.top_keys, T), min(opts.top_pairs, A * A)
    attn = torch.where(visible_QK[None], x.attn_HQK, -1.0)  # never pick a hidden key
    parts = []
    for q0 in range(0, T, opts.q_block):
        q1 = min(T, q0 + opts.q_block)
        nq = q1 - q0
        top_k = attn[:, q0:q1].topk(tk, dim=-1).indices  # [H, nq, tk]
        keys = x.kfeat_HTAE[torch.arange(H, device=dev)[:, None, None], top_k]  # [H, nq, tk, A, E]
        V = torch.matmul(x.qfeat_HTAE[:, q0:q1], keys.reshape(H, nq, tk * A, E).transpose(-1, -2))
        blocks = V.view(H, nq, A, tk, A).permute(0, 1, 3, 2, 4).reshape(H, nq, tk, A * A)
        top_abs, ci = blocks.abs().topk(tp, dim=-1)  # [H, nq, tk, tp]
        val = blocks.gather(3, ci)
        a_i, b_i = ci // A, ci % A
        k_i = top_k[..., None].expand_as(ci)
        q_i = torch.arange(q0, q1, device=dev)[None, :, None, None].expand_as(ci)
        h_i = torch.arange(H, device=dev)[:, None, None, None].expand_as(ci)
        nz = (top_abs > 0) & visible_QK[q0:q1].expand(H, -1, -1).gather(2, top_k)[..., None]
        h_i, q_i, k_i = h_i[nz], q_i[nz], k_i[nz]
        fq, fk = x.feat_idx_TA[q_i, a_i[nz]], x.feat_idx_TA[k_i, b_i[nz]]
        parts.append(Rows(h_i, q_i, k_i, fq, fk, val[nz]))
    return Rows.cat(parts, dev)
