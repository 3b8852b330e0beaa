"""From the study's records to tests, verdicts and answers (pure functions on DataFrames, no model).

The unit of analysis is measured per pair on held-out templates and aggregated over pairs. For a
relation, a unit kind and a head, in one seed, the unit passes when
- head gate: the head's conceptual-minus-control attention on X, averaged over pairs, is at least
  `attn_floor`, with BH q < fdr (sign-flip test over pairs, BH over the heads);
- the unit's held-out contrast is positive over pairs, larger than the placebo relation's, and
  more than twice its anchor-swap contrast (the swap keeps less than half of it) (each one-sided;
  the unit's p is the largest of the three, an intersection-union test), with BH q < fdr over
  the heads;
- effect size: the unit carries at least `share_floor` of the head's own held-out contrast
  (summed over pairs and templates before dividing, so near-zero pairs cannot blow it up).
"Matching" additionally needs at least half of the unit's positive contrast to sit in units
labelled matching (study._labels). An answer holds when it holds in at least `min_pass` seeds.

The positive control: a unit kind passes it when identity (B = A) passes in every token
induction head (TIH) of the studied layers. Only a unit kind that passes it can answer H1/H2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .stats import benjamini_hochberg, mean_ci, permutation_greater, sign_flip_pvalues

PAIR = ["seed", "relation", "pair_id", "layer", "head"]
GROUP_NAMES = ("ff", "bdec", "err", "bias")


@dataclass(frozen=True)
class Criteria:
    fdr: float
    attn_floor: float
    share_floor: float
    min_pass: int
    n_perm: int


def _bh(df: pd.DataFrame, by: list[str], p: str = "p") -> pd.Series:
    out = pd.Series(np.nan, index=df.index)
    for _, g in df.groupby(by):
        out.loc[g.index] = benjamini_hochberg(g[p].tolist())
    return out


def _sign_p(x: np.ndarray, n_perm: int, seed: int) -> float:
    return float(sign_flip_pvalues(np.asarray(x, dtype=float), n_perm, seed)[0]) if len(x) else 1.0


def head_tests(heads: pd.DataFrame, tih: set, c: Criteria) -> pd.DataFrame:
    """Per seed, relation and head: attention and score contrasts over pairs (held-out templates)."""
    pm = heads.groupby(PAIR, as_index=False).mean(numeric_only=True)
    pm["d_attn"] = pm["attn_x"] - pm["attn_x_control"]
    pm["d_attn_swap"] = pm["attn_x_swap"] - pm["attn_x_control"]
    rows = []
    for (seed, rel, L, h), g in pm.groupby(["seed", "relation", "layer", "head"]):
        m, lo, hi = mean_ci(g["d_attn"].to_numpy())
        tot = g["contrast"].sum()
        rows.append(
            dict(
                seed=seed, relation=rel, layer=L, head=h, name=f"{L}.{h}", tih=f"{L}.{h}" in tih, n_pairs=len(g),
                d_attn=m, d_attn_lo=lo, d_attn_hi=hi, p=_sign_p(g["d_attn"].to_numpy(), c.n_perm, seed),
                d_attn_swap=g["d_attn_swap"].mean(), contrast=g["contrast"].mean(),
                **{f"share_{k}": g[f"contrast_{k}"].sum() / tot if tot else np.nan for k in GROUP_NAMES},
                attn_x=g["attn_x"].mean(), attn_x_control=g["attn_x_control"].mean(),
                attn_x_swap=g["attn_x_swap"].mean(), attn_x_no_error=g["attn_x_no_error"].mean(),
            )
        )  # fmt: skip
    out = pd.DataFrame(rows)
    out["q"] = _bh(out, ["seed", "relation"])
    out["gate"] = (out["q"] < c.fdr) & (out["d_attn"] >= c.attn_floor)
    return out


def unit_tests(groups: pd.DataFrame, heads: pd.DataFrame, htests: pd.DataFrame, c: Criteria) -> pd.DataFrame:
    """Per seed, relation, unit kind and head: the unit's held-out tests (module docstring)."""
    gm = groups.groupby(PAIR + ["unit"], as_index=False).mean(numeric_only=True)
    hm = heads.groupby(PAIR, as_index=False)["contrast"].mean().rename(columns={"contrast": "head_contrast"})
    gm = gm.merge(hm, on=PAIR)
    gm["pos"] = gm["contrast"].clip(lower=0)
    placebo = {
        k: g["contrast"].to_numpy() for k, g in gm[gm.relation == "placebo"].groupby(["seed", "unit", "layer", "head"])
    }
    gate = htests.set_index(["seed", "relation", "layer", "head"])
    rows = []
    for (seed, rel, unit, L, h), g in gm.groupby(["seed", "relation", "unit", "layer", "head"]):
        x = g["contrast"].to_numpy()
        p_sign = _sign_p(x, c.n_perm, seed + 1)
        # the anchor swap must keep less than half the contrast: test contrast - 2 x swap contrast > 0
        p_swap = _sign_p(x - 2 * g["swap_contrast"].to_numpy(), c.n_perm, seed + 2)
        pl = placebo.get((seed, unit, L, h))
        p_pl = permutation_greater(x, pl, c.n_perm, seed + 3) if rel != "placebo" and pl is not None else p_sign
        pos = g["pos"].sum()
        head_tot = g["head_contrast"].sum()
        hg = gate.loc[(seed, rel, L, h)]
        rows.append(
            dict(
                seed=seed, relation=rel, unit=unit, layer=L, head=h, name=f"{L}.{h}", tih=bool(hg["tih"]),
                n_pairs=len(g), contrast=x.mean(), swap_contrast=g["swap_contrast"].mean(),
                placebo_contrast=float(np.mean(pl)) if pl is not None else np.nan,
                share=g["contrast"].sum() / head_tot if head_tot > 0 else np.nan,
                p_sign=p_sign, p_swap=p_swap, p_placebo=p_pl, p=max(p_sign, p_swap, p_pl),
                attn_drop=g["attn_drop"].mean(), attn_drop_random=g["attn_drop_random"].mean(),
                attn_drop_error=g["attn_drop_error"].mean(),
                **{
                    f"frac_{k}": float((g[f"frac_{k}"] * g["pos"]).sum() / pos) if pos > 0 else np.nan
                    for k in ("matching", "gated_query", "ungated", "weak")
                },
                gate=bool(hg["gate"]),
            )
        )  # fmt: skip
    out = pd.DataFrame(rows)
    out["q"] = _bh(out, ["seed", "relation", "unit"])
    out["passes"] = out["gate"] & (out["q"] < c.fdr) & (out["contrast"] > 0) & (out["share"] >= c.share_floor)
    out["passes_matching"] = out["passes"] & (out["frac_matching"] >= 0.5)
    return out


def verdicts(utests: pd.DataFrame, n_seeds: int, c: Criteria) -> pd.DataFrame:
    """Per relation, unit kind and head: in how many seeds it passes (any kind / matching)."""
    v = utests.groupby(["relation", "unit", "layer", "head", "name", "tih"], as_index=False).agg(
        n_pass=("passes", "sum"),
        n_pass_matching=("passes_matching", "sum"),
        n_gate=("gate", "sum"),
        share=("share", "mean"),
        contrast=("contrast", "mean"),
        frac_matching=("frac_matching", "mean"),
        attn_drop=("attn_drop", "mean"),
        attn_drop_random=("attn_drop_random", "mean"),
        attn_drop_error=("attn_drop_error", "mean"),
        swap_contrast=("swap_contrast", "mean"),
        placebo_contrast=("placebo_contrast", "mean"),
    )
    v["n_seeds"] = n_seeds
    v["holds"] = v["n_pass"] >= c.min_pass
    v["holds_matching"] = v["n_pass_matching"] >= c.min_pass
    return v


def answers(v: pd.DataFrame, tih: list[str]) -> pd.DataFrame:
    """H1 (every TIH holds) and H2 (non-TIH heads that hold), per relation and unit kind, counting
    any passing unit and, separately, only matching ones."""
    rows = []
    for (rel, unit), g in v.groupby(["relation", "unit"]):
        held = set(g.loc[g.holds, "name"])
        held_m = set(g.loc[g.holds_matching, "name"])
        t = [h for h in tih if h in held]
        tm = [h for h in tih if h in held_m]
        rows.append(
            dict(
                relation=rel, unit=unit, n_tih=len(tih), tih_holding=",".join(t), tih_holding_matching=",".join(tm),
                h1="yes" if tih and len(t) == len(tih) else "no",
                h1_matching="yes" if tih and len(tm) == len(tih) else "no",
                h2=",".join(sorted(held - set(tih))), h2_matching=",".join(sorted(held_m - set(tih))),
                gated_heads=",".join(sorted(set(g.loc[g.n_gate >= g.n_seeds.clip(upper=2), "name"]))),
            )
        )  # fmt: skip
    return pd.DataFrame(rows)


def curve_table(curves: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Concentration: share of the feature x feature contrast that the top-N units carry, as
    sum over pairs and templates of top-N contrast / sum of ff contrast, per relation, unit kind,
    sample (in-sample or held-out) and head."""
    cols = [c for c in curves.columns if c.startswith("top")]
    s = curves.groupby(["relation", "unit", "sample", "layer", "head"], as_index=False)[cols + ["ff"]].sum()
    for col in cols:
        s[f"share_{col}"] = s[col] / s["ff"]
    s["name"] = s["layer"].astype(str) + "." + s["head"].astype(str)
    return s


def positive_control(answers_df: pd.DataFrame, curves_t: pd.DataFrame, group_size: int, tih: list[str]) -> pd.DataFrame:
    """Per unit kind: does identity pass in every TIH, and its mean held-out share at the group size."""
    ident = answers_df[answers_df.relation == "identity"].set_index("unit")
    col = f"share_top{group_size}" if f"share_top{group_size}" in curves_t else "share_top20"
    rows = []
    for unit in ("channel", "query", "key", "fixed"):
        if unit not in ident.index:
            continue
        cv = curves_t[(curves_t.relation == "identity") & (curves_t.unit == unit) & curves_t.name.isin(tih)]
        held = cv[cv["sample"] == "held-out"]
        ins = cv[cv["sample"] == "in-sample"]
        rows.append(
            dict(
                unit=unit, passes=ident.loc[unit, "h1"] == "yes", tih_passing=ident.loc[unit, "tih_holding"],
                passes_matching=ident.loc[unit, "h1_matching"] == "yes",
                share_held_out=float(held[col].mean()) if len(held) else np.nan,
                share_in_sample=float(ins[col].mean()) if len(ins) else np.nan,
            )
        )  # fmt: skip
    return pd.DataFrame(rows)


def chosen_unit(pc: pd.DataFrame) -> str | None:
    """The unit kind that passes the positive control with the largest held-out share (None if none)."""
    ok = pc[pc.passes]
    return None if ok.empty else str(ok.sort_values("share_held_out", ascending=False).iloc[0]["unit"])


def behaviour(heads: pd.DataFrame) -> pd.DataFrame:
    """The model's own conceptual induction: log P(X) after B, conceptual minus control (and anchor
    swap minus control), per relation and X kind; mean and 95% interval over pairs."""
    one = heads.drop_duplicates(["seed", "relation", "pair_id", "template"])
    rows = []
    for (rel, xk), g in list(one.groupby(["relation", "x_kind"])) + [
        ((r, "all"), g) for r, g in one.groupby("relation")
    ]:
        pm = g.groupby(["seed", "pair_id"])[["logp_x", "logp_x_control", "logp_x_swap"]].mean()
        d = (pm["logp_x"] - pm["logp_x_control"]).to_numpy()
        ds = (pm["logp_x_swap"] - pm["logp_x_control"]).to_numpy()
        m, lo, hi = mean_ci(d)
        rows.append(
            dict(
                relation=rel, x_kind=xk, n_pairs=len(pm), logp_x=pm["logp_x"].mean(), d_logp=m, d_logp_lo=lo,
                d_logp_hi=hi, d_logp_swap=float(np.mean(ds)) if len(ds) else np.nan,
            )
        )  # fmt: skip
    return pd.DataFrame(rows)


def x_kind_heads(heads: pd.DataFrame, tih: list[str]) -> pd.DataFrame:
    """Attention contrast on X in the TIH, separately on noun-X and function-X templates."""
    h = heads.assign(name=heads["layer"].astype(str) + "." + heads["head"].astype(str))
    h = h[h.name.isin(tih)]
    h = h.assign(d_attn=h["attn_x"] - h["attn_x_control"], d_attn_swap=h["attn_x_swap"] - h["attn_x_control"])
    return h.groupby(["relation", "x_kind"], as_index=False)[["d_attn", "d_attn_swap", "contrast"]].mean()


def channel_families(
    members: pd.DataFrame, tih: list[str], unit: str, top: int = 15
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 3c, units as objects of their own: the members of the per-pair groups of `unit` in
    the TIH, pooled over pairs and seeds. Per member (a channel, or a query / key feature): in how
    many distinct pairs (and relations) it is selected, its mean contrast per relation, its
    anchor-swap ratio, its activations with and without A, and its commonest label.
    Classes: 'structural' = selected for >= 20% of all pairs, with an ungated label or a swap
    ratio >= 0.5 (it does not need A before X); 'recurrent' = selected for >= 20% of pairs
    otherwise; 'content, pair-specific' = matching or gated query and selected for fewer pairs;
    'other' = the rest. Returns (the most often selected members, a summary per class)."""
    m = members.assign(name=members["layer"].astype(str) + "." + members["head"].astype(str))
    m = m[m.name.isin(tih) & (m.relation != "placebo") & (m.unit == unit)]
    if m.empty:
        return pd.DataFrame(), pd.DataFrame()
    m = m.assign(pair=m["relation"] + ":" + m["pair_id"].astype(str))
    key = ["layer", "feat_q", "feat_k"]
    t = (
        m.groupby(key)
        .agg(
            n_pairs=("pair", "nunique"),
            n_relations=("relation", "nunique"),
            contrast=("contrast", "mean"),
            swap_contrast=("swap_contrast", "mean"),
            q_act=("q_act", "mean"),
            q_act_control=("q_act_control", "mean"),
            k_act_x=("k_act_x", "mean"),
            k_act_x_control=("k_act_x_control", "mean"),
            label=("label", lambda s: s.value_counts().index[0]),
            heads=("name", lambda s: ",".join(sorted(set(s)))),
        )
        .reset_index()
    )
    prof = m.pivot_table(index=key, columns="relation", values="contrast", aggfunc="mean")
    prof.columns = [f"contrast_{c}" for c in prof.columns]
    act = m.pivot_table(index=key, columns="relation", values="q_act", aggfunc="mean")
    act.columns = [f"q_act_{c}" for c in act.columns]
    t = t.merge(prof.reset_index(), on=key).merge(act.reset_index(), on=key)
    n_all = m["pair"].nunique()
    t["pair_rate"] = t["n_pairs"] / n_all
    t["swap_ratio"] = t["swap_contrast"] / t["contrast"].where(t["contrast"] > 0)
    recurrent = t["pair_rate"] >= 0.2
    structural = (t["label"] == "ungated") | (t["swap_ratio"] >= 0.5)
    t["class"] = np.select(
        [recurrent & structural, recurrent, t["label"].isin(["matching", "gated query"])],
        ["structural", "recurrent", "content, pair-specific"],
        "other",
    )
    pos = m.assign(pos=m["contrast"].clip(lower=0)).merge(t[key + ["class"]], on=key)
    summary = pos.groupby("class", as_index=False).agg(contrast=("pos", "sum"))
    summary["n_members"] = summary["class"].map(t["class"].value_counts())
    summary["share_of_group_contrast"] = summary["contrast"] / summary["contrast"].sum()
    return t.sort_values(["n_pairs", "contrast"], ascending=False).head(top), summary
