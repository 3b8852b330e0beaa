"""`fra ingest` on a tiny model: DuckDB aggregates against a dense brute-force FA, resume after
kill -9, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fra.ingest.core.decompose import Decomposer, run_hooks
from fra.ingest.core.reduce import induction_mask
from fra.ingest.core.reference import naive_fa
from fra.ingest.index.build import IngestConfig, Inputs, run
from fra.ingest.index.job import Budget
from fra.ingest.index.schema import IndexFormatError
from fra.ingest.tools.testing import LAYERS, tiny_inputs
from fra.queries import connect


def brute_force(inp, n_examples=8):
    """(layer, head, feat_q, feat_k) -> count, sum, sumsq, ind_count, ind_sum, ind_sumsq and the
    top examples [(|value|, sample, q, k, value)], all from the naive per-pair reference, over the
    (q, k) the layer's own mask lets through (its sliding window, if any), with a QK-norm's RMS of
    each position passed to the reference."""
    model = inp.lm.model
    H = model.cfg.n_heads
    out, best = {}, {}
    for l in inp.layers:
        sae = inp.saes[l]
        window = Decomposer(model, l, sae).sliding_window
        for s, toks in enumerate(inp.tokens):
            t = torch.tensor(toks)[None]
            hooks = run_hooks(model, l, sae.cfg.metadata.hook_name, t)
            q_TH = k_TH = None
            if hooks.q_scale_BTH is not None:
                q_TH = hooks.q_scale_BTH[0]
                k_TH = hooks.k_scale_BTG[0][:, torch.arange(H) // (H // hooks.k_scale_BTG.shape[-1])]
            ind = induction_mask(t[0])
            for h in range(H):
                for q in range(len(toks)):
                    for k in range(q + 1):
                        if window is not None and q - k >= window:
                            continue
                        fq, fk, fa = naive_fa(
                            model, l, sae, hooks.x_BTD[0], hooks.norm_scale_BT[0], h, q, k, q_TH, k_TH
                        )
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
            max_tokens=13,  # the longest sample; the budget floor grows with max_tokens (20 kB > 17.5 kB)
            progress=False,
        ),
        inp,
    )
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert all(stats[str(l)]["count_runs_spilled"] >= 1 and stats[str(l)]["sweeps"] >= 2 for l in LAYERS)
    ref, examples = brute_force(inp, n_examples=4)
    check_against_brute_force(out, ref, examples, min_count=2)
    # the per-pair totals and rows are the in-memory ones, whether the first sweep forms every value
    # (a flush share too small to keep the totals until the last sweep) or the sweeps split them
    # by feature (70 kB: two sweeps at layer 0, the totals kept)
    q = "SELECT layer, head, sample, q, k, score, ff, ff_abs, kept, kept_abs FROM pairs ORDER BY ALL"
    for min_count, budget, index in ((2, None, out), (1, 7e-5, tmp_path / "split")):
        opts = dict(model="tiny", min_count=min_count, top_keys=2, top_pairs=3, examples_per_channel=4, max_tokens=13,
                    progress=False)  # fmt: skip
        if budget is not None:
            run(IngestConfig(out=index, memory_budget_gb=budget, **opts), inp)
        assert json.loads((index / "manifest.json").read_text())["stats"][str(LAYERS[0])]["sweeps"] >= 2
        mem = tmp_path / f"in_memory_{min_count}"
        run(IngestConfig(out=mem, **opts), inp)
        a, b = connect(index).execute(q).fetchnumpy(), connect(mem).execute(q).fetchnumpy()
        for col in a:
            np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-6, err_msg=col)
        assert b["ff_abs"].sum() > 0
        assert _tables(index)["rows"] == _tables(mem)["rows"]


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
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from fra.ingest.tools.testing import tiny_inputs
    from fra.ingest.index import blocks, store
    from fra.ingest.index.build import IngestConfig, run

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)
    {fault}
    run(IngestConfig(out=Path({out!r}), model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4,
                     progress=False), tiny_inputs())
""")

# Faults injected into the subprocess by replacing a function of the code under test (SIGKILL = kill -9).
FAULTS = {
    # a block dies after computing its files, before its partial is renamed into place
    "in a block": "_rec = blocks.record_files\n"
    "blocks.record_files = lambda root, skip=(): "
    "kill() if 'layer=1/stats/block=000000' in str(root) else _rec(root, skip)",
    # right after layer 0 is marked done
    "after a layer": "_w = store._write_json\n"
    "store._write_json = lambda path, data: (_w(path, data), path.name == 'layer=0.json' and kill())",
    # while layer 1's tables move from its work directory into the staged index
    "moving tables": "_r = store._replace\n"
    "store._replace = lambda a, b: kill() if str(a).endswith('pairs/layer=1') else _r(a, b)",
}


@pytest.mark.slow  # three subprocess ingests, each importing torch
@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_after_kill_gives_identical_index(built, tmp_path, fault):
    _, reference = built
    out = tmp_path / "index"
    root = str(Path(__file__).resolve().parent.parent)
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=root, out=str(out), fault=FAULTS[fault])], capture_output=True
    )
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert not out.exists()  # nothing half-written at the final path
    assert (tmp_path / "index.staging").exists() and (tmp_path / "index.lock").exists()  # a stale lock
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root, out=str(out), fault="")], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["index"]  # staging and the stale lock are gone
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


def test_one_block_merge_equals_the_general_merge(tmp_path, monkeypatch):
    """With one block the merge skips the aggregation and the re-ranking (the partial already
    holds the answer); the index is the one the general merge writes from the same partial."""
    from fra.ingest.index import merge

    opts = dict(model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=3, progress=False)
    run(IngestConfig(out=tmp_path / "fast", **opts), tiny_inputs(n_samples=4))
    monkeypatch.setattr(merge, "_as_is", lambda todo: False)  # the general merge of the same partial
    run(IngestConfig(out=tmp_path / "general", **opts), tiny_inputs(n_samples=4))
    fast, slow = _tables(tmp_path / "fast"), _tables(tmp_path / "general")
    assert fast == slow and len(fast["examples"]) > 100


def test_one_forward_pass_per_sample_for_all_layers_and_passes(tmp_path, monkeypatch):
    """Each sample's model forward runs once for every layer and both passes (the memo holds it),
    and the index is the one computed with a forward pass per layer and pass."""
    from fra.ingest.core import decompose

    calls = []
    real = decompose.run_hooks_layers

    def counted(model, names, tokens_BT):
        calls.append(sorted(names))
        return real(model, names, tokens_BT)

    monkeypatch.setattr(decompose, "run_hooks_layers", counted)
    opts = dict(model="tiny", min_count=1, top_keys=2, top_pairs=3, progress=False)
    run(IngestConfig(out=tmp_path / "memo", **opts), tiny_inputs(n_samples=3))
    assert calls == [sorted(LAYERS)] * 3
    monkeypatch.setattr(Budget, "forward_bytes", property(lambda self: 0))  # no memo
    run(IngestConfig(out=tmp_path / "nomemo", **opts), tiny_inputs(n_samples=3))
    assert len(calls) == 3 + 3 * 2 * 2  # a forward pass per sample, layer and pass
    assert _tables(tmp_path / "memo") == _tables(tmp_path / "nomemo")


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


# ---------------------------------------------------------------------------------------------
# the commit protocol, partial verification, one writer per --out, inputs checked before the model


OPTS = dict(model="tiny", min_count=1, top_keys=2, top_pairs=3, examples_per_channel=4, progress=False)


class Killed(BaseException):
    """Stands for kill -9 at a step: raised past every `except Exception`, and nothing on the
    commit path cleans up after it (the lock's release aside, which a stale lock also gets)."""


@pytest.fixture(scope="module")
def staged(built, tmp_path_factory):
    """A staging directory whose every layer is done, with the commit not yet begun; and an
    older index of the same model, with other contents, to be replaced."""
    import shutil

    from fra.ingest.index import store

    work = tmp_path_factory.mktemp("staged")
    original = store.IndexWriter.commit

    def stop(self, manifest):
        raise Killed

    store.IndexWriter.commit = stop
    try:
        with pytest.raises(Killed):
            run(IngestConfig(out=work / "index", **OPTS), tiny_inputs())
    finally:
        store.IndexWriter.commit = original
    assert not (work / "index.lock").exists()  # released on the way out
    template = work / "template.staging"
    shutil.move(work / "index.staging", template)
    old = work / "old"
    run(IngestConfig(out=old, **{**OPTS, "top_keys": 1}), tiny_inputs())
    return template, old


@pytest.mark.parametrize("replace_old", [False, True], ids=["new-out", "replacing-an-index"])
def test_commit_survives_a_kill_at_every_step(built, staged, tmp_path, monkeypatch, capsys, replace_old):
    """Kill the commit before each of its filesystem steps in turn (every call of the store's
    `_replace`, `_write_json`, `_remove`). After each kill OUT is the old index, absent, or the
    new index, never anything else; the next command (`fra query` once the staged index is
    complete, else `fra merge`) finishes the commit, and says so, and the index equals an
    uninterrupted run's, with no staging directory or lock left."""
    import shutil

    from fra.cli import main
    from fra.ingest.index import store
    from fra.ingest.index.merge import MergeConfig
    from fra.ingest.index.merge import run as merge

    template, old = staged
    reference, old_tables = _tables(built[1]), _tables(old)
    steps = {name: getattr(store, name) for name in ("_replace", "_write_json", "_remove")}
    seen_publish = 0
    for n in range(1, 50):
        work = tmp_path / f"kill-before-step-{n}"
        out = work / "index"
        shutil.copytree(template, work / "index.staging")
        if replace_old:
            shutil.copytree(old, out)
        calls = [0]

        def step(name, *args, _n=n, _calls=calls):
            _calls[0] += 1
            if _calls[0] == _n:
                raise Killed
            return steps[name](*args)

        for name in steps:
            monkeypatch.setattr(store, name, lambda *a, _name=name, _step=step: _step(_name, *a))
        try:
            merge(MergeConfig(out=out))
        except Killed:
            pass
        else:
            assert n > 4, "the commit has at least four steps"
            break
        finally:
            for name, f in steps.items():
                monkeypatch.setattr(store, name, f)
        if out.exists():
            assert _tables(out) in (reference, old_tables), n
        else:
            assert not replace_old or (work / "index.staging" / "old").exists(), n
        capsys.readouterr()
        pending = store.pending_commit(out)
        if pending or out.exists() and _tables(out) == reference:
            assert main(["query", "--index", str(out), "heads"]) == 0
            assert ("finished an interrupted commit" in capsys.readouterr().err) == pending, n
            seen_publish += pending
        else:
            merge(MergeConfig(out=out))
        assert _tables(out) == reference, n
        assert sorted(p.name for p in work.iterdir()) == ["index"], n
    else:
        pytest.fail("the commit never completed")
    assert seen_publish >= 3  # the steps after the index is complete were each recovered by `fra query`
    assert _tables(out) == reference


def test_a_complete_staged_index_is_published_by_the_next_ingest(built, staged, tmp_path, capsys):
    """A kill after the staged index is complete: the next `fra ingest` publishes it (no work
    lost, nothing recomputed) before it looks at its own job."""
    import shutil

    from fra.ingest.index import store

    template, _ = staged
    out = tmp_path / "index"
    shutil.copytree(template, tmp_path / "index.staging")
    original = store._publish
    store._publish = lambda out, staging: (_ for _ in ()).throw(Killed)
    try:
        with pytest.raises(Killed):
            from fra.ingest.index.merge import MergeConfig
            from fra.ingest.index.merge import run as merge

            merge(MergeConfig(out=out))
    finally:
        store._publish = original
    assert store.pending_commit(out) and not out.exists()
    blocks_before = sorted((tmp_path / "index.staging" / "partials").rglob("files.json"))
    assert blocks_before  # the resume state is kept until the index is in place
    with pytest.raises(IndexFormatError, match="waits in .*index.staging after an interrupted commit"):
        connect(out)
    run(IngestConfig(out=out, **OPTS), tiny_inputs())
    assert "finished an interrupted commit" in capsys.readouterr().err
    assert _tables(out) == _tables(built[1])


def test_corrupt_partial_is_recomputed_and_named(built, tmp_path, capsys):
    """A statistics partial rewritten as valid Parquet with `sum` doubled (so a plain reader
    accepts it): the resumed run names the block, recomputes it, and the index is exact."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fra.ingest.index import store

    out = tmp_path / "index"
    original = store.IndexWriter.commit
    store.IndexWriter.commit = lambda self, manifest: (_ for _ in ()).throw(Killed)
    try:
        with pytest.raises(Killed):
            run(IngestConfig(out=out, **OPTS), tiny_inputs())
    finally:
        store.IndexWriter.commit = original
    assert not (tmp_path / "index.lock").exists()
    staging = tmp_path / "index.staging"
    for name in ("_done", "index"):  # as if killed before the layers were merged
        import shutil

        shutil.rmtree(staging / name)
    f = staging / "partials" / "layer=1" / "stats" / "block=000000" / "channels" / "head=0" / "part-00000.parquet"
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.schema.get_field_index("sum"), "sum", pc.multiply(t["sum"], 2.0)), f)
    run(IngestConfig(out=out, **OPTS), tiny_inputs())
    err = capsys.readouterr().err
    assert "recomputing corrupt partial(s): layer 1 stats block 0: " in err
    assert re.search(
        r"block=000000/channels/head=0/part-00000.parquet (has \d+ bytes, \d+ were written|changed after it was)", err
    )
    assert _tables(out) == _tables(built[1])


def test_merge_refuses_a_corrupt_partial_and_names_it(tmp_path):
    """`fra merge` (shards) removes a truncated partial and names its block, so its shard reruns it."""
    from fra.ingest.index.merge import MergeConfig
    from fra.ingest.index.merge import run as merge

    out = tmp_path / "index"
    for i in (0, 1):
        run(IngestConfig(out=out, shard=f"{i}/2", block_size=2, **OPTS), tiny_inputs())
    f = tmp_path / "index.staging" / "partials" / "layer=0" / "count" / "block=000001" / "counts.parquet"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(IndexFormatError, match=r"layer 0 count block 1: .*counts.parquet has 50 bytes"):
        merge(MergeConfig(out=out))
    assert not f.parent.exists()
    run(IngestConfig(out=out, shard="1/2", block_size=2, **OPTS), tiny_inputs())
    assert merge(MergeConfig(out=out)) is None  # channels selected: the block was recomputed


def test_one_writer_per_out_and_a_stale_lock_is_taken_over(tmp_path):
    from fra.ingest.index.store import OutLock

    out = tmp_path / "index"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "index.lock").write_text(json.dumps({"pid": live.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(IndexFormatError, match=rf"another fra process \(pid {live.pid} "):
            run(IngestConfig(out=out, **OPTS), tiny_inputs())
        assert not out.exists() and not (tmp_path / "index.staging").exists()
    finally:
        live.kill()
        live.wait()
    # the same lock, its process now dead: taken over
    with OutLock(out):
        assert json.loads((tmp_path / "index.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "index.lock").exists()


def test_refuses_a_staging_directory_fra_did_not_make(tmp_path):
    """A user's own directory named OUT.staging is never deleted; OUT that is a mount point is
    refused before anything is computed."""
    from fra.ingest.index import store

    mine = tmp_path / "index.staging"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(IndexFormatError, match=r"index.staging exists and was not made by FRA"):
        run(IngestConfig(out=tmp_path / "index", **OPTS), tiny_inputs())
    assert (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "mnt").mkdir()
    orig = store.os.path.ismount
    store.os.path.ismount = lambda p: Path(p) == tmp_path / "mnt" or orig(p)
    try:
        with pytest.raises(IndexFormatError, match="is a mount point"):
            run(IngestConfig(out=tmp_path / "mnt", **OPTS), tiny_inputs())
    finally:
        store.os.path.ismount = orig


def test_budget_below_the_floor_is_refused_with_the_floor():
    with pytest.raises(ValueError, match=r"below the floor of 0.0016 GB at --max-tokens 128"):
        IngestConfig(memory_budget_gb=1e-6)
    IngestConfig(memory_budget_gb=0.0016)


def test_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """--layers the SAEs are not for, a wrong --hook, an SAE cfg without a hook, a non-index
    --out: each refused with no model loaded."""
    from fra.ingest import registry
    from fra.ingest.tools.testing import make_sae

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(registry, "load_model", no_model)
    sae_dir = tmp_path / "sae"
    make_sae(16, "blocks.0.ln1.hook_normalized", d_sae=24, k=3).save_model(str(sae_dir))
    corpus = tmp_path / "c.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"]}), corpus)
    base = dict(model="tiny", sae=str(sae_dir), corpus=corpus, progress=False, device="cpu")
    with pytest.raises(IndexFormatError, match=r"--layers 3: the SAEs at .*sae are for layers 0"):
        run(IngestConfig(out=tmp_path / "i", layers=(3,), **base))
    from fra.ingest.index.schema import Manifest

    other = tmp_path / "other"
    other.mkdir()
    Manifest(
        model="tiny", sae={"0": "another"}, corpus="c", policy={}, layers=[0], heads=[0], n_samples=1, shard="0/1"
    ).write(other)
    with pytest.raises(
        IndexFormatError, match=r"--out .*other holds an index of model tiny with SAEs \{'0': 'another'\}"
    ):
        run(IngestConfig(out=other, **base))
    with pytest.raises(IndexFormatError, match=r"--hook blocks.0.hook_resid_pre but the layer-0 SAE reads"):
        run(IngestConfig(out=tmp_path / "i", hook="blocks.{layer}.hook_resid_pre", **base))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg.pop("metadata", None)
    cfg.pop("hook_name", None)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(IndexFormatError, match=r"names no hook .* pass --hook"):
        run(IngestConfig(out=tmp_path / "i", layers=(0,), **base))
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "x").write_text("x")
    with pytest.raises(IndexFormatError, match="is not empty and is not an FRA index"):
        run(IngestConfig(out=tmp_path / "notindex", **base))
    (sae_dir / "cfg.json").write_text("{\n")
    with pytest.raises(IndexFormatError, match=r"the layer-0 SAE at .*sae cannot be read"):
        run(IngestConfig(out=tmp_path / "i", layers=(0,), **base))
    assert not (tmp_path / "i").exists()
