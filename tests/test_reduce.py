"""The ingest inner loop against a dense brute-force FA written here."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fra.ingest.core.reduce import (
    POS_SHIFT,
    ReduceOptions,
    SampleFA,
    cooccurrence,
    induction_mask,
    reduce_sample,
    visible_mask,
)


def brute_force(qf, kf, idx, live, mask):
    """channel -> [(q, a, k, b, values_H)] over causal (q, k) where mask holds, in scan order."""
    H, T, A, _ = qf.shape
    out = {}
    for q in range(T):
        for a in range(A):
            for k in range(q + 1):
                for b in range(A):
                    if mask[q, k] and live[q, a] and live[k, b]:
                        key = (int(idx[q, a]), int(idx[k, b]))
                        out.setdefault(key, []).append((q, k, (qf[:, q, a] * kf[:, k, b]).sum(-1)))
    return out


def test_induction_mask_hand_worked():
    # tokens: 0=BOS, A B C A B ; q=4 (A) repeats p=1 (< q-1), target k=2 (B);
    # q=5 (B) repeats p=2, target k=3 (C). Nothing else repeats.
    m = induction_mask(torch.tensor([0, 7, 8, 9, 7, 8]))
    assert sorted(map(tuple, torch.nonzero(m).tolist())) == [(4, 2), (5, 3)]
    # a token repeated immediately (p = q - 1) is not an induction query
    assert not induction_mask(torch.tensor([0, 5, 5])).any()


def test_cooccurrence_hand_worked():
    # positions 0, 1, 2 hold features {2}, {2, 5}, {5}; causal pairs (q, k) with k <= q:
    # 2 at q and 2 at k: (0,0) (1,0) (1,1) -> 3;   2 at q, 5 at k: (1,1) -> 1
    # 5 at q and 2 at k: (1,0) (1,1) (2,0) (2,1) -> 4;   5 at q, 5 at k: (1,1) (2,1) (2,2) -> 3
    idx = torch.tensor([[2, 0], [2, 5], [5, 0]])
    live = torch.tensor([[True, False], [True, True], [True, False]])
    co = cooccurrence(idx, live)
    assert co.feats_U.tolist() == [2, 5]
    assert co.count_UU.tolist() == [[3, 1], [4, 3]]
    keys, counts = co.channel_keys(10)
    assert keys.tolist() == [22, 25, 52, 55] and counts.tolist() == [3, 1, 4, 3]


def _sample(seed=0, H=2, T=9, A=3, E=4, F=7):
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(H, T, A, E, generator=g)
    kf = torch.randn(H, T, A, E, generator=g)
    idx = torch.stack([torch.randperm(F, generator=g)[:A] for _ in range(T)])
    live = torch.rand(T, A, generator=g) > 0.2
    # dead slots carry activation 0, as project_tokens makes them
    qf, kf = qf * live[None, :, :, None], kf * live[None, :, :, None]
    attn = torch.rand(H, T, T, generator=g).tril()
    return qf, kf, idx, live, attn, F


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window-3"])
@pytest.mark.parametrize("backend", ["torch", "kernel"])
@pytest.mark.parametrize("subset", [False, True], ids=["all-channels", "kept-subset"])
def test_reduce_sample_matches_brute_force(backend, subset, window):
    from fra.ingest.core import fused

    if backend == "kernel" and not fused.available():
        pytest.skip("no C++ toolchain for the CPU kernel")
    qf, kf, idx, live, attn, F = _sample()
    H, T, A, _ = qf.shape
    tokens = torch.tensor([0, 1, 2, 3, 1, 2, 3, 4, 1])
    visible = visible_mask(T, window)
    ind = induction_mask(tokens) & visible
    ref = brute_force(qf, kf, idx, live, visible)
    kept = None
    if subset:  # every other channel present
        kept = torch.tensor(sorted(i * F + j for i, j in ref))[::2]
    x = SampleFA(qf, kf, idx, live, ind, attn, attn, window)
    opts = ReduceOptions(top_keys=2, top_pairs=3, q_block=4, backend=backend)
    red = reduce_sample(x, F, kept, opts)
    res, tot, rows = red.slots, red.totals, red.rows
    # a later sweep (no rows) forms only the query slots it needs, and gives the same slots
    lean = reduce_sample(x, F, kept, replace(opts, with_rows=False))
    assert lean.rows is None and lean.totals is None
    # sweeps split the |FA| totals by query feature: the parts add up to the whole
    half = torch.zeros(F, dtype=torch.bool)
    half[::2] = True
    parts = [
        reduce_sample(x, F, kept, replace(opts, with_rows=False), abs_features=m).ff_abs_HQK for m in (half, ~half)
    ]
    torch.testing.assert_close(parts[0] + parts[1], tot.ff_abs_HQK, rtol=1e-5, atol=1e-5)
    assert parts[0].abs().sum() > 0 and parts[1].abs().sum() > 0
    for f in ("keys_S", "sum_HS", "sumsq_HS", "best_HS", "best_pos_HS", "ind_count_S", "ind_sum_HS", "ind_sumsq_HS"):
        torch.testing.assert_close(getattr(lean.slots, f), getattr(res, f), rtol=1e-6, atol=1e-6)
    # the counts of the channels present, with the same mask
    ckeys, counts = cooccurrence(idx, live, window).channel_keys(F)
    assert {(int(c) // F, int(c) % F): int(n) for c, n in zip(ckeys, counts)} == {c: len(e) for c, e in ref.items()}
    want = set(ref) if kept is None else {(int(x) // F, int(x) % F) for x in kept}
    got = {(int(c) // F, int(c) % F): s for s, c in enumerate(res.keys_S)}
    assert set(got) == want
    for key, s in got.items():
        entries = ref[key]
        vals = torch.stack([v for _, _, v in entries], 1)  # [H, n]
        torch.testing.assert_close(res.sum_HS[:, s].float(), vals.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.sumsq_HS[:, s].float(), (vals**2).sum(1), atol=1e-5, rtol=1e-5)
        for h in range(H):
            i = int(vals[h].abs().argmax())  # first maximum in scan order
            q, k, _ = entries[i]
            assert res.best_HS[h, s] == pytest.approx(vals[h, i].item(), abs=1e-6)
            assert int(res.best_pos_HS[h, s]) == (q << POS_SHIFT) | k
        ind_vals = [v for q, k, v in entries if ind[q, k]]
        assert int(res.ind_count_S[s]) == len(ind_vals)
        if ind_vals:
            torch.testing.assert_close(
                res.ind_sum_HS[:, s].float(), torch.stack(ind_vals, 1).sum(1), atol=1e-5, rtol=1e-5
            )
    assert ind.any() and int(res.ind_count_S.sum()) > 0

    # per-pair totals, and the rows: top pairs at each query's most-attended visible keys
    for h in range(H):
        for q in range(T):
            for k in range(T):
                block = (qf[h, q] @ kf[h, k].T) * (live[q][:, None] & live[k][None, :]) * visible[q, k]
                torch.testing.assert_close(tot.ff_HQK[h, q, k], block.sum(), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(tot.ff_abs_HQK[h, q, k], block.abs().sum(), atol=1e-5, rtol=1e-5)
            seen = torch.nonzero(visible[q])[:, 0]
            keys = seen[attn[h, q, seen].topk(min(2, len(seen))).indices].tolist()
            want_rows = []
            for k in keys:
                block = (qf[h, q] @ kf[h, k].T) * (live[q][:, None] & live[k][None, :])
                top = sorted(
                    (
                        (block[a, b].abs().item(), int(idx[q, a]), int(idx[k, b]))
                        for a in range(A)
                        for b in range(A)
                        if block[a, b] != 0
                    ),
                    reverse=True,
                )[:3]
                want_rows += [(k, i, j) for _, i, j in top]
            sel = (rows.h == h) & (rows.q == q)
            got_rows = list(zip(rows.k[sel].tolist(), rows.feat_q[sel].tolist(), rows.feat_k[sel].tolist()))
            assert sorted(got_rows) == sorted(want_rows)
    kept_t = torch.zeros(H, T, T)
    kept_t.index_put_((rows.h, rows.q, rows.k), rows.value, accumulate=True)
    torch.testing.assert_close(tot.kept_HQK, kept_t)
