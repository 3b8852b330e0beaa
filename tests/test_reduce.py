"""The ingest inner loop against a dense brute-force FA written here."""

from __future__ import annotations

import pytest
import torch

from fra.ingest.reduce import ChannelAccumulator, induction_mask, reduce_sample


def brute_force(qf, kf, idx, live, F, mask):
    """Dict channel -> per-head list of values, over causal (q, k) pairs where mask holds."""
    H, T, A, _ = qf.shape
    out = {}
    for q in range(T):
        for k in range(q + 1):
            if not mask[q, k]:
                continue
            for a in range(A):
                for b in range(A):
                    if live[q, a] and live[k, b]:
                        key = (int(idx[q, a]), int(idx[k, b]))
                        out.setdefault(key, []).append((qf[:, q, a] * kf[:, k, b]).sum(-1))
    return {key: torch.stack(v, 1) for key, v in out.items()}  # [H, n]


def test_induction_mask_hand_worked():
    # tokens: 0=BOS, A B C A B ; q=4 (A) repeats p=1 (< q-1), target k=2 (B);
    # q=5 (B) repeats p=2, target k=3 (C). Nothing else repeats.
    m = induction_mask(torch.tensor([0, 7, 8, 9, 7, 8]))
    assert sorted(map(tuple, torch.nonzero(m).tolist())) == [(4, 2), (5, 3)]
    # a token repeated immediately (p = q - 1) is not an induction query
    assert not induction_mask(torch.tensor([0, 5, 5])).any()


@pytest.mark.parametrize("use_fused", [False, True], ids=["torch", "fused"])
def test_reduce_sample_matches_brute_force(use_fused):
    from fra.ingest import fused

    if use_fused and not fused.available():
        pytest.skip("no C++ toolchain for the fused kernel")
    g = torch.Generator().manual_seed(0)
    H, T, A, E, F = 2, 9, 3, 4, 7
    qf = torch.randn(H, T, A, E, generator=g)
    kf = torch.randn(H, T, A, E, generator=g)
    idx = torch.stack([torch.randperm(F, generator=g)[:A] for _ in range(T)])
    live = torch.rand(T, A, generator=g) > 0.2
    tokens = torch.tensor([0, 1, 2, 3, 1, 2, 3, 4, 1])
    ind = induction_mask(tokens)
    acc, ind_acc = ChannelAccumulator.zeros(F, H), ChannelAccumulator.zeros(F, H)
    # zero out dead slots like project_tokens does (activation 0)
    qf, kf = qf * live[None, :, :, None], kf * live[None, :, :, None]
    res = reduce_sample(qf, kf, idx, live, ind, acc, ind_acc, top_m=5, q_block=4, use_fused=use_fused)

    for accum, mask in ((acc, torch.ones(T, T, dtype=torch.bool)), (ind_acc, ind)):
        ref = brute_force(qf, kf, idx, live, F, mask)
        fq, fk, count, s, ss, mn, mx = accum.nonzero()
        got = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(fq, fk))}
        assert set(got) == set(ref)
        for key, vals in ref.items():
            i = got[key]
            assert count[i] == vals.shape[1]
            torch.testing.assert_close(s[:, i], vals.sum(1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ss[:, i], (vals**2).sum(1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mn[:, i], vals.min(1).values)
            torch.testing.assert_close(mx[:, i], vals.max(1).values)
    assert ind.any() and ind_acc.n_seen() > 0

    # per-pair totals and kept rows
    for h in range(H):
        for q in range(T):
            vals = []
            for k in range(q + 1):
                block = (qf[h, q] @ kf[h, k].T) * (live[q][:, None] & live[k][None, :])
                torch.testing.assert_close(res.ff_HQK[h, q, k], block.sum(), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(res.ff_abs_HQK[h, q, k], block.abs().sum(), atol=1e-5, rtol=1e-5)
                vals += [(block[a, b].abs().item(), k, int(idx[q, a]), int(idx[k, b]), block[a, b].item())
                         for a in range(A) for b in range(A) if block[a, b] != 0]
            top = sorted(vals, reverse=True)[:5]
            sel = (res.rows_h == h) & (res.rows_q == q)
            got = sorted(zip(res.rows_val[sel].abs().tolist(), res.rows_k[sel].tolist(),
                             res.rows_fq[sel].tolist(), res.rows_fk[sel].tolist(), res.rows_val[sel].tolist()),
                         reverse=True)
            assert [(k, a, b) for _, k, a, b, _ in got] == [(k, a, b) for _, k, a, b, _ in top]
            torch.testing.assert_close(torch.tensor([v for *_, v in got]), torch.tensor([v for *_, v in top]))
    # kept totals are the sums of the kept rows
    kept = torch.zeros(H, T, T)
    kept.index_put_((res.rows_h, res.rows_q, res.rows_k), res.rows_val, accumulate=True)
    torch.testing.assert_close(res.kept_HQK, kept)
