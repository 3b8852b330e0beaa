"""`fra export --format neuronpedia-qk`: one prompt's exact QK attribution of a head, written as
Neuronpedia graph JSON with a `qk_tracing_results` object on the head's node.

Neuronpedia's converter (hijohnnylin/neuronpedia, apps/graph/neuronpedia_graph/format_converter.py)
gives each traced attention node

    "qk_tracing_results": {
        "pair_wise_contributors": [[q_node_id, k_node_id, attribution], ...],
        "top_q_marginal_contributors": [[q_node_id, attribution], ...],
        "top_k_marginal_contributors": [[k_node_id, attribution], ...],
    }

FRA fills it with the exact split of the model's score at (query q, key k) of a head: on each side
the SAE features active at that position (one node each), plus three nodes that are never
dropped: the SAE error, the SAE's b_dec and the bias (norm bias, b_Q / b_K; zero for Llama- and
Gemma-style models). Every (query node, key node) pair is listed, so the pairwise attributions
sum to the score that the model computed (up to float32 rounding); each marginal is the sum of
its node's row (query side) or column (key side). The lists are sorted by |attribution|.

This runs the model on the prompt, so it lives on the ingest side (torch); the index commands of
`fra export` stay torch-free.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "neuronpedia-qk"


@dataclass(frozen=True)
class Target:
    layer: int
    head: int
    q: int
    k: int


def _node(node_id: str, feature, feature_type: str, layer: int, pos: int, clerp: str, activation) -> dict:
    # the keys of format_converter.py's make_node
    return {
        "node_id": node_id,
        "jsNodeId": node_id,
        "feature": feature,
        "feature_type": feature_type,
        "layer": layer,
        "ctx_idx": pos,
        "clerp": clerp,
        "activation": activation,
    }


def side_nodes(layer: int, pos: int, feats, acts, token: str, labels: dict) -> list[dict]:
    """The nodes of one position: its active features, then the error, b_dec and bias nodes."""
    nodes = []
    for f, a in zip(feats, acts):
        label = labels.get((layer, f))
        nodes.append(_node(f"{layer}_sae_{f}_{pos}", f, "sae", layer, pos, str(label) if label else f"F{f}", a))
    nodes.append(
        _node(f"{layer}_error_sae_{pos}", None, "sae reconstruction error", layer, pos, f'Err: sae "{token}"', None)
    )
    nodes.append(_node(f"{layer}_bdec_sae_{pos}", None, "bias", layer, pos, "SAE b_dec", None))
    nodes.append(_node(f"{layer}_bias_attn_{pos}", None, "bias", layer, pos, "norm bias + b_Q / b_K", None))
    return nodes


def trace(prepared, target: Target, tokens: list[str], labels: dict | None = None) -> tuple[dict, list[dict], dict]:
    """(target node with its qk_tracing_results, the contributor nodes, facts about the target)
    for one head and one (q, k) of a `Prepared` batch of one prompt."""
    import torch

    labels = labels or {}
    L, h, q, k = target.layer, target.head, target.q, target.k
    live = prepared.live_BTA[0]
    idx, acts = prepared.sparse.feat_idx_BTA[0], prepared.sparse.acts_BTA[0]

    def side(vectors, pos):
        slots = live[pos].nonzero().flatten()
        rows = [vectors.feat_BHTAE[0, h, pos, slots]] + [
            getattr(vectors, f"{c}_BHTE")[0, h, pos][None] for c in ("err", "bdec", "bias")
        ]
        nodes = side_nodes(L, pos, idx[pos, slots].tolist(), acts[pos, slots].tolist(), tokens[pos], labels)
        return torch.cat(rows).double(), nodes

    Q_NE, q_nodes = side(prepared.q, q)
    K_ME, k_nodes = side(prepared.k, k)
    V_NM = Q_NE @ K_ME.T  # exact split: rows are query-side nodes, columns key-side nodes
    by_size = lambda rows: sorted(rows, key=lambda r: -abs(r[-1]))  # noqa: E731
    pairs = by_size(
        [q_nodes[i]["node_id"], k_nodes[j]["node_id"], float(V_NM[i, j])]
        for i in range(len(q_nodes))
        for j in range(len(k_nodes))
    )
    results = {
        "pair_wise_contributors": pairs,
        "top_q_marginal_contributors": by_size([n["node_id"], float(v)] for n, v in zip(q_nodes, V_NM.sum(1))),
        "top_k_marginal_contributors": by_size([n["node_id"], float(v)] for n, v in zip(k_nodes, V_NM.sum(0))),
    }
    scores = prepared.hooks.model_scores_BHQK[0, h, q]
    score = float(scores[k])
    pattern = float(scores.float().softmax(-1)[k])
    target_id = f"{L}_attn_{h}_{q}"
    node = _node(target_id, h, "attention head", L, q, f"L{L}.H{h}: {tokens[q]!r} -> {tokens[k]!r}", score)
    node["qk_tracing_results"] = results
    facts = {
        "node_id": target_id,
        "layer": L,
        "head": h,
        "q": q,
        "k": k,
        "score": score,
        "pattern": pattern,
        "sum_of_contributors": float(V_NM.sum()),
    }
    return node, q_nodes + k_nodes, facts


def qk_graph(model, sae, layer: int, tokens_T, token_strs, heads=None, top_heads=1, q=None, k=None, labels=None):
    """The Neuronpedia graph dict for `heads` (default: the `top_heads` heads whose attention at q
    is most concentrated) at query position q (default: the last) and key k (default: each head's
    highest-scoring visible key)."""
    import torch

    from .core.decompose import Decomposer

    dec = Decomposer(model, layer, sae)
    toks_BT = torch.as_tensor(tokens_T)[None]
    T = toks_BT.shape[1]
    q = T - 1 if q is None else q
    if not 0 <= q < T:
        raise ValueError(f"--q-pos {q} is outside the prompt's {T} tokens")
    p = dec.prepare(toks_BT)
    scores_HK = p.hooks.model_scores_BHQK[0, :, q].float()
    if heads is None:
        peak_H = scores_HK.softmax(-1).max(-1).values
        heads = peak_H.argsort(descending=True)[:top_heads].tolist()
    n_heads = model.cfg.n_heads
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"--head {bad[0]} out of range: layer {layer} has heads 0..{n_heads - 1}")
    visible = dec.mask(T)[q]
    if k is not None and not (0 <= k < T and visible[k]):
        raise ValueError(f"--k-pos {k} is not a key that query {q} can see at layer {layer}")
    nodes, targets = {}, []
    for h in heads:
        kk = int(scores_HK[h].masked_fill(~visible, float("-inf")).argmax()) if k is None else k
        node, contributors, facts = trace(p, Target(layer, h, q, kk), token_strs, labels)
        for n in contributors:
            nodes.setdefault(n["node_id"], n)
        nodes[node["node_id"]] = node
        targets.append(facts)
    return nodes, targets


def graph_json(nodes: dict, targets: list[dict], prompt: str, token_strs, model_name: str, slug: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        fra_version = version("fra")
    except PackageNotFoundError:
        fra_version = "unknown"
    return {
        "metadata": {
            "slug": slug,
            "scan": model_name,
            "prompt": prompt,
            "prompt_tokens": list(token_strs),
            "schema_version": 1,
            "info": {
                "generator": {"name": "fra export --format neuronpedia-qk", "version": fra_version},
                "fra_qk_targets": targets,
            },
        },
        "qParams": {},
        "nodes": list(nodes.values()),
        "links": [],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fra export --format neuronpedia-qk",
        description="Run the model on one prompt and write the exact QK attribution of a head (query "
        "q, key k) as Neuronpedia graph JSON (qk_tracing_results).",
    )
    p.add_argument("--format", choices=[FORMAT], required=True, help="neuronpedia-qk: this exporter")
    p.add_argument(
        "--model", default="smollm2-135m", help="a preset (smollm2-135m, gemma3-270m) or a TransformerLens name"
    )
    p.add_argument("--sae", default=None, help="SAE source (sae-lens dir or RELEASE:ID); default: the preset's")
    p.add_argument("--layer", type=int, required=True, help="the attention layer")
    p.add_argument("--head", type=int, action="append", help="a head to trace (repeatable); default: --top-heads")
    p.add_argument("--top-heads", type=int, default=1, help="without --head: this many heads, most concentrated at q")
    p.add_argument("--prompt", required=True, help="the text (BOS is prepended)")
    p.add_argument("--q-pos", type=int, default=None, help="query position (BOS = 0); default: the last token")
    p.add_argument("--k-pos", type=int, default=None, help="key position; default: each head's highest score at q")
    p.add_argument("--slug", default="fra-qk", help="the graph's slug in its metadata")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cpu", help="torch device")
    return p


def main(argv) -> dict:
    a = build_parser().parse_args(argv)
    from .registry import feature_labels, load_model, sae_source

    if a.top_heads < 1:
        raise ValueError("--top-heads must be >= 1")
    lm = load_model(a.model, device=a.device)
    sae, _ = sae_source(a.model, a.sae).load(a.layer, a.device)
    ids = [lm.bos_id, *lm.tokenizer(a.prompt, add_special_tokens=False)["input_ids"]]
    token_strs = [lm.tokenizer.decode([i]) for i in ids]
    labels = feature_labels(a.model)
    nodes, targets = qk_graph(lm.model, sae, a.layer, ids, token_strs, a.head, a.top_heads, a.q_pos, a.k_pos, labels)
    doc = graph_json(nodes, targets, a.prompt, token_strs, a.model, a.slug)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(a.out)
    for t in targets:
        print(
            f"L{t['layer']}.H{t['head']} q={t['q']} k={t['k']}: score {t['score']:.4f} "
            f"(contributors sum to {t['sum_of_contributors']:.4f}), attention {t['pattern']:.3f}"
        )
    print(f"wrote {a.out}")
    return doc
