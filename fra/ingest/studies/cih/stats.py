"""Statistics of the CIH study: sign-flip tests, Benjamini-Hochberg, intervals."""

from __future__ import annotations

import math

import torch


def sign_flip_pvalues(d_NM: torch.Tensor, n_perm: int, seed: int) -> torch.Tensor:
    """One-sided p-values that the mean of each column of paired differences d[:, m] is > 0.

    One set of random sign vectors is shared by all columns (batched as one matmul); the p-value
    counts the observed sign pattern too, so it is never below 1 / (n_perm + 1)."""
    d = torch.as_tensor(d_NM, dtype=torch.float64)
    if d.ndim == 1:
        d = d[:, None]
    n, m = d.shape
    if n == 0:
        return torch.ones(m, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(m, dtype=torch.float64)
    obs = d.mean(0)
    done = 0
    while done < n_perm:  # chunks keep the sign matrix small
        b = min(4096, n_perm - done)
        signs = torch.randint(0, 2, (b, n), generator=g).double() * 2 - 1
        out += ((signs @ d) / n >= obs[None] - 1e-12 * obs.abs()[None]).sum(0)
        done += b
    return (out + 1) / (n_perm + 1)


def benjamini_hochberg(pvals) -> list[float]:
    """BH-adjusted q-values, in the input order."""
    p = [float(x) for x in pvals]
    n = len(p)
    order = sorted(range(n), key=lambda i: p[i])
    q = [0.0] * n
    prev = 1.0
    for rank in range(n, 0, -1):
        i = order[rank - 1]
        prev = min(prev, p[i] * n / rank)
        q[i] = prev
    return q


def mean_ci(x, z: float = 1.96) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval (mean +- z * s / sqrt(n))."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if n < 2:
        return m, m, m
    half = z * float(x.std()) / math.sqrt(n)
    return m, m - half, m + half


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def permutation_greater(x, y, n_perm: int, seed: int) -> float:
    """One-sided p-value that mean(x) > mean(y), by permuting the group labels (counts the
    observed labelling, so it is never below 1 / (n_perm + 1))."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() == 0 or y.numel() == 0:
        return 1.0
    allv = torch.cat([x, y])
    n = x.numel()
    obs = float(x.mean() - y.mean())
    g = torch.Generator().manual_seed(seed)
    hits, done = 0, 0
    while done < n_perm:
        b = min(2048, n_perm - done)
        perm = torch.argsort(torch.rand(b, allv.numel(), generator=g), dim=1)
        v = allv[perm]
        diff = v[:, :n].mean(1) - v[:, n:].mean(1)
        hits += int((diff >= obs - 1e-12 * abs(obs)).sum())
        done += b
    return (hits + 1) / (n_perm + 1)
