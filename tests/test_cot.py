"""The CoT study: Thought Anchors' receiver scores and suppression KL against direct computations,
the exact sentence-block split, sentence offsets, the null, and answer extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from fra.ingest.studies.cot import anchors as ta
from fra.ingest.studies.cot.resolve import GROUPS, resolve
from fra.ingest.studies.cot.sentences import segment, shuffled_spans
from fra.ingest.studies.cot.traces import TraceInputError, extract_answer, read_jsonl
from fra.ingest.tools.testing import make_model, make_sae

# ---------------------------------------------------------------------------- Thought Anchors' code
# Reference: whitebox-analyses/attention_analysis/attn_funcs.py of interp-reasoning/thought-anchors
# (MIT licence), `_compute_averaged_matrix` and `get_vertical_scores(control_depth=False)`, kept
# as written there (minus the rank option) so that our functions are checked against theirs.


def _ta_averaged(matrix, sentence_boundaries):
    n = len(sentence_boundaries)
    result = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        row_start, row_end = sentence_boundaries[i]
        row_start = min(row_start, matrix.shape[0] - 1)
        row_end = min(row_end, matrix.shape[0] - 1)
        if row_start >= row_end:
            continue
        for j in range(n):
            col_start, col_end = sentence_boundaries[j]
            col_start = min(col_start, matrix.shape[1] - 1)
            col_end = min(col_end, matrix.shape[1] - 1)
            if col_start >= col_end:
                continue
            region = matrix[row_start:row_end, col_start:col_end]
            if region.size > 0:
                result[i, j] = np.mean(region)
    return result


def _ta_vertical(avg_mat, proximity_ignore=4):
    avg_mat = avg_mat.copy()
    avg_mat[np.triu_indices_from(avg_mat, k=1)] = np.nan
    avg_mat[np.triu_indices_from(avg_mat, k=-proximity_ignore + 1)] = np.nan
    n = avg_mat.shape[-1]
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        return np.array([np.nanmean(avg_mat[i + proximity_ignore :, i]) for i in range(n)])


def test_receiver_measures_hand_worked():
    # 6 one-token sentences after a 1-token prompt: block means are the pattern entries.
    # Column 0 is read on rows 4 and 5 (>= 0 + 4): 0.2 and 0.4 -> vertical score 0.3;
    # column 1 on row 5 only: 0.1; columns 2..5 have no row 4 later: NaN.
    T = 7
    pat = np.zeros((1, T, T))
    pat[0, 5, 1], pat[0, 6, 1], pat[0, 6, 2] = 0.2, 0.4, 0.1
    spans = [(t, t + 1) for t in range(1, T)]
    vert = ta.vertical_scores(ta.block_means(pat, spans)[0])
    np.testing.assert_allclose(vert[:2], [0.3, 0.1])
    assert np.isnan(vert[2:]).all()
    # two values a, b: every |x - mean| is |a - b| / 2, so m4 / m2^2 = 1 and Fisher kurtosis = -2
    np.testing.assert_allclose(ta.head_kurtosis(vert[None, None]), [[-2.0]])
    # a 2 x 2 block averages its 4 entries: (0.1 + 0.3 + 0.5 + 0.7) / 4 = 0.4
    pat2 = np.zeros((1, 4, 4))
    pat2[0, 2:4, 0:2] = [[0.1, 0.3], [0.5, 0.7]]
    assert ta.block_means(pat2, [(0, 2), (2, 4)])[0, 1, 0] == pytest.approx(0.4)


def test_receiver_measures_match_thought_anchors_code():
    rng = np.random.default_rng(0)
    T = 40
    pat = np.tril(rng.random((T, T)))
    pat /= pat.sum(1, keepdims=True)
    cuts = np.sort(rng.choice(np.arange(3, T - 2), 10, replace=False))
    bounds = np.r_[2, cuts, T - 1]  # the last span ends before T - 1, where TA's clipping would cut it
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    ours = ta.block_means(pat[None], spans)[0]
    np.testing.assert_allclose(ours, _ta_averaged(pat, spans), rtol=1e-6, atol=1e-7)  # TA stores float32
    np.testing.assert_allclose(ta.vertical_scores(ours), _ta_vertical(ours), equal_nan=True, rtol=1e-12)
    kurt = stats.kurtosis(_ta_vertical(ours), fisher=True, bias=True, nan_policy="omit")
    np.testing.assert_allclose(ta.head_kurtosis(ta.vertical_scores(ours)[None]), [kurt], rtol=1e-12)
    # receiver heads: top mean kurtosis, largest first, NaN skipped
    assert ta.top_heads(np.array([[1.0, np.nan], [3.0, 2.0]]), 3) == [(1, 0), (1, 1), (0, 0)]


@pytest.fixture(scope="module")
def tiny():
    model = make_model("llama", seed=0)
    tokens = torch.randint(1, 50, (14,), generator=torch.Generator().manual_seed(1))
    spans = [(1, 4), (4, 6), (6, 9), (9, 11), (11, 12), (12, 14)]
    return model, tokens, spans


@torch.no_grad()
def test_receiver_scores_on_tiny_model_direct(tiny):
    model, tokens, spans = tiny
    _, cache = model.run_with_cache(tokens[None])
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0].numpy()
        vert = ta.vertical_scores(ta.block_means(pat, spans))
        for h in range(model.cfg.n_heads):  # the definition, by loops
            for j in range(len(spans)):
                rows = [
                    pat[h, spans[i][0] : spans[i][1], spans[j][0] : spans[j][1]].mean()
                    for i in range(j + 4, len(spans))
                ]
                want = np.mean(rows) if rows else np.nan
                np.testing.assert_allclose(vert[h, j], want, rtol=1e-6, equal_nan=True)


@torch.no_grad()
def test_suppression_kl_on_tiny_model_direct(tiny):
    model, tokens, spans = tiny
    got = ta.suppression_matrix(model, tokens, spans, batch=4)
    base = model(tokens[None])[0].double()
    for j, (s, e) in enumerate(spans):
        # direct: drop sentence j's keys from every softmax row and renormalise the rest
        def cut(pattern, hook, s=s, e=e):
            pattern = pattern.clone()
            pattern[..., s:e] = 0
            return pattern / pattern.sum(-1, keepdim=True)

        supp = model.run_with_hooks(
            tokens[None], fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", cut) for l in range(model.cfg.n_layers)]
        )[0].double()
        p = torch.softmax(base / 0.6, -1)
        kl = (p * (torch.log_softmax(base / 0.6, -1) - torch.log_softmax(supp / 0.6, -1))).sum(-1).clamp_min(0)
        log_kl = torch.log(kl + 1e-9).numpy()
        want = [log_kl[a:b].mean() for a, b in spans]
        # float32 forward passes; log(KL + 1e-9) amplifies differences where KL is near 1e-9
        np.testing.assert_allclose(got[:, j], want, atol=2e-3)
        # tokens before the suppressed sentence cannot see it: KL 0 exactly, log 1e-9
        assert np.allclose(got[:j, j], np.log(1e-9))
    assert (got[np.tril_indices(len(spans), -1)] > np.log(1e-9) + 1).all()


def test_sentence_block_split_is_exact(tiny):
    from fra.ingest.core.decompose import Decomposer

    model, tokens, _ = tiny
    layer, head, d_sae = 1, 2, 24
    sae = make_sae(16, f"blocks.{layer}.ln1.hook_normalized", d_sae=d_sae, k=3, seed=3)
    d = Decomposer(model, layer, sae, dtype=torch.float64).decompose(tokens)
    T = len(tokens)
    scores = d.model_scores_BHQK[0, head].clone()
    scores[~torch.ones(T, T, dtype=torch.bool).tril()] = -torch.inf
    terms = d.terms_CBHQK[:, 0, head]
    qf, kf, fi = d.q.feat_BHTAE[0, head], d.k.feat_BHTAE[0, head], d.sparse.feat_idx_BTA[0]
    q_mask = torch.zeros(T, dtype=torch.bool)
    q_mask[9:14] = True
    k_mask = torch.zeros(T, dtype=torch.bool)
    k_mask[2:5] = True
    r = resolve(terms, scores, qf, kf, fi, q_mask, k_mask, d_sae, return_all=True, top=5)
    # the block's own scores: the 16 terms sum to the model's scores on it (float32 model)
    blk = q_mask[:, None] & k_mask[None, :]
    torch.testing.assert_close(terms.sum(0)[blk], scores[blk].double(), atol=1e-4, rtol=1e-5)
    # direct Delta from the model's scores and pattern, by loops
    A = torch.softmax(scores.double(), -1)
    Z = sum(A[q, k] for q in range(T) for k in range(T) if blk[q, k])
    direct = 0.0
    for q in q_mask.nonzero().reshape(-1).tolist():
        expect = sum(A[q, k] * scores[q, k] for k in range(q + 1))
        direct += sum(A[q, k] / Z * (scores[q, k] - expect) for k in k_mask.nonzero().reshape(-1).tolist())
    assert r.delta == pytest.approx(float(direct), rel=1e-9)
    assert sum(r.groups.values()) == pytest.approx(r.delta, abs=1e-4)  # float32 scores vs float64 terms
    assert set(r.groups) == set(GROUPS)
    # channels sum to the ff group to float64 precision, and match a brute-force FA sum
    assert r.ff_channels == pytest.approx(r.groups["ff"], rel=1e-10, abs=1e-12)
    assert r.all_channels["value"].sum() == pytest.approx(r.groups["ff"], rel=1e-10, abs=1e-12)
    W = {q: sum(A[q, k] / Z for k in range(T) if blk[q, k]) for q in range(T)}
    brute: dict[tuple[int, int], float] = {}
    for q in range(T):
        for k in range(q + 1):
            c = (A[q, k] / Z if blk[q, k] else 0.0) - W[q] * A[q, k]
            if c == 0:
                continue
            fa = d.fa_block(0, head, q, k)
            for a in range(fa.shape[0]):
                for b in range(fa.shape[1]):
                    key = (int(fi[q, a]), int(fi[k, b]))
                    brute[key] = brute.get(key, 0.0) + float(c * fa[a, b])
    ch = r.all_channels
    got = {(int(a), int(b)): v for a, b, v in zip(ch.feat_q, ch.feat_k, ch.value)}
    for key, v in brute.items():
        assert got.get(key, 0.0) == pytest.approx(v, abs=1e-10)
    # key classes label channels without changing values: positive mass by class sums to the total
    classes = torch.tensor([t % 3 for t in range(T)])
    rc = resolve(terms, scores, qf, kf, fi, q_mask, k_mask, d_sae, key_class_T=classes, top=5)
    pos_total = sum(max(v, 0.0) for v in brute.values())
    assert sum(rc.positive_by_class.values()) == pytest.approx(pos_total, rel=1e-9)
    assert list(rc.top["value"]) == pytest.approx(list(r.top["value"]), rel=1e-12)
    # the top table holds the largest |value| channels, largest first
    want = sorted(brute.items(), key=lambda kv: -abs(kv[1]))[:5]
    assert [(int(a), int(b)) for a, b in zip(r.top.feat_q, r.top.feat_k)] == [k for k, _ in want]


def test_null_shuffles_boundaries_only():
    spans = [(5, 9), (9, 10), (10, 17), (17, 20), (20, 26)]
    rng = np.random.default_rng(0)
    moved = False
    for _ in range(20):
        new = shuffled_spans(spans, rng)
        assert new[0][0] == 5 and new[-1][1] == 26  # the same tokens
        assert all(a[1] == b[0] for a, b in zip(new[:-1], new[1:]))  # contiguous
        assert sorted(e - s for s, e in new) == sorted(e - s for s, e in spans)  # the same lengths
        moved |= new != spans
    assert moved


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fra.ingest.registry import SMOLLM2_GGUF, ModelUnavailableError, smollm2_dir

    try:
        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    except ModelUnavailableError as exc:
        pytest.skip(str(exc))


def test_sentence_offsets_round_trip(tokenizer):
    from fra.ingest.studies.cot.config import SHIPPED_TRACES

    traces = read_jsonl(SHIPPED_TRACES, tokenizer)
    n_sent = n_exact = 0
    for t in traces:
        seg = segment(tokenizer, t.prompt, t.trace)
        assert seg.tokens == tokenizer(t.prompt + t.trace, add_special_tokens=False)["input_ids"]
        spans = seg.token_spans
        assert spans[0][0] == seg.prompt_len and spans[-1][1] == len(seg.tokens)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans[:-1], spans[1:]))
        assert "".join(seg.sentences) == t.trace
        assert "".join(tokenizer.decode(seg.tokens[s:e]) for s, e in spans) == t.trace
        for (s, e), text in zip(spans, seg.sentences):
            n_sent += 1
            n_exact += tokenizer.decode(seg.tokens[s:e]) == text
    assert n_exact == n_sent, f"{n_sent - n_exact} sentences straddle a token"
    # a cut keeps whole sentences within the budget
    t = next(t for t in traces if segment(tokenizer, t.prompt, t.trace).n >= 3)
    full = segment(tokenizer, t.prompt, t.trace)
    cut = segment(tokenizer, t.prompt, t.trace, max_tokens=full.token_spans[-1][0] + 1)
    assert cut.token_spans == full.token_spans[:-1] and cut.tokens == full.tokens[: full.token_spans[-1][0]]


def test_extract_answer_and_jsonl(tmp_path, tokenizer):
    assert extract_answer("5 + 3 = 8. Then 8 - 2 = 6.\n\nAnswer: 6") == "6"
    assert extract_answer("So, the answer is -1,234.") == "-1234"
    assert extract_answer("first 3 then 41") == "41"
    assert extract_answer("no digits") is None
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"problem": "1+1?", "trace": "1 + 1 = 2. Answer: 2", "answer": "2"}) + "\n")
    (t,) = read_jsonl(p, tokenizer)
    assert t.correct and t.predicted == "2" and t.prompt.endswith("assistant\n")
    p.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(TraceInputError, match="trace"):
        read_jsonl(p, tokenizer)


def test_token_classes():
    from fra.ingest.studies.cot.study import token_class

    reused = {"12", "apples"}
    assert token_class(" 12", reused) == "content"
    assert token_class(" Apples", reused) == "content"
    assert token_class(" pears", reused) == "word"
    assert token_class(".\n\n", reused) == "structural"
    assert token_class(" =", reused) == "structural"


def test_cli_has_cot_commands(capsys):
    from fra.cli import main

    for argv, flag in ((["report", "cot", "--help"], "--proximity"), (["cot", "--help"], "--from-jsonl")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and flag in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # config validation is a usage error, not a traceback
        main(["report", "cot", "--min-sentences", "2"])
    assert exc.value.code == 2 and "min_sentences must be >= proximity + 3" in capsys.readouterr().err


def test_sae_layers_default_to_every_shipped_sae_and_refuse_missing_ones():
    from fra.ingest.registry import shipped_sae_layers
    from fra.ingest.studies.cot.config import CotReportConfig
    from fra.ingest.studies.cot.study import resolve_sae_layers

    shipped = shipped_sae_layers("smollm2-135m")
    assert {3, 24} <= set(shipped)  # the layers holding the most receiver heads (reports/cot/heads.parquet)
    assert resolve_sae_layers(CotReportConfig()) == shipped
    assert resolve_sae_layers(CotReportConfig(sae_layers=(24,))) == (24,)
    assert resolve_sae_layers(CotReportConfig(model="gpt2")) == ()  # no shipped SAEs: nothing resolved
    with pytest.raises(ValueError, match=r"no shipped SAE for smollm2-135m at layer\(s\) \[4\]"):
        resolve_sae_layers(CotReportConfig(sae_layers=(3, 4)))


def test_receiver_layers_are_the_two_holding_most_receiver_heads():
    """The shipped report's receiver heads put the most heads in layers 3 and 24 (ties broken by the
    strongest head), the layers whose SAEs were trained for this study."""
    import pandas as pd

    from fra.ingest.studies.cot.report import receiver_layers

    heads = pd.read_parquet("reports/cot/heads.parquet")
    receivers = [
        (int(r.layer), int(r.head)) for r in heads[heads.receiver_rank >= 0].sort_values("receiver_rank").itertuples()
    ]
    assert len(receivers) == 20
    assert receiver_layers(receivers, 2) == [3, 24]
    # hand-worked: two heads each in layers 5 and 9, 9 holds the strongest; one in layer 1
    assert receiver_layers([(9, 0), (5, 1), (1, 2), (5, 3), (9, 4)], 2) == [9, 5]


def test_term_shares_of_delta_by_hand():
    """The report's 'who carries Delta' numbers on two hand-made anchor x head cases."""
    import pandas as pd

    from fra.ingest.studies.cot.report import _term_shares

    zero = {f"g_{g}": [0.0, 0.0] for g in GROUPS}
    d = pd.DataFrame(
        {**zero, "g_ff": [1.0, 3.0], "g_bdec_f": [2.0, -1.0], "g_f_err": [0.0, -1.0], "g_bias": [0.0, 1.0]}
    )
    d["delta"] = d[[f"g_{g}" for g in GROUPS]].sum(1)  # 3, 2: the groups sum to Delta
    s = _term_shares(d)
    # summed Delta 5 = ff 4 + b_dec/error 0 + bias 1
    assert (s["ff_share_of_sum"], s["resid_share_of_sum"], s["bias_share_of_sum"]) == pytest.approx((0.8, 0.0, 0.2))
    # absolute mass: ff 1 + 3, b_dec/error 2 + 1 + 1, bias 1: 4 / 9, 4 / 9, 1 / 9
    assert (s["ff_share_of_abs"], s["resid_share_of_abs"], s["bias_share_of_abs"]) == pytest.approx(
        (4 / 9, 4 / 9, 1 / 9)
    )
