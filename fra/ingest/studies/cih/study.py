"""Runs the CIH study: prompts -> model -> decomposed query rows -> selection -> tests -> report.

Per seed and relation: the selection half (selection pairs x selection templates) ranks every
channel of every head by its mean conceptual-minus-control margin contrast and keeps the top
`n_select` per head; their union is the set of units (layer, feat_q, feat_k). The test half
(the other pairs x the test-only templates) measures each unit in every head of its layer, each
head's own contrast, the causal removals and the gating activations (analysis.py).
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from .analysis import PromptRow, aggregate, answers, head_stats, pairs_of, seed_findings, unit_tests, with_bh
from .config import CIHConfig
from .measure import gather_units, margin_weights, random_matched_removal, row_channels, row_groups
from .prompts import TEMPLATES, load_lexicon, split_templates, study_prompts
from .results import SeedResult


class Setup:
    """Model, SAEs and projectors, loaded once."""

    def __init__(self, cfg: CIHConfig):
        from fra.ingest.core.decompose import Decomposer
        from fra.ingest.registry import load_model, load_shipped_sae

        self.lm = load_model(cfg.model, device=cfg.device)
        self.model = self.lm.model
        tok = self.lm.tokenizer
        self.encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        self.saes = {L: load_shipped_sae(cfg.model, L, cfg.device) for L in cfg.layers}
        # the validated entry: model and SAEs are checked once, and their projections reused
        self.projs = {L: Decomposer(self.model, L, self.saes[L]).proj for L in cfg.layers}
        self.layers = tuple(cfg.layers)


def batches(prompts, size: int):
    """Prompts of one template have one length: batch them together (pairs stay adjacent)."""
    by = defaultdict(list)
    for p in prompts:
        by[p.template].append(p)
    for ps in by.values():
        for i in range(0, len(ps), size):
            yield ps[i : i + size]


@torch.no_grad()
def measure_batch(setup: Setup, prompts, unit_keys: dict | None, n_draws: int, gen: torch.Generator):
    """Selection mode (unit_keys None): per layer, a list of (prompt, keys_S, margin_HS).
    Test mode: per layer, a list of PromptRow. Also returns the largest |groups - scores|."""
    model = setup.model
    toks = torch.tensor([p.tokens for p in prompts], device=model.cfg.device)
    names = {
        n for L in setup.layers for n in (setup.saes[L].cfg.metadata.hook_name, f"blocks.{L}.attn.hook_attn_scores")
    }
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names, stop_at_layer=max(setup.layers) + 1)
    from fra.ingest.core.decompose import project_tokens

    out, resid = {}, 0.0
    for L in setup.layers:
        sae, proj = setup.saes[L], setup.projs[L]
        F = sae.cfg.d_sae
        x = cache[sae.cfg.metadata.hook_name]
        acts = sae.encode(x)
        sparse, q, k, _ = project_tokens(proj, x, acts, sae.W_dec, sae.b_dec)
        scores_BHQK = cache[f"blocks.{L}.attn.hook_attn_scores"].float()
        live_BTA = sparse.acts_BTA != 0
        rows = []
        for b, p in enumerate(prompts):
            qp, T = p.q_pos, len(p.tokens)
            keys, contrib = row_channels(
                q.feat_BHTAE[b, :, qp],
                k.feat_BHTAE[b],
                sparse.feat_idx_BTA[b, qp],
                live_BTA[b, qp],
                sparse.feat_idx_BTA[b],
                live_BTA[b],
                F,
            )
            groups = row_groups(q, k, b, qp)
            scores = scores_BHQK[b, :, qp, :T]
            resid = max(resid, float((groups.sum(0) - scores).abs().max()))
            if unit_keys is None:
                rows.append((p, keys, contrib @ margin_weights(T, p.x_pos, qp)))
                continue
            uk = unit_keys[L]
            units, unit_idx = gather_units(keys, contrib, uk)
            if p.role == "concept" and len(uk):
                rand_p = random_matched_removal(scores, contrib, unit_idx, p.x_pos, n_draws, gen)
            else:
                rand_p = torch.full((len(uk), scores.shape[0]), float("nan"))
            dense_TF = torch.zeros(T, F).scatter_add_(1, sparse.feat_idx_BTA[b], sparse.acts_BTA[b].float())
            fq, fk = uk // F, uk % F
            others = [t for t in range(1, qp + 1) if t != p.x_pos]
            rows.append(
                PromptRow(
                    p,
                    L,
                    groups,
                    scores,
                    units,
                    rand_p,
                    dense_TF[qp, fq],
                    dense_TF[p.x_pos, fk],
                    (dense_TF[others][:, fk] > 0).float().mean(0),
                )
            )
        out[L] = rows
    return out, resid


def select_units(sel_rows, n_heads: int, n_select: int) -> tuple[torch.Tensor, dict]:
    """Top n_select channels per head by mean conceptual-minus-control margin on the selection half.
    Returns the sorted unit keys and, per key, head -> its mean selection contrast."""
    by_pair = defaultdict(dict)
    for p, keys, margin in sel_rows:
        by_pair[p.pair_id][p.role] = (keys, margin)
    keys_all, vals_all, n = [], [], 0
    for d in by_pair.values():
        if len(d) != 2:
            continue
        n += 1
        for role, sign in (("concept", 1.0), ("control", -1.0)):
            keys_all.append(d[role][0])
            vals_all.append(sign * d[role][1])
    if n == 0:
        return torch.zeros(0, dtype=torch.long), {}
    keys = torch.cat(keys_all)
    uniq, inv = torch.unique(keys, return_inverse=True)
    acc = torch.zeros(n_heads, uniq.shape[0], dtype=torch.float64)
    acc.index_add_(1, inv, torch.cat(vals_all, 1).double())
    acc /= n
    top = acc.topk(min(n_select, uniq.shape[0]), dim=1)
    selected = defaultdict(dict)
    for h in range(n_heads):
        for v, i in zip(top.values[h].tolist(), top.indices[h].tolist()):
            selected[int(uniq[i])][h] = v
    return torch.tensor(sorted(selected), dtype=torch.long), dict(selected)


def run_relation(setup, cfg: CIHConfig, prompts, rel: str, tih: set, seed: int, gen: torch.Generator):
    """Selection on half 0, then every test on half 1, for one relation. Returns the head
    stats and unit tests (BH applied over this relation) and the largest decomposition residual."""
    H = setup.model.cfg.n_heads
    sel_rows, test_rows, resid = defaultdict(list), defaultdict(list), 0.0
    for batch in batches([p for p in prompts if p.half == 0], cfg.batch_size):
        rows, r = measure_batch(setup, batch, None, cfg.n_random_draws, gen)
        resid = max(resid, r)
        for L, rs in rows.items():
            sel_rows[L] += rs
    units = {L: select_units(sel_rows[L], H, cfg.n_select) for L in setup.layers}
    del sel_rows
    unit_keys = {L: u[0] for L, u in units.items()}
    for batch in batches([p for p in prompts if p.half == 1], cfg.batch_size):
        rows, r = measure_batch(setup, batch, unit_keys, cfg.n_random_draws, gen)
        resid = max(resid, r)
        for L, rs in rows.items():
            test_rows[L] += rs
    heads, tests = [], []
    for L in setup.layers:
        pairs = pairs_of(test_rows[L])
        hs = head_stats(pairs, rel, L, tih, cfg.n_perm, seed)
        heads += hs
        tests += unit_tests(
            pairs, rel, L, unit_keys[L].tolist(), units[L][1], setup.saes[L].cfg.d_sae, hs, cfg.n_perm, seed + 1
        )
    return with_bh(heads), with_bh(tests), resid


def run_seed(setup: Setup, cfg: CIHConfig, lex, relations, tih: set, seed: int, progress: bool = True) -> SeedResult:
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    heads, tests, n_pairs, resid = [], [], [], 0.0
    for rel in relations:
        prompts = study_prompts(rel, lex, cfg.n_pairs, setup.encode, setup.lm.bos_id, seed)
        rel_heads, rel_tests, r = run_relation(setup, cfg, prompts, rel, tih, seed, gen)
        resid = max(resid, r)
        heads += rel_heads
        tests += rel_tests
        n_pairs.append(
            (rel, len({p.pair_id for p in prompts if p.half == 0}), len({p.pair_id for p in prompts if p.half == 1}))
        )
        if progress:
            n_found = len(seed_findings(rel_tests, rel_heads, cfg.fdr, cfg.gate_ratio))
            print(
                f"  seed {seed} {rel}: {n_pairs[-1][1]}+{n_pairs[-1][2]} pairs, "
                f"{len({(t.layer, t.feat_q, t.feat_k) for t in rel_tests})} units, {n_found} findings, "
                f"{time.time() - t0:.0f} s",
                flush=True,
            )
    sel_t, test_t = split_templates(len(TEMPLATES), random.Random(seed))
    return SeedResult(
        seed,
        sel_t,
        test_t,
        tuple(n_pairs),
        tuple(heads),
        tuple(tests),
        tuple(seed_findings(tests, heads, cfg.fdr, cfg.gate_ratio)),
        resid,
        time.time() - t0,
    )


def feature_labels(model: str) -> dict:
    """(layer, feature) -> the label text of the shipped feature table ({} when there is none)."""
    from fra.ingest.registry import feature_labels as structured

    return {key: str(label) for key, label in structured(model).items()}


def run(cfg: CIHConfig, progress: bool = True):
    """The whole study; writes report.md, cih.json and the figures into cfg.out."""
    from fra.ingest.studies.census import load_census

    from .report import write_report

    t0 = time.time()
    run_cfg = cfg.effective()
    torch.set_num_threads(run_cfg.threads)
    torch.manual_seed(0)
    setup = Setup(run_cfg)
    census = load_census(run_cfg.model)
    tih = set(census["token_induction_heads"])
    lex = load_lexicon()
    skipped = {
        r: len(lex.relations.get(r, []))
        for r in run_cfg.relations
        if r != "placebo" and len(lex.relations.get(r, [])) < run_cfg.min_pairs_relation
    }
    relations = [r for r in run_cfg.relations if r not in skipped]
    seeds = []
    for seed in run_cfg.seeds:
        seeds.append(run_seed(setup, run_cfg, lex, relations, tih, seed, progress))
    labels = feature_labels(run_cfg.model)
    kinds = lex.kinds
    findings = aggregate(seeds, kinds, run_cfg.min_pass, labels)
    tih_here = sorted(h for h in tih if int(h.split(".")[0]) in run_cfg.layers)
    ans = answers(seeds, findings, tih_here, relations, kinds, run_cfg.min_pass, run_cfg.fdr)
    # downstream check of the headline findings (at most 12, largest share first), first seed's prompts
    from .causal import logprob_effects

    logprob = []
    for f in sorted([f for f in findings if f.headline], key=lambda f: -f.share)[:12]:
        prompts = study_prompts(f.relation, lex, run_cfg.n_pairs, setup.encode, setup.lm.bos_id, run_cfg.seeds[0])
        logprob.append(logprob_effects(setup, run_cfg, f, prompts))
    out = Path(cfg.out)
    write_report(
        out, cfg, run_cfg, setup, census, lex, relations, skipped, seeds, findings, ans, time.time() - t0, logprob
    )
    if progress:
        print(f"CIH report written to {out}/report.md in {time.time() - t0:.0f} s")
    return seeds, findings, ans


def _rounded(x):
    """Floats to 6 significant digits (cih.json stays small; no number in the report needs more)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def save_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_rounded(doc), indent=0, default=str))
    tmp.rename(path)
