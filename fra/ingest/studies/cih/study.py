"""Runs the CIH study: prompts -> model -> decomposed query rows -> per-pair units -> tables.

Per seed and relation, two phases over the same pairs:
- selection templates (conceptual and control prompts): each pair's channel contrasts
  (conceptual minus control margin, per channel and head) are summed over its selection
  templates; the pair's top channels, top query-feature marginals and top key-feature marginals
  are kept per head, and so are the top channels over all selection pairs (the fixed unit, one
  set for every pair). The in-sample concentration (how much of each prompt pair's feature x
  feature contrast its own top 1, 5, 20, 100 channels carry) is recorded here.
- held-out templates (conceptual, control and anchor-swap prompts): every unit is measured on
  templates it was not selected on: its contrast, its anchor-swap contrast, the drop of attention
  on X when it is removed from the head's scores (against random channels matched on their
  contribution at X, and against removing the SAE-error terms), and the gating labels of its
  channels. Head-level rows (attention on X, term groups, log P(X)) are recorded too.
The outputs are flat records (tables.py writes them to Parquet); analysis.py turns them into tests
and answers. Nothing here decides anything.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CIHConfig
from .measure import (
    GROUPS,
    RowEntries,
    batch_groups,
    channel_labels,
    coalesce,
    difference,
    gather_keys,
    margin_weights,
    marginal,
    p_target,
    row_entries,
    top_keys,
    unit_mask,
    x_matched_random_drop,
)
from .prompts import Prompt, x_kind

UNITS = ("channel", "query", "key", "fixed")  # per-pair channels, per-pair feature marginals, fixed channels
CURVE_N = (1, 5, 20, 100)


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


@dataclass
class Row:
    """The query row of one prompt at one layer."""

    entries: RowEntries  # the feature x feature terms, sparse
    groups_GHT: Tensor  # ff, bdec, err, bias; they sum to scores_HT
    scores_HT: Tensor  # hook_attn_scores[h, q, :]
    act_b_F: Tensor  # SAE activations at B (dense)
    act_x_F: Tensor  # ... and at X
    logp_x: float  # log P(X) as the next token after B (NaN when the pass stopped early)


def pair_groups(prompts: list[Prompt], size: int):
    """Batches of whole (pair, template) groups that share one template (so one length)."""
    by = defaultdict(list)
    for p in prompts:
        by[(p.half, p.template)].append(p)
    for ps in by.values():
        groups = defaultdict(list)
        for p in ps:
            groups[p.pair_id].append(p)
        batch = []
        for g in groups.values():
            batch += g
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch


@torch.no_grad()
def measure_rows(setup: Setup, prompts: list[Prompt], full: bool) -> tuple[list[dict], float]:
    """Per prompt, {layer: Row}; `full` runs every layer to get log P(X). Also returns the largest
    |sum of term groups - hook_attn_scores|."""
    from fra.ingest.core.decompose import project_tokens

    model = setup.model
    toks = torch.tensor([p.tokens for p in prompts], device=model.cfg.device)
    names = {
        n for L in setup.layers for n in (setup.saes[L].cfg.metadata.hook_name, f"blocks.{L}.attn.hook_attn_scores")
    }
    stop = None if full else max(setup.layers) + 1
    logits, cache = model.run_with_cache(toks, names_filter=lambda n: n in names, stop_at_layer=stop)
    if full:
        x_tok = torch.tensor([p.tokens[p.x_pos] for p in prompts], device=logits.device)
        logp = logits[:, -1].float().log_softmax(-1).gather(1, x_tok[:, None])[:, 0].cpu().tolist()
    else:
        logp = [float("nan")] * len(prompts)
    out = [{} for _ in prompts]
    resid = 0.0
    for L in setup.layers:
        sae, proj = setup.saes[L], setup.projs[L]
        F = sae.cfg.d_sae
        x = cache[sae.cfg.metadata.hook_name]
        acts = sae.encode(x)
        sparse, q, k, _ = project_tokens(proj, x, acts, sae.W_dec, sae.b_dec)
        scores_BHQK = cache[f"blocks.{L}.attn.hook_attn_scores"].float()
        live_BTA = sparse.acts_BTA != 0
        if len({len(p.tokens) for p in prompts}) != 1:
            raise ValueError("a batch must hold prompts of one length (one template)")
        groups_BGHT = batch_groups(q, k, prompts[0].q_pos)
        for b, p in enumerate(prompts):
            qp, T = p.q_pos, len(p.tokens)
            entries = row_entries(
                q.feat_BHTAE[b, :, qp],
                k.feat_BHTAE[b],
                sparse.feat_idx_BTA[b, qp],
                live_BTA[b, qp],
                sparse.feat_idx_BTA[b],
                live_BTA[b],
                F,
            )
            groups = groups_BGHT[b, :, :, :T]
            scores = scores_BHQK[b, :, qp, :T]
            resid = max(resid, float((groups.sum(0) - scores).abs().max()))
            dense = torch.zeros(2, F)
            for i, t in enumerate((qp, p.x_pos)):
                dense[i].scatter_add_(0, sparse.feat_idx_BTA[b, t], sparse.acts_BTA[b, t].float())
            out[b][L] = Row(entries, groups.float(), scores, dense[0], dense[1], logp[b])
    return out, resid


def _curve_sums(vals_HN: Tensor) -> list[list[float]]:
    """Per head, the cumulative sums of the first 1, 5, 20, 100 values."""
    cum = vals_HN.cumsum(1)
    n = cum.shape[1]
    return [[float(cum[h, min(m, n) - 1]) if n else 0.0 for m in CURVE_N] for h in range(cum.shape[0])]


class Selection:
    """Phase 1 state: per pair and layer, the summed channel contrasts over its selection templates."""

    def __init__(self):
        self.acc = defaultdict(list)  # (pair_id, layer) -> [(keys_D, d_HD)]
        self.n_t = defaultdict(int)  # pair_id -> selection templates measured
        self.fixed = defaultdict(list)  # layer -> [(keys, d)] over selection pairs
        self.curves = []

    def add(self, c: Prompt, rows_c: dict, rows_u: dict, seed: int, d_sae: dict):
        self.n_t[c.pair_id] += 1
        for L, rc in rows_c.items():
            ru = rows_u[L]
            w = margin_weights(len(c.tokens), c.x_pos, c.q_pos)
            keys, d = difference(rc.entries.keys_S, rc.entries.values(w), ru.entries.keys_S, ru.entries.values(w))
            self.acc[(c.pair_id, L)].append((keys, d))
            if c.pair_set == 0:
                self.fixed[L].append((keys, d))
                if len(self.fixed[L]) >= 32:
                    self.fixed[L] = [
                        coalesce(torch.cat([k for k, _ in self.fixed[L]]), torch.cat([v for _, v in self.fixed[L]], 1))
                    ]
            ff = d.sum(1)
            F = d_sae[L]
            for unit, vv in (("channel", d), ("query", marginal(keys, d, F, "q")), ("key", marginal(keys, d, F, "k"))):
                top = vv.topk(min(max(CURVE_N), vv.shape[1]), dim=1).values
                for h, sums in enumerate(_curve_sums(top)):
                    self.curves.append(
                        dict(
                            seed=seed, relation=c.relation, pair_id=c.pair_id, template=c.template, layer=L, head=h,
                            unit=unit, sample="in-sample", ff=float(ff[h]),
                            **{f"top{m}": s for m, s in zip(CURVE_N, sums)},
                        )
                    )  # fmt: skip

    def units(self, layers, d_sae: dict, n: int) -> dict:
        """(pair_id or None for fixed, layer) -> {unit kind: top keys [H, n] by mean contrast}."""
        out = {}
        for (pid, L), parts in self.acc.items():
            keys, d = coalesce(torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts], 1))
            d = d / self.n_t[pid]
            qm, km = marginal(keys, d, d_sae[L], "q"), marginal(keys, d, d_sae[L], "k")
            ar = torch.arange(d_sae[L])
            out[(pid, L)] = {"channel": top_keys(keys, d, n), "query": top_keys(ar, qm, n), "key": top_keys(ar, km, n)}
        for L in layers:
            if self.fixed[L]:
                keys, d = coalesce(
                    torch.cat([k for k, _ in self.fixed[L]]), torch.cat([v for _, v in self.fixed[L]], 1)
                )
                out[(None, L)] = top_keys(keys, d, n)
        return out


def _unit_values(row: Row, w: Tensor, sel_HN: Tensor, kind: str, d_sae: int) -> Tensor:
    m_HS = row.entries.values(w)
    if kind in ("channel", "fixed"):
        return gather_keys(row.entries.keys_S, m_HS, sel_HN)
    dense = marginal(row.entries.keys_S, m_HS, d_sae, "q" if kind == "query" else "k")
    return dense.gather(1, sel_HN.clamp(min=0)) * (sel_HN >= 0)


def _labels(kind: str, sel_HN: Tensor, rc: Row, ru: Row, d_sae: int, floor: float, ratio: float) -> list[list[str]]:
    """Per head and unit, the gating label (measure.channel_labels; for a feature marginal only its
    own side is labelled: a query feature 'gated query' or 'matching' (fires at B either way), a key
    feature 'matching' (fires at X less without A) or 'ungated')."""
    out = []
    for h in range(sel_HN.shape[0]):
        s = sel_HN[h].clamp(min=0)
        fq, fk = s // d_sae, s % d_sae
        if kind in ("channel", "fixed"):
            lab = channel_labels(rc.act_b_F[fq], ru.act_b_F[fq], rc.act_x_F[fk], ru.act_x_F[fk], floor, ratio)
        elif kind == "query":
            big = torch.full_like(rc.act_x_F[s], 1e9)
            lab = channel_labels(rc.act_b_F[s], ru.act_b_F[s], big, big * 0, floor, ratio)
        else:
            big = torch.full_like(rc.act_x_F[s], 1e9)
            lab = channel_labels(big, big, rc.act_x_F[s], ru.act_x_F[s], floor, ratio)
        out.append(lab)
    return out


def held_out(
    trio: dict,
    rows: dict,
    units: dict,
    cfg: CIHConfig,
    seed: int,
    d_sae: dict,
    gen: torch.Generator,
    detail: set | None = None,
) -> tuple[list, list, list, list]:
    """Every measurement on one (pair, held-out template): head rows, unit group rows, held-out
    curve rows and the groups' member rows. The random-channel removals and the member rows are
    made only for the heads in `detail` ((layer, head) pairs; None = every head)."""
    c, u, s = trio["concept"], trio["control"], trio["swap"]
    rc_all, ru_all, rs_all = rows[c], rows[u], rows[s]
    w = margin_weights(len(c.tokens), c.x_pos, c.q_pos)
    x = c.x_pos
    base = dict(seed=seed, relation=c.relation, pair_id=c.pair_id, template=c.template, x_kind=x_kind(c.template))
    heads, groups, curves, chans = [], [], [], []
    N = cfg.group_size
    for L in rc_all:
        rc, ru, rs = rc_all[L], ru_all[L], rs_all[L]
        H = rc.scores_HT.shape[0]
        F = d_sae[L]
        hc, hu, hs = rc.scores_HT @ w, ru.scores_HT @ w, rs.scores_HT @ w
        gd = (rc.groups_GHT - ru.groups_GHT) @ w  # [G, H]
        pc, pu, ps = p_target(rc.scores_HT, x), p_target(ru.scores_HT, x), p_target(rs.scores_HT, x)
        p_noerr = p_target(rc.scores_HT - rc.groups_GHT[GROUPS.index("err")], x)
        for h in range(H):
            heads.append(
                dict(
                    **base, layer=L, head=h, contrast=float(hc[h] - hu[h]), swap_contrast=float(hs[h] - hu[h]),
                    **{f"contrast_{g}": float(gd[i, h]) for i, g in enumerate(GROUPS)},
                    attn_x=float(pc[h]), attn_x_control=float(pu[h]), attn_x_swap=float(ps[h]),
                    attn_x_no_error=float(p_noerr[h]), logp_x=rc.logp_x, logp_x_control=ru.logp_x,
                    logp_x_swap=rs.logp_x,
                )
            )  # fmt: skip
        ff = gd[GROUPS.index("ff")]
        for kind in UNITS:
            key = (None, L) if kind == "fixed" else (c.pair_id, L)
            if key not in units:
                continue
            sel = units[key] if kind == "fixed" else units[key][kind]
            vc, vu, vs = (_unit_values(r, w, sel, kind, F) for r in (rc, ru, rs))
            d, dsw = vc - vu, vs - vu
            for h, sums in enumerate(_curve_sums(d)):
                curves.append(
                    dict(
                        **base, layer=L, head=h, unit=kind, sample="held-out", ff=float(ff[h]),
                        **{f"top{m}": v for m, v in zip(CURVE_N, sums)},
                    )
                )  # fmt: skip
            g_sel = sel[:, :N]
            mask = unit_mask(rc.entries.keys_S, g_sel, F, kind)
            removed = rc.entries.removed(mask)
            drop = pc - p_target(rc.scores_HT - removed, x)
            want = torch.tensor([detail is None or (L, h) in detail for h in range(H)])
            target = torch.where(want, removed[:, x], torch.full_like(removed[:, x], float("nan")))
            rand = x_matched_random_drop(rc.scores_HT, rc.entries, mask, target, x, cfg.n_random_draws, gen)
            labs = _labels(kind, g_sel, rc, ru, F, cfg.act_floor, cfg.gate_ratio)
            gdc = d[:, :N]
            for h in range(H):
                pos = gdc[h].clamp(min=0)
                tot = float(pos.sum())
                frac = {lab: 0.0 for lab in ("matching", "gated query", "ungated", "weak")}
                for v, lab in zip(pos.tolist(), labs[h]):
                    frac[lab] += v / tot if tot > 0 else 0.0
                groups.append(
                    dict(
                        **base, layer=L, head=h, unit=kind, contrast=float(gdc[h].sum()),
                        swap_contrast=float(dsw[h, :N].sum()), x_contrib=float(removed[h, x]),
                        attn_drop=float(drop[h]), attn_drop_random=float(rand[h]),
                        attn_drop_error=float(pc[h] - p_noerr[h]),
                        **{f"frac_{k.replace(' ', '_')}": v for k, v in frac.items()},
                    )
                )  # fmt: skip
                if kind == "fixed" or not bool(want[h]):
                    continue
                for r in range(N):
                    key_ = int(g_sel[h, r])
                    if key_ < 0:
                        continue
                    fq, fk = {"channel": (key_ // F, key_ % F), "query": (key_, -1), "key": (-1, key_)}[kind]
                    qa = [float(r_.act_b_F[fq]) if fq >= 0 else float("nan") for r_ in (rc, ru, rs)]
                    ka = [float(r_.act_x_F[fk]) if fk >= 0 else float("nan") for r_ in (rc, ru, rs)]
                    chans.append(
                        dict(
                            **base, layer=L, head=h, unit=kind, rank=r, feat_q=fq, feat_k=fk,
                            contrast=float(gdc[h, r]), swap_contrast=float(dsw[h, r]),
                            q_act=qa[0], q_act_control=qa[1], q_act_swap=qa[2],
                            k_act_x=ka[0], k_act_x_control=ka[1], k_act_x_swap=ka[2], label=labs[h][r],
                        )
                    )  # fmt: skip
    return heads, groups, curves, chans


def run_relation(
    setup, cfg: CIHConfig, prompts: list[Prompt], seed: int, gen: torch.Generator, progress=None, detail=None
):
    """Phase 1 then phase 2 for one relation; returns the record lists and the largest residual.
    `detail`: the (layer, head) pairs that get random-channel removals and member rows (None: all)."""
    d_sae = {L: setup.saes[L].cfg.d_sae for L in setup.layers}
    sel = Selection()
    resid = 0.0
    for batch in pair_groups([p for p in prompts if p.half == 0], cfg.batch_size):
        rows, r = measure_rows(setup, batch, full=False)
        resid = max(resid, r)
        by = defaultdict(dict)
        for p, row in zip(batch, rows):
            by[p.pair_id][p.role] = (p, row)
        for d in by.values():
            if "concept" in d and "control" in d:
                sel.add(d["concept"][0], d["concept"][1], d["control"][1], seed, d_sae)
        if progress:
            progress(len(batch))
    units = sel.units(setup.layers, d_sae, max(CURVE_N + (cfg.group_size,)))
    curves = sel.curves
    del sel
    heads, groups, chans = [], [], []
    for batch in pair_groups([p for p in prompts if p.half == 1], cfg.batch_size):
        rows, r = measure_rows(setup, batch, full=True)
        resid = max(resid, r)
        by = defaultdict(dict)
        row_of = {}
        for p, row in zip(batch, rows):
            by[p.pair_id][p.role] = p
            row_of[p] = row
        for trio in by.values():
            if len(trio) != 3:
                continue
            # the fixed unit is evaluated on test pairs only (it was selected on the selection pairs)
            us = {k: v for k, v in units.items() if k[0] is not None or trio["concept"].pair_set == 1}
            h, g, cv, ch = held_out(trio, row_of, us, cfg, seed, d_sae, gen, detail)
            heads += h
            groups += g
            curves += cv
            chans += ch
        if progress:
            progress(len(batch))
    return dict(heads=heads, groups=groups, curves=curves, members=members_per_pair(chans)), resid


def members_per_pair(rows: list[dict]) -> list[dict]:
    """Member rows averaged over a pair's held-out templates (the label: the commonest)."""
    if not rows:
        return []
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = ["seed", "relation", "pair_id", "layer", "head", "unit", "rank", "feat_q", "feat_k"]
    num = ["contrast", "swap_contrast", "q_act", "q_act_control", "q_act_swap", "k_act_x", "k_act_x_control",
           "k_act_x_swap"]  # fmt: skip
    out = df.groupby(keys, as_index=False)[num].mean()
    lab = df.groupby(keys)["label"].agg(lambda s: s.value_counts().index[0]).reset_index()
    n = df.groupby(keys).size().rename("n_templates").reset_index()
    return out.merge(lab, on=keys).merge(n, on=keys).to_dict("records")


def run_seed(
    setup: Setup, cfg: CIHConfig, pairs_of: dict, seed: int, progress: bool = True, detail=None
) -> tuple[dict, float]:
    """Every relation for one seed; the records carry the seed and relation."""
    from tqdm import tqdm

    from .prompts import study_prompts

    gen = torch.Generator().manual_seed(seed)
    out = defaultdict(list)
    resid = 0.0
    n_prompts = {}
    for rel, pairs in pairs_of.items():
        n_prompts[rel] = study_prompts(
            rel, pairs, setup.lexicon, cfg.n_pairs, cfg.n_templates, setup.encode, setup.lm.bos_id, seed
        )
    total = sum(len(v) for v in n_prompts.values())
    bar = tqdm(total=total, desc=f"seed {seed}", disable=not progress, unit="prompt")
    t0 = time.time()
    for rel, prompts in n_prompts.items():
        recs, r = run_relation(setup, cfg, prompts, seed, gen, bar.update, detail)
        resid = max(resid, r)
        for k, v in recs.items():
            out[k] += v
        out["prompts"] += [
            dict(
                seed=seed, relation=rel, pair_id=p.pair_id, pair_set=p.pair_set, half=p.half, template=p.template,
                role=p.role, A=p.words[0], X=p.words[1], N=p.words[2], B=p.words[3], n_tokens=len(p.tokens),
            )
            for p in prompts
        ]  # fmt: skip
    bar.close()
    if progress:
        print(f"  seed {seed}: {total} prompts in {time.time() - t0:.0f} s", flush=True)
    return dict(out), resid


ORTHOGRAPHIC = {
    "identity": lambda a, b: a == b,
    "plural": lambda a, b: b == a + "s",
    "capitalised": lambda a, b: b == a.capitalize() and a != b,
}


@torch.no_grad()
def validate_pairs(setup: Setup, pairs, p_min: float, prompt: str) -> tuple[list, dict]:
    """The admission rules of the shipped pairs, applied to user pairs (--pairs): A and B single
    tokens with a leading space; orthographic relations (identity, plural, capitalised) by form;
    any other relation drops morphological pairs (prompts.morphological) and needs the model to
    complete `prompt` (A filled in) with B at probability >= p_min. Returns the kept pairs and
    the count dropped per reason."""
    from .prompts import morphological

    kept, dropped = [], defaultdict(int)
    for p in pairs:
        if any(len(setup.encode(" " + w)) != 1 for w in (p.A, p.B)):
            dropped["not single tokens"] += 1
            continue
        if p.relation in ORTHOGRAPHIC:
            if ORTHOGRAPHIC[p.relation](p.A, p.B):
                kept.append(p)
            else:
                dropped[f"not a {p.relation} pair"] += 1
            continue
        if morphological(p.A, p.B):
            dropped["morphological"] += 1
            continue
        ids = [setup.lm.bos_id] + setup.encode(prompt.format(A=p.A))
        logits = setup.model(torch.tensor([ids], device=setup.model.cfg.device))
        prob = float(logits[0, -1].float().softmax(-1)[setup.encode(" " + p.B)[0]])
        if prob >= p_min:
            kept.append(p)
        else:
            dropped[f"model probability < {p_min}"] += 1
    return kept, dict(dropped)
