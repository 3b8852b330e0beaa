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


@dataclass(frozen=True)
class Resolved:
    delta: float  # from the model's own scores
    groups: dict[str, float]  # exact split of delta
    channels: "object"  # pandas DataFrame: feat_q, feat_k, value, anchor, baseline (ff terms, all nonzero)
    by_key: "object"  # DataFrame: feat_q, feat_k, k (key position), anchor part at that key


def _anchor_part(q_feat_TAE, k_feat_TAE, fi_TA, w_QK, q_idx, k_idx, F: int):
    """Per key position k: sum_q w_qk FA[q, k, i, j], keyed by channel id fi * F + fj."""
    ids, vals, keys = [], [], []
    Qf = q_feat_TAE[q_idx]  # [Qs, A, E]
    for k in k_idx.tolist():
        fa_QAA = torch.einsum("qae,be->qab", Qf, k_feat_TAE[k]) * w_QK[q_idx, k][:, None, None]
        cid = (fi_TA[q_idx][:, :, None] * F + fi_TA[k][None, None, :]).reshape(-1)
        u, inv = torch.unique(cid, return_inverse=True)
        s = torch.zeros(len(u), dtype=fa_QAA.dtype).index_add_(0, inv, fa_QAA.reshape(-1))
        ids.append(u)
        vals.append(s)
        keys.append(torch.full((len(u),), k))
    return torch.cat(ids), torch.cat(vals), torch.cat(keys)


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
) -> Resolved:
    """Split Delta of one head for one (query set, key set) exactly into groups and channels.

    `terms_CQK` are the 16 component-pair terms of this head (ordered as TERM_NAMES), `scores_QK`
    the model's hook_attn_scores (-inf above the diagonal), `*_feat_TAE` the head's per-slot
    query/key vectors and `fi_TA` the slots' feature ids (padding slots hold 0 with a zero
    vector). `base_rows` = (positions, `baseline_rows` of them) reuses the baseline between calls.
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
    ids, vals, keys = _anchor_part(q_feat_TAE, k_feat_TAE, fi_TA, w_QK, q_idx, k_idx, F)

    if base_rows is None:
        base_pos, B = q_idx, baseline_rows(q_feat_TAE, k_feat_TAE, fi_TA, pattern_QK, q_idx, F)
    else:
        base_pos, B = base_rows
    W_q = w_QK.sum(1)[base_pos]
    acc_FF = torch.zeros(F, F, dtype=dt)
    acc_FF.index_add_(0, fi_TA[base_pos].reshape(-1), (B * W_q[:, None, None]).reshape(-1, F))
    anchor_FF = torch.zeros(F * F, dtype=dt).index_add_(0, ids, vals).reshape(F, F)
    nz = ((anchor_FF != 0) | (acc_FF != 0)).nonzero()
    fq, fk = nz[:, 0], nz[:, 1]
    channels = pd.DataFrame(
        {
            "feat_q": fq.numpy().astype(np.int32),
            "feat_k": fk.numpy().astype(np.int32),
            "value": (anchor_FF[fq, fk] - acc_FF[fq, fk]).numpy(),
            "anchor": anchor_FF[fq, fk].numpy(),
            "baseline": acc_FF[fq, fk].numpy(),
        }
    )
    by_key = pd.DataFrame(
        {
            "feat_q": (ids // F).numpy().astype(np.int32),
            "feat_k": (ids % F).numpy().astype(np.int32),
            "k": keys.numpy().astype(np.int32),
            "anchor": vals.numpy(),
        }
    )
    return Resolved(delta, groups, channels, by_key)
