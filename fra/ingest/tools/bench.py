"""`fra bench`: what a full `fra ingest` costs per SAE width, against the schema-1 dense path.

Workload: SmolLM2-135M-Instruct, one layer (17), all 9 heads, `n_samples` samples of exactly
`seq_len` tokens (BOS + consecutive windows of the shipped demo corpus). SAEs: synthetic TopK
SAEs (random unit-norm decoder rows, encoder = decoder transposed, zero biases, k = 32) of each
width. For memory and channel counts a random SAE needs no download and spreads its features
widely; they are not results about any real SAE.

Each width runs in its own process, so that its peak RSS is its own. Per width: samples/s of
the whole ingest (both passes and the writing, model loading excluded), peak RSS, bytes on
disk per sample, channels seen and kept. The dense path of schema 1 (commit `baseline`, a
[d_sae^2, heads] accumulator) runs on the same workload at the first width, in the same
`fra bench` call, from a temporary git worktree of this repository (skipped with a message
when that is not possible, e.g. outside a git checkout).

Engines: the same workload at the first width runs again with `--engine ray` and
`engine_workers` actors on a local Ray instance (when Ray is installed), next to the local
engine's run, with samples/s and wall time including Ray's start-up. From the measured
per-sample worker time and the merge's cost per partial it prints an *estimate* of a run of
10^6 samples on 100 GPUs, using the H100 throughput measured outside this bench (FACTS.md).
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

BASELINE_COMMIT = "c06acfe"  # the last commit with the dense [d_sae^2, heads] channel accumulators


@dataclass(frozen=True)
class BenchConfig:
    widths: tuple[int, ...] = opt((4096, 24576, 65536), "SAE widths (d_sae) to measure")
    k: int = opt(32, "TopK k of the synthetic SAEs")
    layer: int = opt(17, "the layer indexed")
    n_samples: int = opt(64, "samples indexed per width")
    seq_len: int = opt(128, "tokens per sample, BOS included")
    min_count: int = opt(128, "the ingest's keep-policy (as in the README's main job)")
    memory_budget_gb: float = opt(1.0, "the ingest's memory budget")
    baseline: str | None = opt(
        BASELINE_COMMIT, "git commit of the dense path to compare with at the first width; '' to skip"
    )
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
    """One width, in this process: the new ingest (`engine` local or ray), or the schema-1 runner
    when `baseline`."""
    import time

    import torch

    t_load = time.perf_counter()
    device = args["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    hook = f"blocks.{args['layer']}.ln1.hook_normalized"
    out = Path(args["out"])
    if args.get("baseline"):  # the old package, imported from the baseline worktree
        from fra.ingest.models import load_model
        from fra.ingest.runner import IngestConfig, Inputs, run
    else:
        from ..index.build import IngestConfig, Inputs, run
        from ..registry import load_model
    lm = load_model("smollm2-135m", device=device)
    sae = synthetic_sae(lm.model.cfg.d_model, args["width"], args["k"], hook, args["seed"]).to(device)
    tokens = bench_tokens(lm.tokenizer, lm.bos_id, args["n_samples"], args["seq_len"])
    ids, texts, saes = list(range(len(tokens))), [""] * len(tokens), {args["layer"]: sae}
    sae_id = {str(args["layer"]): f"synthetic-{args['width']}"}
    common = dict(
        out=out,
        model="smollm2-135m",
        layers=(args["layer"],),
        min_count=args["min_count"],
        progress=False,
        device=device,
    )
    if args.get("baseline"):
        inp = Inputs(lm, saes, (args["layer"],), ids, texts, tokens, "bench", sae_id)
        cfg = IngestConfig(**common)
    else:
        inp = Inputs(lm, saes, ids, texts, tokens, "bench", sae_id)
        cfg = IngestConfig(
            **common,
            memory_budget_gb=args["memory_budget_gb"],
            block_size=args["block_size"],
            engine=args.get("engine", "local"),
            workers=args.get("workers"),
        )
    load = time.perf_counter() - t_load
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
    manifest = json.loads((out / "manifest.json").read_text())
    st = manifest["stats"][str(args["layer"])]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "width": args["width"],
        "samples_per_s": len(tokens) / seconds,
        "seconds": seconds,
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


def _child(args: dict, pythonpath: str | None = None) -> dict:
    """`measure(args)` in a fresh interpreter (its own peak RSS)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import json, sys; from fra.ingest.tools.bench import measure; "
        "print('RESULT' + json.dumps(measure(json.loads(sys.argv[1]))))"
    )
    # cwd: not the repository, whose fra/ folder would shadow the baseline's package on sys.path
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(args["out"]).parent,
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"bench child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT") :])


def _baseline_tree(commit: str, tmp: Path) -> str | None:
    """A PYTHONPATH under which `import fra` is the package of `commit`, or None (with a message)."""
    repo = Path(__file__).resolve().parents[2]
    wt = tmp / "baseline"
    p = subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(wt), commit], capture_output=True, text=True
    )
    if p.returncode != 0:
        print(f"dense baseline skipped: cannot check out {commit} ({p.stderr.strip()[:200]})")
        return None
    # this file (and the config helper it imports) go into the throwaway worktree, so that the
    # child imports the same measure() next to the old package
    (wt / "ingest" / "tools").mkdir(exist_ok=True)
    (wt / "ingest" / "tools" / "__init__.py").touch()
    shutil.copy(__file__, wt / "ingest" / "tools" / "bench.py")
    shutil.copy(Path(__file__).parents[1] / "config.py", wt / "ingest" / "config.py")
    shim = tmp / "shim" / "fra"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("")
    for sub in ("ingest", "queries"):
        (shim / sub).symlink_to(wt / sub)
    return str(tmp / "shim")


def _remove_worktree(tmp: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(tmp / "baseline")], capture_output=True
    )


def run(cfg: BenchConfig) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fra-bench-"))
    base = {k: v for k, v in asdict(cfg).items() if k not in ("widths", "baseline")}
    rows = []
    try:
        for width in cfg.widths:
            print(f"measuring d_sae = {width} ...", flush=True)
            rows.append({"path": "two-pass", **_child({**base, "width": width, "out": str(tmp / f"w{width}")})})
            print("  " + json.dumps(rows[-1]), flush=True)
            shutil.rmtree(tmp / f"w{width}", ignore_errors=True)
        if cfg.engine_workers:
            _engine_row(cfg, base, tmp, rows)
        if cfg.baseline:
            path = _baseline_tree(cfg.baseline, tmp)
            if path is not None:
                print(f"measuring the dense path of {cfg.baseline} at d_sae = {cfg.widths[0]} ...", flush=True)
                args = {**base, "width": cfg.widths[0], "out": str(tmp / "dense"), "baseline": True}
                try:
                    rows.append({"path": f"dense ({cfg.baseline})", **_child(args, path)})
                    print("  " + json.dumps(rows[-1]), flush=True)
                except RuntimeError as exc:
                    print(f"dense baseline failed: {exc}")
    finally:
        _remove_worktree(tmp)
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


# The H100's throughput of the statistics pass at k=32, d_sae=4096 (FACTS.md, "The inner loop of
# ingest": exact channel sums and counts plus top-8 per channel, 106 samples/s per layer);
# measured outside this bench, on synthetic activations.
H100_SAMPLES_PER_S = 106.0


def _print_engines(cfg: BenchConfig, rows: list[dict]) -> None:
    local = next((r for r in rows if r["path"] == "two-pass" and r["width"] == cfg.widths[0]), None)
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
    gpu_h = N * 2 / H100_SAMPLES_PER_S / G / 3600  # two passes, both at the statistics pass's rate
    cpu_h = N * ray_row["block_seconds"] / n / G / 3600
    print(
        f"ESTIMATE, not a measurement, for {N:.0e} samples of {cfg.seq_len} tokens at one layer on {G} workers:\n"
        f"  compute on {G} H100s: {N:.0e} x 2 passes / {H100_SAMPLES_PER_S:.0f} samples/s (FACTS.md: the statistics "
        f"pass on synthetic activations, k=32, d_sae=4096) / {G} = {gpu_h:.2f} h\n"
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
        f"synthetic TopK SAEs k={cfg.k}, min_count {cfg.min_count}, budget {cfg.memory_budget_gb} GB"
    )
    print(
        f"{'path':>18} {'d_sae':>6} {'samples/s':>10} {'peak RSS GB':>12} {'MB/sample':>10} "
        f"{'channels seen':>14} {'kept':>10} {'sweeps':>7} {'spilled runs':>13}"
    )
    for r in rows:
        if r["path"].startswith("ray"):
            continue
        print(
            f"{r['path']:>18} {r['width']:>6} {r['samples_per_s']:10.2f} {r['peak_rss_gb']:12.2f} "
            f"{r['bytes_per_sample'] / 1e6:10.2f} {r['channels_seen']:14,} {r['channels_kept']:10,} "
            f"{r['sweeps']:7} {r['count_runs_spilled']:13}"
        )
    print(
        "Goals (issue 10): peak RSS <= 8 GB at 24,576 and <= 16 GB at 65,536; at 4,096 no slower than the dense path."
    )
