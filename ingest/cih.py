"""Conceptual Induction Heads (CIH): induction behaviour inside single feature-pair channels.

Question. H1: every token induction head (TIH) has at least one CIH channel. H2: some heads that
are not TIH have CIH channels too. H3: what the top channels are.

Channel induction score. For head h and channel (i, j), over prompts whose queries q have an
induction target k*:

    margin_ij = mean_q [ FA_ij(q, k*) - mean_{k causal, k != k*} FA_ij(q, k) ]

It is linear in the scores, so summed over all channels plus the non-feature terms it equals the
head's own margin mean_q [score(q, k*) - mean_{k != k*} score(q, k)] exactly (tested). Each
prompt contributes through a weight matrix W[q, k] (+1 at k*, -1/(n-1) at the other causal keys,
divided by the number of target queries), so every margin is sum_{q,k} W[q, k] * term[q, k].

Prompt sets. (a) [BOS] + r + r, random tokens; (b) a held-out corpus span repeated;
(c) conceptual repeats "... the A X ... the B" where B is a synonym, plural or capitalised form of
A (never the same token), the query is B and the target X. Controls: (a') [BOS] + r1 + r2,
(c') A replaced by an unrelated noun (same B, same X), and for every prompt a random target drawn from the same distance
distribution (the "shifted-target" null).

Statistics. Prompts are split in halves. Channels are selected on half A by their margin; on
half B each selected channel's per-prompt margin minus its shifted-target margin is tested with
a sign-flip permutation test, and Benjamini-Hochberg controls the FDR over every (head, channel)
tested. A channel is a CIH channel of a head when, on held-out conceptual prompts (c), it
passes FDR 0.05, its margin is positive and it exceeds its margin on the matched control (c')
where A is replaced by an unrelated noun (sign-flip test on the paired prompts).

Phases: prompts -> per-prompt factored projections (decompose) -> dense [H, F*F] margin
accumulators on half A -> selection -> per-prompt margins of selected channels on half B and
controls -> tests -> report.md, figures and cih.json.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TEMPLATES = (
    "I saw the{A}{X} near the old house. Much later that evening, I kept thinking about the{B}",
    "She bought a{A}{X} at the market on Monday. By the time winter came, she had forgotten the{B}",
    "The report mentioned one{A}{X} in its first section, and at the very end it described the{B}",
)


@dataclass(frozen=True)
class CIHConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, ...] = (17, 18)
    out: Path = Path("reports/cih")
    n_random: int = 40  # prompts in set (a) and in its control (a')
    random_len: int = 30
    n_natural: int = 40  # set (b)
    n_concept: int = 80  # per relation, set (c); the same number of unrelated controls (c')
    relations: tuple[str, ...] = ("synonym", "plural", "capitalised")
    n_select: int = 10  # channels selected per head on half A
    n_perm: int = 2000
    fdr: float = 0.05
    min_census_induction: float = 0.3
    max_census_control: float = 0.05
    corpus: Path = Path(__file__).parent / "assets" / "demo_corpus.parquet"  # held-out, ships in the repo
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.n_random < 4 or self.n_concept < 4 or self.n_natural < 0:
            raise ValueError("need at least 4 prompts per set (they are split in halves)")
        if not 0 < self.fdr < 1:
            raise ValueError("fdr must lie in (0, 1)")


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    tokens: list[int]
    targets: dict[int, int]  # query position -> induction target position
    set: str  # "random", "random_ctrl", "natural", "concept:<relation>", "concept_ctrl:<relation>"
    half: int  # 0 = selection, 1 = evaluation
    meta: dict


def random_prompts(n, L, d_vocab, bos, rng, repeat=True, set_name="random"):
    out = []
    low = 100 if d_vocab > 1000 else 1  # skip the special and byte tokens of a real vocabulary
    for i in range(n):
        r1 = [rng.randrange(low, d_vocab) for _ in range(L)]
        r2 = r1 if repeat else [rng.randrange(low, d_vocab) for _ in range(L)]
        toks = [bos] + r1 + r2
        # the query at position 1 + L + p (second copy of r[p]) targets 1 + p + 1
        targets = {1 + L + p: 2 + p for p in range(1, L)}
        out.append(Prompt(toks, targets, set_name, i % 2, {}))
    return out


def natural_prompts(n, L, tokenizer, bos, rng, corpus: Path):
    from .corpus import read_corpus

    table = read_corpus(corpus, split="heldout")
    out, tries = [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        text = table["text"][rng.randrange(table.num_rows)].as_py()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < L:
            continue
        start = rng.randrange(0, len(ids) - L + 1)
        span = ids[start : start + L]
        toks = [bos] + span + span
        # only queries whose token occurs once in the span: the target is then unambiguous
        targets = {1 + L + p: 2 + p for p in range(1, L) if span.count(span[p]) == 1}
        if targets:
            out.append(Prompt(toks, targets, "natural", len(out) % 2, {}))
    return out


def concept_prompts(pairs, nouns, relation, n, tokenizer, bos, rng):
    """Conceptual repeats "... the A X ... the B" and their controls "... the U X ... the B".

    The control replaces A (not B) with an unrelated noun U, so the query token B and the filler
    X are the same in both prompts and only the earlier word's relation to B differs: a channel
    that fires because of B's own features (plural, capitalised, ...) cannot tell them apart."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for i, (a, b) in enumerate(pairs[:n]):
        x = rng.choice(nouns)
        u = rng.choice([w for w in nouns if w not in (a, b, x) and w[:4] != b.lower()[:4]])
        template = TEMPLATES[i % len(TEMPLATES)]
        pre, post = template.split("{A}{X}")
        pair = []
        for set_name, aw in ((f"concept:{relation}", a), (f"concept_ctrl:{relation}", u)):
            ids = [bos] + enc(pre) + enc(" " + aw) + enc(" " + x) + enc(post.replace("{B}", "")) + enc(" " + b)
            a_pos = 1 + len(enc(pre))
            q = len(ids) - 1
            if ids[a_pos] != enc(" " + aw)[0] or ids[a_pos + 1] != enc(" " + x)[0] or ids[q] == ids[a_pos]:
                break  # tokenisation merged across a boundary, or B is A's token: skip the pair
            pair.append(Prompt(ids, {q: a_pos + 1}, set_name, i % 2, {"A": aw, "B": b, "X": x}))
        if len(pair) == 2:
            out += pair
    return out


def shifted_targets(prompt: Prompt, distances: list[int], rng) -> dict[int, int]:
    """The null: each query's target replaced by a random causal key at a distance drawn from
    the real targets' distance distribution (never the real target, never beyond position 1)."""
    out = {}
    for q, k in prompt.targets.items():
        for _ in range(100):
            d = rng.choice(distances)
            kk = q - d
            if 1 <= kk < q and kk != k:
                out[q] = kk
                break
        else:
            out[q] = max(1, k - 1) if k - 1 != k else k
    return out


def margin_weights(T: int, targets: dict[int, int]):
    """W[q, k]: +1 at the target, -1/(n_other) at every other causal key, / number of queries."""
    import torch

    W = torch.zeros(T, T)
    nq = len(targets)
    for q, k in targets.items():
        W[q, : q + 1] = -1.0 / q  # q other causal keys besides the target (keys 0..q)
        W[q, k] = 1.0
        W[q] /= nq
    return W


def family(p: Prompt) -> str:
    """Selection family of a prompt: random, natural, concept:<relation>, or a control."""
    return p.set


def control_of(fam: str) -> str | None:
    return {"random": "random_ctrl"}.get(fam, fam.replace("concept:", "concept_ctrl:") if fam.startswith("concept:") else None)


def distance_key(p: Prompt) -> str:
    return p.set.split(":")[0].replace("_ctrl", "")


# --------------------------------------------------------------------------------------------
# Per-prompt margins


def prompt_margins(qfeat_HTAE, kfeat_HTAE, feat_idx_TA, live_TA, W_MQK, d_sae):
    """Per-channel margins of one prompt: (global keys [S], values [M, H, S])."""
    import torch

    H, T, A, E = qfeat_HTAE.shape
    M = W_MQK.shape[0]
    qs = torch.nonzero(W_MQK.abs().sum((0, 2)) > 0).flatten()
    uniq, inv = torch.unique(feat_idx_TA[live_TA], return_inverse=True)
    U1 = uniq.shape[0] + 1
    dev = qfeat_HTAE.device
    local = torch.full((T, A), U1 - 1, dtype=torch.long, device=dev)
    local[live_TA] = inv
    V = torch.einsum("hqae,hkbe->hqkab", qfeat_HTAE[:, qs], kfeat_HTAE)  # [H, nq, T, A, A]
    valid = live_TA[qs][:, None, :, None] & live_TA[None, :, None, :]
    keys = (local[qs][:, None, :, None] * U1 + local[None, :, None, :]).expand(len(qs), T, A, A)
    acc = torch.zeros(M, H, U1 * U1, device=dev)
    for m in range(M):
        w = W_MQK[m][qs]  # [nq, T]
        contrib = (V * (w[None, :, :, None, None] * valid)).flatten(1)
        acc[m].index_add_(1, keys.flatten(), contrib)
    nz = torch.nonzero(acc.abs().sum((0, 1)) > 0).flatten()
    u, w_ = nz // U1, nz % U1
    return (uniq[u] * d_sae + uniq[w_]).cpu(), acc[:, :, nz].cpu()


@dataclass
class PromptResult:
    keys: object  # [S] global channel keys
    vals: object  # [M, H, S]: margins under (real target, shifted target)
    head_terms: dict  # per measure: group -> [H] margins of ff / bdec / err / bias / total


def analyse_prompt(model, sae, proj, prompt: Prompt, shifted: dict, device="cpu") -> PromptResult:
    import torch

    from .core.decompose import TERM_NAMES, pair_terms, project_tokens, run_hooks

    toks = torch.tensor(prompt.tokens, device=device)[None]
    hooks = run_hooks(model, proj.layer, sae.cfg.metadata.hook_name, toks)
    acts = sae.encode(hooks.x_BTD)
    sparse, q, k, _ = project_tokens(proj, hooks.x_BTD, acts, sae.W_dec, sae.b_dec, hooks.norm_scale_BT)
    T = toks.shape[1]
    W = torch.stack([margin_weights(T, prompt.targets), margin_weights(T, shifted)]).to(toks.device)
    keys, vals = prompt_margins(q.feat_BHTAE[0], k.feat_BHTAE[0], sparse.feat_idx_BTA[0],
                                sparse.acts_BTA[0] != 0, W, sae.cfg.d_sae)
    terms = pair_terms(q, k)[:, 0]  # [C, H, Q, K]
    groups = {"ff": ["feat_feat"], "bdec": [t for t in TERM_NAMES if "bdec" in t and "err" not in t and "bias" not in t],
              "err": [t for t in TERM_NAMES if "err" in t and "bias" not in t],
              "bias": [t for t in TERM_NAMES if "bias" in t]}
    head_terms = {}
    causal = torch.ones(T, T, device=toks.device).tril().bool()
    score = torch.where(causal, hooks.model_scores_BHQK[0], torch.zeros((), device=toks.device))
    for m, name in enumerate(("real", "shifted")):
        head_terms[name] = {g: torch.einsum("chqk,qk->h", terms[[TERM_NAMES.index(t) for t in ts]], W[m]).tolist()
                            for g, ts in groups.items()}
        head_terms[name]["total"] = torch.einsum("hqk,qk->h", score, W[m]).tolist()
    return PromptResult(keys, vals, head_terms)


# --------------------------------------------------------------------------------------------
# Statistics


def sign_flip_pvalue(diffs, n_perm: int, rng) -> float:
    """One-sided p-value that the mean of paired differences is > 0 (sign-flip permutation)."""
    import torch

    d = torch.as_tensor(diffs, dtype=torch.float64)
    if len(d) == 0:
        return 1.0
    obs = d.mean()
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    signs = torch.randint(0, 2, (n_perm, len(d)), generator=g).double() * 2 - 1
    null = (signs * d).mean(1)
    return float(((null >= obs).sum() + 1) / (n_perm + 1))


def benjamini_hochberg(pvals: list[float]) -> list[float]:
    """BH-adjusted q-values, in the input order."""
    n = len(pvals)
    order = sorted(range(n), key=lambda i: pvals[i])
    q = [0.0] * n
    prev = 1.0
    for rank in range(n, 0, -1):
        i = order[rank - 1]
        prev = min(prev, pvals[i] * n / rank)
        q[i] = prev
    return q


# --------------------------------------------------------------------------------------------
# The study


def run(cfg: CIHConfig) -> dict:
    import torch

    from .studies.census import census
    from .core.decompose import build_projector
    from .registry import load_model
    from .registry import load_shipped_sae

    t_start = time.time()
    rng = random.Random(cfg.seed)
    lm = load_model(cfg.model, device=cfg.device)
    model, tok = lm.model, lm.tokenizer
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. token induction heads, all layers as context
    cen = census(model, 50, 32, lm.bos_id, cfg.seed, cfg.device)
    ind, ctrl = cen["repeat"]["induction"], cen["control"]["induction"]
    tih = {(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)
           if ind[l, h] >= cfg.min_census_induction and ctrl[l, h] < cfg.max_census_control}

    # 2. prompts
    pairs = json.loads((ASSETS / "concept_pairs.json").read_text())
    prompts = random_prompts(cfg.n_random, cfg.random_len, model.cfg.d_vocab, lm.bos_id, rng)
    prompts += random_prompts(cfg.n_random, cfg.random_len, model.cfg.d_vocab, lm.bos_id, rng, repeat=False,
                              set_name="random_ctrl")
    if cfg.n_natural and Path(cfg.corpus).exists():
        prompts += natural_prompts(cfg.n_natural, cfg.random_len, tok, lm.bos_id, rng, cfg.corpus)
    for rel in cfg.relations:
        prompts += concept_prompts(pairs[rel], pairs["nouns"], rel, cfg.n_concept, tok, lm.bos_id, rng)
    distances = {}
    for p in prompts:
        distances.setdefault(distance_key(p), []).extend(q - k for q, k in p.targets.items())
    shifted = [shifted_targets(p, distances[distance_key(p)], rng) for p in prompts]

    report = {"config": {k: str(v) for k, v in asdict(cfg).items()},
              "census": {f"{l}.{h}": {"induction": float(ind[l, h]), "control": float(ctrl[l, h])}
                         for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)},
              "tih": sorted(f"{l}.{h}" for l, h in tih), "layers": {}, "n_prompts": {}}
    for p in prompts:
        report["n_prompts"][p.set] = report["n_prompts"].get(p.set, 0) + 1

    from tqdm import tqdm

    for layer in cfg.layers:
        sae = load_shipped_sae(cfg.model, layer, cfg.device)
        proj = build_projector(model, layer, sae)
        F, H = sae.cfg.d_sae, model.cfg.n_heads
        sets = sorted({p.set for p in prompts})
        sel_acc = {s: torch.zeros(H, F * F) for s in sets if control_of(s) is not None or s == "natural"}
        head_terms = {}  # prompt index -> per-measure head margins by term group
        # pass 1, half A: accumulate every channel's margin per selection family
        with torch.no_grad():
            for i in tqdm([i for i, p in enumerate(prompts) if p.half == 0], desc=f"CIH layer {layer}, half A"):
                r = analyse_prompt(model, sae, proj, prompts[i], shifted[i], cfg.device)
                fam = family(prompts[i])
                if fam in sel_acc:
                    sel_acc[fam].index_add_(1, r.keys, r.vals[0])
                head_terms[i] = r.head_terms
        tests = []
        cancel = {}  # per head and family: how the feature x feature margin splits into + and - channels
        for fam, acc in sel_acc.items():
            n_a = sum(1 for p in prompts if family(p) == fam and p.half == 0)
            if n_a == 0:
                continue
            for h in range(H):
                cancel.setdefault(str(h), {})[fam] = {
                    "positive": float(acc[h].clamp(min=0).sum()) / n_a, "negative": float(acc[h].clamp(max=0).sum()) / n_a,
                    "n_channels": int((acc[h] != 0).sum()), "largest": float(acc[h].max()) / n_a}
            top = (acc / n_a).topk(cfg.n_select, dim=1)
            for h in range(H):
                for rank, key in enumerate(top.indices[h].tolist()):
                    tests.append({"family": fam, "head": h, "key": key, "feat_q": key // F, "feat_k": key % F,
                                  "rank_on_A": rank, "margin_A": float(top.values[h, rank])})
        del sel_acc
        sel_keys = torch.tensor(sorted({t["key"] for t in tests}), dtype=torch.long)
        # pass 2, half B and its controls: keep only the selected channels' per-prompt margins
        per_prompt = {}  # (key, prompt index) -> [M, H] margins under (real, shifted) targets
        with torch.no_grad():
            for i in tqdm([i for i, p in enumerate(prompts) if p.half == 1], desc=f"CIH layer {layer}, half B"):
                r = analyse_prompt(model, sae, proj, prompts[i], shifted[i], cfg.device)
                head_terms[i] = r.head_terms
                hit = torch.isin(r.keys, sel_keys)
                for key, v in zip(r.keys[hit].tolist(), r.vals[:, :, hit].unbind(-1)):
                    per_prompt[(key, i)] = v
        layer_rep = {"heads": {h: {"sets": {}, "channel_sums_half_A": c} for h, c in cancel.items()}}
        # head-level margins and their split into term groups, per set
        for s in sets:
            idx = [i for i, p in enumerate(prompts) if p.set == s]
            for h in range(H):
                hr = layer_rep["heads"].setdefault(str(h), {"sets": {}, "channel_sums_half_A": {}})
                agg = {g: sum(head_terms[i]["real"][g][h] for i in idx) / len(idx)
                       for g in ("ff", "bdec", "err", "bias", "total")}
                agg["shifted_total"] = sum(head_terms[i]["shifted"]["total"][h] for i in idx) / len(idx)
                hr["sets"][s] = agg
        zero = torch.zeros(2, H)
        for t in tests:
            fam = t["family"]
            evals = [i for i, p in enumerate(prompts) if p.half == 1 and family(p) == fam]
            ctrl_set = control_of(fam)
            ctrls = [i for i, p in enumerate(prompts) if p.half == 1 and family(p) == ctrl_set]
            # a channel absent from a prompt contributes exactly 0 there
            real = [float(per_prompt.get((t["key"], i), zero)[0, t["head"]]) for i in evals]
            null = [float(per_prompt.get((t["key"], i), zero)[1, t["head"]]) for i in evals]
            ctrl = [float(per_prompt.get((t["key"], i), zero)[0, t["head"]]) for i in ctrls]
            head_margin = sum(layer_rep["heads"][str(t["head"])]["sets"].get(s, {"total": 0})["total"]
                              for s in {prompts[i].set for i in evals}) / max(1, len({prompts[i].set for i in evals}))
            t.update({
                "margin_B": sum(real) / len(real), "shifted_B": sum(null) / len(null),
                "control_B": sum(ctrl) / len(ctrl) if ctrl else None,
                "p": sign_flip_pvalue([a - b for a, b in zip(real, null)], cfg.n_perm, rng),
                "share_of_head_margin": (sum(real) / len(real)) / head_margin if head_margin else None,
                "n_eval": len(evals),
            })
            if ctrl:  # the control pairs one-to-one with the concept prompts
                t["p_vs_control"] = sign_flip_pvalue([a - b for a, b in zip(real, ctrl)], cfg.n_perm, rng)
        layer_rep["tests"] = tests
        report["layers"][str(layer)] = layer_rep
    # FDR over every test of the study
    all_tests = [t for lr in report["layers"].values() for t in lr["tests"]]
    for t, q in zip(all_tests, benjamini_hochberg([t["p"] for t in all_tests])):
        t["q"] = q
    with_ctrl = [t for t in all_tests if "p_vs_control" in t]
    for t, q in zip(with_ctrl, benjamini_hochberg([t["p_vs_control"] for t in with_ctrl])):
        t["q_vs_control"] = q
    for t in all_tests:
        t["cih"] = (t["family"].startswith("concept:") and t["q"] < cfg.fdr and t["margin_B"] > 0
                    and t.get("q_vs_control", 1.0) < cfg.fdr)
        t.pop("key")
    report["answers"] = answers(report, cfg)
    report["seconds"] = time.time() - t_start
    features = _feature_labels(cfg.model, cfg.layers)
    (out / "cih.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, features, out)
    figures(report, out)
    print(f"CIH report written to {out}/report.md in {report['seconds']:.0f} s")
    print(json.dumps(report["answers"]["summary"], indent=1))
    return report


def answers(report, cfg) -> dict:
    """H1 and H2 for every relation on its own (selection, tests and controls per relation) and
    for any relation; synonyms are the strictest reading, since plural and capitalised forms
    share a stem or spelling with A."""
    tih = set(report["tih"])
    heads_in_layers = [f"{l}.{h}" for l, lr in report["layers"].items() for h in lr["heads"]]
    tih_here = [h for h in heads_in_layers if h in tih]
    per_rel, effects = {}, {}
    for l, lr in report["layers"].items():
        for t in lr["tests"]:
            if t["cih"]:
                rel = t["family"].split(":")[1]
                per_rel.setdefault(rel, {}).setdefault(f"{l}.{t['head']}", 0)
                per_rel[rel][f"{l}.{t['head']}"] += 1
                # effect size: the channel's margin over the matched control, as a share of the
                # head's own margin on these prompts
                head_margin = lr["heads"][str(t["head"])]["sets"][t["family"]]["total"]
                if head_margin > 0:
                    effects.setdefault(rel, []).append((t["margin_B"] - t["control_B"]) / head_margin)
    rels = list(cfg.relations)
    any_rel = {h: sum(per_rel.get(r, {}).get(h, 0) for r in rels) for h in heads_in_layers}

    def verdict(counts):
        if not tih_here:
            return "not applicable: no TIH in these layers"
        return "yes" if all(counts.get(h, 0) > 0 for h in tih_here) else "no"

    out = {"tih_in_layers": tih_here, "cih_channels_per_head": {r: per_rel.get(r, {}) for r in rels}}
    summary = {"tests": sum(len(lr["tests"]) for lr in report["layers"].values())}
    for r in rels + ["any relation"]:
        counts = any_rel if r == "any relation" else per_rel.get(r, {})
        summary[f"H1 [{r}]"] = verdict(counts) + f" ({sum(counts.get(h, 0) > 0 for h in tih_here)} of {len(tih_here)} TIH)"
        summary[f"H2 [{r}]: non-TIH heads with CIH channels"] = sorted(h for h, n in counts.items() if n and h not in tih)
        eff = sorted(e for rr in (rels if r == "any relation" else [r]) for e in effects.get(rr, []))
        if eff:
            summary[f"effect [{r}]: CIH channel margin over control / head margin, median (max)"] = (
                f"{eff[len(eff) // 2]:.4f} ({eff[-1]:.4f}) over {len(eff)} channels")
    out["summary"] = summary
    return out


def _feature_labels(model: str, layers) -> dict:
    from .registry import SAE_DIR

    path = SAE_DIR / model / "features.parquet"
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["layer", "feature", "label"]).to_pylist()
    return {(r["layer"], r["feature"]): r["label"] for r in t}


def write_markdown(report, labels, out: Path) -> None:
    a = report["answers"]
    lines = ["# Conceptual induction heads in SmolLM2-135M", "",
             f"Reproduce: `fra report cih` (seed {report['config']['seed']}); every number is in `cih.json`.", "",
             "## Answers", "",
             "Each relation has its own selection (half A), tests (half B) and matched control; the answers are per "
             "relation and for any relation. Synonyms are the strictest reading: plural and capitalised forms share "
             "a stem or spelling with A, so sub-word features can match them without any concept.", "",
             *[f"- **{k}:** {', '.join(v) if isinstance(v, list) else v}" + ("none" if v == [] else "")
               for k, v in a["summary"].items() if k != "tests"], "",
             f"Tests: {a['summary']['tests']} (head, channel) pairs, each selected on half A and tested on half B; "
             f"Benjamini-Hochberg FDR {report['config']['fdr']} over all of them. A CIH channel needs q < FDR on "
             "conceptual repeats against the shifted-target null, a positive held-out margin, and a margin above "
             "the matched control in which A is replaced by an unrelated noun while B and X stay the same "
             "(paired sign-flip test, BH-adjusted q < FDR over all tests with a control).", "",
             "Prompt counts: " + ", ".join(f"{k} {v}" for k, v in sorted(report["n_prompts"].items())), "",
             "## Token induction heads (census, all layers)", "",
             "TIH (induction >= 0.3 on repeats, < 0.05 on the non-repeating control): " + ", ".join(report["tih"]), "",
             "## Head margins and how they split (mean over prompts)", "",
             "| head | set | margin | ff | b_dec | error | bias | shifted-target margin |", "|---|---|---|---|---|---|---|---|"]
    for l, lr in report["layers"].items():
        for h, hr in lr["heads"].items():
            for s, v in sorted(hr["sets"].items()):
                lines.append(f"| {l}.{h} | {s} | {v['total']:.2f} | {v['ff']:.2f} | {v['bdec']:.2f} | {v['err']:.2f} | "
                             f"{v['bias']:.2f} | {v['shifted_total']:.2f} |")
    lines += ["", "## Top held-out channels per family", "",
              "| head | family | feat_q -> feat_k | labels | margin B | shifted B | control B | share of head margin | q (shifted) | q (control) | CIH |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for l, lr in report["layers"].items():
        for t in sorted(lr["tests"], key=lambda t: (t["head"], t["family"], -t["margin_B"])):
            if t["rank_on_A"] >= 3 and not t["cih"]:
                continue
            lq = labels.get((int(l), t["feat_q"]), "")
            lk = labels.get((int(l), t["feat_k"]), "")
            ctrl = "" if t["control_B"] is None else f"{t['control_B']:.3f}"
            share = "" if t["share_of_head_margin"] is None else f"{t['share_of_head_margin']:.3f}"
            q_ctrl = f"{t['q_vs_control']:.3g}" if "q_vs_control" in t else ""
            lines.append(f"| {l}.{t['head']} | {t['family']} | {t['feat_q']} -> {t['feat_k']}"
                         f"{' (self)' if t['feat_q'] == t['feat_k'] else ''} | {lq} -> {lk} | {t['margin_B']:.3f} | "
                         f"{t['shifted_B']:.3f} | {ctrl} | {share} | {t['q']:.3g} | {q_ctrl} | "
                         f"{'yes' if t['cih'] else ''} |")
    lines += ["", "## H2: how much of a head's feature x feature margin cancels across channels (half A)", "",
              "| head | family | sum of positive channel margins | sum of negative | net | largest single channel | channels |",
              "|---|---|---|---|---|---|---|"]
    for l, lr in report["layers"].items():
        for h, hr in lr["heads"].items():
            for fam, c in sorted(hr.get("channel_sums_half_A", {}).items()):
                lines.append(f"| {l}.{h} | {fam} | {c['positive']:.2f} | {c['negative']:.2f} | "
                             f"{c['positive'] + c['negative']:.2f} | {c['largest']:.3f} | {c['n_channels']:,} |")
    lines += ["", "## H3: the CIH channels as units", ""]
    by_pair = {}
    for l, lr in report["layers"].items():
        for t in lr["tests"]:
            if t["cih"]:
                by_pair.setdefault((int(l), t["feat_q"], t["feat_k"]), []).append(
                    (f"{l}.{t['head']}", t["family"].split(":")[1]))
    lines += ["| layer | feat_q -> feat_k | query label | key label | key reads 'prev token was ...' | self-pair | "
              "heads where it is a CIH channel | relations |", "|---|---|---|---|---|---|---|---|"]
    for (l, fq, fk), hits in sorted(by_pair.items(), key=lambda kv: -len({h for h, _ in kv[1]})):
        lk = labels.get((l, fk), "")
        heads = sorted({h for h, _ in hits}, key=lambda h: int(h.split(".")[1]))
        rels = sorted({r for _, r in hits})
        lines.append(f"| {l} | {fq} -> {fk} | {labels.get((l, fq), '')} | {lk} | {'yes' if '(prev:' in lk else 'no'} | "
                     f"{'yes' if fq == fk else 'no'} | {', '.join(heads)} | {', '.join(rels)} |")
    lines += ["", "![channel margins](margins.png)", "", "![head margins](heads.png)", "",
              "## Caveats", "",
              "- The SAEs are the CPU-budget ones shipped with the repo (see MODEL_CARD.md); their error term carries "
              "a large share of every margin (table above), so a channel-level null result may reflect the SAE.",
              "- Only channels ranked in the top few on half A are tested; a head could still have CIH channels "
              "that rank lower.",
              "- q-values between 0.01 and 0.05 are fragile: re-run with other seeds (`fra report cih --seed N`), "
              "which redraws the fillers, controls and shifted targets, before trusting them."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def figures(report, out: Path) -> None:
    """margins.png: per relation, each tested channel's held-out margin against its matched
    control (CIH channels in red); heads.png: each head's margin on conceptual repeats against
    the matched control."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional; the numbers are in cih.json
        return
    fams = sorted({t["family"] for lr in report["layers"].values() for t in lr["tests"] if t["family"].startswith("concept:")})
    if not fams:
        return
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        pts = [(t["control_B"], t["margin_B"], t["cih"], f"{l}.{t['head']}" in report["tih"])
               for l, lr in report["layers"].items() for t in lr["tests"] if t["family"] == fam]
        for cih_flag, tih_flag, color, label in ((False, False, "tab:gray", "other heads"),
                                                 (False, True, "tab:blue", "TIH"), (True, None, "tab:red", "CIH channel")):
            sel = [(x, y) for x, y, c, t in pts if c == cih_flag and (tih_flag is None or t == tih_flag)]
            if sel:
                ax.scatter(*zip(*sel), s=10, c=color, label=label)
        lim = max(max(abs(x), abs(y)) for x, y, *_ in pts) * 1.05 or 1
        _diagonal_panel(ax, (-lim, lim), "held-out margin, matched control (A replaced)",
                        "held-out margin, conceptual repeat", fam.replace("concept:", "") + " repeats")
    _save(fig, out / "margins.png")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for fam, marker in zip(fams, "os^"):
        xs, ys, cs = [], [], []
        for l, lr in report["layers"].items():
            for h, hr in lr["heads"].items():
                st = hr["sets"]
                ctrl = fam.replace("concept:", "concept_ctrl:")
                if fam in st and ctrl in st:
                    xs.append(st[ctrl]["total"]); ys.append(st[fam]["total"])
                    cs.append("tab:blue" if f"{l}.{h}" in report["tih"] else "tab:gray")
        ax.scatter(xs, ys, c=cs, marker=marker, s=18, label=fam.replace("concept:", ""))
    _diagonal_panel(ax, ax.get_xlim(), "head margin, matched control", "head margin, conceptual repeat",
                    "Heads of the SAE layers (blue: token induction heads)")
    _save(fig, out / "heads.png")


def _diagonal_panel(ax, lim, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, legend and the y = x line that marks 'no effect over the control'."""
    ax.plot(lim, lim, "k--", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
