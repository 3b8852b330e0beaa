"""The `fra` command line. Each stage's flags are generated from its config dataclass, and heavy
imports (torch, transformer-lens, duckdb, streamlit) happen inside the commands, so that
`fra --help` is instant."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from fra.errors import Parser, UsageError, debug_wanted, run_reporting


def _flag_type(tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        return args[0], "+"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0]) if inner else (str, None)
    return tp, None


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field: `--field-name VALUE`, defaults from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, nargs = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            shown = (
                "none" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
            )
            parser.add_argument(
                flag,
                type=tp,
                nargs=nargs,
                default=default,
                metavar=f.name.upper(),
                help=text if "default:" in text else f"{text} (default: {shown})" if text else f"default: {shown}",
            )


def config_from_args(cls, args):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is not None and _flag_type(hints[f.name])[1] == "+":
            value = tuple(value)
        if value is not None:
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the config's own checks name the flag
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------------------


def cmd_corpus(args):
    from fra.ingest.corpus import CorpusConfig, build_corpus, fetch_sources

    cfg = config_from_args(CorpusConfig, args)
    if args.action == "fetch":
        fetch_sources(cfg.src_dir)
        return
    from fra.ingest.registry import smollm2_hf

    _, tok = smollm2_hf()
    stats = build_corpus(cfg, tok)
    print(json.dumps(stats, indent=1))


def cmd_train_sae(args):
    from fra.ingest.sae.train import SAETrainConfig, run

    metrics = run(config_from_args(SAETrainConfig, args))
    last = metrics["curve"][-1]
    state = "finished" if metrics["finished"] else "stopped early; continue with --resume"
    print(f"{metrics['tokens_per_layer']:,} tokens per layer in {metrics['seconds']:.0f} s ({state})")
    for name, m in last["sae"].items():
        share = "n/a" if m["tih_ff_share"] is None else f"{m['tih_ff_share']:.1%}"
        print(
            f"  {name}: held-out FVE {m['fve']:.3f}, QK VE q {m['qk_ve_q']:.3f} k {m['qk_ve_k']:.3f}, "
            f"TIH feature share {share}, dead {m['dead_fraction']:.2%}"
        )


def cmd_eval_sae(args):
    from fra.ingest.sae.evaluate import EvalConfig, run

    print(json.dumps(run(config_from_args(EvalConfig, args)), indent=1))


def cmd_census(args):
    from fra.ingest.studies.census import CensusConfig, run

    run(config_from_args(CensusConfig, args))


def cmd_ingest(args):
    from fra.ingest.index.build import IngestConfig, run

    run(config_from_args(IngestConfig, args))


def cmd_merge(args):
    from fra.ingest.index.merge import MergeConfig, run

    out = run(config_from_args(MergeConfig, args))
    if out is not None:
        print(f"index written to {out}")


def cmd_explain(args):
    from fra.ingest.index.explain import ExplainConfig, run

    run(config_from_args(ExplainConfig, args))


def cmd_bench(args):
    from fra.ingest.tools.bench import BenchConfig, run

    run(config_from_args(BenchConfig, args))


def cmd_query(args):
    from fra.queries import cli as qcli

    qcli.main(args.rest)


def cmd_sql(args):
    from fra.queries import cli as qcli

    qcli.sql_main(args.rest)


def cmd_export(args):
    if "neuronpedia-qk" in args.rest or "--format=neuronpedia-qk" in args.rest:  # runs the model (torch)
        from fra.ingest.export_neuronpedia import main as neuronpedia_main

        neuronpedia_main(args.rest)
        return
    from fra.queries import cli as qcli

    qcli.export_main(args.rest)


def cmd_bench_views(args):
    from fra.queries import bench

    bench.main(args.rest)


def cmd_app(args):
    import os

    page = Path(__file__).resolve().parent / "app" / "main.py"
    try:
        import fra.app as app_pkg

        page = Path(app_pkg.__file__).parent / "main.py"
    except ImportError:
        pass
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(page),
        "--server.headless",
        "true",
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--",
        "--index",
        str(args.index),
    ]
    # exec, not a child process: `fra app` becomes the server, so a signal to it reaches streamlit
    # and nothing is left running when it is killed
    os.execv(sys.executable, cmd)


def cmd_report(args):
    from fra.ingest.studies.cih import CIHConfig, run

    cfg = config_from_args(CIHConfig, args)
    if args.study == "atlas":  # stage 2b: from an index only, no model
        from fra.ingest.studies.cih.atlas import write_atlas

        if cfg.atlas_index is None:
            raise UsageError("fra report atlas: give the index with --atlas-index PATH")
        print(write_atlas(cfg.atlas_index, cfg.out.parent / "atlas"))
        return
    run(cfg)


def cmd_cot(args):
    from fra.ingest.studies.cot import CotConfig, make_traces

    cfg = config_from_args(CotConfig, args)
    traces = make_traces(cfg)
    n_ok = sum(t.correct for t in traces)
    print(f"{len(traces)} traces ({n_ok} correct) written to {cfg.out}")


def cmd_report_cot(argv):
    from fra.ingest.studies.cot.config import CotReportConfig

    p = argparse.ArgumentParser(
        prog="fra report cot", description="thought anchors of chains of thought, resolved into feature-pair channels"
    )
    add_config_args(p, CotReportConfig)
    try:
        cfg = config_from_args(CotReportConfig, p.parse_args(argv))
    except ValueError as exc:
        p.error(str(exc))
    from fra.ingest.studies.cot import run_report

    summary = run_report(cfg)
    print(f"report written to {cfg.out / 'report.md'} ({summary['seconds']:.0f} s)")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(
        prog="fra",
        description="Feature-Resolved Attention: index attention scores by SAE feature pairs. A failure prints "
        "one line on stderr (exit 2: a wrong flag, 1: a failure while running); --debug anywhere on the "
        "line, or FRA_DEBUG=1, shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure (also FRA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def config_of(module, name):
        # the config dataclasses import nothing heavy at module level
        return getattr(importlib.import_module(f"fra.ingest.{module}"), name)

    # (command, module, config class, function, help); the positional argument, if any, first
    staged = (
        ("corpus", "corpus", "CorpusConfig", cmd_corpus, "fetch the offline sources or build the corpus Parquet"),
        ("train-sae", "sae.train", "SAETrainConfig", cmd_train_sae, "train TopK SAEs on SmolLM2 attention inputs"),
        (
            "eval-sae",
            "sae.evaluate",
            "EvalConfig",
            cmd_eval_sae,
            "measure shipped SAEs on held-out text (model card numbers)",
        ),
        (
            "census",
            "studies.census",
            "CensusConfig",
            cmd_census,
            "induction / previous-token / duplicate-token scores of every head",
        ),
        ("ingest", "index.job", "IngestConfig", cmd_ingest, "build the feature-pair index of a corpus"),
        (
            "merge",
            "index.merge",
            "MergeConfig",
            cmd_merge,
            "the next step of a `fra ingest --shard i/n` job: select channels, or write the index",
        ),
        (
            "explain",
            "index.explain",
            "ExplainConfig",
            cmd_explain,
            "add the score split at every example, the SAE activations and the q = k sums to an index",
        ),
        (
            "bench",
            "tools.bench",
            "BenchConfig",
            cmd_bench,
            "ingest cost per SAE width (synthetic, shipped SAEs): FA values/s, roofline ratio, local vs Ray",
        ),
        (
            "report",
            "studies.cih.config",
            "CIHConfig",
            cmd_report,
            "reproducible studies; `fra report cih` (`--quick`: a smoke run), `fra report atlas --atlas-index PATH`, "
            "`fra report cot` (see `fra report cot --help`)",
        ),
        (
            "cot",
            "studies.cot.config",
            "CotConfig",
            cmd_cot,
            "chains of thought: generate traces on reasoning-gym problems, or read a JSONL of them",
        ),
    )
    for name, module, cls, func, text in staged:
        p = sub.add_parser(name, help=text)
        if name == "corpus":
            p.add_argument("action", choices=["fetch", "build"])
        if name == "report":
            p.add_argument("study", choices=["cih", "atlas", "cot"])
        add_config_args(p, config_of(module, cls))
        p.set_defaults(func=func)

    for name, func, text in (
        ("query", cmd_query, "common questions: top channels of a head, channels of a feature, ..."),
        ("sql", cmd_sql, "run SQL over the index with the views defined (or open a shell)"),
        ("export", cmd_export, "write a view or filtered rows to partitioned Parquet"),
        ("bench-views", cmd_bench_views, "latency of the views and app queries on a large (synthetic) index"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)

    p = sub.add_parser("app", help="serve the Streamlit explorer over an index")
    p.add_argument("--index", type=Path, default=Path("runs/demo"), help="the index to explore (default: runs/demo)")
    p.add_argument("--port", type=int, default=8501, help="the port to serve on (default: 8501)")
    p.set_defaults(func=cmd_app)

    return parser


PASSTHROUGH = {"query": cmd_query, "sql": cmd_sql, "export": cmd_export, "bench-views": cmd_bench_views}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, argv = debug_wanted(argv)
    import os

    # before torch loads OpenMP: threads that spin at every barrier made a forward pass 17x slower
    # on a 2-core machine shared with another process; passive waiting costs nothing when idle
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not debug:  # the hub's retry warnings: its final error is reported in one line
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if argv and argv[0] in PASSTHROUGH:  # these parse their own arguments (fra.queries.cli)
        return run_reporting(f"fra {argv[0]}", lambda: PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:])), debug)
    if argv[:2] == ["report", "cot"]:  # its own flags (CotReportConfig), not the CIH study's
        return run_reporting("fra report cot", lambda: cmd_report_cot(argv[2:]), debug)
    args = build_parser().parse_args(argv)
    return run_reporting(f"fra {args.command}", lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
