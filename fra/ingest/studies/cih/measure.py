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


def gather_units(keys_S: Tensor, contrib_HST: Tensor, unit_keys_U: Tensor) -> tuple[Float[Tensor, "U H T"], Tensor]:
    """Contributions of the selected units (zero where a unit is absent from the row), and each
    unit's index into the row's channels (-1 where absent)."""
    H, S, T = contrib_HST.shape
    out = torch.zeros(unit_keys_U.shape[0], H, T, dtype=contrib_HST.dtype)
    idx = torch.full((unit_keys_U.shape[0],), -1, dtype=torch.long)
    if S == 0 or unit_keys_U.numel() == 0:
        return out, idx
    pos = torch.searchsorted(keys_S, unit_keys_U).clamp(max=S - 1)
    hit = keys_S[pos] == unit_keys_U
    out[hit] = contrib_HST[:, pos[hit]].permute(1, 0, 2)
    idx[hit] = pos[hit]
    return out, idx


def p_target(row_HT: Float[Tensor, "... H T"], x_pos: int) -> Float[Tensor, "... H"]:
    """Attention probability on X of the query row (the query is the last position, so every key
    is causal)."""
    return row_HT.softmax(-1)[..., x_pos]


def random_matched_removal(
    row_HT: Float[Tensor, "H T"],
    contrib_HST: Float[Tensor, "H S T"],
    unit_idx_U: Int[Tensor, " U"],
    x_pos: int,
    n_draws: int,
    generator: torch.Generator,
) -> Float[Tensor, "U H"]:
    """Mean attention on X after removing, instead of unit u, random other channels of the row
    whose total magnitude (sum over keys of |contribution|) first reaches unit u's own.

    Each draw walks one random order of the row's channels with unit u's own channel taken out;
    the removed set is the shortest prefix of that order whose cumulative magnitude reaches the
    target (all other channels, if they never do). Absent units (index -1) get NaN."""
    H, S, T = contrib_HST.shape
    U = unit_idx_U.shape[0]
    out = torch.full((U, H), float("nan"))
    present = unit_idx_U >= 0
    if S == 0 or not present.any():
        return out
    u_idx = unit_idx_U[present]
    for h in range(H):
        mag_S = contrib_HST[h].abs().sum(-1)
        target_U = mag_S[u_idx]
        acc = torch.zeros(u_idx.shape[0])
        for _ in range(n_draws):
            perm = torch.randperm(S, generator=generator)
            cum_mag = mag_S[perm].cumsum(0)  # [S]
            # only a prefix can be needed: once 2 x the largest target is reached, every unit's
            # target is reached even with the unit's own channel taken out
            K = min(S, int(torch.searchsorted(cum_mag, 2 * target_U.max())) + 2)
            perm, cum_mag = perm[:K], cum_mag[:K]
            rank_S = torch.full((S,), K, dtype=torch.long)
            rank_S[perm] = torch.arange(K)
            cum_rows = contrib_HST[h, perm].cumsum(0)  # [K, T]
            r_U = rank_S[u_idx]  # K when the unit is beyond the prefix
            # the unit's own channel taken out of the order: subtract it from every prefix that holds it
            after_UK = torch.arange(K)[None] >= r_U[:, None]
            cum_mag_UK = cum_mag[None] - after_UK * target_U[:, None]
            i = torch.searchsorted(cum_mag_UK, target_U[:, None]).clamp(max=K - 1)[:, 0]
            removed = cum_rows[i] - (i >= r_U)[:, None] * contrib_HST[h, u_idx]
            acc += (row_HT[h][None] - removed).softmax(-1)[:, x_pos]
        out[present, h] = acc / n_draws
    return out
