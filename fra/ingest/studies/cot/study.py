"""`fra report cot`: thought anchors of chains of thought, resolved into SAE feature-pair channels.

Phases: (1) per trace, the attention pattern of every head -> sentence block means, vertical
scores and their kurtosis (receiver heads), and Thought Anchors' suppression KL matrix, for the
real sentence boundaries and for null boundaries (same tokens, sentence lengths shuffled);
(2) the receiver heads (top mean kurtosis) and, among the heads of the SAE layers, the strongest
ones, whose anchor sentences and sentence pairs are split exactly into channels (`resolve.py`);
(3) the consistency test (receiver vs suppression ranking, content share of the channels), correct
vs incorrect traces, against the null; (4) tables for the explorer, figures and report.md
(`report.py`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import anchors as ta
from .config import CotReportConfig
from .sentences import Segmented, segment, shuffled_spans


@dataclass
class TraceResult:
    idx: int
    seg: Segmented
    correct: bool
    task: str
    vert_LHN: np.ndarray
    kurt_LH: np.ndarray
    blocks_LHNN: np.ndarray
    kl_NN: np.ndarray
    null_spans: list = field(default_factory=list)
    null_vert: list = field(default_factory=list)  # [L, H, N] per draw
    null_kl: list = field(default_factory=list)  # [N, N] per draw


def token_class(text: str, reused: set[str]) -> str:
    """'content' (a number or word that the querying sentences reuse), 'word' (alphanumeric, not
    reused) or 'structural' (punctuation, whitespace, format)."""
    t = text.strip().lower()
    if not any(c.isalnum() for c in t):
        return "structural"
    return "content" if t in reused else "word"


def _patterns(model, tokens_T):
    import torch

    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens_T[None], names_filter=lambda n: n in names)
    return np.stack([cache[n][0].float().numpy() for n in names])  # [L, H, T, T]


def phase1(model, seg: Segmented, cfg: CotReportConfig, rng) -> dict:
    import torch

    tokens_T = torch.tensor(seg.tokens)
    pat_LHTT = _patterns(model, tokens_T)
    L, H = pat_LHTT.shape[:2]
    flat = pat_LHTT.reshape(L * H, *pat_LHTT.shape[2:])

    def verts(spans):
        b = ta.block_means(flat, spans).reshape(L, H, len(spans), len(spans))
        return b, ta.vertical_scores(b, cfg.proximity)

    blocks, vert = verts(seg.token_spans)
    out = dict(blocks=blocks.astype(np.float32), vert=vert, kurt=ta.head_kurtosis(vert))
    # only sentences with a row `proximity` later enter the suppression score: suppress those
    cols = list(range(seg.n - cfg.proximity))
    out["kl"] = ta.suppression_matrix(model, tokens_T, seg.token_spans, cols)
    out["null_spans"], out["null_vert"], out["null_kl"] = [], [], []
    for _ in range(cfg.n_shuffles):
        spans = shuffled_spans(seg.token_spans, rng)
        out["null_spans"].append(spans)
        out["null_vert"].append(verts(spans)[1])
        out["null_kl"].append(ta.suppression_matrix(model, tokens_T, spans, cols))
    return out


def consistency(vert_LHN, kl_NN, receivers, proximity) -> float:
    """Spearman correlation over sentences of the receiver score and the suppression score (mean
    log-KL on sentences >= `proximity` later, the same rows as the vertical score)."""
    rec = ta.receiver_scores(vert_LHN, receivers)
    supp = ta.vertical_scores(kl_NN, proximity)
    return ta.spearman(rec, supp)


def _mask(spans, idx, T: int):
    import torch

    m = torch.zeros(T, dtype=torch.bool)
    for i in idx:
        m[spans[i][0] : spans[i][1]] = True
    return m


def _key_classes(texts: list[str], spans, qsent):
    import torch

    from .resolve import CLASSES

    reused = {texts[t].strip().lower() for i in qsent for t in range(*spans[i])}
    return torch.tensor([CLASSES.index(token_class(x, reused)) for x in texts])


def _anchors_of(rec_scores, n_anchors: int) -> list[int]:
    ok = np.isfinite(rec_scores)
    return [int(j) for j in np.argsort(-np.where(ok, rec_scores, -np.inf))[:n_anchors] if ok[j]]


def _content_share(r) -> float:
    tot = sum(r.positive_by_class.values())
    return r.positive_by_class["content"] / tot if tot > 0 else float("nan")


def _head_inputs(d, head: int, T: int, prompt_len: int, F: int) -> dict:
    """What `resolve` needs of one head of a decomposed trace, fixed over its blocks."""
    import torch

    from .resolve import baseline_rows

    terms = d.terms_CBHQK[:, 0, head]
    scores = d.model_scores_BHQK[0, head].clone()
    scores[~torch.ones(T, T, dtype=torch.bool).tril()] = -torch.inf
    qf, kf = d.q.feat_BHTAE[0, head], d.k.feat_BHTAE[0, head]
    fi = d.sparse.feat_idx_BTA[0]
    pattern = torch.softmax(scores, -1)
    pos = torch.arange(prompt_len, T)
    base = (pos, baseline_rows(qf, kf, fi, pattern, pos, F))
    return dict(fixed=(terms, scores, qf, kf, fi), base=base, F=F, T=T, pattern=pattern, qf=qf, kf=kf, fi=fi)


def _resolve_block(h: dict, spans, qsent, ksent, top: int, classes=None):
    from .resolve import resolve

    qm, km = _mask(spans, qsent, h["T"]), _mask(spans, [ksent], h["T"])
    r = resolve(*h["fixed"], qm, km, h["F"], h["base"], key_class_T=classes, top=top)
    return r, qm, km


def _channel_values(rank: int, row) -> dict:
    """A resolved channel's columns (a row of `resolve(...).top`), shared by anchor and cell tables."""
    return dict(
        rank=rank,
        feat_q=int(row.feat_q),
        feat_k=int(row.feat_k),
        value=float(row.value),
        anchor_part=float(row.anchor),
        baseline_part=float(row.baseline),
    )


def _channel_labels(layer: int, row, labels: dict) -> dict:
    return dict(
        label_q=str(labels.get((layer, int(row.feat_q)), "")), label_k=str(labels.get((layer, int(row.feat_k)), ""))
    )


def _anchor_channel_rows(res, h, layer, head, j, r, qm, km, texts, labels) -> list[dict]:
    from .resolve import key_positions

    block = h["pattern"] * qm[:, None] * km[None, :]
    w = block / block.sum()
    q_idx, k_idx = qm.nonzero().reshape(-1), km.nonzero().reshape(-1)
    rows = []
    for c_rank, row in enumerate(r.top.itertuples()):
        per_key = key_positions(h["qf"], h["kf"], h["fi"], w, q_idx, k_idx, int(row.feat_q), int(row.feat_k))
        best = k_idx[per_key.abs().argsort(descending=True)[:3]].tolist()
        rows.append(
            dict(
                trace=res.idx,
                layer=layer,
                head=head,
                anchor=j,
                **_channel_values(c_rank, row),
                cls=row.cls,
                key_tokens=json.dumps([texts[k] for k in best]),
                **_channel_labels(layer, row, labels),
            )
        )
    return rows


def _resolve_anchors(res, h, layer, head, rec, cfg, texts, labels, out) -> list[float]:
    """The anchors of the real boundaries and their channels (into `out`); returns their content shares."""
    seg = res.seg
    shares = []
    for rank, j in enumerate(_anchors_of(rec, cfg.anchors)):
        qsent = list(range(j + cfg.proximity, seg.n))
        classes = _key_classes(texts, seg.token_spans, qsent)
        r, qm, km = _resolve_block(h, seg.token_spans, qsent, j, cfg.top_channels, classes)
        shares.append(_content_share(r))
        out["anchors"].append(
            dict(
                trace=res.idx,
                layer=layer,
                head=head,
                anchor=j,
                rank=rank,
                receiver_score=float(rec[j]),
                delta=r.delta,
                ff_channels=r.ff_channels,
                content_share=shares[-1],
                **{f"g_{g}": v for g, v in r.groups.items()},
                **{f"pos_{c}": v for c, v in r.positive_by_class.items()},
            )
        )
        out["anchor_channels"] += _anchor_channel_rows(res, h, layer, head, j, r, qm, km, texts, labels)
    return shares


def _null_content(res, h, receivers, cfg, texts) -> list[float]:
    """Mean content share of the anchors of each null draw."""
    shares = []
    for spans, vert in zip(res.null_spans, res.null_vert):
        ns = []
        for j in _anchors_of(ta.receiver_scores(vert, receivers), cfg.anchors):
            qsent = list(range(j + cfg.proximity, res.seg.n))
            r = _resolve_block(h, spans, qsent, j, cfg.top_channels, _key_classes(texts, spans, qsent))[0]
            ns.append(_content_share(r))
        shares.append(float(np.nanmean(ns)) if ns else float("nan"))
    return shares


def _resolve_cells(res, h, layer, head, cfg, labels, out) -> None:
    """Every sentence pair (i > j) of the trace and its channels, into `out`."""
    for i in range(1, res.seg.n):
        for j in range(i):
            r = _resolve_block(h, res.seg.token_spans, [i], j, cfg.top_channels)[0]
            out["cells"].append(
                dict(
                    trace=res.idx,
                    layer=layer,
                    head=head,
                    i=i,
                    j=j,
                    attn=float(res.blocks_LHNN[layer, head, i, j]),
                    delta=r.delta,
                    **{f"g_{g}": v for g, v in r.groups.items()},
                )
            )
            for c_rank, row in enumerate(r.top.itertuples()):
                out["cell_channels"].append(
                    dict(
                        trace=res.idx,
                        layer=layer,
                        head=head,
                        i=i,
                        j=j,
                        **_channel_values(c_rank, row),
                        **_channel_labels(layer, row, labels),
                    )
                )


def resolve_trace(res: TraceResult, decs: dict, fa_heads, receivers, cfg, tok_text, labels) -> dict:
    """Channels of the anchors (real and null boundaries) per FA head, and of every sentence pair
    for the first FA head (the explorer's cells)."""
    import torch

    seg = res.seg
    tokens_T = torch.tensor(seg.tokens)
    T = len(seg.tokens)
    texts = [tok_text(t) for t in seg.tokens]
    out = {"anchors": [], "anchor_channels": [], "cells": [], "cell_channels": [], "content": [], "null_content": []}
    rec = ta.receiver_scores(res.vert_LHN, receivers)
    by_layer = {}
    for n_head, (layer, head) in enumerate(fa_heads):
        if layer not in by_layer:
            by_layer[layer] = decs[layer].decompose(tokens_T)
        h = _head_inputs(by_layer[layer], head, T, seg.prompt_len, decs[layer].sae.cfg.d_sae)
        shares = _resolve_anchors(res, h, layer, head, rec, cfg, texts, labels, out)
        out["content"].append(float(np.nanmean(shares)) if shares else float("nan"))
        out["null_content"] += _null_content(res, h, receivers, cfg, texts)
        if n_head == 0:
            _resolve_cells(res, h, layer, head, cfg, labels, out)
    return out


# reasoning models TransformerLens does not list by name, loaded into the architecture they share
DISTILL_BASES = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "Qwen/Qwen2.5-1.5B"}


def load_cot_model(name: str):
    """A preset or TransformerLens name (fra.ingest.registry.load_model), or a distilled reasoning
    model of DISTILL_BASES: its Hugging Face weights in the base architecture (needs the hub)."""
    from fra.ingest.registry import LoadedModel, ModelUnavailableError, load_model

    if name not in DISTILL_BASES:
        return load_model(name)
    import torch
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ModelUnavailableError(f"cannot load {name!r} from the Hugging Face hub: {exc}") from exc
    model = HookedTransformer.from_pretrained_no_processing(
        DISTILL_BASES[name], hf_model=hf, tokenizer=tok, dtype=torch.float32
    )
    return LoadedModel(name, model.eval(), tok, tok.bos_token_id)


def _select_traces(cfg: CotReportConfig, tok, traces) -> tuple[list, list[int]]:
    """(idx, trace, segmented) of the traces with enough sentences (cut at max_sentences), and the
    indices of the skipped ones."""
    results = []
    skipped = []
    for idx, tr in enumerate(traces):
        seg = segment(tok, tr.prompt, tr.trace, cfg.max_tokens)
        if seg.n > cfg.max_sentences:
            seg = segment(tok, tr.prompt, tr.trace, seg.token_spans[cfg.max_sentences - 1][1])
        if seg.n < cfg.min_sentences:
            skipped.append(idx)
            continue
        results.append((idx, tr, seg))
    if cfg.max_traces is not None:
        results = results[: cfg.max_traces]
    if len(results) < 2:
        raise ValueError(
            f"only {len(results)} of {len(traces)} traces have >= {cfg.min_sentences} sentences within "
            f"{cfg.max_tokens} tokens; the study needs at least 2 (lower --min-sentences or give longer traces)"
        )
    return results, skipped


def _run_phase1(model, results, cfg: CotReportConfig, rng) -> list[TraceResult]:
    from tqdm import tqdm

    done: list[TraceResult] = []
    for idx, tr, seg in tqdm(results, desc="attention + suppression", unit="trace"):
        p = phase1(model, seg, cfg, rng)
        done.append(
            TraceResult(
                idx,
                seg,
                tr.correct,
                tr.task,
                p["vert"],
                p["kurt"],
                p["blocks"],
                p["kl"],
                p["null_spans"],
                p["null_vert"],
                p["null_kl"],
            )
        )
    return done


def resolve_sae_layers(cfg: CotReportConfig) -> tuple[int, ...]:
    """The layers whose SAEs resolve heads: `--sae-layers`, else every layer with a shipped SAE
    (none for a model without shipped SAEs)."""
    from fra.ingest.registry import shipped_sae_layers

    shipped = shipped_sae_layers(cfg.model) if cfg.model == "smollm2-135m" else ()
    if cfg.sae_layers is None:
        return shipped
    missing = sorted(set(cfg.sae_layers) - set(shipped))
    if missing:
        raise ValueError(
            f"--sae-layers {' '.join(map(str, cfg.sae_layers))}: no shipped SAE for {cfg.model} at layer(s) "
            f"{missing}; shipped: {list(shipped) or 'none'} (train one with `fra train-sae --layers ...`)"
        )
    return tuple(cfg.sae_layers)


def _pick_heads(done: list[TraceResult], cfg: CotReportConfig):
    """Mean kurtosis [L, H], the number of traces that vote, the receiver heads and the FA heads."""
    # kurtosis needs 4 vertical scores (its bound is n - 5 + 1/(n - 1)): shorter traces do not vote
    voters = [r for r in done if r.seg.n >= cfg.proximity + 4] or done
    mean_kurt = np.nanmean(np.stack([r.kurt_LH for r in voters]), 0)
    receivers = ta.top_heads(mean_kurt, cfg.top_receivers)
    in_sae = np.full_like(mean_kurt, np.nan)
    for l in cfg.sae_layers:
        in_sae[l] = mean_kurt[l]
    fa_heads = ta.top_heads(in_sae, cfg.fa_heads)
    return mean_kurt, len(voters), receivers, fa_heads


def _decomposers(cfg: CotReportConfig, model, fa_heads):
    """Decomposers and feature labels of the FA heads' layers, and the FA heads (none without shipped SAEs)."""
    from fra.ingest.core.decompose import Decomposer
    from fra.ingest.registry import feature_labels, load_shipped_sae

    decs = {}
    labels = {}
    if cfg.model == "smollm2-135m":
        decs = {l: Decomposer(model, l, load_shipped_sae(cfg.model, l)) for l in {l for l, _ in fa_heads}}
        labels = feature_labels(cfg.model)
    else:
        fa_heads = []  # no shipped SAEs for other models
    return decs, labels, fa_heads


def _consistency_rows(done, resolved, receivers, cfg: CotReportConfig) -> list[dict]:
    rows = []
    for r, rv in zip(done, resolved):
        rows.append(
            dict(
                trace=r.idx,
                task=r.task,
                correct=r.correct,
                n_sentences=r.seg.n,
                n_tokens=len(r.seg.tokens),
                agreement=consistency(r.vert_LHN, r.kl_NN, receivers, cfg.proximity),
                null_agreement=[consistency(v, k, receivers, cfg.proximity) for v, k in zip(r.null_vert, r.null_kl)],
                content_share=float(np.nanmean(rv["content"])) if rv else float("nan"),
                null_content_share=float(np.nanmean(rv["null_content"])) if rv else float("nan"),
            )
        )
    return rows


def _meta(cfg: CotReportConfig, traces, done, skipped, receivers, fa_heads, n_voters: int) -> dict:
    return dict(
        config={
            k: (str(v) if not isinstance(v, (int, float, bool, type(None), tuple)) else v)
            for k, v in asdict(cfg).items()
        },
        n_traces_file=len(traces),
        n_used=len(done),
        skipped_short=len(skipped),
        receivers=receivers,
        fa_heads=fa_heads,
        kurtosis_traces=n_voters,
        seconds=None,
    )


def run(cfg: CotReportConfig) -> dict:
    import torch
    from tqdm import tqdm

    from .report import write_report
    from .traces import read_jsonl

    if cfg.quick:
        cfg = replace(cfg, max_traces=cfg.max_traces or 6)
    cfg = replace(cfg, sae_layers=resolve_sae_layers(cfg))
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    lm = load_cot_model(cfg.model)
    model, tok = lm.model, lm.tokenizer
    traces = read_jsonl(cfg.traces, tok)
    rng = np.random.default_rng(cfg.seed)
    results, skipped = _select_traces(cfg, tok, traces)
    done = _run_phase1(model, results, cfg, rng)
    mean_kurt, n_voters, receivers, fa_heads = _pick_heads(done, cfg)
    decs, labels, fa_heads = _decomposers(cfg, model, fa_heads)

    def tok_text(t):
        return tok.decode([t])

    resolved = []
    for r in tqdm(done, desc="feature-resolved anchors", unit="trace"):
        resolved.append(resolve_trace(r, decs, fa_heads, receivers, cfg, tok_text, labels) if fa_heads else None)
    rows = _consistency_rows(done, resolved, receivers, cfg)
    meta = _meta(cfg, traces, done, skipped, receivers, fa_heads, n_voters)
    summary = write_report(cfg, traces, done, resolved, rows, mean_kurt, receivers, fa_heads, meta, tok_text)
    summary["seconds"] = time.time() - t0
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary
