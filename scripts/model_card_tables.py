"""Prints the MODEL_CARD.md tables from the metrics JSON files (no model needed) and draws
reports/sae/curve.png.

Inputs: the shipped SAEs' `eval_metrics.json` and `train_metrics.json`; the previous SAEs' in
`reports/sae/previous/`; the objective comparison and the width x k grid in `reports/sae/`.
"""

import json
from pathlib import Path

root = Path(__file__).resolve().parent.parent
assets = root / "fra" / "ingest" / "assets"
saes = assets / "saes" / "smollm2-135m"
reports = root / "reports" / "sae"
load = lambda p: json.loads(Path(p).read_text())  # noqa: E731

GOALS = {"tih": 0.55, "qk": 0.90, "fve": 0.86, "dead": 0.01, "splice": 0.015}


def per_head(tih) -> str:
    return ", ".join(f"{h}: {r['ff_share']:.0%}" for h, r in tih["heads"].items())


def quality_rows(name, ev, tokens, seconds):
    """`tokens` and `seconds`: numbers, or dicts by layer (layers of one file from different runs)."""
    rows = []
    for layer, m in ev["layers"].items():
        if isinstance(tokens, dict):
            if int(layer) not in tokens:
                continue
            name_l, tok_l, sec_l = name[int(layer)], tokens[int(layer)], seconds[int(layer)]
            rows += quality_rows(name_l, {"layers": {layer: m}}, tok_l, sec_l)
            continue
        qk, tih = m.get("qk_ve"), m.get("tih")
        rows.append(
            f"| {name} | {layer} | {m['d_sae']} | {m['k']} | {tokens:,} | {seconds / 60:.0f} min | {m['fve']:.3f} | "
            + (f"{qk['q_mean']:.3f} / {qk['k_mean']:.3f} / {qk['min']:.3f} | " if qk else "– | ")
            + (f"{tih['mean_ff_share']:.1%} ({per_head(tih)}) | " if tih else "– | ")
            + f"{m['dead']} ({m['dead_fraction']:.2%} of {m['dead_scan_tokens']:,}) | "
            f"{m['loss_increase_spliced']:.4f} | "
            f"{m['kl_spliced']:.4f} | {m['loss_increase_zero_ablated']:.4f} |"
        )
    return rows


def main():
    prev_ev, prev_tr = (
        load(reports / "previous" / "eval_metrics.json"),
        load(reports / "previous" / "train_metrics.json"),
    )
    prev_attn = load(reports / "previous" / "attention_metrics.json")
    for layer, m in prev_ev["layers"].items():
        m.update(prev_attn["layers"][layer])
    ev, tr = load(saes / "eval_metrics.json"), load(saes / "train_metrics.json")
    # every train_metrics*.json is one run; its layers take the run's tokens and time
    runs = {p.name: load(p) for p in sorted(saes.glob("train_metrics*.json"))}
    run_of = {l: (n, r) for n, r in runs.items() for l in r["config"]["layers"]}
    names = {
        l: "shipped" if n == "train_metrics.json" else "shipped (CoT receiver layers)" for l, (n, _) in run_of.items()
    }
    prev_seconds = prev_tr["collect_seconds"] + sum(v["train_seconds"] for v in prev_tr["layers"].values())
    print("### Previous and shipped SAEs, held-out text\n")
    print(
        "| SAEs | layer | latents | k | train tokens | CPU time | variance explained | QK variance explained "
        "(mean q / mean k / worst head) | TIH feature share (per head) | dead | +Δ loss spliced (nats) | KL spliced "
        "| +Δ loss zero-ablated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in quality_rows("previous", prev_ev, 600_000, prev_seconds) + quality_rows(
        names,
        ev,
        {l: r["tokens_per_layer"] for l, (_, r) in run_of.items()},
        {l: r["seconds"] for l, (_, r) in run_of.items()},
    ):
        print(row)

    print("\n### Goals\n")
    print("| goal | layer 17 | layer 18 | met? |\n|---|---|---|---|")
    L = ev["layers"]
    for text, key, fmt, ok in (
        (
            f"TIH feature share ≥ {GOALS['tih']:.0%}",
            lambda m: m["tih"]["mean_ff_share"],
            "{:.1%}",
            lambda v: v >= GOALS["tih"],
        ),
        (
            f"QK variance explained ≥ {GOALS['qk']}",
            lambda m: min(m["qk_ve"]["q_mean"], m["qk_ve"]["k_mean"]),
            "{:.3f}",
            lambda v: v >= GOALS["qk"],
        ),
        (f"variance explained ≥ {GOALS['fve']}", lambda m: m["fve"], "{:.3f}", lambda v: v >= GOALS["fve"]),
        (f"dead latents < {GOALS['dead']:.0%}", lambda m: m["dead_fraction"], "{:.2%}", lambda v: v < GOALS["dead"]),
        (
            f"splice loss increase ≤ {GOALS['splice']}",
            lambda m: m["loss_increase_spliced"],
            "{:.4f}",
            lambda v: v <= GOALS["splice"],
        ),
    ):
        vals = [key(L[l]) for l in ("17", "18")]
        print(f"| {text} | {fmt.format(vals[0])} | {fmt.format(vals[1])} | {'yes' if all(map(ok, vals)) else 'no'} |")

    print("\n### Curve: held-out metrics against training tokens (both objectives, same stream)\n")
    names = sorted(tr["curve"][-1]["sae"])
    print("| tokens per layer | CPU time | " + " | ".join(f"{n}: FVE / QK VE q / TIH share" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for p in tr["curve"]:
        print(
            f"| {p['tokens']:,} | {p['seconds'] / 60:.0f} min | "
            + " | ".join(
                f"{p['sae'][n]['fve']:.3f} / {p['sae'][n]['qk_ve_q']:.3f} / "
                + ("–" if p["sae"][n]["tih_ff_share"] is None else f"{p['sae'][n]['tih_ff_share']:.1%}")
                for n in names
            )
            + " |"
        )
    pc = tr.get("precision_check")
    if pc:
        print(
            "\nbf16 collection against fp32 on held-out text (relative error of the activation vector): "
            + "; ".join(
                f"layer {l}: median {v['rel_err_median']:.4f}, 99.9th percentile {v['rel_err_p999']:.4f}, "
                f"max {v['rel_err_max']:.4f} over {v['n_tokens']:,} tokens"
                for l, v in pc.items()
            )
        )

    grid_path = reports / "grid" / "train_metrics.json"
    if grid_path.exists():
        grid = load(grid_path)
        speed = (
            load(reports / "grid" / "ingest_speed.json") if (reports / "grid" / "ingest_speed.json").exists() else {}
        )
        last = grid["curve"][-1]
        print(f"\n### Width x k (layer 17, plain MSE, {last['tokens']:,} tokens each, one stream)\n")
        print(
            "| latents | k | ingest samples/s (layer 17) | channels kept | TIH feature share | "
            "variance explained | QK VE q / k |"
        )
        print("|---|---|---|---|---|---|---|")
        for name in sorted(last["sae"], key=lambda n: (int(n.split("x")[0]), int(n.split("x")[1].split(":")[0]))):
            m = last["sae"][name]
            w, k = name.split(":")[0].split("x")
            s = speed.get(name.split("@")[0], {})
            print(
                f"| {w} | {k} | {s.get('samples_per_s', float('nan')):.2f} | {s.get('channels_kept', 0):,} | "
                f"{m['tih_ff_share']:.1%} | {m['fve']:.3f} | {m['qk_ve_q']:.3f} / {m['qk_ve_k']:.3f} |"
            )
    plot(tr)
    census_tables()


def census_tables():
    census = load(assets / "census_smollm2-135m.json")
    heads = sorted(census["heads"], key=lambda r: -r["induction"])
    print(
        "\n| head | induction (repeats) | induction (control) | previous-token | duplicate-token "
        "|\n|---|---|---|---|---|"
    )
    for r in heads[:12]:
        print(
            f"| {r['layer']}.{r['head']} | {r['induction']:.3f} | {r['induction_control']:.3f} | "
            f"{r['prev_token']:.3f} | {r['duplicate']:.3f} |"
        )
    print(
        "\nTop previous-token heads: "
        + ", ".join(
            f"{r['layer']}.{r['head']} ({r['prev_token']:.2f})"
            for r in sorted(census["heads"], key=lambda r: -r["prev_token"])[:6]
        )
    )
    print(
        "Top duplicate-token heads: "
        + ", ".join(
            f"{r['layer']}.{r['head']} ({r['duplicate']:.2f})"
            for r in sorted(census["heads"], key=lambda r: -r["duplicate"])[:6]
        )
    )
    print("Token induction heads (>= 0.3 on repeats, < 0.05 on control): " + ", ".join(census["token_induction_heads"]))


def plot(tr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(tr["curve"][-1]["sae"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title, goal) in zip(
        axes,
        (
            ("fve", "variance explained", GOALS["fve"]),
            ("qk_ve_q", "QK variance explained (queries, mean over heads)", GOALS["qk"]),
            ("tih_ff_share", "feature share of TIH margins", GOALS["tih"]),
        ),
    ):
        for n in names:
            pts = [(p["tokens"] / 1e6, p["sae"][n][key]) for p in tr["curve"] if p["sae"][n][key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=n.replace("@", ", layer "))
        ax.axhline(goal, color="k", ls=":", lw=1, label="goal")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens per layer (millions)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = reports / "curve.png"
    fig.savefig(out, dpi=110)
    print(f"\n![held-out metrics against training tokens](reports/sae/curve.png)  (written to {out.relative_to(root)})")


if __name__ == "__main__":
    main()
