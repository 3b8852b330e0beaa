"""CIH measurement: the query row's term groups against the model's own scores, the channel
contributions against a naive per-pair reference, weights, unit selection and removal, the random
removal matched at X, and the gating labels."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from fra.ingest.core.decompose import build_projector, decompose
from fra.ingest.studies.cih.measure import (
    RowEntries,
    channel_labels,
    contrast_weights,
    difference,
    gather_keys,
    margin_weights,
    marginal,
    row_channels,
    top_keys,
    unit_mask,
    x_matched_random_drop,
)
from fra.ingest.studies.cih.prompts import Prompt
from fra.ingest.studies.cih.study import measure_rows
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
        out.append(Prompt(toks, 2, 3, (5,), "r", ("concept", "control")[i % 2], i // 2, 1, 0, ("a", "x", "n", "b"), 0))
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
    prompts = tiny_prompts()
    rows, resid = measure_rows(setup, prompts, full=True)
    # fp32 through one layer and a 16-term split: 1e-4 on scores of size ~1-10
    assert resid < 1e-4
    assert len(rows) == 4 and set(rows[0]) == {1}
    # log P(X) after B from the model's own logits
    p = prompts[0]
    ref = setup.model(torch.tensor([p.tokens]))[0, -1].log_softmax(-1)[p.tokens[p.x_pos]]
    assert rows[0][1].logp_x == pytest.approx(float(ref), abs=1e-5)
    # the sparse entries' sum over channels is the ff group
    w = torch.zeros(len(p.tokens))
    w[p.x_pos] = 1.0
    torch.testing.assert_close(rows[0][1].entries.values(w).sum(1), rows[0][1].groups_GHT[0, :, p.x_pos])


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


def hand_entries() -> RowEntries:
    # 2 heads, T = 3, channels 3, 7, 11; entries (channel, key position, value in head 0 / head 1)
    keys = torch.tensor([3, 7, 11])
    inv = torch.tensor([0, 0, 1, 2])
    t = torch.tensor([0, 2, 1, 2])
    V = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    return RowEntries(keys, inv, t, V, 3)


def test_row_entries_values_removed_and_dense_hand_made():
    e = hand_entries()
    # dense[h, s, t]: channel 3 has 1 at t=0 and 2 at t=2; channel 7 has 3 at t=1; channel 11 has 4 at t=2
    assert e.dense()[0].tolist() == [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]]
    # margin weights (+1 at t=1, -1/2 at t=0 and 2): channel 3 -> -1.5, channel 7 -> 3, channel 11 -> -2
    assert e.values(torch.tensor([-0.5, 1.0, -0.5]))[0].tolist() == [-1.5, 3.0, -2.0]
    # removing channels 3 and 11 in head 0, only 7 in head 1
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert e.removed(mask).tolist() == [[1.0, 0.0, 6.0], [0.0, 30.0, 0.0]]


def test_unit_mask_selects_channels_or_feature_marginals():
    d = 4  # keys i * 4 + j: 5 = (1, 1), 6 = (1, 2), 9 = (2, 1)
    keys = torch.tensor([5, 6, 9])
    assert unit_mask(keys, torch.tensor([[6, -1]]), d, "channel").tolist() == [[False, True, False]]
    assert unit_mask(keys, torch.tensor([[1, -1]]), d, "query").tolist() == [[True, True, False]]
    assert unit_mask(keys, torch.tensor([[1, 2]]), d, "key").tolist() == [[True, True, True]]


def test_difference_marginal_top_and_gather_hand_made():
    keys, d = difference(
        torch.tensor([5, 6]), torch.tensor([[1.0, 2.0]]), torch.tensor([6, 9]), torch.tensor([[0.5, 4.0]])
    )
    assert keys.tolist() == [5, 6, 9] and d.tolist() == [[1.0, 1.5, -4.0]]
    # query marginals over d_sae = 4: feature 1 has 1 + 1.5, feature 2 has -4
    assert marginal(keys, d, 4, "q").tolist() == [[0.0, 2.5, -4.0, 0.0]]
    assert marginal(keys, d, 4, "k").tolist() == [[0.0, -3.0, 1.5, 0.0]]
    assert top_keys(keys, d, 4).tolist() == [[6, 5, 9, -1]]
    assert gather_keys(keys, d, torch.tensor([[9, 7, -1]])).tolist() == [[-4.0, 0.0, 0.0]]


def test_x_matched_random_drop_hand_worked():
    g = torch.Generator().manual_seed(0)
    # one head, T = 3, X = 1, row [0, 2, 0]. Channels: 0 (the unit, +2 at X), 1 and 2 (+1 at X each)
    e = RowEntries(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]),
                   torch.tensor([[2.0, 1.0, 1.0]]), 3)  # fmt: skip
    row = torch.tensor([[0.0, 2.0, 0.0]])
    excl = torch.tensor([[True, False, False]])
    # matched at X to the unit's 2: both other channels go, row -> [0, 0, 0]: attention on X 1/3,
    # drop = e^2 / (e^2 + 2) - 1/3, in every draw
    drop = x_matched_random_drop(row, e, excl, torch.tensor([2.0]), 1, 5, g)
    assert drop[0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2) - 1 / 3, abs=1e-6)
    # a target of 1: one of them, row -> [0, 1, 0], drop = e^2 / (e^2 + 2) - e / (e + 2)
    drop = x_matched_random_drop(row, e, excl, torch.tensor([1.0]), 1, 5, g)
    assert drop[0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2) - math.e / (math.e + 2), abs=1e-6)
    # unreachable (3 > 1 + 1) or non-positive targets give NaN
    assert math.isnan(x_matched_random_drop(row, e, excl, torch.tensor([3.0]), 1, 2, g)[0].item())
    assert math.isnan(x_matched_random_drop(row, e, excl, torch.tensor([-1.0]), 1, 2, g)[0].item())


def test_channel_labels_with_the_activation_floor():
    t = torch.tensor
    # (q at B with A, q at B without A, k at X with A, k at X without A); floor 0.3, ratio 0.5
    labs = channel_labels(
        t([0.01, 1.0, 1.0, 1.0, 1.0]), t([0.01, 0.2, 0.9, 0.9, 0.9]),
        t([0.01, 1.0, 1.0, 0.2, 1.0]), t([0.0, 1.0, 0.1, 0.0, 0.8]), 0.3, 0.5,
    )  # fmt: skip
    # tiny activations both sides: weak (the old rule called this 'matching');
    # q drops without A: gated; q stays and k drops: matching; k below the floor: weak; both stay: ungated
    assert labs == ["weak", "gated query", "matching", "weak", "ungated"]
