"""Head census: induction, previous-token and duplicate-token scores for every head.

Definitions follow the TransformerLens main demo and its head detector:
- induction score: on [BOS] + r + r with r a sequence of `seq_len` uniformly random tokens,
  the mean attention from each position of the second copy to the token *after* the earlier
  occurrence of the same token (the diagonal at offset -(seq_len - 1)).
- its control: the same diagonal on [BOS] + r1 + r2 with r1, r2 independent (no repeats).
- previous-token score: mean attention from position q to q-1 (q >= 1) on the same sequences.
- duplicate-token score: on the repeated sequences, the mean attention from the second copy to
  the earlier occurrence of the same token (offset -seq_len).

A token induction head (TIH) has induction >= `tih_min` on repeats and < `tih_control_max`
on the control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..registry import ASSETS


@dataclass(frozen=True)
class CensusConfig:
    model: str = "smollm2-135m"
    seq_len: int = 50
    n_seqs: int = 32
    seed: int = 0
    tih_min: float = 0.3
    tih_control_max: float = 0.05
    out: Path = ASSETS / "census_smollm2-135m.json"
    device: str = "cpu"

    def __post_init__(self):
        if self.seq_len < 2 or self.n_seqs < 1:
            raise ValueError("seq_len must be >= 2 and n_seqs >= 1")
        if self.out == ASSETS / "census_smollm2-135m.json" and self.model != "smollm2-135m":
            object.__setattr__(self, "out", ASSETS / f"census_{self.model}.json")  # never another model's file


def random_repeats(n_seqs, seq_len, d_vocab, bos_id, seed, repeat=True, low=100):
    """[n_seqs, 1 + 2 seq_len] token ids: BOS, then r, then r again (or an independent r2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r1 = torch.randint(low, d_vocab, (n_seqs, seq_len), generator=g)
    r2 = r1 if repeat else torch.randint(low, d_vocab, (n_seqs, seq_len), generator=g)
    bos = torch.full((n_seqs, 1), bos_id)
    return torch.cat([bos, r1, r2], 1)


def head_scores(patterns_LBHQK, seq_len: int) -> dict:
    """Scores per (layer, head) from attention patterns of [BOS] + r + r sequences."""
    import torch

    P = patterns_LBHQK
    second = torch.arange(1 + seq_len, 1 + 2 * seq_len)
    ind = P[..., second, second - seq_len + 1].mean((1, -1))
    dup = P[..., second, second - seq_len].mean((1, -1))
    q = torch.arange(1, P.shape[-1])
    prev = P[..., q, q - 1].mean((1, -1))
    return {"induction": ind, "duplicate": dup, "prev_token": prev}


def census(model, seq_len, n_seqs, bos_id, seed, device="cpu") -> dict:
    import torch

    out = {}
    for name, repeat in (("repeat", True), ("control", False)):
        toks = random_repeats(n_seqs, seq_len, model.cfg.d_vocab, bos_id, seed, repeat=repeat)
        with torch.no_grad():
            # stop before the unembedding: no [batch, pos, d_vocab] logits (1 GB per 10 sequences of Gemma 3)
            _, cache = model.run_with_cache(
                toks.to(device), names_filter=lambda n: n.endswith("hook_pattern"), stop_at_layer=model.cfg.n_layers
            )
        P = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)]).cpu()
        out[name] = head_scores(P, seq_len)
    return out


def run(cfg: CensusConfig) -> dict:
    from ..registry import load_model

    lm = load_model(cfg.model, device=cfg.device)
    res = census(lm.model, cfg.seq_len, cfg.n_seqs, lm.bos_id, cfg.seed, cfg.device)
    n_layers, n_heads = res["repeat"]["induction"].shape
    heads = []
    for l in range(n_layers):
        for h in range(n_heads):
            heads.append(
                {
                    "layer": l,
                    "head": h,
                    "induction": float(res["repeat"]["induction"][l, h]),
                    "induction_control": float(res["control"]["induction"][l, h]),
                    "prev_token": float(res["repeat"]["prev_token"][l, h]),
                    "duplicate": float(res["repeat"]["duplicate"][l, h]),
                }
            )
    tih = [
        f"{r['layer']}.{r['head']}"
        for r in sorted(heads, key=lambda r: -r["induction"])
        if r["induction"] >= cfg.tih_min and r["induction_control"] < cfg.tih_control_max
    ]
    doc = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "token_induction_heads": tih, "heads": heads}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(doc, indent=1))
    top = sorted(heads, key=lambda r: -r["induction"])[:12]
    print("head   induction  control  prev_token  duplicate")
    for r in top:
        print(
            f"{r['layer']:>2}.{r['head']:<3} {r['induction']:9.3f} {r['induction_control']:8.3f} "
            f"{r['prev_token']:11.3f} {r['duplicate']:10.3f}"
        )
    print("token induction heads:", ", ".join(tih))
    return doc


def load_census(model: str = "smollm2-135m") -> dict:
    path = ASSETS / f"census_{model}.json"
    if not path.exists():
        raise FileNotFoundError(f"no census for {model} at {path}; run `fra census --model {model}`")
    return json.loads(path.read_text())
