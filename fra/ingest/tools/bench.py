"""`fra bench`: what a full `fra ingest` costs, for the shipped SAEs and per SAE width.

Workload: SmolLM2-135M-Instruct, one layer (17), all 9 heads, `n_samples` samples of exactly
`seq_len` tokens (BOS + consecutive windows of the shipped demo corpus). SAEs: the shipped SAE of
the layer (4,096 latents, k=64), and synthetic TopK SAEs (random unit-norm decoder rows, encoder
= decoder transposed, zero biases, k = `k`) of each width. For memory and channel counts a random
SAE needs no download and spreads its features widely; they are not results about any real SAE.

Each SAE runs in its own process, so that its peak RSS is its own. Per SAE: samples/s of the whole
ingest (both passes and the writing, model loading excluded), the time of each pass, peak RSS,
bytes on disk per sample, channels seen and kept, and for the statistics pass:
- FA values/s: the feature x feature values (one per head, visible (q, k) and pair of active
  features) that the pass forms and reduces, per second;
- the roofline ratio: the pass's time per sample over the time of plain `torch.matmul` calls
  that compute the same values (the faster of blocks of `q_block` queries and blocks of one query,
  whose output stays in cache), measured in the same process right after the ingest on the first
  `roofline_samples` samples.

Engines: the same workload at the first width runs again with `--engine ray` and
`engine_workers` actors on a local Ray instance (when Ray is installed), next to the local
engine's run, with samples/s and wall time including Ray's start-up. From the measured
per-sample worker time and the merge's cost per partial it prints an *estimate* of a run of
10^6 samples on 100 such CPU workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import opt

SHIPPED = "shipped"


@dataclass(frozen=True)
class BenchConfig:
    widths: tuple[int, ...] = opt((4096, 24576, 65536), "SAE widths (d_sae) to measure")
    k: int = opt(32, "TopK k of the synthetic SAEs")
    layer: int = opt(17, "the layer indexed")
    n_samples: int = opt(64, "samples indexed per width")
    seq_len: int = opt(128, "tokens per sample, BOS included")
    min_count: int = opt(128, "the ingest's keep-policy (as in the README's main job)")
    memory_budget_gb: float = opt(1.0, "the ingest's memory budget")
    shipped: bool = opt(True, "also measure the shipped SAE of the layer (4,096 latents, k=64)")
    roofline_samples: int = opt(8, "samples on which the plain-matmul time of the roofline ratio is measured")
    device: str | None = opt(None, "torch device; default: cuda when available, else cpu")
    seed: int = opt(0, "seed of the synthetic SAEs")
    engine_workers: int = opt(2, "actors of the --engine ray run at the first width (0: skip the engine comparison)")
    block_size: int = opt(16, "the ingest's samples per block")

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2 or not self.widths:
            raise ValueError("need n_samples >= 1, seq_len >= 2 and at least one width")


def synthetic_sae(d_in: int, d_sae: int, k: int, hook: str, seed: int):
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    sae.cfg.metadata.hook_name = hook
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d_in, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def bench_tokens(tokenizer, bos_id: int, n: int, seq_len: int) -> list[list[int]]:
    """`n` samples of BOS + `seq_len - 1` consecutive tokens of the demo corpus (cycled)."""
    from ..corpus import DEMO_CORPUS, read_corpus

    texts = read_corpus(DEMO_CORPUS).column("text").to_pylist()
    stream = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
    w = seq_len - 1
    return [[bos_id] + [stream[(i * w + j) % len(stream)] for j in range(w)] for i in range(n)]


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def measure(args: dict) -> dict:
    """One SAE (`width` SHIPPED or a synthetic width), in this process."""
    import time

    import torch

    from ..index import blocks
    from ..index.build import IngestConfig, Inputs, run
    from ..registry import load_model, sae_source

    t_load = time.perf_counter()
    device = args["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    hook = f"blocks.{args['layer']}.ln1.hook_normalized"
    out = Path(args["out"])
    lm = load_model("smollm2-135m", device=device)
    if args["width"] == SHIPPED:
        sae, sae_name = sae_source("smollm2-135m", None).load(args["layer"], device)
    else:
        sae = synthetic_sae(lm.model.cfg.d_model, args["width"], args["k"], hook, args["seed"]).to(device)
        sae_name = f"synthetic-{args['width']}"
    tokens = bench_tokens(lm.tokenizer, lm.bos_id, args["n_samples"], args["seq_len"])
    inp = Inputs(lm, {args["layer"]: sae}, list(range(len(tokens))), [""] * len(tokens), tokens, "bench",
                 {str(args["layer"]): sae_name})  # fmt: skip
    cfg = IngestConfig(
        out=out,
        model="smollm2-135m",
        layers=(args["layer"],),
        min_count=args["min_count"],
        progress=False,
        device=device,
        memory_budget_gb=args["memory_budget_gb"],
        block_size=args["block_size"],
        engine=args.get("engine", "local"),
        workers=args.get("workers"),
    )
    load = time.perf_counter() - t_load
    phase_seconds = {"count": 0.0, "stats": 0.0}  # local engine: time of each pass's blocks
    block_run = blocks.BlockWorker.run

    def timed_run(worker, task):
        t = time.perf_counter()
        block_run(worker, task)
        phase_seconds[task.phase] += time.perf_counter() - t

    blocks.BlockWorker.run = timed_run
    t = time.perf_counter()
    startup = 0.0
    if args.get("engine") == "ray":
        import ray

        ray.init(num_cpus=args["workers"], include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - t
    run(cfg, inp)
    seconds = time.perf_counter() - t
    if args.get("engine") == "ray":
        ray.shutdown()
    blocks.BlockWorker.run = block_run
    manifest = json.loads((out / "manifest.json").read_text())
    st = manifest["stats"][str(args["layer"])]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    roof = roofline(lm.model, args["layer"], sae, tokens[: args["roofline_samples"]], cfg.q_block, device)
    return {
        "width": args["width"],
        "d_sae": int(sae.cfg.d_sae),
        "samples_per_s": len(tokens) / seconds,
        "seconds": seconds,
        "count_seconds": phase_seconds["count"],
        "stats_seconds": phase_seconds["stats"],
        **roof,
        "peak_rss_gb": _peak_rss_gb(),
        "bytes_per_sample": size / len(tokens),
        "channels_seen": st["channels_seen"],
        "channels_kept": st.get("channels_kept", st.get("channels_written")),
        "sweeps": st.get("sweeps", 1),
        "count_runs_spilled": st.get("count_runs_spilled", 0),
        "load_seconds": load,
        "startup_seconds": startup,
        "blocks": st.get("blocks"),
        "block_seconds": st.get("block_seconds"),
        "merge_seconds": st.get("merge_seconds", 0) + st.get("select_seconds", 0),  # both passes over the partials
    }


def roofline(model, layer: int, sae, tokens: list[list[int]], q_block: int, device: str) -> dict:
    """Per sample: the FA values of the statistics pass (all heads) and the time of the plain
    `torch.matmul` calls that form them (only them: each query's visible keys), in blocks of
    `q_block` queries and in blocks of one query (whose output stays in cache); the faster of
    the two is the roofline."""
    import time

    import torch

    from ..core.decompose import Decomposer
    from ..core.reduce import cooccurrence, query_blocks

    dec = Decomposer(model, layer, sae)
    window = getattr(dec, "sliding_window", None)
    values, mm = 0, {q_block: 0.0, 1: 0.0}
    with torch.no_grad():
        for toks in tokens:
            p = dec.prepare(torch.tensor(toks, device=device))
            qf, kf = p.q.feat_BHTAE[0].contiguous(), p.k.feat_BHTAE[0].contiguous()
            H, T, A, E = qf.shape
            values += H * int(cooccurrence(p.sparse.feat_idx_BTA[0], p.live_BTA[0], window).count_UU.sum())
            for qb in mm:
                _sync(device)
                t = time.perf_counter()
                for q0, q1, k0 in query_blocks(T, qb, window):
                    torch.matmul(qf[:, q0:q1].reshape(H, -1, E), kf[:, k0:q1].reshape(H, -1, E).transpose(1, 2))
                _sync(device)
                mm[qb] += time.perf_counter() - t
    n = max(len(tokens), 1)
    return {"fa_values_per_sample": values / n, "matmul_seconds_per_sample": min(mm.values()) / n}


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _child(args: dict) -> dict:
    """`measure(args)` in a fresh interpreter (its own peak RSS)."""
    env = dict(os.environ)
    code = (
        "import json, sys; from fra.ingest.tools.bench import measure; "
        "print('RESULT' + json.dumps(measure(json.loads(sys.argv[1]))))"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"bench child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT") :])


def run(cfg: BenchConfig) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fra-bench-"))
    base = {k: v for k, v in asdict(cfg).items() if k not in ("widths", "shipped")}
    rows = []
    try:
        for width in ([SHIPPED] if cfg.shipped else []) + list(cfg.widths):
            print(f"measuring d_sae = {width} ...", flush=True)
            rows.append({"path": "local", **_child({**base, "width": width, "out": str(tmp / f"w{width}")})})
            print("  " + json.dumps(rows[-1]), flush=True)
            shutil.rmtree(tmp / f"w{width}", ignore_errors=True)
        if cfg.engine_workers:
            _engine_row(cfg, base, tmp, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(cfg, rows)
    _print_engines(cfg, rows)
    return {"config": {k: str(v) for k, v in asdict(cfg).items()}, "rows": rows}


def _engine_row(cfg: BenchConfig, base: dict, tmp: Path, rows: list[dict]) -> None:
    """The first width again, with --engine ray and `engine_workers` actors on a local Ray instance."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("engine comparison skipped: Ray is not installed (pip install 'fra[ray]')")
        return
    print(f"measuring --engine ray with {cfg.engine_workers} workers at d_sae = {cfg.widths[0]} ...", flush=True)
    args = {**base, "width": cfg.widths[0], "out": str(tmp / "ray"), "engine": "ray", "workers": cfg.engine_workers}
    rows.append({"path": f"ray, {cfg.engine_workers} workers", **_child(args)})
    print("  " + json.dumps(rows[-1]), flush=True)


def _print_engines(cfg: BenchConfig, rows: list[dict]) -> None:
    local = next((r for r in rows if r["path"] == "local" and r["width"] == cfg.widths[0]), None)
    ray_row = next((r for r in rows if r["path"].startswith("ray")), None)
    if local is None or ray_row is None:
        return
    n = cfg.n_samples
    print(
        f"\nengines, same workload ({n} samples, d_sae {cfg.widths[0]}, blocks of {cfg.block_size}). Wall time: "
        "the whole `fra ingest` of each engine after the driver loaded the model, so for Ray it includes "
        "Ray's start-up, the actors' start and their copy of the model:"
    )
    print(
        f"{'engine':>18} {'wall s':>8} {'samples/s':>10} {'Ray start-up s':>15} {'worker s/sample':>16} "
        f"{'merge s':>8} {'partials':>9}"
    )
    for r in (local, ray_row):
        name = "local, 1 process" if r is local else r["path"]
        print(
            f"{name:>18} {r['seconds']:8.1f} {n / r['seconds']:10.2f} {r['startup_seconds']:15.1f} "
            f"{r['block_seconds'] / n:16.2f} {r['merge_seconds']:8.2f} {2 * r['blocks']:9}"
        )
    N, G = 10**6, 100
    per_partial = ray_row["merge_seconds"] / (2 * ray_row["blocks"])  # count and statistics partials
    cpu_h = N * ray_row["block_seconds"] / n / G / 3600
    print(
        f"ESTIMATE, not a measurement, for {N:.0e} samples of {cfg.seq_len} tokens at one layer on {G} workers:\n"
        f"  compute on {G} CPU workers like these: {N:.0e} x {ray_row['block_seconds'] / n:.2f} s / "
        f"{G} = {cpu_h:.1f} h\n"
        f"  merge, in one process after the compute: {per_partial:.2f} s per partial here (blocks of {cfg.block_size})"
    )
    for block in (cfg.block_size, 4096):
        partials = 2 * -(-N // block)
        bound = (
            ""
            if block == cfg.block_size
            else (", a lower bound: a larger block touches more channels, so its partial costs more")
        )
        print(
            f"    blocks of {block}: {partials:,} partials x {per_partial:.2f} s = "
            f"{partials * per_partial / 3600:.1f} h{bound}"
        )


def _print(cfg: BenchConfig, rows: list[dict]) -> None:
    import torch

    dev = cfg.device or ("cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads")
    print(
        f"\nfra bench ({dev}): layer {cfg.layer}, 9 heads, {cfg.n_samples} samples x {cfg.seq_len} tokens, "
        f"the shipped SAE (k=64) and synthetic TopK SAEs k={cfg.k}, min_count {cfg.min_count}, "
        f"budget {cfg.memory_budget_gb} GB"
    )
    print(
        f"{'SAE':>10} {'d_sae':>6} {'samples/s':>10} {'count s/smp':>12} {'stats s/smp':>12} {'FA values/s':>12} "
        f"{'roofline x':>11} {'peak RSS GB':>12} {'MB/sample':>10} {'channels seen':>14} {'kept':>10} {'sweeps':>7}"
    )
    for r in rows:
        if r["path"] != "local":
            continue
        n = cfg.n_samples
        stats_per_sample = r["stats_seconds"] / n
        print(
            f"{str(r['width']):>10} {r['d_sae']:>6} {r['samples_per_s']:10.2f} {r['count_seconds'] / n:12.2f} "
            f"{stats_per_sample:12.2f} {r['fa_values_per_sample'] / stats_per_sample:12.3g} "
            f"{stats_per_sample / r['matmul_seconds_per_sample']:11.1f} {r['peak_rss_gb']:12.2f} "
            f"{r['bytes_per_sample'] / 1e6:10.2f} {r['channels_seen']:14,} {r['channels_kept']:10,} {r['sweeps']:7}"
        )
    print(
        "samples/s: both passes of the layer and the writing. roofline x: the statistics pass's time per sample "
        "over that of plain torch.matmul forming the same FA values (same process, first "
        f"{cfg.roofline_samples} samples). Goals (issue 20): roofline <= 3x, count pass <= 0.2 s per sample."
    )
