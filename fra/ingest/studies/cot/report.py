"""Tables (Parquet, read by the explorer's CoT page), figures and report.md of `fra report cot`."""

from __future__ import annotations

import json

import numpy as np

from .resolve import GROUPS


def _perm_diff(values: np.ndarray, labels: np.ndarray, n_perm: int, rng) -> tuple[float, float]:
    """Mean(values | label) - mean(values | not label), and its two-sided permutation p-value."""
    ok = np.isfinite(values)
    v, lab = values[ok], labels[ok]
    if lab.sum() < 1 or (~lab).sum() < 1:
        return float("nan"), float("nan")
    obs = v[lab].mean() - v[~lab].mean()
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(lab)
        hits += abs(v[p].mean() - v[~p].mean()) >= abs(obs) - 1e-12
    return float(obs), float((hits + 1) / (n_perm + 1))


def _wilcoxon(d: np.ndarray) -> float:
    from scipy import stats

    d = d[np.isfinite(d)]
    if len(d) < 3 or np.all(d == 0):
        return float("nan")
    return float(stats.wilcoxon(d).pvalue)


def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_traces(out, traces, done) -> None:
    import pandas as pd

    all_tr = pd.DataFrame(
        [
            dict(
                trace=i,
                task=t.task,
                correct=t.correct,
                problem=t.problem,
                answer=t.answer,
                predicted=t.predicted,
                n_new_tokens=t.n_new_tokens,
                trace_text=t.trace,
            )
            for i, t in enumerate(traces)
        ]
    )
    used = {r.idx for r in done}
    all_tr["used"] = all_tr["trace"].isin(used)
    all_tr.to_parquet(out / "traces.parquet", index=False)


def _sentence_rows(r, receivers, proximity) -> list[dict]:
    from .anchors import receiver_scores, vertical_scores

    rec = receiver_scores(r.vert_LHN, receivers)
    supp = vertical_scores(r.kl_NN, proximity)
    return [
        dict(
            trace=r.idx,
            i=i,
            text=text,
            tok_start=s,
            tok_end=e,
            receiver_score=float(rec[i]),
            suppression_score=float(supp[i]),
        )
        for i, ((s, e), text) in enumerate(zip(r.seg.token_spans, r.seg.sentences))
    ]


def _matrix_frames(r, L, H) -> list:
    import pandas as pd

    ii, jj = np.tril_indices(r.seg.n)
    return [
        pd.DataFrame(
            dict(
                trace=r.idx,
                layer=l,
                head=h,
                i=ii,
                j=jj,
                attn=r.blocks_LHNN[l, h][ii, jj].astype(np.float32),
            )
        )
        for l in range(L)
        for h in range(H)
    ]


def _write_trace_tables(out, done, receivers, cfg, L, H):
    """sentences, matrices and kl tables; returns the sentences."""
    import pandas as pd

    sent_rows, mat_rows, kl_rows = [], [], []
    for r in done:
        sent_rows += _sentence_rows(r, receivers, cfg.proximity)
        mat_rows += _matrix_frames(r, L, H)
        ii, jj = np.tril_indices(r.seg.n)
        kl_rows.append(pd.DataFrame(dict(trace=r.idx, i=ii, j=jj, log_kl=r.kl_NN[ii, jj].astype(np.float32))))
    sent = pd.DataFrame(sent_rows)
    sent.to_parquet(out / "sentences.parquet", index=False)
    pd.concat(mat_rows).to_parquet(out / "matrices.parquet", index=False)
    pd.concat(kl_rows).to_parquet(out / "kl.parquet", index=False)
    return sent


def _write_heads(out, mean_kurt, receivers, fa_heads) -> None:
    import pandas as pd

    L, H = mean_kurt.shape
    rank = {lh: k for k, lh in enumerate(receivers)}
    heads = pd.DataFrame(
        [
            dict(
                layer=l,
                head=h,
                mean_kurtosis=float(mean_kurt[l, h]),
                receiver_rank=rank.get((l, h), -1),
                resolved=(l, h) in fa_heads,
            )
            for l in range(L)
            for h in range(H)
        ]
    )
    heads.to_parquet(out / "heads.parquet", index=False)


def _write_resolved(out, resolved) -> dict:
    import pandas as pd

    tables = {}
    for name in ("anchors", "anchor_channels", "cells", "cell_channels"):
        df = pd.DataFrame([x for rv in resolved if rv for x in rv[name]])
        tables[name] = df
        df.to_parquet(out / f"{name}.parquet", index=False)
    return tables


def _write_consistency(out, rows):
    import pandas as pd

    cons = pd.DataFrame(rows)
    cons["null_agreement_mean"] = [
        float(np.nanmean(x)) if np.isfinite(x).any() else np.nan for x in map(np.asarray, cons["null_agreement"])
    ]
    cons.drop(columns=["null_agreement"]).to_parquet(out / "consistency.parquet", index=False)
    return cons


def _consistency_arrays(cons) -> dict:
    return dict(
        agree=cons["agreement"].to_numpy(float),
        null_agree=cons["null_agreement_mean"].to_numpy(float),
        share=cons["content_share"].to_numpy(float),
        null_share=cons["null_content_share"].to_numpy(float),
        correct=cons["correct"].to_numpy(bool),
    )


def _consistency_stats(v: dict, n_perm: int, rng) -> dict:
    agree, null_agree, share, null_share, correct = (
        v["agree"],
        v["null_agree"],
        v["share"],
        v["null_share"],
        v["correct"],
    )
    stats = dict(
        n_traces=len(agree),
        n_correct=int(correct.sum()),
        agreement_mean=float(np.nanmean(agree)),
        null_agreement_mean=float(np.nanmean(null_agree)),
        agreement_vs_null_p=_wilcoxon(agree - null_agree),
        content_share_mean=float(np.nanmean(share)) if np.isfinite(share).any() else float("nan"),
        null_content_share_mean=float(np.nanmean(null_share)) if np.isfinite(null_share).any() else float("nan"),
        content_vs_null_p=_wilcoxon(share - null_share),
    )
    for key, vals in (
        ("agreement", agree),
        ("null_agreement", null_agree),
        ("content_share", share),
        ("null_content_share", null_share),
    ):
        d, p = _perm_diff(vals, correct, n_perm, rng)
        stats[f"{key}_correct_minus_incorrect"], stats[f"{key}_correct_p"] = d, p
    return stats


def _anchor_stats(anc, ch) -> dict:
    stats = {}
    tot = anc[[f"g_{g}" for g in GROUPS]].sum(1)
    stats["anchor_delta_mean"] = float(anc["delta"].mean())
    stats["anchor_groups_mean"] = {g: float(anc[f"g_{g}"].mean()) for g in GROUPS}
    stats["anchor_split_max_abs_err"] = float((tot - anc["delta"]).abs().max())
    pos_cols = [c for c in anc.columns if c.startswith("pos_")]
    pos_tot = anc[pos_cols].sum(1)
    stats["positive_ff_by_class"] = {c[4:]: float((anc[c] / pos_tot).mean()) for c in pos_cols}
    key = ["trace", "layer", "head", "anchor"]
    top = ch.groupby(key)["value"].sum()
    a = anc.set_index(key)
    stats["top_channels_share_of_ff"] = float((top / a["g_ff"]).median())
    stats["top1_share_of_positive"] = float(
        (ch[ch["rank"] == 0].set_index(key)["value"].clip(lower=0) / pos_tot.set_axis(a.index)).median()
    )
    stats["ff_share_of_delta"] = float((a["g_ff"] / a["delta"]).median())
    stats["resid_share_of_delta"] = float((_resid(a) / a["delta"]).median())
    stats.update(_term_shares(anc))
    stats["delta_positive_share"] = float((anc["delta"] > 0).mean())
    stats["anchor_first3_share"] = float((anc["anchor"] <= 2).mean())
    stats["per_head"] = {
        f"{l}.{h}": {"n": len(d), **_term_shares(d), "delta_mean": float(d["delta"].mean())}
        for (l, h), d in anc.groupby(["layer", "head"])
    }
    return stats


def _resid(d):
    """The b_dec / SAE-error terms of the split: every group but ff and bias."""
    return d["g_bdec_f"] + d["g_f_bdec"] + d["g_err_f"] + d["g_f_err"] + d["g_resid_resid"]


def _term_shares(d) -> dict:
    """Who carries Delta, summed over the anchor x head cases of `d`: the share of the summed Delta
    (signed; the three add up to 1) and the share of the absolute mass (|ff|, |b_dec / error|, |bias|
    summed per case over groups, so opposite signs do not cancel)."""
    parts = {"ff": d["g_ff"], "resid": _resid(d), "bias": d["g_bias"]}
    total = d["delta"].sum()
    absolute = {k: d[[f"g_{g}" for g in GROUPS if _family(g) == k]].abs().sum(1).sum() for k in parts}
    mass = sum(absolute.values())
    return {
        **{f"{k}_share_of_sum": float(v.sum() / total) if total else float("nan") for k, v in parts.items()},
        **{f"{k}_share_of_abs": float(v / mass) if mass else float("nan") for k, v in absolute.items()},
    }


def _family(group: str) -> str:
    return "ff" if group == "ff" else "bias" if group == "bias" else "resid"


def _accuracy(traces):
    import pandas as pd

    lengths = pd.DataFrame(
        [dict(task=t.task, correct=t.correct, n_new=t.n_new_tokens, n_chars=len(t.trace)) for t in traces]
    )
    return (
        lengths.groupby("task")
        .agg(n=("correct", "size"), correct=("correct", "sum"), mean_new_tokens=("n_new", "mean"))
        .reset_index()
    )


def _receiver_figure(out, mean_kurt, receivers, fa_heads, n_done: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 8))
    im = ax.imshow(mean_kurt, aspect="auto", cmap="viridis")
    for k, (l, h) in enumerate(receivers):
        ax.text(h, l, str(k + 1), ha="center", va="center", color="w", fontsize=7)
    for l, h in fa_heads:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="r", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"mean kurtosis of vertical scores ({n_done} traces)\nnumbers: receiver rank; red: resolved")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "receiver_heads.png", dpi=110)
    plt.close(fig)


def _consistency_figure(out, v: dict) -> None:
    plt = _pyplot()
    correct = v["correct"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (a, b, name) in zip(
        axes,
        (
            (v["agree"], v["null_agree"], "receiver-suppression Spearman"),
            (v["share"], v["null_share"], "content share of channels"),
        ),
    ):
        bins = np.linspace(np.nanmin(np.r_[a, b, 0]), np.nanmax(np.r_[a, b, 1e-9]), 16)
        ax.hist(a[correct & np.isfinite(a)], bins, alpha=0.6, label="correct")
        ax.hist(a[~correct & np.isfinite(a)], bins, alpha=0.6, label="incorrect")
        ax.hist(b[np.isfinite(b)], bins, histtype="step", color="k", label="null (shuffled boundaries)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "consistency.png", dpi=100)
    plt.close(fig)


def _intro_lines(cfg, traces, done, acc, stats) -> list[str]:
    return [
        "# Chains of thought, feature-resolved (`fra report cot`)",
        "",
        f"Model `{cfg.model}`, traces `{cfg.traces.name}`: {len(traces)} traces, {len(done)} with at least "
        f"{cfg.min_sentences} sentences within {cfg.max_tokens} tokens are studied. Regenerate with `fra report cot`.",
        "",
        "## The traces",
        "",
        "| task | traces | correct (reasoning-gym) | mean new tokens |",
        "|---|---|---|---|",
        *[f"| {a.task} | {a.n} | {a.correct} | {a.mean_new_tokens:.0f} |" for a in acc.itertuples()],
        "",
        f"Studied traces: {stats['n_traces']} ({stats['n_correct']} correct), "
        f"{np.mean([r.seg.n for r in done]):.1f} sentences and {np.mean([len(r.seg.tokens) for r in done]):.0f} "
        "tokens (prompt included) on average.",
        "",
    ]


def receiver_layers(receivers, n: int) -> list[int]:
    """The `n` layers holding the most receiver heads, ties broken by the strongest head (receivers
    are in rank order)."""
    count, best = {}, {}
    for k, (l, _) in enumerate(receivers):
        count[l] = count.get(l, 0) + 1
        best.setdefault(l, k)
    return sorted(count, key=lambda l: (-count[l], best[l]))[:n]


def _sae_layer_lines(cfg, receivers, fa_heads) -> list[str]:
    rank = {lh: k for k, lh in enumerate(receivers)}
    top = receiver_layers(receivers, 2)
    n_in = {l: sum(1 for rl, _ in receivers if rl == l) for l in top}
    covered = [l for l in top if l in cfg.sae_layers]
    return [
        f"SAE layers: {list(cfg.sae_layers) or 'none'} (`--sae-layers`; by default every layer with a shipped SAE). "
        f"The two layers holding the most of the {len(receivers)} receiver heads (ties broken by the strongest "
        "head) are "
        + " and ".join(
            f"{l} ({n_in[l]} heads, the strongest ranked {min(k for lh, k in rank.items() if lh[0] == l) + 1})"
            for l in top
        )
        + (
            "; both have SAEs (trained for this study, MODEL_CARD.md)."
            if len(covered) == len(top)
            else f"; only {covered or 'none'} of them have SAEs: train the others with `fra train-sae`."
        ),
        "",
    ]


def _receiver_lines(cfg, done, mean_kurt, receivers, fa_heads, meta) -> list[str]:
    rank = {lh: k for k, lh in enumerate(receivers)}
    return [
        "## Receiver heads",
        "",
        "![receiver heads](receiver_heads.png)",
        "",
        "Thought Anchors' definition (fra/ingest/studies/cot/anchors.py): block means of attention weights, "
        f"vertical scores over rows >= {cfg.proximity} sentences later, kurtosis per head averaged over traces.",
        "",
        f"Kurtosis is bounded by the number of scores: with n finite vertical scores the Fisher kurtosis is at most "
        f"n - 5 + 1/(n - 1) (one dominant sentence), so on short traces many heads reach the bound and tie. Here "
        f"{meta.get('kurtosis_traces')} traces (>= {cfg.proximity + 4} sentences) vote, with "
        f"{np.median([r.seg.n - cfg.proximity for r in done]):.0f} finite vertical scores per trace (median).",
        "",
        "| rank | head | mean kurtosis |",
        "|---|---|---|",
        *[f"| {k + 1} | {l}.{h} | {mean_kurt[l, h]:.2f} |" for k, (l, h) in enumerate(receivers[:10])],
        "",
        *_sae_layer_lines(cfg, receivers, fa_heads),
        f"Resolved into channels (the {cfg.fa_heads} strongest receiver heads in the SAE layers): "
        + ", ".join(
            f"{l}.{h} (rank {rank.get((l, h), -1) + 1 if (l, h) in rank else '>' + str(len(receivers))}, "
            f"kurtosis {mean_kurt[l, h]:.2f})"
            for l, h in fa_heads
        ),
        "",
    ]


def _sentence_lines() -> list[str]:
    return [
        "## Sentence x sentence",
        "",
        "![sentence matrices](sentence_matrices.png)",
        "",
    ]


def _anchor_lines(cfg, stats, tables, sent, receivers) -> list[str]:
    anc = tables["anchors"]
    rank = {f"{l}.{h}": k + 1 for k, (l, h) in enumerate(receivers)}
    g = stats["anchor_groups_mean"]
    lines = [
        "## Channels behind the top anchors",
        "",
        "Split: the attention-weighted score advantage Delta of an anchor's keys over the row's average key, "
        "from queries >= "
        f"{cfg.proximity} sentences later (fra/ingest/studies/cot/resolve.py says why scores, not weights, and "
        "why the advantage). The groups sum to Delta from the model's own scores to "
        f"{stats['anchor_split_max_abs_err']:.1e} (max over {len(anc)} anchor x head cases).",
        "",
        "| group | mean over anchors |",
        "|---|---|",
        f"| Delta (model) | {stats['anchor_delta_mean']:.3f} |",
        *[f"| {k} | {v:.3f} |" for k, v in g.items()],
        "",
        "Who carries Delta, per resolved head: feature x feature terms (ff), the terms with the SAE's b_dec "
        "or error on either side (b_dec / error: f_bdec, f_err, bdec_f, err_f, resid_resid) and the bias "
        "terms; as a share of the summed Delta (signed, the three add up to 1) and of the absolute mass "
        "(|part| summed over groups and anchors, so that opposite signs do not cancel).",
        "",
        "| head | receiver rank | anchors | mean Delta | ff / b_dec+error / bias, share of summed Delta "
        "| ff / b_dec+error / bias, share of absolute mass |",
        "|---|---|---|---|---|---|",
        *[
            f"| {h} | {rank.get(h, '>' + str(len(rank)))} | {d['n']} | {d['delta_mean']:.2f} | "
            f"{_fmt(d['ff_share_of_sum'], 2)} / {_fmt(d['resid_share_of_sum'], 2)} / "
            f"{_fmt(d['bias_share_of_sum'], 2)} | {_fmt(d['ff_share_of_abs'], 2)} / "
            f"{_fmt(d['resid_share_of_abs'], 2)} / {_fmt(d['bias_share_of_abs'], 2)} |"
            for h, d in stats["per_head"].items()
        ],
        f"| all | | {len(anc)} | {stats['anchor_delta_mean']:.2f} | {_fmt(stats['ff_share_of_sum'], 2)} / "
        f"{_fmt(stats['resid_share_of_sum'], 2)} / {_fmt(stats['bias_share_of_sum'], 2)} | "
        f"{_fmt(stats['ff_share_of_abs'], 2)} / {_fmt(stats['resid_share_of_abs'], 2)} / "
        f"{_fmt(stats['bias_share_of_abs'], 2)} |",
        "",
        "Classes of the channels' positive values (mean share over anchors, all channels): "
        + ", ".join(f"{k} {v:.2f}" for k, v in stats["positive_ff_by_class"].items())
        + ". A channel's class is that of the anchor tokens carrying most of its anchor part: content = a "
        "number or word that the later sentences reuse; word = alphanumeric, not reused; structural = "
        "punctuation, whitespace, format; baseline-only = no anchor part (it only lowers the row's average).",
        "",
        "Examples (the strongest channel of the top anchor of a few traces):",
        "",
        "| trace | head | anchor sentence | channel | value | class | key tokens | key feature |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ch = tables["anchor_channels"]
    ex = ch[(ch["rank"] == 0)].merge(anc[anc["rank"] == 0][["trace", "layer", "head", "anchor"]])
    for row in ex.head(8).itertuples():
        text = sent[(sent.trace == row.trace) & (sent.i == row.anchor)]["text"].iloc[0].strip().replace("|", "/")
        lines.append(
            f"| {row.trace} | {row.layer}.{row.head} | {text[:60]!r} | ({row.feat_q}, {row.feat_k}) | "
            f"{row.value:.3f} | {row.cls} | {', '.join(json.loads(row.key_tokens))!r} | {row.label_k[:40]} |"
        )
    lines.append("")
    return lines


def _consistency_lines(cfg, stats, receivers) -> list[str]:
    return [
        "## Internal consistency, against a null",
        "",
        "![consistency](consistency.png)",
        "",
        "Per trace: (a) agreement = Spearman correlation over sentences between the receiver score (mean vertical "
        f"score over the {len(receivers)} receiver heads) and the suppression score (mean log-KL over sentences >= "
        f"{cfg.proximity} later); (b) content share = share of the positive channel values at the anchors that "
        "belongs to content channels. The null keeps the tokens and the model's outputs and shuffles the order "
        f"of the sentence lengths ({cfg.n_shuffles} draw(s) per trace), recomputing (a) and (b).",
        "",
        "| measure | real | null | real vs null (Wilcoxon p) | correct - incorrect | perm. p | same on null |",
        "|---|---|---|---|---|---|---|",
        f"| agreement | {_fmt(stats['agreement_mean'])} | {_fmt(stats['null_agreement_mean'])} | "
        f"{_fmt(stats['agreement_vs_null_p'], 4)} | {_fmt(stats['agreement_correct_minus_incorrect'])} | "
        f"{_fmt(stats['agreement_correct_p'], 4)} | {_fmt(stats['null_agreement_correct_minus_incorrect'])} |",
        f"| content share | {_fmt(stats['content_share_mean'])} | {_fmt(stats['null_content_share_mean'])} | "
        f"{_fmt(stats['content_vs_null_p'], 4)} | {_fmt(stats['content_share_correct_minus_incorrect'])} | "
        f"{_fmt(stats['content_share_correct_p'], 4)} | {_fmt(stats['null_content_share_correct_minus_incorrect'])} |",
        "",
    ]


def _resolution_lines(cfg, stats, receivers, fa_heads) -> list[str]:
    rank = {lh: k + 1 for k, lh in enumerate(receivers)}
    heads = ", ".join(f"{l}.{h}" for l, h in fa_heads)
    outside = [f"{l}.{h}" for l, h in fa_heads if (l, h) not in rank]
    groups = stats["anchor_groups_mean"]
    biggest = max(groups, key=lambda g: abs(groups[g]))
    delta = stats["anchor_delta_mean"]
    if outside:
        which = (
            f"Of the resolved heads ({heads}), {', '.join(outside)} are not among the top {len(receivers)} "
            "receiver heads: they are only the strongest heads of the SAE layers, so their channels say why "
            "*they* attend to an anchor, not why the receiver heads do."
        )
    else:
        which = (
            f"The resolved heads ({heads}) are receiver heads themselves (ranks "
            f"{', '.join(str(rank[lh]) for lh in fa_heads)} of {len(receivers)}), so their channels say why "
            "receiver heads attend to an anchor."
        )
    sign = (
        " It is negative: the anchors' keys score below the row's attention-weighted average key (which "
        "includes the position-0 sink), so the split explains why the anchor is attended *less* than that "
        "average, and a positive channel value works for the anchor."
        if delta < 0
        else ""
    ) + (
        f" Delta > 0 in {stats['delta_positive_share']:.0%} of the anchor x head cases; the anchors are mostly "
        f"a trace's first sentences ({stats['anchor_first3_share']:.0%} of the cases are sentences 0-2)."
    )
    return [
        "## What the feature resolution adds over the sentence-level view",
        "",
        f"Thought Anchors' view says which sentences receive attention (receiver heads) and which ones matter "
        f"causally (suppression); here they agree with Spearman {_fmt(stats['agreement_mean'], 2)} on average "
        f"against {_fmt(stats['null_agreement_mean'], 2)} on shuffled boundaries (p = "
        f"{_fmt(stats['agreement_vs_null_p'], 3)}). The feature-resolved split says *why* a head attends to an "
        f"anchor. Summed over the anchor x head cases, the feature x feature terms give "
        f"{_fmt(stats['ff_share_of_sum'], 2)} of the summed score advantage Delta, the b_dec / error terms "
        f"{_fmt(stats['resid_share_of_sum'], 2)} and the bias terms {_fmt(stats['bias_share_of_sum'], 2)}; of "
        f"the absolute mass (opposite signs not cancelling) the feature terms carry "
        f"{_fmt(stats['ff_share_of_abs'], 2)} and the b_dec / error terms {_fmt(stats['resid_share_of_abs'], 2)} "
        f"(per anchor, the median ff share of Delta is {_fmt(stats['ff_share_of_delta'], 2)}, unstable where "
        f"Delta is near 0). The ff part is spread over many channels (the top {cfg.top_channels} carry a median "
        f"{_fmt(stats['top_channels_share_of_ff'], 2)} of it, the top one "
        f"{_fmt(stats['top1_share_of_positive'], 2)} of the positive mass); and content channels carry "
        f"{_fmt(stats['content_share_mean'], 2)} of the positive channel mass against "
        f"{_fmt(stats['null_content_share_mean'], 2)} on shuffled boundaries (p = "
        f"{_fmt(stats['content_vs_null_p'], 3)}). None of these numbers exists at sentence level.",
        "",
        f"Read with care. {which} Their mean Delta at the anchors is {delta:.2f}.{sign} The group with the "
        f"largest mean |part| is `{biggest}` ({groups[biggest]:.2f}). The b_dec / error share belongs to the SAE "
        "as much as to the head: an SAE that keeps more of what W_Q and W_K read moves part of it into "
        "feature terms (MODEL_CARD.md gives each SAE's QK variance explained; the per-head table above "
        "separates the layers).",
        "",
    ]


def _correctness_lines(traces, stats) -> list[str]:
    if not (stats["n_correct"] == 0 or stats["n_correct"] == stats["n_traces"]):
        return []
    n_ok = sum(t.correct for t in traces)
    return [
        "## Correct against incorrect traces",
        "",
        f"Not measurable on these traces: {n_ok} of {len(traces)} traces are correct, and "
        f"{stats['n_correct']} of the {stats['n_traces']} studied ones (a correct trace of this model is "
        f"short: at most {max([len(t.trace) for t in traces if t.correct], default=0)} characters). "
        "Run the study on a reasoning model's traces (README) for this test.",
        "",
    ]


def write_report(cfg, traces, done, resolved, rows, mean_kurt, receivers, fa_heads, meta, tok_text) -> dict:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed + 1)
    L, H = mean_kurt.shape

    # ---- tables for the explorer
    _write_traces(out, traces, done)
    sent = _write_trace_tables(out, done, receivers, cfg, L, H)
    _write_heads(out, mean_kurt, receivers, fa_heads)
    tables = _write_resolved(out, resolved)
    cons = _write_consistency(out, rows)

    # ---- statistics
    v = _consistency_arrays(cons)
    stats = _consistency_stats(v, cfg.n_perm, rng)
    anc = tables["anchors"]
    if len(anc):
        stats.update(_anchor_stats(anc, tables["anchor_channels"]))
    acc = _accuracy(traces)

    # ---- figures
    _receiver_figure(out, mean_kurt, receivers, fa_heads, len(done))
    # second panel: the strongest resolved head other than the top receiver head (that is the first panel)
    sentence_figure(out, receivers[0], next((h for h in fa_heads if h != receivers[0]), receivers[0]))
    _consistency_figure(out, v)

    # ---- report.md
    lines = [
        *_intro_lines(cfg, traces, done, acc, stats),
        *_receiver_lines(cfg, done, mean_kurt, receivers, fa_heads, meta),
        *_sentence_lines(),
    ]
    if len(anc):
        lines += _anchor_lines(cfg, stats, tables, sent, receivers)
    lines += _consistency_lines(cfg, stats, receivers)
    if len(anc):
        lines += _resolution_lines(cfg, stats, receivers, fa_heads)
    lines += _correctness_lines(traces, stats)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return dict(meta=meta, stats=stats, accuracy=acc.to_dict("records"))


def sentence_figure(out, receiver, resolved, n_traces: int = 3) -> None:
    """sentence_matrices.png from the stored tables: for the longest traces, the mean attention of the
    top receiver head and of the strongest resolved head (diagonal left out, as in the vertical
    scores), and the suppression log-KL matrix."""
    import pandas as pd

    plt = _pyplot()

    sent = pd.read_parquet(out / "sentences.parquet")
    mats = pd.read_parquet(out / "matrices.parquet")
    kl = pd.read_parquet(out / "kl.parquet")
    sizes = sent.groupby("trace")["i"].max().sort_values(ascending=False) + 1
    show = [int(t) for t in sizes.index[:n_traces]]
    fig, axes = plt.subplots(len(show), 3, figsize=(14, 4.2 * len(show)), squeeze=False)
    for row, tr in enumerate(show):
        n = int(sizes[tr])
        for col, (l, h) in enumerate((receiver, resolved)):
            d = mats[(mats.trace == tr) & (mats.layer == l) & (mats["head"] == h) & (mats.i > mats.j)]
            m = np.full((n, n), np.nan)
            m[d.i.to_numpy(), d.j.to_numpy()] = d.attn.to_numpy()
            im = axes[row, col].imshow(m, cmap="magma")
            fig.colorbar(im, ax=axes[row, col], fraction=0.046)
            what = "top receiver head" if col == 0 else "resolved head"
            axes[row, col].set_title(f"trace {tr}: {what} {l}.{h}, mean attention weight", fontsize=9)
        d = kl[(kl.trace == tr) & (kl.i > kl.j)]
        m = np.full((n, n), np.nan)
        m[d.i.to_numpy(), d.j.to_numpy()] = d.log_kl.to_numpy()
        im = axes[row, 2].imshow(m, cmap="viridis")
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046)
        axes[row, 2].set_title(f"trace {tr}: suppression log-KL (col: suppressed)", fontsize=9)
        for a in axes[row]:
            a.set_xlabel("key sentence j")
            a.set_ylabel("query sentence i")
    fig.tight_layout()
    fig.savefig(out / "sentence_matrices.png", dpi=90)
    plt.close(fig)
