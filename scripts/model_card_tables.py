"""Prints the MODEL_CARD.md tables from the shipped metrics JSON files (no model needed)."""

import json
from pathlib import Path

root = Path(__file__).resolve().parent.parent / "ingest" / "assets"
saes = root / "saes" / "smollm2-135m"
train = json.loads((saes / "train_metrics.json").read_text())
ev = json.loads((saes / "eval_metrics.json").read_text())
print("| layer | latents | k | L0 | variance explained | dead (over held-out tokens) | loss clean | +Δ spliced | +Δ zero-ablated | KL spliced | KL zero-ablated | train tokens | train time |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for layer, m in ev["layers"].items():
    t = train["layers"][layer]
    print(f"| {layer} | {m['d_sae']} | {m['k']} | {m['l0']:.1f} | {m['fve']:.3f} | {m['dead']} ({m['dead_fraction']:.2%} of {m['dead_scan_tokens']:,} tokens) | "
          f"{m['loss_clean']:.3f} | {m['loss_increase_spliced']:.4f} nats | {m['loss_increase_zero_ablated']:.4f} nats | "
          f"{m['kl_spliced']:.4f} | {m['kl_zero_ablated']:.4f} | {t['n_train_tokens']:,} | {t['train_seconds']:.0f} s |")
print(f"\nActivation collection: {train['collect_seconds']:.0f} s; evaluation tokens for loss/KL/FVE: "
      f"{next(iter(ev['layers'].values()))['n_eval_tokens']:,}.")
census = json.loads((root / "census_smollm2-135m.json").read_text())
heads = sorted(census["heads"], key=lambda r: -r["induction"])
print("\n| head | induction (repeats) | induction (control) | previous-token | duplicate-token |\n|---|---|---|---|---|")
for r in heads[:12]:
    print(f"| {r['layer']}.{r['head']} | {r['induction']:.3f} | {r['induction_control']:.3f} | {r['prev_token']:.3f} | {r['duplicate']:.3f} |")
print("\nTop previous-token heads: " + ", ".join(f"{r['layer']}.{r['head']} ({r['prev_token']:.2f})"
      for r in sorted(census["heads"], key=lambda r: -r["prev_token"])[:6]))
print("Top duplicate-token heads: " + ", ".join(f"{r['layer']}.{r['head']} ({r['duplicate']:.2f})"
      for r in sorted(census["heads"], key=lambda r: -r["duplicate"])[:6]))
print("Token induction heads (>= 0.3 on repeats, < 0.05 on control): " + ", ".join(census["token_induction_heads"]))
