"""The query row of one prompt, decomposed: per-head term groups and per-channel contributions.

Only the query B's row of each head's score matrix matters to the study. For that row the
component-pair terms of `decompose` group into four parts that sum exactly to
``hook_attn_scores[h, q, :]``:

    ff    feat x feat                      (resolved further into channels (i, j))
    bdec  feat x bdec, bdec x feat, bdec x bdec
    err   every term with the SAE error and no bias
    bias  every term with a bias (zero for SmolLM2)

A channel (i, j) contributes FA[h, q, k, i, j] at every key k where j is active (i active at q);
`row_channels` returns these contributions as a dense [H, S, T] block over the S channels present
in the row, so a margin or contrast is one matmul with a weight vector over keys, and removing a
channel from the scores is one subtraction.

Shape key: H heads, T key positions, A active-feature slots, E d_head, S channels in the row,
U selected units, G term groups, R random draws.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

GROUPS = ("ff", "bdec", "err", "bias")


def margin_weights(T: int, x_pos: int, q_pos: int) -> Float[Tensor, " T"]:
    """+1 at the target X, -1/q at each of the q other causal keys 0..q (q = q_pos)."""
    w = torch.zeros(T)
    w[: q_pos + 1] = -1.0 / q_pos
    w[x_pos] = 1.0
    return w


def contrast_weights(T: int, x_pos: int, others) -> Float[Tensor, " T"]:
    """+1 at X, minus the mean over the positions `others` (A, or the other nouns N)."""
    w = torch.zeros(T)
    others = list(others)
    w[others] -= 1.0 / len(others)
    w[x_pos] += 1.0
    return w


def row_groups(q_side, k_side, b: int, q_pos: int) -> Float[Tensor, "G H T"]:
    """The four term groups of the query row of prompt b; they sum to hook_attn_scores[b, :, q]."""
    comps = ("feat", "bdec", "err", "bias")
    qv = {c: q_side.component(c)[b, :, q_pos] for c in comps}  # [H, E]
    kv = {c: k_side.component(c)[b] for c in comps}  # [H, T, E]
    term = {(cq, ck): torch.einsum("he,hte->ht", qv[cq], kv[ck]) for cq in comps for ck in comps}
    group = {
        "ff": [("feat", "feat")],
        "bdec": [("feat", "bdec"), ("bdec", "feat"), ("bdec", "bdec")],
        "err": [t for t in term if "err" in t and "bias" not in t],
        "bias": [t for t in term if "bias" in t],
    }
    return torch.stack([sum(term[t] for t in group[g]) for g in GROUPS])


def row_channels(
    qf_HAE: Float[Tensor, "H A E"],
    kf_HTAE: Float[Tensor, "H T A E"],
    idx_q_A: Int[Tensor, " A"],
    live_q_A: Bool[Tensor, " A"],
    idx_TA: Int[Tensor, "T A"],
    live_TA: Bool[Tensor, "T A"],
    d_sae: int,
) -> tuple[Int[Tensor, " S"], Float[Tensor, "H S T"]]:
    """Channel keys i * d_sae + j present in the row, and each one's contribution at every key."""
    H, T = kf_HTAE.shape[:2]
    V_HATA = torch.einsum("hae,htbe->hatb", qf_HAE, kf_HTAE)
    keys_ATA = idx_q_A[:, None, None] * d_sae + idx_TA[None]
    valid_ATA = live_q_A[:, None, None] & live_TA[None]
    uniq_S, inv = torch.unique(keys_ATA[valid_ATA], return_inverse=True)
    t_pos = torch.arange(T, device=idx_TA.device)[None, :, None].expand_as(keys_ATA)[valid_ATA]
    contrib = torch.zeros(H, uniq_S.shape[0] * T, dtype=V_HATA.dtype, device=V_HATA.device)
    contrib.index_add_(1, inv * T + t_pos, V_HATA[:, valid_ATA])
    return uniq_S, contrib.view(H, uniq_S.shape[0], T)


def coalesce(keys_S: Int[Tensor, " S"], vals_HS: Float[Tensor, "H S"]) -> tuple[Tensor, Tensor]:
    """Sum the columns that share a key; returns sorted unique keys and their summed values."""
    uniq, inv = torch.unique(keys_S, return_inverse=True)
    out = torch.zeros(vals_HS.shape[0], uniq.shape[0], dtype=vals_HS.dtype)
    out.index_add_(1, inv, vals_HS)
    return uniq, out


def difference(
    keys_a: Tensor, vals_a_HS: Tensor, keys_b: Tensor, vals_b_HS: Tensor
) -> tuple[Int[Tensor, " D"], Float[Tensor, "H D"]]:
    """a - b over the union of their keys (a key missing on one side counts 0 there)."""
    return coalesce(torch.cat([keys_a, keys_b]), torch.cat([vals_a_HS, -vals_b_HS], 1))


def marginal(keys_S: Tensor, vals_HS: Tensor, d_sae: int, side: str) -> Float[Tensor, "H F"]:
    """Channel values summed over the other side: side 'q' gives feature i at the query x every key
    feature, side 'k' every query feature x feature j at the key. Dense over the d_sae features."""
    feat = keys_S // d_sae if side == "q" else keys_S % d_sae
    out = torch.zeros(vals_HS.shape[0], d_sae, dtype=vals_HS.dtype)
    return out.index_add_(1, feat, vals_HS)


def gather_keys(keys_S: Tensor, vals_HS: Tensor, sel_HN: Int[Tensor, "H N"]) -> Float[Tensor, "H N"]:
    """vals[h, s] at the key sel[h, n] of each head (0 where the key is absent or sel is -1)."""
    H, S = vals_HS.shape
    if S == 0:
        return torch.zeros(sel_HN.shape, dtype=vals_HS.dtype)
    pos = torch.searchsorted(keys_S, sel_HN.clamp(min=0)).clamp(max=S - 1)
    hit = (keys_S[pos] == sel_HN) & (sel_HN >= 0)
    return torch.where(hit, vals_HS.gather(1, pos), torch.zeros((), dtype=vals_HS.dtype))


def top_keys(keys_S: Tensor, vals_HS: Tensor, n: int) -> Int[Tensor, "H n"]:
    """Per head, the keys of the n largest values, largest first (-1 pads when fewer exist)."""
    H, S = vals_HS.shape
    out = torch.full((H, n), -1, dtype=torch.long)
    if S == 0:
        return out
    k = min(n, S)
    idx = vals_HS.topk(k, dim=1).indices
    out[:, :k] = keys_S[idx]
    return out


def unit_contrib(keys_S: Tensor, contrib_HST: Tensor, sel_HN: Tensor, d_sae: int, kind: str) -> Float[Tensor, "H N T"]:
    """Each selected unit's contribution at every key: a channel's own, or a feature marginal's
    (every channel of the row that has that query / key feature)."""
    H, S, T = contrib_HST.shape
    if kind in ("channel", "fixed"):
        if S == 0:
            return torch.zeros(H, sel_HN.shape[1], T)
        pos = torch.searchsorted(keys_S, sel_HN.clamp(min=0)).clamp(max=S - 1)
        hit = (keys_S[pos] == sel_HN) & (sel_HN >= 0)
        out = contrib_HST.gather(1, pos[..., None].expand(H, -1, T))
        return out * hit[..., None]
    feat = keys_S // d_sae if kind == "query" else keys_S % d_sae
    dense = torch.zeros(H, d_sae, T, dtype=contrib_HST.dtype).index_add_(1, feat, contrib_HST)
    return dense.gather(1, sel_HN.clamp(min=0)[..., None].expand(-1, -1, T)) * (sel_HN >= 0)[..., None]


def x_matched_random_drop(
    row_HT: Float[Tensor, "H T"],
    contrib_HST: Float[Tensor, "H S T"],
    exclude_HS: Bool[Tensor, "H S"],
    target_H: Float[Tensor, " H"],
    x_pos: int,
    n_draws: int,
    generator: torch.Generator,
) -> Float[Tensor, " H"]:
    """Mean drop of attention on X when random channels of the row (outside the unit) are removed,
    their summed contribution at X matched to the unit's (target_H).

    Each draw walks a random order of the channels whose contribution at X is positive and removes
    the shortest prefix whose cumulative contribution at X reaches the target. NaN where the target
    is not positive or no prefix reaches it."""
    H, S, T = contrib_HST.shape
    out = torch.full((H,), float("nan"))
    p0 = row_HT.softmax(-1)[:, x_pos]
    for h in range(H):
        if not target_H[h] > 0:
            continue
        cand = torch.nonzero((contrib_HST[h, :, x_pos] > 0) & ~exclude_HS[h])[:, 0]
        xs = contrib_HST[h, cand, x_pos]
        if xs.sum() < target_H[h]:
            continue
        acc = 0.0
        for _ in range(n_draws):
            perm = cand[torch.randperm(cand.shape[0], generator=generator)]
            cum = contrib_HST[h, perm, x_pos].cumsum(0)
            n = int(torch.searchsorted(cum, target_H[h])) + 1
            removed_T = contrib_HST[h, perm[:n]].sum(0)
            acc += float(p0[h] - (row_HT[h] - removed_T).softmax(-1)[x_pos])
        out[h] = acc / n_draws
    return out


def channel_labels(qc: Tensor, qu: Tensor, kc: Tensor, ku: Tensor, floor: float, ratio: float) -> list[str]:
    """Gating label of each channel from its query feature's activation at B (conceptual qc,
    control qu) and its key feature's at X (kc, ku):
    - 'weak': either feature is below the activation floor on the conceptual prompt;
    - 'gated query': the query feature fires at B much less without A (qu < ratio * qc): the A -> B
      match happened upstream, in what switched the query feature on;
    - 'matching': the query feature fires at B either way and the key feature at X depends on A
      (ku < ratio * kc): the pair itself matches B's content with what came before X;
    - 'ungated': both fire either way; the channel does not see A (a structural channel)."""
    out = []
    for a, b, c, d in zip(qc.tolist(), qu.tolist(), kc.tolist(), ku.tolist()):
        if a < floor or c < floor:
            out.append("weak")
        elif b < ratio * a:
            out.append("gated query")
        elif d < ratio * c:
            out.append("matching")
        else:
            out.append("ungated")
    return out


def p_target(row_HT: Float[Tensor, "... H T"], x_pos: int) -> Float[Tensor, "... H"]:
    """Attention probability on X of the query row (the query is the last position, so every key
    is causal)."""
    return row_HT.softmax(-1)[..., x_pos]
