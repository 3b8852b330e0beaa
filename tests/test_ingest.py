"""`fra ingest` on a tiny model: DuckDB aggregates against a dense brute-force FA, resume after
kill -9, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fra.ingest.core.decompose import run_hooks
from fra.ingest.core.reduce import induction_mask
from fra.ingest.core.reference import naive_fa
from fra.ingest.index.build import IngestConfig, Inputs, run
from fra.ingest.index.schema import IndexFormatError
from fra.ingest.tools.testing import LAYERS, tiny_inputs
from fra.queries import connect


def brute_force(inp, n_examples=8):
    """(layer, head, feat_q, feat_k) -> count, sum, sumsq, ind_count, ind_sum, ind_sumsq and the
    top examples [(|value|, sample, q, k, value)], all from the naive per-pair reference."""
    model = inp.lm.model
    out, best = {}, {}
    for l in inp.layers:
        sae = inp.saes[l]
        for s, toks in enumerate(inp.tokens):
            t = torch.tensor(toks)[None]
            hooks = run_hooks(model, l, sae.cfg.metadata.hook_name, t)
            ind = induction_mask(t[0])
            for h in range(model.cfg.n_heads):
                for q in range(len(toks)):
                    for k in range(q + 1):
                        fq, fk, fa = naive_fa(model, l, sae, hooks.x_BTD[0], hooks.norm_scale_BT[0], h, q, k)
                        for a, i in enumerate(fq.tolist()):
                            for b, j in enumerate(fk.tolist()):
                                c = out.setdefault((l, h, i, j), [0, 0.0, 0.0, 0, 0.0, 0.0])
                                v = fa[a, b].item()
                                c[0] += 1
                                c[1] += v
                                c[2] += v * v
                                if ind[q, k]:
                                    c[3] += 1
                                    c[4] += v
                                    c[5] += v * v
                                best.setdefault((l, h, i, j), {}).setdefault(inp.sample_ids[s], {})[q, k] = v
    return out, best


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    inp = tiny_inputs()
    out = tmp_path_factory.mktemp("idx") / "index"
    run(
        IngestConfig(
            out=out, model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4, progress=False
        ),
        inp,
    )
    return inp, out


def check_against_brute_force(index, ref, examples, min_count=1):
    con = connect(index)
    got = {
        (l, h, i, j): v
        for l, h, i, j, *v in con.execute(
            "SELECT layer, head, feat_q, feat_k, count, sum, sumsq, ind_count, ind_sum, ind_sumsq FROM channels"
        ).fetchall()
    }
    assert set(got) == {key for key, v in ref.items() if v[0] >= min_count}
    for key, (c, s, ss, ic, isum, issq) in got.items():
        rc, rs, rss, ric, risum, rissq = ref[key]
        assert (c, ic) == (rc, ric), key
        # float32 entries summed in float64, against float64 naive values: float32 rounding of each entry
        assert (s, ss, isum, issq) == pytest.approx((rs, rss, risum, rissq), abs=1e-4, rel=1e-5)
    ex = {}
    for l, h, i, j, r, smp, q, k, v in con.execute(
        "SELECT layer, head, feat_q, feat_k, rank, sample, q, k, value FROM examples ORDER BY ALL"
    ).fetchall():
        ex.setdefault((l, h, i, j), []).append((r, smp, q, k, v))
    assert set(ex) == set(got)
    E = connect(index).execute("SELECT max(rank) + 1 FROM examples").fetchone()[0]
    tol = 1e-5  # float32 values against the float64 reference; closer ties may go either way
    for key, rows in ex.items():
        per_sample = {smp: max(abs(v) for v in e.values()) for smp, e in examples[key].items()}
        ranked = sorted(per_sample.items(), key=lambda x: (-x[1], x[0]))
        assert [r for r, *_ in rows] == list(range(min(E, len(ranked))))
        for _, smp, q, k, v in rows:  # each example is a real entry, the strongest of its sample
            assert examples[key][smp][q, k] == pytest.approx(v, abs=tol)
            assert abs(v) == pytest.approx(per_sample[smp], abs=tol)
        assert [abs(v) for *_, v in rows] == pytest.approx([a for _, a in ranked[:E]], abs=tol)
        if len(ranked) <= E or ranked[E - 1][1] - ranked[E][1] > tol:
            assert {smp for _, smp, *_ in rows} == {smp for smp, _ in ranked[:E]}, key


def test_channels_and_examples_match_brute_force(built):
    inp, out = built
    ref, examples = brute_force(inp, n_examples=4)
    assert any(v[3] > 0 for v in ref.values())  # the fixture has induction targets
    check_against_brute_force(out, ref, examples)


def test_out_of_core_equals_in_memory(tmp_path):
    """A memory budget so small that the count pass spills runs to Parquet (aggregated by DuckDB)
    and the statistics take several sweeps gives the same index, checked against the brute force."""
    inp = tiny_inputs()
    out = tmp_path / "index"
    run(
        IngestConfig(
            out=out,
            model="tiny",
            min_count=2,
            top_keys=2,
            top_pairs=3,
            examples_per_channel=4,
            memory_budget_gb=2e-5,
            progress=False,
        ),
        inp,
    )
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert all(stats[str(l)]["count_runs_spilled"] >= 1 and stats[str(l)]["sweeps"] >= 2 for l in LAYERS)
    ref, examples = brute_force(inp, n_examples=4)
    check_against_brute_force(out, ref, examples, min_count=2)


def test_refuses_a_model_the_decomposition_refuses(tmp_path):
    """`fra ingest` runs the same validation as decompose(): a softcapped model is refused."""
    from fra.ingest.core.decompose import DecompositionInputError
    from fra.ingest.tools.testing import make_model

    inp = tiny_inputs()
    inp.lm = type(inp.lm)("tiny", make_model("llama", attn_scores_soft_cap=30.0), None, 0)
    with pytest.raises(DecompositionInputError, match="soft_cap"):
        run(IngestConfig(out=tmp_path / "i", model="tiny", progress=False), inp)
    assert not (tmp_path / "i").exists() and not (tmp_path / "i.staging").exists()


def test_pair_totals_match_model_and_channels(built):
    inp, out = built
    con = connect(out)
    model = inp.lm.model
    for l in LAYERS:
        for s, toks in enumerate(inp.tokens):
            scores = run_hooks(
                model, l, inp.saes[l].cfg.metadata.hook_name, torch.tensor(toks)[None]
            ).model_scores_BHQK[0]
            rows = con.execute(
                "SELECT head, q, k, score, ff + f_bdec + f_err + bdec_f + err_f + resid_resid + bias "
                "FROM pairs WHERE layer = ? AND sample = ?",
                [l, s],
            ).fetchall()
            assert len(rows) == model.cfg.n_heads * len(toks) * (len(toks) + 1) // 2
            for h, q, k, score, total in rows:
                assert score == pytest.approx(scores[h, q, k].item(), abs=1e-5)
                assert total == pytest.approx(score, abs=1e-4)  # fp32, scores O(10)
    # the corpus sum of ff over pairs equals the sum over channels (min_count=1 keeps all)
    a = con.execute("SELECT layer, head, sum(ff) FROM pairs GROUP BY ALL ORDER BY ALL").fetchall()
    b = con.execute("SELECT layer, head, sum(sum) FROM channels GROUP BY ALL ORDER BY ALL").fetchall()
    for (l1, h1, x), (l2, h2, y) in zip(a, b):
        assert (l1, h1) == (l2, h2) and x == pytest.approx(y, rel=1e-4, abs=1e-3)
    # rows sum to the pairs' kept column
    k1 = con.execute("SELECT sum(value) FROM rows").fetchone()[0]
    k2 = con.execute("SELECT sum(kept) FROM pairs").fetchone()[0]
    assert k1 == pytest.approx(k2, rel=1e-5)


def _tables(index: Path) -> dict:
    con = connect(index)
    return {
        t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
        for t in ("rows", "pairs", "channels", "examples", "samples", "features")
    }


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from fra.ingest.tools.testing import tiny_inputs
    from fra.ingest.index.build import IngestConfig, run
    run(IngestConfig(out=Path({out!r}), model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4,
                     progress=False), tiny_inputs())
""")


@pytest.mark.parametrize(
    "fault,rc",
    [
        ({"FRA_KILL_AT": "done:0"}, -9),
        ({"FRA_KILL_AT": "moved:1:pairs"}, -9),
        ({"FRA_FAIL_BLOCK": "stats:1:0"}, 1),  # dies inside a block, before its partial is in place
    ],
)
def test_resume_after_kill_gives_identical_index(built, tmp_path, fault, rc):
    _, reference = built
    out = tmp_path / "index"
    root = str(Path(__file__).resolve().parent.parent)
    code = SCRIPT.format(root=root, out=str(out))
    env = {**os.environ, **fault, "FRA_FAIL_MARKER": str(tmp_path / "died")}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert p.returncode == rc, p.stderr.decode()[-2000:]
    assert not out.exists()  # nothing half-written at the final path
    assert (tmp_path / "index.staging").exists()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert not (tmp_path / "index.staging").exists()
    assert _tables(out) == _tables(reference)
    m = json.loads((out / "manifest.json").read_text())
    assert m["layers"] == list(LAYERS) and m["n_samples"] == 3


def test_rerun_replaces_partitions_without_duplicates(built, tmp_path):
    out = tmp_path / "index"
    for _ in range(2):
        run(
            IngestConfig(
                out=out, model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4, progress=False
            ),
            tiny_inputs(),
        )
    assert _tables(out) == _tables(built[1])


def test_refuses_another_models_index(built, tmp_path):
    out = tmp_path / "index"
    run(IngestConfig(out=out, model="tiny", min_count=1, progress=False), tiny_inputs())
    before = _tables(out)
    other = tiny_inputs(seed=1)  # different SAEs
    with pytest.raises(IndexFormatError, match="holds an index of model tiny with SAEs"):
        run(IngestConfig(out=out, model="tiny", progress=False), other)
    assert _tables(out) == before


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(heads=(7,)), "head 7 out of range"),
        (dict(layers=(5,)), "layer 5 out of range"),
    ],
)
def test_bad_layer_or_head(tmp_path, kwargs, match):
    inp = tiny_inputs()
    if "layers" in kwargs:
        inp = Inputs(inp.lm, {5: inp.saes[0]}, inp.sample_ids, inp.texts, inp.tokens, "c", {"5": "x"})
        kwargs.pop("layers")
    with pytest.raises(ValueError, match=match):
        run(IngestConfig(out=tmp_path / "i", model="tiny", progress=False, **kwargs), inp)
    assert not (tmp_path / "i").exists()


def test_empty_corpus_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fra.ingest.corpus import read_corpus

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"sample_id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="holds no samples"):
        read_corpus(path)


def test_ray_engine_without_ray_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fra\[ray\]'"):
        run(IngestConfig(out=tmp_path / "i", model="tiny", engine="ray", progress=False), tiny_inputs())
    assert not (tmp_path / "i.staging").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="i/n"):
        IngestConfig(shard="2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        IngestConfig(shard="3/2")
    with pytest.raises(ValueError, match="local or ray"):
        IngestConfig(engine="spark")
    with pytest.raises(ValueError, match="--shard is for clusters without Ray"):
        IngestConfig(engine="ray", shard="0/2")


def test_shards_and_merge_give_the_single_run_index(tmp_path):
    """--shard 0/2 and 1/2 write their blocks into one staging area; with the two-phase recipe
    (shards, fra merge, shards, fra merge) the index equals the single-process one bit for bit.
    A shard run twice changes nothing, a merge before the blocks are done is refused, and so is
    a shard with other options."""
    from fra.ingest.index.merge import MergeConfig
    from fra.ingest.index.merge import run as merge

    opts = dict(model="tiny", min_count=2, top_keys=2, top_pairs=3, block_size=2, progress=False)
    run(IngestConfig(out=tmp_path / "full", **opts), tiny_inputs(n_samples=5))
    out = tmp_path / "sharded"

    def shard(i, **other):
        return run(IngestConfig(out=out, shard=f"{i}/2", **{**opts, **other}), tiny_inputs(n_samples=5))

    assert shard(0) is None
    with pytest.raises(IndexFormatError, match="1 of 3 blocks are not done yet"):
        merge(MergeConfig(out=out))  # block 1 belongs to shard 1/2
    shard(1)
    shard(1)
    assert merge(MergeConfig(out=out)) is None  # the channels are selected
    with pytest.raises(IndexFormatError, match="3 of 3 blocks are not done yet"):
        merge(MergeConfig(out=out))  # the statistics pass has not run
    with pytest.raises(IndexFormatError, match="another job"):
        shard(0, min_count=3)
    shard(0)
    shard(1)
    assert merge(MergeConfig(out=out)) == out
    assert _tables(out) == _tables(tmp_path / "full")
    with pytest.raises(IndexFormatError, match="nothing is staged"):
        merge(MergeConfig(out=out))


def test_merge_adds_block_sums_exactly():
    """Float addition depends on its order: (2^53 + 1) + 1 = 2^53 (each + 1 rounds back to even),
    but 2^53 + (1 + 1) = 2^53 + 2. The merge adds the blocks' sums in fixed point, exactly, so
    every order gives 2^53 + 2."""
    import duckdb

    from fra.ingest.index.merge import _exact_sum

    for order in ([2.0**53, 1.0, 1.0], [1.0, 1.0, 2.0**53], [1.0, 2.0**53, 1.0]):
        con = duckdb.connect()
        con.execute("SET threads = 1")  # rows are added in the order given
        got = con.execute(f"SELECT {_exact_sum('x')} FROM (SELECT unnest(?::DOUBLE[]) AS x)", [order]).fetchall()[0][0]
        assert got == 2.0**53 + 2, order
