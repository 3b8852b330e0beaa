"""`fra bench-views`: latency of the DuckDB views and of the app's page queries on a large index.

Without --index it writes a synthetic index (random values in the real schema, clearly not a
result) with the requested number of rows, so that latency can be measured at scale without
hours of ingest on a CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import connect
from .lib import run

SYNTH_LAYERS, SYNTH_HEADS, D_SAE = (17, 18), 9, 4096


def synthetic_index(
    root: Path, n_rows: int, n_samples: int = 512, seq: int = 128, n_channels: int = 300_000, seed: int = 0
) -> Path:
    """Random values in the real schema (`fra.ingest.index.schema`), clearly not a result."""
    from fra.ingest.index.schema import Manifest
    from fra.ingest.index.store import conform, write_parquet

    rng = np.random.default_rng(seed)
    root = Path(root)
    parts = len(SYNTH_LAYERS) * SYNTH_HEADS
    per = n_rows // parts
    zipf = lambda n: np.minimum(rng.zipf(1.3, n) - 1, D_SAE - 1).astype(np.int32)  # noqa: E731
    qs = np.repeat(np.arange(seq), np.arange(1, seq + 1))
    ks = np.concatenate([np.arange(q + 1) for q in range(seq)])
    n_pair_samples = max(1, min(n_samples, 2_000_000 // (parts * len(qs))))

    def put(name, layer, head, cols):
        write_parquet(
            conform(name, pa.table(cols)), root / name / f"layer={layer}" / f"head={head}" / "part-00000.parquet"
        )

    for layer in SYNTH_LAYERS:
        for head in range(SYNTH_HEADS):
            q = rng.integers(1, seq, per).astype(np.int16)
            put(
                "rows",
                layer,
                head,
                {
                    "sample": rng.integers(0, n_samples, per).astype(np.int32),
                    "q": q,
                    "k": (q * rng.random(per)).astype(np.int16),
                    "feat_q": zipf(per),
                    "feat_k": zipf(per),
                    "value": rng.normal(0, 1, per).astype(np.float32),
                    "induction": rng.random(per) < 0.02,
                },
            )
            n_p = n_pair_samples * len(qs)
            pairs = {
                "sample": np.repeat(np.arange(n_pair_samples, dtype=np.int32), len(qs)),
                "q": np.tile(qs, n_pair_samples).astype(np.int16),
                "k": np.tile(ks, n_pair_samples).astype(np.int16),
                "induction": rng.random(n_p) < 0.01,
            }
            for c in (
                "score",
                "ff",
                "ff_abs",
                "kept",
                "kept_abs",
                "f_bdec",
                "f_err",
                "bdec_f",
                "err_f",
                "resid_resid",
                "bias",
            ):
                pairs[c] = rng.normal(0, 1, n_p).astype(np.float32)
            put("pairs", layer, head, pairs)
            key = np.unique(rng.integers(0, D_SAE * D_SAE, n_channels))
            cnt = rng.integers(64, 5000, len(key))
            s = rng.normal(0, 1, len(key)) * cnt
            fq, fk = (key // D_SAE).astype(np.int32), (key % D_SAE).astype(np.int32)
            put(
                "channels",
                layer,
                head,
                {
                    "feat_q": fq,
                    "feat_k": fk,
                    "count": cnt,
                    "sum": s,
                    "sumsq": np.abs(s) * 3,
                    "ind_count": cnt // 50,
                    "ind_sum": s / 50,
                    "ind_sumsq": np.abs(s) / 10,
                },
            )
            E = 8
            q_e = rng.integers(1, seq, len(key) * E).astype(np.int16)
            put(
                "examples",
                layer,
                head,
                {
                    "feat_q": np.repeat(fq, E),
                    "feat_k": np.repeat(fk, E),
                    "rank": np.tile(np.arange(E, dtype=np.int8), len(key)),
                    "sample": rng.integers(0, n_samples, len(key) * E).astype(np.int32),
                    "q": q_e,
                    "k": (q_e * rng.random(len(key) * E)).astype(np.int16),
                    "value": rng.normal(0, 1, len(key) * E).astype(np.float32),
                },
            )
    toks = [[f"t{i}" for i in range(seq)] for _ in range(n_samples)]
    write_parquet(
        conform(
            "samples",
            pa.table(
                {
                    "sample": np.arange(n_samples, dtype=np.int32),
                    "text": ["synthetic"] * n_samples,
                    "token_ids": [list(range(seq))] * n_samples,
                    "tokens": toks,
                    "n_tokens": np.full(n_samples, seq, dtype=np.int16),
                }
            ),
        ),
        root / "samples" / "part-0.parquet",
    )
    L = np.repeat(SYNTH_LAYERS, D_SAE)
    n = len(L)
    write_parquet(
        conform(
            "features",
            pa.table(
                {
                    "layer": L,
                    "feature": np.tile(np.arange(D_SAE), len(SYNTH_LAYERS)),
                    "index_frequency": rng.random(n) / 100,
                    "bos_rate": rng.random(n) / 10,
                    "label": ['"synthetic"'] * n,
                    "top_tokens": [["synthetic"]] * n,
                    "prev_token": pa.nulls(n, pa.string()),
                    "frequency": rng.random(n) / 100,
                    "mean_act_when_active": rng.random(n),
                    "max_act": rng.random(n) * 3,
                    "top_contexts": [["x [[y]] z"]] * n,
                    "punct_or_bos": rng.random(n) < 0.02,
                }
            ),
        ),
        root / "features" / "part-0.parquet",
    )
    Manifest(
        model="synthetic",
        sae={},
        corpus="synthetic",
        policy={},
        layers=list(SYNTH_LAYERS),
        heads=list(range(SYNTH_HEADS)),
        n_samples=n_samples,
        shard="0/1",
        stats={"synthetic": True},
    ).write(root)
    return root


def time_views(index: Path, repeats: int = 3) -> list[tuple[str, float]]:
    con = connect(index)
    layer, head = con.execute("SELECT layer, head FROM head_totals ORDER BY 1, 2 LIMIT 1").fetchone()
    feat = con.execute("SELECT feat_q FROM rows WHERE layer = ? AND head = ? LIMIT 1", [layer, head]).fetchone()[0]
    fq, fk = con.execute(
        "SELECT feat_q, feat_k FROM channels WHERE layer = ? AND head = ? ORDER BY count DESC LIMIT 1", [layer, head]
    ).fetchone()
    cases = [
        ("feature_lookup (one feature, all heads)", "feature_channels", [feat, None, 1, 30]),
        ("top_channels (one head)", "top_channels", [layer, head, 8, True, 20]),
        ("channel top examples", "channel_examples", [layer, head, fq, fk, 20]),
        ("head_summary (all heads)", "head_summary", []),
        ("app Head page: pattern of one sample", "pattern", [layer, head, 0]),
        ("app Sample page: rows of one query", "query_rows", [layer, head, 0, 100]),
    ]
    out = []
    for name, query, params in cases:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(con, query, params)
            times.append(time.perf_counter() - t)
        out.append((name, min(times)))
    t = time.perf_counter()
    con.execute("SELECT * FROM top_entries_n(?)", [20]).fetchall()
    out.append(("top_entries (20 largest anywhere)", time.perf_counter() - t))
    return out


def main(argv=None):
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog="fra bench-views")
    p.add_argument("--index", type=Path, help="an existing index; default: a synthetic one")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic index")
    a = p.parse_args(argv)
    index = a.index
    if index is None:
        index = Path(tempfile.mkdtemp()) / "synthetic"
        t = time.perf_counter()
        synthetic_index(index, a.rows)
        print(f"synthetic index with {a.rows:,} rows written in {time.perf_counter() - t:.0f} s to {index}")
    n = connect(index).execute("SELECT count(*) FROM rows").fetchone()[0]
    print(f"\nview latency on {index} ({n:,} rows), best of 3:")
    for name, sec in time_views(index):
        print(f"  {name:45s} {sec * 1000:8.0f} ms")
