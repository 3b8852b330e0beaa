"""SAE quality on held-out text, and per-feature statistics and labels (no LLM).

Measures, per layer: L0, fraction of variance explained, dead latents over the evaluated
tokens, the loss increase (nats) and KL divergence when the reconstruction is spliced in at the
hook, compared with zero-ablating the hook; and what attention sees (`metrics.py`): the
variance of every head's query and key vectors that the reconstruction keeps, and the share of
the token induction heads' margins carried by feature x feature terms on random repeats.
Position 0 (the attention sink) is left out of every measure and left unchanged in the splices,
as in training.

Labels: for each feature, the most common tokens among its top activations and the most
common preceding token, e.g. `"the" / "The" (prev: "of")`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..corpus import padded_batches
from ..registry import SAE_DIR, FeatureLabel
from ..registry import shipped_hook as hook_name


@dataclass(frozen=True)
class EvalConfig:
    corpus: Path = opt(Path("data/corpus.parquet"), "corpus built by `fra corpus build`; its heldout split is used")
    model: str = opt("smollm2-135m", "model name (only the default model is supported here)")
    layers: tuple[int, ...] = opt((17, 18), "layers whose SAEs are evaluated")
    sae_dir: Path = opt(SAE_DIR / "smollm2-135m", "directory holding one sae-lens directory per hook")
    n_samples: int = opt(400, "held-out samples for loss, KL, variance explained, QK variance explained and L0")
    n_dead_tokens: int = opt(1_000_000, "held-out tokens scanned for dead latents and labels")
    scan_precision: str = opt("bf16", "matmuls of the feature scan's forward passes: bf16 (faster) or fp32")
    batch_size: int = opt(16, "samples per forward pass")
    top_n: int = opt(12, "top activations kept per feature (labels and contexts)")
    tih_seqs: int = opt(32, "random-repeat sequences for the TIH feature share (seed 1; the census used seed 0)")
    seed: int = opt(0, "seed of the held-out sample order")
    device: str = opt("cpu", "torch device")
    out: Path | None = opt(
        None, "metrics JSON (default: SAE_DIR/eval_metrics.json); features.parquet and features_sample.md go next to it"
    )

    def __post_init__(self):
        if self.n_samples <= 0 or self.n_dead_tokens <= 0:
            raise ValueError("n_samples and n_dead_tokens must be positive")

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.sae_dir) / "eval_metrics.json"


def splice_metrics(model, sae, layer, token_lists, batch_size, device):
    """Clean loss, loss with the SAE reconstruction spliced in, loss with the hook zeroed; KL
    of each from clean. Next-token loss over positions 1..T-1 of every sample."""
    import torch
    import torch.nn.functional as F

    name = hook_name(layer)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl_spliced": 0.0, "kl_zero": 0.0}
    stats = {"sse": 0.0, "sum_x": 0.0, "sum_x2": 0.0, "l0": 0.0, "n": 0, "x": [], "recon": []}
    n_tok = 0
    for _, toks, mask in padded_batches(token_lists, batch_size):
        toks, mask = toks.to(device), mask.to(device)
        keep = mask.clone()
        keep[:, 0] = False

        def splice(x, hook, keep=keep):
            recon = sae.decode(sae.encode(x))
            return torch.where(keep[..., None], recon, x)

        def zero(x, hook, keep=keep):
            return torch.where(keep[..., None], torch.zeros_like(x), x)

        def record(x, hook, keep=keep):
            acts = sae.encode(x[keep])
            recon = sae.decode(acts)
            xs = x[keep]
            stats["sse"] += (xs - recon).pow(2).sum().item()
            stats["sum_x"] = stats["sum_x"] + xs.double().sum(0)
            stats["sum_x2"] += xs.double().pow(2).sum().item()
            stats["l0"] += (acts > 0).sum().item()
            stats["n"] += xs.shape[0]
            stats["x"].append(xs)
            stats["recon"].append(recon)
            return x

        with torch.no_grad():
            logp = {
                "clean": model.run_with_hooks(toks, fwd_hooks=[(name, record)]).log_softmax(-1),
                "spliced": model.run_with_hooks(toks, fwd_hooks=[(name, splice)]).log_softmax(-1),
                "zero": model.run_with_hooks(toks, fwd_hooks=[(name, zero)]).log_softmax(-1),
            }
        tgt = toks[:, 1:]
        valid = mask[:, 1:]
        for key, lp in logp.items():
            nll = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
            sums[key] += nll[valid].sum().item()
        for key in ("spliced", "zero"):
            kl = F.kl_div(logp[key][:, :-1], logp["clean"][:, :-1], log_target=True, reduction="none").sum(-1)
            sums[f"kl_{key}"] += kl[valid].sum().item()
        n_tok += int(valid.sum())
    from .metrics import attention_maps, qk_variance_explained

    qk = qk_variance_explained(attention_maps(model, layer), torch.cat(stats["x"]), torch.cat(stats["recon"]))
    return {
        "qk_ve": qk,
        "loss_clean": sums["clean"] / n_tok,
        "loss_spliced": sums["spliced"] / n_tok,
        "loss_zero_ablated": sums["zero"] / n_tok,
        "loss_increase_spliced": (sums["spliced"] - sums["clean"]) / n_tok,
        "loss_increase_zero_ablated": (sums["zero"] - sums["clean"]) / n_tok,
        "kl_spliced": sums["kl_spliced"] / n_tok,
        "kl_zero_ablated": sums["kl_zero"] / n_tok,
        # total variance about the global mean: sum x^2 - n |mean|^2
        "fve": 1 - stats["sse"] / (stats["sum_x2"] - stats["sum_x"].pow(2).sum().item() / stats["n"]),
        "l0": stats["l0"] / stats["n"],
        "n_eval_tokens": n_tok,
    }


def feature_scan(model, saes: dict, token_lists, batch_size, n_tokens, top_n, device, precision="fp32"):
    """Firing counts, activation sums and top-`top_n` contexts of every feature, per layer."""
    import torch
    from tqdm import tqdm

    from .train import ActivationStream

    layers = sorted(saes)
    d_sae = {l: saes[l].cfg.d_sae for l in layers}
    count = {l: torch.zeros(d_sae[l], dtype=torch.long) for l in layers}
    act_sum = {l: torch.zeros(d_sae[l], dtype=torch.float64) for l in layers}
    top_val = {l: torch.full((d_sae[l], top_n), -1.0) for l in layers}
    top_loc = {l: torch.zeros((d_sae[l], top_n), dtype=torch.long) for l in layers}
    seen = 0
    stream = ActivationStream(model, layers, precision, device)
    bar = tqdm(total=n_tokens, desc="feature scan", unit="tok")
    for start, toks, mask in padded_batches(token_lists, batch_size):
        x = stream(toks, mask)
        mask[:, 0] = False
        B, T = toks.shape
        loc = (torch.arange(B)[:, None] + start) * 4096 + torch.arange(T)[None]  # sample*4096+pos
        loc = loc[mask]
        for l in layers:
            with torch.no_grad():
                acts = saes[l].encode(x[l].to(device)).cpu()
            count[l] += (acts > 0).sum(0)
            act_sum[l] += acts.sum(0).double()
            v, i = acts.T.topk(min(top_n, acts.shape[0]), dim=-1)  # per feature, this batch
            allv = torch.cat([top_val[l], v], 1)
            alll = torch.cat([top_loc[l], loc[i]], 1)
            best = allv.topk(top_n, dim=-1).indices
            top_val[l], top_loc[l] = allv.gather(1, best), alll.gather(1, best)
        seen += int(mask.sum())
        bar.update(int(mask.sum()))
        if seen >= n_tokens:
            break
    bar.close()
    return {"n_tokens": seen, "count": count, "act_sum": act_sum, "top_val": top_val, "top_loc": top_loc}


def context_string(tokens, pos, tokenizer, before=8, after=2) -> str:
    lo = max(1, pos - before)
    left = tokenizer.decode(tokens[lo:pos])
    mid = tokenizer.decode(tokens[pos : pos + 1])
    right = tokenizer.decode(tokens[pos + 1 : pos + 1 + after])
    return f"{left}[[{mid}]]{right}".replace("\n", " ")


def auto_label(tokens_at: list[str], prev_tokens: list[str]) -> FeatureLabel:
    """Most common activating tokens (and the most common preceding token when it dominates)."""
    if not tokens_at:
        return FeatureLabel(())
    common = Counter(t.strip() or repr(t) for t in tokens_at).most_common(3)
    prev, n = Counter(p.strip() or repr(p) for p in prev_tokens).most_common(1)[0]
    return FeatureLabel(tuple(t for t, _ in common), prev if n >= 0.5 * len(prev_tokens) else None)


def feature_table(scan, layer, token_lists, tokenizer):
    """Rows for features.parquet: layer, feature, frequency, mean activation, label, contexts."""
    rows = []
    n = scan["n_tokens"]
    for f in range(scan["count"][layer].shape[0]):
        c = int(scan["count"][layer][f])
        vals = scan["top_val"][layer][f].tolist()
        locs = scan["top_loc"][layer][f].tolist()
        at, prev, ctx = [], [], []
        for v, loc in zip(vals, locs):
            if v <= 0:
                continue
            s, p = divmod(loc, 4096)
            toks = token_lists[s]
            at.append(tokenizer.decode(toks[p : p + 1]))
            prev.append(tokenizer.decode(toks[p - 1 : p]))
            ctx.append(context_string(toks, p, tokenizer))
        label = auto_label(at, prev)
        rows.append(
            {
                "layer": layer,
                "feature": f,
                "frequency": c / n,
                "mean_act_when_active": float(scan["act_sum"][layer][f]) / c if c else 0.0,
                "max_act": max(vals) if vals and vals[0] > 0 else 0.0,
                "label": str(label),
                "top_tokens": list(label.top_tokens),
                "prev_token": label.prev_token,
                "top_contexts": ctx,
            }
        )
    return rows


def run(cfg: EvalConfig) -> dict:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..corpus import read_corpus, tokenize_samples
    from ..registry import SAESource, load_smollm2
    from .metrics import tih_feature_share, tih_heads

    lm = load_smollm2(device=cfg.device)
    table = read_corpus(cfg.corpus, split="heldout")
    idx = list(range(table.num_rows))
    random.Random(cfg.seed).shuffle(idx)
    texts = [table["text"][i].as_py() for i in idx]
    n_scan = min(len(texts), cfg.n_dead_tokens // 60 + 64)
    tokens = tokenize_samples(texts[:n_scan], lm.tokenizer, lm.bos_id, 128)
    saes = {l: SAESource(path=Path(cfg.sae_dir)).load(l, cfg.device)[0] for l in cfg.layers}
    metrics = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "layers": {}}
    scan = feature_scan(lm.model, saes, tokens, 32, cfg.n_dead_tokens, cfg.top_n, cfg.device, cfg.scan_precision)
    feature_rows = []
    for l in cfg.layers:
        m = splice_metrics(lm.model, saes[l], l, tokens[: cfg.n_samples], cfg.batch_size, cfg.device)
        dead = int((scan["count"][l] == 0).sum())
        m.update(
            {
                "dead": dead,
                "dead_fraction": dead / saes[l].cfg.d_sae,
                "dead_scan_tokens": scan["n_tokens"],
                "d_sae": saes[l].cfg.d_sae,
                "k": saes[l].cfg.k,
            }
        )
        heads = tih_heads(l)
        if heads:
            m["tih"] = tih_feature_share(lm.model, l, saes[l], heads, lm.bos_id, n_seqs=cfg.tih_seqs)
        metrics["layers"][str(l)] = m
        feature_rows += feature_table(scan, l, tokens, lm.tokenizer)
    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics, feature_rows = merge_with_existing(out, metrics, feature_rows)
    pq.write_table(pa.Table.from_pylist(feature_rows), out.parent / "features.parquet", compression="zstd")
    out.write_text(json.dumps(metrics, indent=1))
    (out.parent / "features_sample.md").write_text(feature_sample_table(feature_rows, 20, cfg.seed))
    return metrics


def merge_with_existing(out: Path, metrics: dict, feature_rows: list[dict]) -> tuple[dict, list[dict]]:
    """Keep the other layers of an existing eval_metrics.json and features.parquet at `out`: an
    evaluation of some layers replaces only theirs. Every layer entry records the settings it was
    measured with (`config`), since layers of one file may come from different runs."""
    import pyarrow.parquet as pq

    for m in metrics["layers"].values():
        m["config"] = metrics["config"]
    if not out.exists():
        return metrics, feature_rows
    old = json.loads(out.read_text())
    layers = {l: {"config": old.get("config"), **m} for l, m in old.get("layers", {}).items()}
    layers.update(metrics["layers"])
    merged = {"config": metrics["config"], "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))}
    table = out.parent / "features.parquet"
    if table.exists():
        new = {r["layer"] for r in feature_rows}
        feature_rows = [r for r in pq.read_table(table).to_pylist() if r["layer"] not in new] + feature_rows
        feature_rows.sort(key=lambda r: (r["layer"], r["feature"]))
    return merged, feature_rows


def feature_sample_table(rows: list[dict], n: int, seed: int) -> str:
    """Markdown: `n` randomly chosen live features per layer, with label and top contexts."""
    import random

    out = []
    for layer in sorted({r["layer"] for r in rows}):
        live = [r for r in rows if r["layer"] == layer and r["frequency"] > 0]
        pick = sorted(random.Random(seed + layer).sample(live, min(n, len(live))), key=lambda r: r["feature"])
        out += [
            f"### Layer {layer}: {len(pick)} random live features",
            "",
            "| feature | frequency | auto label | top-activating contexts (token in [[ ]]) |",
            "|---|---|---|---|",
        ]
        for r in pick:
            ctx = " · ".join(c.replace("|", "\\|") for c in r["top_contexts"][:3])
            out.append(f"| {r['feature']} | {r['frequency']:.4f} | {r['label'].replace('|', '/')} | {ctx} |")
        out.append("")
    return "\n".join(out)
