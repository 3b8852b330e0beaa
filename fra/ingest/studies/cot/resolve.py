"""The feature-resolved step: which feature-pair channels make a head attend from some sentences'
tokens (queries) to another sentence's tokens (keys).

FA splits attention *scores* exactly, not weights. A softmax row is unchanged when a constant is
added to every score of that row, so the split that says why a block of keys is attended is the
split of the block's attention-weighted score *advantage* over the row's average key:

    Delta = sum_{q in Qs, k in Ks} w_qk (s_qk - E_{k' ~ A_q}[s_qk'])
          = sum_{q, k'} C_qk' s_qk',   C_qk' = w_qk' [k' in Ks] - W_q A_qk',

with A the model's attention pattern, w_qk = A_qk / sum_{block} A (the block's attention mass
normalised to 1) and W_q = sum_{k in Ks} w_qk. Every row of C sums to 0, so per-query constants
(query-side-only terms) cancel, and Delta is linear in the scores: it splits exactly into the
component groups of the `pairs` table (ff, f_bdec, f_err, bdec_f, err_f, resid_resid, bias) and the
ff group further into channels (feat_q, feat_k). A channel's value is its "anchor part"
(sum over the block of w_qk FA[q, k]) minus its "baseline part" (sum_q W_q sum_k' A_qk' FA[q, k']).
A plain mean of scores over the block would be dominated by per-query constants that never move
attention; a split of the attention weights themselves does not exist.

Shape key: T positions (Q query, K key), A active-feature slots, E d_head, F d_sae, N sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fra.ingest.core.decompose import TERM_NAMES

GROUPS = ("ff", "f_bdec", "f_err", "bdec_f", "err_f", "resid_resid", "bias")


def group_of(term: str) -> str:
    cq, ck = term.split("_")
    if "bias" in (cq, ck):
        return "bias"
    if cq == ck == "feat":
        return "ff"
    if cq == "feat":
        return f"f_{ck}"
    if ck == "feat":
        return f"{cq}_f"
    return "resid_resid"


def coefficients(pattern_QK: torch.Tensor, q_mask_T: torch.Tensor, k_mask_T: torch.Tensor) -> torch.Tensor:
    """C_QK with Delta = sum(C * scores) (see the module docstring); zero outside causal entries."""
    block = pattern_QK * q_mask_T[:, None] * k_mask_T[None, :]
    w = block / block.sum()
    W_q = w.sum(1)
    return w - W_q[:, None] * pattern_QK


CLASSES = ("content", "word", "structural")


@dataclass(frozen=True)
class Resolved:
    delta: float  # from the model's own scores
    groups: dict[str, float]  # exact split of delta
    ff_channels: float  # sum of every channel's value (equals groups["ff"])
    top: "object"  # DataFrame of the `top` channels by |value|: feat_q, feat_k, value, anchor, baseline, cls
    positive_by_class: dict[str, float]  # sum of max(value, 0) over the channels of each class
    all_channels: "object" = None  # DataFrame of every nonzero channel (only with return_all)


def baseline_rows(q_feat_TAE, k_feat_TAE, fi_TA, pattern_QK, q_idx, F: int) -> torch.Tensor:
    """[len(q_idx), A, F]: B_q[a, f] = sum_k' A_qk' FA[q, k', a, f] (the row's expected FA)."""
    T, A, E = k_feat_TAE.shape
    out = torch.zeros(len(q_idx), A, F, dtype=q_feat_TAE.dtype)
    for r, q in enumerate(q_idx.tolist()):
        kf = (k_feat_TAE[: q + 1] * pattern_QK[q, : q + 1, None, None]).reshape(-1, E)
        out[r].index_add_(1, fi_TA[: q + 1].reshape(-1), q_feat_TAE[q] @ kf.T)
    return out


def resolve(
    terms_CQK: torch.Tensor,
    scores_QK: torch.Tensor,
    q_feat_TAE: torch.Tensor,
    k_feat_TAE: torch.Tensor,
    fi_TA: torch.Tensor,
    q_mask_T: torch.Tensor,
    k_mask_T: torch.Tensor,
    d_sae: int,
    base_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_class_T: torch.Tensor | None = None,
    top: int = 10,
    return_all: bool = False,
) -> Resolved:
    """Split Delta of one head for one (query set, key set) exactly into groups and channels.

    `terms_CQK` are the 16 component-pair terms of this head (ordered as TERM_NAMES), `scores_QK`
    the model's hook_attn_scores (-inf above the diagonal), `*_feat_TAE` the head's per-slot
    query/key vectors and `fi_TA` the slots' feature ids (padding slots hold 0 with a zero
    vector). `base_rows` = (positions, `baseline_rows` of them) reuses the baseline between calls.
    `key_class_T` (index into CLASSES per key position) labels each channel by the class of keys
    that carry most of its |anchor part|; channels with no anchor part are 'baseline-only'.
    """
    import pandas as pd

    dt = q_feat_TAE.dtype
    pattern_QK = torch.softmax(scores_QK.to(dt), -1)
    C_QK = coefficients(pattern_QK, q_mask_T.to(dt), k_mask_T.to(dt))
    finite = torch.isfinite(scores_QK)
    delta = float(torch.where(finite, C_QK * scores_QK.to(dt), 0).sum())
    per_term = (terms_CQK.to(dt) * C_QK).sum((-1, -2))
    groups = dict.fromkeys(GROUPS, 0.0)
    for name, v in zip(TERM_NAMES, per_term.tolist()):
        groups[group_of(name)] += v

    F = d_sae
    q_idx = q_mask_T.nonzero().reshape(-1)
    k_idx = k_mask_T.nonzero().reshape(-1)
    block = pattern_QK * q_mask_T.to(dt)[:, None] * k_mask_T.to(dt)[None, :]
    w_QK = block / block.sum()
    classed = key_class_T is not None
    n_cls = len(CLASSES) if classed else 1
    # every channel with a nonzero value has a query feature active on a query of the block: work on
    # dense [those features, F] rows instead of [F, F]
    rows_R, local_QA = torch.unique(fi_TA[q_idx], return_inverse=True)
    R = len(rows_R)
    anchor_CX = torch.zeros(n_cls, R * F, dtype=dt)
    Qf = q_feat_TAE[q_idx]
    fq_ids = local_QA[:, :, None] * F
    for k in k_idx.tolist():
        fa_QAA = torch.einsum("qae,be->qab", Qf, k_feat_TAE[k]) * w_QK[q_idx, k][:, None, None]
        cid = (fq_ids + fi_TA[k][None, None, :]).reshape(-1)
        anchor_CX[int(key_class_T[k]) if classed else 0].index_add_(0, cid, fa_QAA.reshape(-1))
    anchor_X = anchor_CX.sum(0)

    if base_rows is None:
        base_pos, B = q_idx, baseline_rows(q_feat_TAE, k_feat_TAE, fi_TA, pattern_QK, q_idx, F)
    else:
        base_pos, B = base_rows
    row_of = torch.full((len(q_mask_T),), -1, dtype=torch.long)
    row_of[base_pos] = torch.arange(len(base_pos))
    if (row_of[q_idx] < 0).any():
        raise ValueError("base_rows must cover every query position of the block")
    B_q = B[row_of[q_idx]] * w_QK.sum(1)[q_idx][:, None, None]
    base_X = torch.zeros(R, F, dtype=dt).index_add_(0, local_QA.reshape(-1), B_q.reshape(-1, F)).reshape(-1)
    value_X = anchor_X - base_X
    if classed:
        has_anchor = anchor_CX.abs().amax(0) > 0
        cls_X = torch.where(has_anchor, anchor_CX.abs().argmax(0), len(CLASSES))
    else:
        cls_X = torch.where(anchor_X != 0, 0, len(CLASSES))
    names = (*CLASSES, "baseline-only") if classed else ("n/a", "", "", "baseline-only")
    pos = value_X.clamp_min(0)
    positive = {names[c]: float(pos[cls_X == c].sum()) for c in range(len(names)) if names[c]}
    n_top = min(top, R * F)
    idx = value_X.abs().topk(n_top).indices
    idx = idx[value_X[idx] != 0]

    def table(ix):
        return pd.DataFrame(
            {
                "feat_q": rows_R[ix // F].numpy().astype(np.int32),
                "feat_k": (ix % F).numpy().astype(np.int32),
                "value": value_X[ix].numpy(),
                "anchor": anchor_X[ix].numpy(),
                "baseline": base_X[ix].numpy(),
                "cls": [names[int(c)] for c in cls_X[ix]],
            }
        )

    everything = table(((anchor_X != 0) | (base_X != 0)).nonzero().reshape(-1)) if return_all else None
    return Resolved(delta, groups, float(value_X.sum()), table(idx), positive, everything)


def key_positions(q_feat_TAE, k_feat_TAE, fi_TA, w_QK, q_idx, k_idx, fq: int, fk: int) -> torch.Tensor:
    """[len(k_idx)] the anchor part of channel (fq, fk) at each key position."""
    qsum_QE = (q_feat_TAE[q_idx] * (fi_TA[q_idx] == fq)[..., None]).sum(1)
    ksum_KE = (k_feat_TAE[k_idx] * (fi_TA[k_idx] == fk)[..., None]).sum(1)
    return ((qsum_QE @ ksum_KE.T) * w_QK[q_idx][:, k_idx]).sum(0)
