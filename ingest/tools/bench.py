"""`fra bench`: throughput of the ingest inner loop on the default model, against the naive
per-pair reference measured in the same run, with a breakdown of where the time goes.

Workload: SmolLM2-135M, layers 17-18, all 9 heads, 128-token samples (random tokens after BOS,
so every sample has exactly 128 positions), the shipped SAEs.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, ...] = (17, 18)
    n_samples: int = 8
    seq_len: int = 128
    naive_pairs: int = 12  # (head, q, k) pairs timed with the naive reference, then extrapolated
    top_m: int = 32
    device: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2:
            raise ValueError("n_samples >= 1 and seq_len >= 2")


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(cfg: BenchConfig) -> dict:
    import torch

    from .decompose import build_projector, pair_terms, project_tokens, run_hooks
    from .models import load_model
    from .reduce import ChannelAccumulator, induction_mask, reduce_sample
    from .reference import naive_fa
    from .runner import IngestConfig, Inputs, run as ingest
    from .train_sae import load_shipped_sae

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(cfg.model, device=device)
    model = lm.model
    g = torch.Generator().manual_seed(cfg.seed)
    samples = [[lm.bos_id] + torch.randint(100, model.cfg.d_vocab, (cfg.seq_len - 1,), generator=g).tolist()
               for _ in range(cfg.n_samples)]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
               "layers": {}}
    for layer in cfg.layers:
        sae = load_shipped_sae(cfg.model, layer, device)
        proj = build_projector(model, layer, sae)
        F, H = sae.cfg.d_sae, model.cfg.n_heads
        acc, ind_acc = ChannelAccumulator.zeros(F, H, device=device), ChannelAccumulator.zeros(F, H, device=device)
        phases = dict.fromkeys(("forward", "sae_encode", "project", "reduce", "pair_terms"), 0.0)
        with torch.no_grad():
            for i, toks in enumerate(samples):
                t = torch.tensor(toks, device=device)[None]
                marks = [time.perf_counter()]
                hooks = run_hooks(model, layer, sae.cfg.metadata.hook_name, t); _sync(device); marks.append(time.perf_counter())
                acts = sae.encode(hooks.x_BTD); _sync(device); marks.append(time.perf_counter())
                sparse, q, k, _ = project_tokens(proj, hooks.x_BTD, acts, sae.W_dec, sae.b_dec, hooks.norm_scale_BT)
                _sync(device); marks.append(time.perf_counter())
                reduce_sample(q.feat_BHTAE[0], k.feat_BHTAE[0], sparse.feat_idx_BTA[0], sparse.acts_BTA[0] != 0,
                              induction_mask(t[0]), acc, ind_acc, cfg.top_m)
                _sync(device); marks.append(time.perf_counter())
                pair_terms(q, k); _sync(device); marks.append(time.perf_counter())
                if i == 0:
                    continue  # warm-up
                for name, a, b in zip(phases, marks, marks[1:]):
                    phases[name] += b - a
        n = cfg.n_samples - 1 or 1
        per_sample = sum(phases.values()) / n
        # naive reference: a few (h, q, k) pairs of the first sample, extrapolated to all causal pairs
        hooks = run_hooks(model, layer, sae.cfg.metadata.hook_name, torch.tensor(samples[0], device=device)[None])
        T = cfg.seq_len
        pairs = [(int(torch.randint(0, H, (1,), generator=g)), q, int(torch.randint(0, q + 1, (1,), generator=g)))
                 for q in torch.randint(0, T, (cfg.naive_pairs,), generator=g).tolist()]
        t0 = time.perf_counter()
        for h, qq, kk in pairs:
            naive_fa(model, layer, sae, hooks.x_BTD[0], hooks.norm_scale_BT[0], h, qq, kk)
        naive_per_sample = (time.perf_counter() - t0) / len(pairs) * H * T * (T + 1) / 2
        results["layers"][str(layer)] = {
            "samples_per_s": 1 / per_sample,
            "naive_s_per_sample": naive_per_sample,
            "speedup_vs_naive": naive_per_sample / per_sample,
            "phase_ms_per_sample": {k: 1000 * v / n for k, v in phases.items()},
        }
    # bytes written per sample: a real ingest of the same samples into a temporary index
    tmp = Path(tempfile.mkdtemp())
    saes = {l: load_shipped_sae(cfg.model, l, device) for l in cfg.layers}
    inp = Inputs(lm, saes, tuple(cfg.layers), list(range(len(samples))), ["" for _ in samples], samples, "bench",
                 {str(l): "bench" for l in cfg.layers})
    ingest(IngestConfig(out=tmp / "index", model=cfg.model, top_m=cfg.top_m, progress=False, device=device), inp)
    size = sum(p.stat().st_size for p in (tmp / "index").rglob("*") if p.is_file())
    shutil.rmtree(tmp)
    results["bytes_written_per_sample"] = size / len(samples)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if device == "cuda":
        results["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    _print(results)
    return results


def _print(r: dict) -> None:
    print(f"\nfra bench on {r['device']}: 128-token samples, all heads, per layer")
    print(f"{'layer':>5} {'samples/s':>10} {'naive s/sample':>15} {'speed-up':>9}   time per sample (ms)")
    for layer, m in r["layers"].items():
        ph = "  ".join(f"{k} {v:.0f}" for k, v in m["phase_ms_per_sample"].items())
        print(f"{layer:>5} {m['samples_per_s']:10.2f} {m['naive_s_per_sample']:15.0f} {m['speedup_vs_naive']:8.0f}x   {ph}")
    print(f"bytes written per sample (all layers): {r['bytes_written_per_sample'] / 1e6:.2f} MB")
    print(f"peak RSS: {r['peak_rss_gb']:.2f} GB" + (f", peak GPU memory {r['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in r else ""))
