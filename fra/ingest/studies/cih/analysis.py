"""From measured query rows to tests, findings and answers (pure functions, no model).

The combined criterion. A unit (layer, feat_q, feat_k) is a finding of a relation in head h for
one seed when, on the test half (held-out pairs and held-out templates):
- its conceptual-minus-control margin contrast has BH q < fdr (sign-flip test over test pairs,
  BH over every (unit, head) test of that relation and seed) and a positive mean;
- it raises the score on X itself more after A than after the control word (x_contrast > 0), and
  its contribution at X exceeds its contribution at A (it points at the token after A; a channel
  that only pushes attention away from A is not induction);
- the head's own conceptual-minus-control contrast has BH q < fdr and a positive mean.
So a head with a negative or non-significant margin of its own never counts, whatever its
channels do. The headline keeps the findings that pass in at least `min_pass` seeds, and H1/H2
count only "matching" findings (the query feature also fires at B without A).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .measure import GROUPS, contrast_weights, margin_weights, p_target
from .prompts import Prompt
from .results import Answer, Finding, HeadStat, SeedFinding, SeedResult, UnitTest
from .stats import benjamini_hochberg, mean_ci, sign_flip_pvalues, wilson


@dataclass(frozen=True)
class PromptRow:
    """The measured query row of one prompt at one layer (test half)."""

    prompt: Prompt
    layer: int
    groups_GHT: Tensor  # ff, bdec, err, bias; they sum to scores_HT
    scores_HT: Tensor  # hook_attn_scores[h, q, :]
    units_UHT: Tensor  # the selected units' contributions (0 where absent)
    rand_p_UH: Tensor  # attention on X after removing random channels of matched magnitude
    q_act_U: Tensor  # feat_q's activation at B
    k_act_x_U: Tensor  # feat_k's activation at X
    k_rate_else_U: Tensor  # fraction of positions 1..q, other than X, where feat_k is active


def pairs_of(rows: list[PromptRow]) -> list[tuple[PromptRow, PromptRow]]:
    """(conceptual, control) rows that share a pair_id, in pair order."""
    by = defaultdict(dict)
    for r in rows:
        by[r.prompt.pair_id][r.prompt.role] = r
    return [(d["concept"], d["control"]) for _, d in sorted(by.items()) if len(d) == 2]


def _weights(p: Prompt):
    T = len(p.tokens)
    return (
        margin_weights(T, p.x_pos, p.q_pos),
        contrast_weights(T, p.x_pos, [p.a_pos]),
        contrast_weights(T, p.x_pos, p.n_pos),
    )


def head_measures(pairs) -> dict:
    """Per pair and head: total and group contrasts, X-vs-A / X-vs-N, attention on X."""
    out = defaultdict(list)
    for c, u in pairs:
        w, w_xa, w_xn = _weights(c.prompt)
        x = c.prompt.x_pos
        out["contrast"].append((c.scores_HT - u.scores_HT) @ w)
        out["groups"].append((c.groups_GHT - u.groups_GHT) @ w)  # [G, H]
        out["x_minus_a"].append(c.scores_HT @ w_xa)
        out["x_minus_n"].append(c.scores_HT @ w_xn)
        out["attn_x"].append(p_target(c.scores_HT, x))
        out["attn_x_control"].append(p_target(u.scores_HT, x))
        out["attn_x_no_error"].append(p_target(c.scores_HT - c.groups_GHT[GROUPS.index("err")], x))
    return {k: torch.stack(v) for k, v in out.items()}


def head_stats(pairs, relation: str, layer: int, tih: set, n_perm: int, seed: int) -> list[HeadStat]:
    """Every head's held-out contrast (q is filled in by `with_bh` over all heads of a relation)."""
    m = head_measures(pairs)
    p = sign_flip_pvalues(m["contrast"], n_perm, seed)
    out = []
    for h in range(m["contrast"].shape[1]):
        mean, lo, hi = mean_ci(m["contrast"][:, h])
        g = m["groups"][:, :, h].mean(0)
        out.append(
            HeadStat(
                relation,
                layer,
                h,
                f"{layer}.{h}" in tih,
                len(pairs),
                mean,
                lo,
                hi,
                float(p[h]),
                1.0,
                *[float(v) for v in g],
                float(m["x_minus_a"][:, h].mean()),
                float(m["x_minus_n"][:, h].mean()),
                float(m["attn_x"][:, h].mean()),
                float(m["attn_x_control"][:, h].mean()),
                float(m["attn_x_no_error"][:, h].mean()),
            )
        )
    return out


def unit_tests(
    pairs,
    relation: str,
    layer: int,
    unit_keys: list[int],
    selected: dict,
    d_sae: int,
    heads: list[HeadStat],
    n_perm: int,
    seed: int,
) -> list[UnitTest]:
    """Every selected unit in every head of its layer. `selected[key]` maps head -> mean
    selection-half contrast for the heads where the unit was selected."""
    if not pairs or not unit_keys:
        return []
    d, dx, xa, xn, drop, drop_r, present = [], [], [], [], [], [], []
    for c, u in pairs:
        w, w_xa, w_xn = _weights(c.prompt)
        x = c.prompt.x_pos
        d.append((c.units_UHT - u.units_UHT) @ w)  # [U, H]
        dx.append(c.units_UHT[..., x] - u.units_UHT[..., x])
        xa.append(c.units_UHT @ w_xa)
        xn.append(c.units_UHT @ w_xn)
        p0 = p_target(c.scores_HT, x)
        drop.append(p0[None] - p_target(c.scores_HT[None] - c.units_UHT, x))
        drop_r.append(p0[None] - c.rand_p_UH)
        present.append(c.units_UHT.abs().sum((1, 2)) > 0)
    d, dx, xa, xn = torch.stack(d), torch.stack(dx), torch.stack(xa), torch.stack(xn)  # [J, U, H]
    drop, drop_r, present = torch.stack(drop), torch.stack(drop_r), torch.stack(present)
    J, U, H = d.shape
    p = sign_flip_pvalues(d.reshape(J, U * H), n_perm, seed).reshape(U, H)
    gate = {
        name: torch.stack([getattr(r, name) for r, _ in pairs]) for name in ("q_act_U", "k_act_x_U", "k_rate_else_U")
    }
    q_ctrl = torch.stack([u.q_act_U for _, u in pairs])
    k_ctrl = torch.stack([u.k_act_x_U for _, u in pairs])
    head_c = {hs.head: hs.contrast for hs in heads}
    out = []
    for i, key in enumerate(unit_keys):
        pres = present[:, i]
        n_pres = int(pres.sum())
        for h in range(H):
            mean, lo, hi = mean_ci(d[:, i, h])
            share = mean / head_c[h] if head_c[h] else float("nan")
            out.append(
                UnitTest(
                    relation,
                    layer,
                    key // d_sae,
                    key % d_sae,
                    h,
                    h in selected.get(key, {}),
                    float(selected.get(key, {}).get(h, float("nan"))),
                    mean,
                    lo,
                    hi,
                    float(p[i, h]),
                    1.0,
                    float(dx[:, i, h].mean()),
                    float(xa[:, i, h].mean()),
                    float(xn[:, i, h].mean()),
                    share,
                    n_pres,
                    float(drop[pres, i, h].mean()) if n_pres else 0.0,
                    float(drop_r[pres, i, h].mean()) if n_pres else 0.0,
                    float(gate["q_act_U"][:, i].mean()),
                    float(q_ctrl[:, i].mean()),
                    float(gate["k_act_x_U"][:, i].mean()),
                    float(k_ctrl[:, i].mean()),
                    float(gate["k_rate_else_U"][:, i].mean()),
                )
            )
    return out


def with_bh(items: list, attr: str = "q"):
    """The same records with q = BH-adjusted p over the whole list."""
    qs = benjamini_hochberg([it.p for it in items])
    return [replace(it, **{attr: q}) for it, q in zip(items, qs)]


def gating_label(
    q_act: float, q_act_control: float, gate_ratio: float, k_act: float = 0.0, k_act_control: float = 0.0
) -> str:
    """'gated query' when the query feature fires at B much less without A (the A -> B match then
    happens upstream, in what switches the query feature on); 'matching' when the query feature
    fires at B either way and the key feature at X depends on A (fires much less after the control
    word): the pair itself does the matching; 'ungated' when both features fire either way and the
    contrast is only a change in their activation sizes."""
    if q_act_control < gate_ratio * q_act:
        return "gated query"
    if k_act_control < gate_ratio * k_act:
        return "matching"
    return "ungated"


def passes(t: UnitTest, h: HeadStat, fdr: float) -> bool:
    """The combined criterion of the module docstring."""
    return (
        t.q < fdr
        and t.contrast > 0
        and t.x_contrast > 0
        and t.x_minus_a > 0
        and h.q < fdr
        and h.contrast > 0
        and (t.relation, t.layer, t.head) == (h.relation, h.layer, h.head)
    )


def seed_findings(tests: list[UnitTest], heads: list[HeadStat], fdr: float, gate_ratio: float) -> list[SeedFinding]:
    hs = {(h.relation, h.layer, h.head): h for h in heads}
    by = defaultdict(list)
    for t in tests:
        h = hs[(t.relation, t.layer, t.head)]
        if passes(t, h, fdr):
            by[(t.relation, t.layer, t.feat_q, t.feat_k)].append((t, h))
    out = []
    for (rel, layer, fq, fk), hits in sorted(by.items()):
        best, bh = max(hits, key=lambda th: th[0].share)
        out.append(
            SeedFinding(
                rel,
                layer,
                fq,
                fk,
                tuple(sorted(t.head for t, _ in hits)),
                best.head,
                gating_label(best.q_act, best.q_act_control, gate_ratio, best.k_act_x, best.k_act_x_control),
                best.share,
                min(t.q for t, _ in hits),
                best.attn_drop,
                best.attn_drop_random,
                bh.attn_x - bh.attn_x_no_error,
            )
        )
    return out


def aggregate(seeds: list[SeedResult], kinds: dict, min_pass: int, labels: dict) -> list[Finding]:
    """One record per distinct (relation, layer, feat_q, feat_k) that passed in any seed."""
    by = defaultdict(list)
    for s in seeds:
        for f in s.findings:
            by[(f.relation, f.layer, f.feat_q, f.feat_k)].append(f)
    n = len(seeds)
    out = []
    for (rel, layer, fq, fk), fs in by.items():
        head_count = defaultdict(int)
        for f in fs:
            for h in f.heads:
                head_count[h] += 1
        heads = sorted(head_count, key=lambda h: (-head_count[h], h))
        kinds_seen = [f.kind for f in fs]
        bests = [f.best_head for f in fs]
        lo, hi = wilson(len(fs), n)
        out.append(
            Finding(
                rel,
                kinds.get(rel, ""),
                layer,
                fq,
                fk,
                ",".join(f"{layer}.{h}" for h in heads),
                f"{layer}.{max(sorted(set(bests)), key=bests.count)}",
                max(sorted(set(kinds_seen)), key=kinds_seen.count),
                len(fs),
                n,
                len(fs) / n,
                lo,
                hi,
                len(fs) >= min_pass,
                statistics.mean(f.share for f in fs),
                statistics.median(f.q_value for f in fs),
                statistics.mean(f.attn_drop for f in fs),
                statistics.mean(f.attn_drop_random for f in fs),
                statistics.mean(f.attn_drop_error for f in fs),
                labels.get((layer, fq), ""),
                labels.get((layer, fk), ""),
            )
        )
    return sorted(out, key=lambda f: (f.relation, -f.n_pass, -f.share))


def answers(
    seeds: list[SeedResult],
    findings: list[Finding],
    tih_here: list[str],
    relations,
    kinds: dict,
    min_pass: int,
    fdr: float,
) -> list[Answer]:
    """H1: every token induction head of the studied layers carries a "matching" finding of the
    relation in at least min_pass seeds (so it also has a significant contrast of its own). H2:
    heads outside the TIH set that do. "gated query" findings are reported but do not count (the
    A -> B match happens upstream, in what switches the query feature on), nor do "ungated" ones
    (neither feature depends on A; only activation sizes do)."""
    out = []
    for rel in relations:
        carried = {"matching": defaultdict(int), "gated query": defaultdict(int), "ungated": defaultdict(int)}
        other = defaultdict(int)  # head -> seeds in which it carries a gated-query or ungated finding
        sig = defaultdict(int)
        per_seed, per_seed_m = [], []
        for s in seeds:
            fs = [f for f in s.findings if f.relation == rel]
            per_seed.append(len(fs))
            per_seed_m.append(sum(f.kind == "matching" for f in fs))
            for kind in carried:
                for h in {f"{f.layer}.{h}" for f in fs if f.kind == kind for h in f.heads}:
                    carried[kind][h] += 1
            for h in {f"{f.layer}.{h}" for f in fs if f.kind != "matching" for h in f.heads}:
                other[h] += 1
            for h in s.heads:
                if h.relation == rel and h.q < fdr and h.contrast > 0:
                    sig[f"{h.layer}.{h.head}"] += 1
        headline = [f for f in findings if f.relation == rel and f.headline]
        # shares of the contrast of TIH whose own contrast is significant: headline findings
        # together (both kinds), error and b_dec terms
        shares = defaultdict(list)
        for s in seeds:
            tests = {(t.layer, t.feat_q, t.feat_k, t.head): t for t in s.tests if t.relation == rel}
            for h in s.heads:
                if h.relation != rel or f"{h.layer}.{h.head}" not in tih_here or h.contrast <= 0 or h.q >= fdr:
                    continue
                tot = sum(
                    tests[(f.layer, f.feat_q, f.feat_k, h.head)].contrast
                    for f in headline
                    if (f.layer, f.feat_q, f.feat_k, h.head) in tests
                )
                shares["findings"].append(tot / h.contrast)
                shares["err"].append(h.err / h.contrast)
                shares["bdec"].append(h.bdec / h.contrast)
        holding = sorted(h for h, n in carried["matching"].items() if n >= min_pass)
        gated = sorted(h for h, n in other.items() if n >= min_pass and h not in holding)
        with_head = [h for h in tih_here if h in holding]
        if not tih_here:
            h1, detail = "not applicable", "no token induction head in the studied layers"
        else:
            h1 = "yes" if len(with_head) == len(tih_here) else "no"
            detail = (
                f"{len(with_head)} of {len(tih_here)} TIH carry a matching finding in >= {min_pass} of "
                f"{len(seeds)} seeds"
            )
        mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
        out.append(
            Answer(
                rel,
                kinds.get(rel, ""),
                h1,
                detail,
                tuple(h for h in holding if h not in tih_here),
                tuple(gated),
                tuple(sorted(h for h, n in sig.items() if n >= min_pass)),
                sum(f.kind == "matching" for f in headline),
                sum(f.kind != "matching" for f in headline),
                tuple(per_seed),
                tuple(per_seed_m),
                mean(shares["findings"]),
                mean(shares["err"]),
                mean(shares["bdec"]),
            )
        )
    return out
