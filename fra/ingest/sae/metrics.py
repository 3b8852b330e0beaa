"""How well an SAE explains what attention sees, beyond plain variance explained.

- **QK variance explained** (`qk_variance_explained`): per query head and per key-value head,
  1 - E|(g * (x - x_hat)) W|^2 / E|q - E q|^2, where x is the SAE's input (`ln1.hook_normalized`),
  g the norm weight, W the head's W_Q (or W_K) and q = (g * x) W + b the query (key) vector
  before rotary. The bias cancels in the error, so this is the share of the variance of the
  query and key vectors that the reconstruction keeps.
- **Feature share of TIH margins** (`tih_feature_share`): on [BOS] + r + r random-token repeats
  (the TransformerLens induction setup, `studies.census.random_repeats`), the induction margin of
  a head is the mean over second-copy queries of score(q, k*) minus the mean score over the
  other causal keys, k* being the token after the earlier occurrence. The decomposition splits
  the margin exactly over its terms; the share is margin(feature x feature) / margin(all terms).

`attention_maps` is also what the attention-aware training objective projects the error through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionMaps:
    """[d_model, n_heads * d_head] and [d_model, n_kv_heads * d_head] maps from the SAE input to
    the query and key vectors before rotary (norm weight folded in, no bias)."""

    q_DM: Tensor
    k_DM: Tensor
    n_heads: int
    n_kv: int

    @property
    def qk_DM(self) -> Tensor:
        return torch.cat([self.q_DM, self.k_DM], 1)


def attention_maps(model, layer: int) -> AttentionMaps:
    attn, ln = model.blocks[layer].attn, model.blocks[layer].ln1
    g_D = ln.w.detach().float() if hasattr(ln, "w") else torch.ones(model.cfg.d_model)
    W_q = attn.W_Q.detach().float()
    W_k = (attn._W_K if hasattr(attn, "_W_K") else attn.W_K).detach().float()
    if getattr(attn, "q_norm", None) is not None and model.cfg.use_qk_norm:  # the QK-norm's weight, per d_head
        W_q, W_k = W_q * attn.q_norm.w.detach().float(), W_k * attn.k_norm.w.detach().float()
    fold = lambda W: (g_D[None, :, None] * W).permute(1, 0, 2).reshape(W.shape[1], -1)  # noqa: E731
    return AttentionMaps(fold(W_q), fold(W_k), W_q.shape[0], W_k.shape[0])


@torch.no_grad()
def qk_variance_explained(maps: AttentionMaps, x_ND: Tensor, recon_ND: Tensor) -> dict:
    """Per-head variance explained of the query and key vectors; `x_ND` held-out SAE inputs."""
    out = {}
    for side, W, n in (("q", maps.q_DM, maps.n_heads), ("k", maps.k_DM, maps.n_kv)):
        v = (x_ND.float() @ W).view(len(x_ND), n, -1)
        e = ((x_ND - recon_ND).float() @ W).view(len(x_ND), n, -1)
        total = (v - v.mean(0)).pow(2).sum((0, 2))
        out[side] = (1 - e.pow(2).sum((0, 2)) / total).tolist()
    out["q_mean"], out["k_mean"] = sum(out["q"]) / maps.n_heads, sum(out["k"]) / maps.n_kv
    out["min"] = min(out["q"] + out["k"])
    return out


@torch.no_grad()
def tih_feature_share(
    model, layer: int, sae, heads: list[int], bos_id: int, n_seqs: int = 16, seq_len: int = 50, seed: int = 1
) -> dict:
    """Margins and feature x feature shares of `heads` on random-token repeats (see module doc)."""
    from ..core.decompose import TERM_NAMES, Decomposer
    from ..studies.census import random_repeats

    toks = random_repeats(n_seqs, seq_len, model.cfg.d_vocab, bos_id, seed)
    dec = Decomposer(model, layer, sae).decompose(toks.to(sae.W_dec.device))
    T = toks.shape[1]
    q = torch.arange(1 + seq_len, T)  # second copy
    w_QK = torch.zeros(len(q), T)
    for i, qp in enumerate(q.tolist()):
        w_QK[i, : qp + 1] = -1.0 / qp  # the qp other causal keys
        w_QK[i, qp - seq_len + 1] = 1.0  # k*
    margin = lambda t_BHQK: torch.einsum("bhqk,qk->h", t_BHQK[:, :, q].float().cpu(), w_QK) / (n_seqs * len(q))  # noqa: E731
    total = margin(dec.total_BHQK)
    ff = margin(dec.term("feat_feat"))
    err = margin(sum(dec.term(t) for t in TERM_NAMES if "err" in t))
    rows = {
        h: {
            "margin": float(total[h]),
            "ff": float(ff[h]),
            "ff_share": float(ff[h] / total[h]),
            "err_share": float(err[h] / total[h]),
        }
        for h in heads
    }
    shares = [r["ff_share"] for r in rows.values()]
    return {
        "heads": rows,
        "mean_ff_share": sum(shares) / len(shares) if shares else None,
        "n_seqs": n_seqs,
        "seq_len": seq_len,
        "seed": seed,
    }


def tih_heads(layer: int, model: str = "smollm2-135m") -> list[int]:
    """Token induction heads of the model's census (`fra/ingest/assets/census_MODEL.json`) at `layer`."""
    import json

    from ..registry import ASSETS

    path = ASSETS / f"census_{model}.json"
    if not path.exists():
        return []
    census = json.loads(path.read_text())
    return sorted(int(h.split(".")[1]) for h in census["token_induction_heads"] if int(h.split(".")[0]) == layer)
