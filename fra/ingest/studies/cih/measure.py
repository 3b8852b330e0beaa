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

from dataclasses import dataclass

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


def batch_groups(q_side, k_side, q_pos: int) -> Float[Tensor, "B G H T"]:
    """The four term groups of the query row at q_pos of every prompt of a batch (one length);
    they sum to hook_attn_scores[:, :, q_pos]."""
    comps = ("feat", "bdec", "err", "bias")
    qv = {c: q_side.component(c)[:, :, q_pos] for c in comps}  # [B, H, E]
    kv = {c: k_side.component(c) for c in comps}  # [B, H, T, E]
    term = {(cq, ck): torch.einsum("bhe,bhte->bht", qv[cq], kv[ck]) for cq in comps for ck in comps}
    group = {
        "ff": [("feat", "feat")],
        "bdec": [("feat", "bdec"), ("bdec", "feat"), ("bdec", "bdec")],
        "err": [t for t in term if "err" in t and "bias" not in t],
        "bias": [t for t in term if "bias" in t],
    }
    return torch.stack([sum(term[t] for t in group[g]) for g in GROUPS], 1)


def row_groups(q_side, k_side, b: int, q_pos: int) -> Float[Tensor, "G H T"]:
    """The four term groups of the query row of prompt b; they sum to hook_attn_scores[b, :, q]."""
    return batch_groups(q_side, k_side, q_pos)[b]


@dataclass(frozen=True)
class RowEntries:
    """The feature x feature terms of one query row, sparse: entry n is the term of channel
    keys_S[inv_N[n]] at key position t_N[n], with value V_HN[:, n] in each head."""

    keys_S: Tensor
    inv_N: Tensor
    t_N: Tensor
    V_HN: Tensor
    T: int

    def values(self, w_T: Float[Tensor, " T"]) -> Float[Tensor, "H S"]:
        """Each channel's contributions weighted over keys (a margin, or the value at one key)."""
        out = torch.zeros(self.V_HN.shape[0], self.keys_S.shape[0], dtype=self.V_HN.dtype)
        return out.index_add_(1, self.inv_N, self.V_HN * w_T[self.t_N])

    def removed(self, mask_HS: Bool[Tensor, "H S"]) -> Float[Tensor, "H T"]:
        """The summed contribution at every key of the channels selected per head by mask_HS."""
        vals = self.V_HN * mask_HS[:, self.inv_N]
        return torch.zeros(self.V_HN.shape[0], self.T, dtype=self.V_HN.dtype).index_add_(1, self.t_N, vals)

    def dense(self) -> Float[Tensor, "H S T"]:
        H, S = self.V_HN.shape[0], self.keys_S.shape[0]
        out = torch.zeros(H, S * self.T, dtype=self.V_HN.dtype)
        out.index_add_(1, self.inv_N * self.T + self.t_N, self.V_HN)
        return out.view(H, S, self.T)


def row_entries(
    qf_HAE: Float[Tensor, "H A E"],
    kf_HTAE: Float[Tensor, "H T A E"],
    idx_q_A: Int[Tensor, " A"],
    live_q_A: Bool[Tensor, " A"],
    idx_TA: Int[Tensor, "T A"],
    live_TA: Bool[Tensor, "T A"],
    d_sae: int,
) -> RowEntries:
    """Every feature x feature term of the row with its channel key i * d_sae + j and key position."""
    T = kf_HTAE.shape[1]
    V_HATA = torch.einsum("hae,htbe->hatb", qf_HAE, kf_HTAE)
    keys_ATA = idx_q_A[:, None, None] * d_sae + idx_TA[None]
    valid_ATA = live_q_A[:, None, None] & live_TA[None]
    uniq_S, inv = torch.unique(keys_ATA[valid_ATA], return_inverse=True)
    t_pos = torch.arange(T, device=idx_TA.device)[None, :, None].expand_as(keys_ATA)[valid_ATA]
    return RowEntries(uniq_S, inv, t_pos, V_HATA[:, valid_ATA], T)


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
    e = row_entries(qf_HAE, kf_HTAE, idx_q_A, live_q_A, idx_TA, live_TA, d_sae)
    return e.keys_S, e.dense()


def unit_mask(keys_S: Tensor, sel_HN: Int[Tensor, "H N"], d_sae: int, kind: str) -> Bool[Tensor, "H S"]:
    """Which channels of the row belong to each head's unit group: the channels themselves
    (kind 'channel' / 'fixed'), or every channel with that query ('query') or key ('key') feature."""
    if kind in ("channel", "fixed"):
        ids = keys_S
    else:
        ids = keys_S // d_sae if kind == "query" else keys_S % d_sae
    return torch.stack([torch.isin(ids, s[s >= 0]) for s in sel_HN])


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


def x_matched_random_drop(
    row_HT: Float[Tensor, "H T"],
    entries: RowEntries,
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
    is not positive or all such channels together do not reach it."""
    H, S = exclude_HS.shape
    out = torch.full((H,), float("nan"))
    w = torch.zeros(entries.T)
    w[x_pos] = 1.0
    xc_HS = entries.values(w)
    p0 = row_HT.softmax(-1)[:, x_pos]
    for h in range(H):
        if not target_H[h] > 0:
            continue
        cand = torch.nonzero((xc_HS[h] > 0) & ~exclude_HS[h])[:, 0]
        if xc_HS[h, cand].sum() < target_H[h]:
            continue
        acc = 0.0
        for _ in range(n_draws):
            perm = cand[torch.randperm(cand.shape[0], generator=generator)]
            cum = xc_HS[h, perm].cumsum(0)
            n = min(int(torch.searchsorted(cum, target_H[h])) + 1, perm.shape[0])
            chosen = torch.zeros(S, dtype=torch.bool)
            chosen[perm[:n]] = True
            vals = entries.V_HN[h] * chosen[entries.inv_N]
            removed_T = torch.zeros(entries.T, dtype=vals.dtype).index_add_(0, entries.t_N, vals)
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
