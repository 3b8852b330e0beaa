"""CIH measurement: the query row's term groups against the model's own scores, the channel
contributions against a naive per-pair reference, weights, and the matched random removal."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from fra.ingest.core.decompose import build_projector, decompose
from fra.ingest.studies.cih.measure import (
    contrast_weights,
    gather_units,
    margin_weights,
    random_matched_removal,
    row_channels,
)
from fra.ingest.studies.cih.prompts import Prompt
from fra.ingest.studies.cih.study import measure_batch
from fra.ingest.tools.testing import make_model, make_sae


def tiny_setup(family: str):
    model = make_model(family, processed=False)
    sae = make_sae(16, "blocks.1.ln1.hook_normalized", d_sae=24, k=4)
    return SimpleNamespace(model=model, layers=(1,), saes={1: sae}, projs={1: build_projector(model, 1, sae)})


def tiny_prompts(n=4, T=9, seed=0):
    g = random.Random(seed)
    out = []
    for i in range(n):
        toks = (0,) + tuple(g.randrange(1, 50) for _ in range(T - 1))
        out.append(Prompt(toks, 2, 3, (5,), "r", ("concept", "control")[i % 2], i // 2, 1, 0, ("a", "x", "n", "b")))
    return out


def test_margin_and_contrast_weights_hand_worked():
    # T=5, X at 2, query at 4: keys 0..4 are causal; +1 at X, -1/4 at each of the 4 others
    w = margin_weights(5, 2, 4)
    assert w.tolist() == pytest.approx([-0.25, -0.25, 1.0, -0.25, -0.25])
    # on a row: score(X) - mean(other 4) = 10 - (1 + 2 + 3 + 4) / 4 = 7.5
    row = torch.tensor([1.0, 2.0, 10.0, 3.0, 4.0])
    assert float(row @ w) == pytest.approx(7.5)
    # X minus the mean of keys 1 and 3: 10 - (2 + 3) / 2 = 7.5
    assert float(row @ contrast_weights(5, 2, [1, 3])) == pytest.approx(10.0 - 2.5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_groups_sum_to_hook_attn_scores(family):
    setup = tiny_setup(family)
    rows, resid = measure_batch(setup, tiny_prompts(), None, 1, torch.Generator().manual_seed(0))
    # fp32 through one layer and a 16-term split: 1e-4 on scores of size ~1-10
    assert resid < 1e-4
    assert len(rows[1]) == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_channels_match_a_naive_per_pair_sum(family):
    setup = tiny_setup(family)
    model, sae = setup.model, setup.saes[1]
    p = tiny_prompts(1)[0]
    dec = decompose(model, 1, sae, torch.tensor(p.tokens))
    q = p.q_pos
    idx, acts = dec.sparse.feat_idx_BTA[0], dec.sparse.acts_BTA[0]
    keys, contrib = row_channels(
        dec.q.feat_BHTAE[0, :, q], dec.k.feat_BHTAE[0], idx[q], acts[q] != 0, idx, acts != 0, sae.cfg.d_sae
    )
    # naive: every (query slot a, key position t, key slot b) through fa_block, summed per (i, j)
    ref = {}
    H, T = contrib.shape[0], len(p.tokens)
    for h in range(H):
        for t in range(T):
            blk = dec.fa_block(0, h, q, t)
            for a in range(idx.shape[1]):
                for b in range(idx.shape[1]):
                    if acts[q, a] != 0 and acts[t, b] != 0:
                        key = int(idx[q, a]) * sae.cfg.d_sae + int(idx[t, b])
                        ref.setdefault(key, torch.zeros(H, T))[h, t] += blk[a, b]
    assert sorted(ref) == keys.tolist()
    torch.testing.assert_close(contrib, torch.stack([ref[k] for k in keys.tolist()], 1), atol=1e-5, rtol=1e-5)
    # summed over channels: the feature x feature term of the decomposition, row q
    torch.testing.assert_close(contrib.sum(1), dec.term("feat_feat")[0, :, q], atol=1e-5, rtol=1e-5)


def test_gather_units_hand_made():
    keys = torch.tensor([3, 7, 11])
    contrib = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # [H=2, S=3, T=2]
    units, idx = gather_units(keys, contrib, torch.tensor([7, 8, 11]))
    assert idx.tolist() == [1, -1, 2]
    assert units[0].tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert units[1].abs().sum() == 0
    assert units[2].tolist() == [[4.0, 5.0], [10.0, 11.0]]


def test_random_matched_removal_hand_worked():
    g = torch.Generator().manual_seed(0)
    # one head, keys 0..2, X = 1. Row [0, 2, 0]. Channel 0 is the unit (+2 at X, magnitude 2);
    # channels 1 and 2 are identical (+1 at X, magnitude 1 each).
    row = torch.tensor([[0.0, 2.0, 0.0]])
    contrib = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])
    # matched removal of the unit: the other two channels (magnitude 1 + 1 = 2), never the unit
    # itself: row -> [0, 0, 0], attention on X = 1/3, in every draw
    p = random_matched_removal(row, contrib, torch.tensor([0, -1]), 1, 5, g)
    assert p[0, 0].item() == pytest.approx(1 / 3)
    assert math.isnan(p[1, 0].item())  # an absent unit
    # unit = channel 1 (magnitude 1): one other channel reaching magnitude 1, channel 0 or 2
    # removing 0: row [0, 0, 0] -> 1/3; removing 2: row [0, 1, 0] -> e / (e + 2); the mean lies between
    p = random_matched_removal(row, contrib, torch.tensor([1]), 1, 50, g)
    assert 1 / 3 < p[0, 0].item() < math.e / (math.e + 2)
