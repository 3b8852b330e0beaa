"""Thought Anchors' two white-box measures (Bogdan, Macar, Nanda, Conmy 2025, arXiv 2506.19143),
as in `whitebox-analyses/attention_analysis/` of github.com/interp-reasoning/thought-anchors.

Receiver heads (`attn_funcs.py`, `receiver_head_funcs.py`):
  - per head, the sentence x sentence matrix M[i, j] = mean of the attention *weights* over the
    block (tokens of sentence i) x (tokens of sentence j), causal zeros of diagonal blocks
    included (`_compute_averaged_matrix`);
  - the vertical score of sentence j = mean of M[i, j] over rows i >= j + 4
    (`get_vertical_scores(proximity_ignore=4, control_depth=False)`); NaN for the last 4
    sentences, which have no such row;
  - per head, the kurtosis of the vertical scores over sentences (Fisher, biased, NaNs omitted:
    `scipy.stats.kurtosis(fisher=True, bias=True, nan_policy="omit")`), averaged over traces;
    the receiver heads are the top-k heads by that mean (k=20 in the paper);
  - a sentence's receiver score = mean of its vertical scores over the receiver heads.
  One difference: `_compute_averaged_matrix` clips span ends to T - 1, which drops the last token
  of a span that ends the text; these functions keep every token of every span.

Attention suppression (`attn_supp_funcs.get_suppression_KL_matrix`): the pre-softmax scores of
one sentence's keys are set to the dtype's minimum in every head of every layer (for every query),
and for every token the KL divergence KL(P_base || P_supp) of the next-token distributions at
temperature 0.6 is taken; entry [i, j] = mean over sentence i's tokens of log(KL + 1e-9) with
sentence j suppressed. Thought Anchors computes the KL on top-p (p = 0.9999) truncated logits;
here it is the full-vocabulary KL (float32, as theirs), and exactly 0 before sentence j (causality).

Shape key: L layers, H heads, T positions (Q query, K key), N sentences.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

PROXIMITY = 4
TEMPERATURE = 0.6
LOG_EPS = 1e-9


def block_means(pattern_HQK: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """[H, N, N] mean attention weight over each (sentence i tokens) x (sentence j tokens) block."""
    starts = np.array([s for s, _ in spans])
    lens = np.array([e - s for s, e in spans], dtype=np.float64)
    # sum over blocks by cumulative sums along both axes: exact, and one pass over the pattern
    p = np.asarray(pattern_HQK, dtype=np.float64)[:, spans[0][0] : spans[-1][1], spans[0][0] : spans[-1][1]]
    off = starts - spans[0][0]
    rows = np.add.reduceat(p, off, axis=1)
    blocks = np.add.reduceat(rows, off, axis=2)
    return blocks / (lens[:, None] * lens[None, :])


def vertical_scores(mat_NN: np.ndarray, proximity: int = PROXIMITY) -> np.ndarray:
    """[..., N] mean of each column j over rows i >= j + proximity; NaN where there is no such row."""
    n = mat_NN.shape[-1]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = i - j >= proximity
    vals = np.where(keep, mat_NN, 0.0).sum(-2)
    cnt = keep.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, vals / np.maximum(cnt, 1), np.nan)


def head_kurtosis(vert_LHN: np.ndarray) -> np.ndarray:
    """[L, H] kurtosis of each head's vertical scores over sentences (Thought Anchors' settings)."""
    return np.asarray(stats.kurtosis(vert_LHN, axis=-1, fisher=True, bias=True, nan_policy="omit"), dtype=np.float64)


def top_heads(mean_kurt_LH: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of largest mean kurtosis, largest first (NaNs skipped)."""
    flat = np.where(np.isnan(mean_kurt_LH), -np.inf, mean_kurt_LH).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [tuple(int(x) for x in np.unravel_index(o, mean_kurt_LH.shape)) for o in order if np.isfinite(flat[o])]


def receiver_scores(vert_LHN: np.ndarray, heads: list[tuple[int, int]]) -> np.ndarray:
    """[N] mean vertical score over the receiver heads."""
    return np.mean([vert_LHN[l, h] for l, h in heads], axis=0)


def kl_next_token(base_TV: torch.Tensor, supp_TV: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """[T] KL(P_base || P_supp) of the next-token distributions at `temperature`, clipped at 0
    (in float32, as Thought Anchors computes it)."""
    lp = torch.log_softmax(base_TV.float() / temperature, -1)
    lq = torch.log_softmax(supp_TV.float() / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def sentence_means(values_T: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    return np.array([np.mean(values_T[s:e]) for s, e in spans])


@torch.no_grad()
def suppression_matrix(
    model, tokens_T: torch.Tensor, spans: list[tuple[int, int]], columns: list[int] | None = None, batch: int = 4
) -> np.ndarray:
    """[N, N] Thought Anchors' suppression matrix: [i, j] = mean over sentence i's tokens of
    log(KL + 1e-9), with sentence j's keys suppressed in every head of every layer. Only the
    sentences j in `columns` (default: all) are suppressed; the other columns are NaN."""
    tokens_T = tokens_T.reshape(-1)
    base_TV = model(tokens_T[None])[0]
    hooks_names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(model.cfg.n_layers)]
    out = np.full((len(spans), len(spans)), np.nan)
    columns = list(range(len(spans))) if columns is None else list(columns)
    for b0 in range(0, len(columns), batch):
        cols = columns[b0 : b0 + batch]
        group = [spans[j] for j in cols]

        def suppress(scores_BHQK, hook, group=group):
            floor = torch.finfo(scores_BHQK.dtype).min
            for row, (s, e) in enumerate(group):
                scores_BHQK[row, :, :, s:e] = torch.where(
                    torch.isinf(scores_BHQK[row, :, :, s:e]), scores_BHQK[row, :, :, s:e], floor
                )
            return scores_BHQK

        logits_BTV = model.run_with_hooks(
            tokens_T[None].expand(len(group), -1), fwd_hooks=[(n, suppress) for n in hooks_names]
        )
        for row, (s, _) in enumerate(group):
            # positions before the suppressed keys cannot see them: their KL is 0 by causality
            kl_T = np.zeros(len(tokens_T))
            kl_T[s:] = kl_next_token(base_TV[s:], logits_BTV[row, s:]).cpu().numpy()
            out[:, cols[row]] = sentence_means(np.log(kl_T + LOG_EPS), spans)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation over the entries where both are finite (NaN if fewer than 3)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(a[ok], b[ok]).statistic)
