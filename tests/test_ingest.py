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

from fra.ingest.decompose import run_hooks
from fra.ingest.reduce import induction_mask
from fra.ingest.runner import IndexError_, IngestConfig, run
from fra.ingest.testing import LAYERS, tiny_inputs
from fra.queries import connect

from fra.ingest.reference import naive_fa

def brute_force(inp):
    """channel -> (count, sum, ind_count, ind_sum) per (layer, head), from the naive reference."""
    model = inp.lm.model
    out = {}
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
                                c = out.setdefault((l, h, i, j), [0, 0.0, 0, 0.0])
                                v = fa[a, b].item()
                                c[0] += 1; c[1] += v
                                if ind[q, k]:
                                    c[2] += 1; c[3] += v
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    inp = tiny_inputs()
    out = tmp_path_factory.mktemp("idx") / "index"
    run(IngestConfig(out=out, model="tiny", min_count=1, top_m=6, progress=False), inp)
    return inp, out


def test_channel_aggregates_match_brute_force(built):
    inp, out = built
    ref = brute_force(inp)
    con = connect(out)
    got = {
        (l, h, i, j): (c, s, ic, isum)
        for l, h, i, j, c, s, ic, isum in con.execute(
            "SELECT layer, head, feat_q, feat_k, count, sum, ind_count, ind_sum FROM channels").fetchall()
    }
    assert set(got) == set(ref)
    for key, (c, s, ic, isum) in ref.items():
        gc, gs, gic, gisum = got[key]
        assert gc == c and gic == ic, key
        # fp32 accumulation of O(1) values over a few dozen entries against float64
        assert gs == pytest.approx(s, abs=1e-4, rel=1e-4)
        assert gisum == pytest.approx(isum, abs=1e-4, rel=1e-4)
    assert any(v[2] > 0 for v in ref.values())  # the fixture has induction targets


def test_pair_totals_match_model_and_channels(built):
    inp, out = built
    con = connect(out)
    model = inp.lm.model
    for l in LAYERS:
        for s, toks in enumerate(inp.tokens):
            scores = run_hooks(model, l, inp.saes[l].cfg.metadata.hook_name, torch.tensor(toks)[None]).model_scores_BHQK[0]
            rows = con.execute(
                "SELECT head, q, k, score, ff + f_bdec + f_err + bdec_f + err_f + resid_resid + bias "
                "FROM pairs WHERE layer = ? AND sample = ?", [l, s]).fetchall()
            assert len(rows) == model.cfg.n_heads * len(toks) * (len(toks) + 1) // 2
            for h, q, k, score, total in rows:
                assert score == pytest.approx(scores[h, q, k].item(), abs=1e-5)
                assert total == pytest.approx(score, abs=1e-4)  # fp32, scores O(10)
    # the corpus sum of ff over pairs equals the sum over channels (min_count=1 keeps all)
    a = con.execute("SELECT layer, head, sum(ff) FROM pairs GROUP BY ALL ORDER BY ALL").fetchall()
    b = con.execute("SELECT layer, head, sum(sum) FROM channels GROUP BY ALL ORDER BY ALL").fetchall()
    for (l1, h1, x), (l2, h2, y) in zip(a, b):
        assert (l1, h1) == (l2, h2) and x == pytest.approx(y, rel=1e-4, abs=1e-3)
    # kept rows sum to the pairs' kept column
    k1 = con.execute("SELECT sum(value) FROM rows").fetchone()[0]
    k2 = con.execute("SELECT sum(kept) FROM pairs").fetchone()[0]
    assert k1 == pytest.approx(k2, rel=1e-5)


def _tables(index: Path) -> dict:
    con = connect(index)
    return {
        t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
        for t in ("rows", "pairs", "channels", "samples", "features")
    }


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from fra.ingest.testing import tiny_inputs
    from fra.ingest.runner import IngestConfig, run
    run(IngestConfig(out=Path({out!r}), model="tiny", min_count=1, top_m=6, progress=False), tiny_inputs())
""")


@pytest.mark.parametrize("kill_at", ["done:0", "moved:1:pairs"])
def test_resume_after_kill_gives_identical_index(built, tmp_path, kill_at):
    _, reference = built
    out = tmp_path / "index"
    root = str(Path(__file__).resolve().parent.parent)
    code = SCRIPT.format(root=root, out=str(out))
    env = {**os.environ, "FRA_KILL_AT": kill_at}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
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
        run(IngestConfig(out=out, model="tiny", min_count=1, top_m=6, progress=False), tiny_inputs())
    assert _tables(out) == _tables(built[1])


def test_refuses_another_models_index(built, tmp_path):
    out = tmp_path / "index"
    run(IngestConfig(out=out, model="tiny", min_count=1, progress=False), tiny_inputs())
    before = _tables(out)
    other = tiny_inputs(seed=1)  # different SAEs
    with pytest.raises(IndexError_, match="holds an index of model tiny with SAEs"):
        run(IngestConfig(out=out, model="tiny", progress=False), other)
    assert _tables(out) == before


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=(7,)), "head 7 out of range"),
    (dict(layers=(5,)), "layer 5 out of range"),
])
def test_bad_layer_or_head(tmp_path, kwargs, match):
    inp = tiny_inputs()
    if "layers" in kwargs:
        inp.layers = kwargs.pop("layers")
    with pytest.raises(IndexError_, match=match):
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


def test_config_validation():
    with pytest.raises(ValueError, match="i/n"):
        IngestConfig(shard="2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        IngestConfig(shard="3/2")


def test_shards_merge_to_the_unsharded_index(tmp_path):
    """--shard 0/2 and 1/2, merged, equal one run over all samples; merging twice is idempotent,
    and a shard given twice is refused."""
    from fra.ingest.merge import MergeConfig, run as merge
    from fra.ingest.runner import select_shard

    full = tiny_inputs(n_samples=5)
    run(IngestConfig(out=tmp_path / "full", model="tiny", min_count=1, top_m=6, progress=False), full)
    shards = []
    for i in range(2):
        cfg = IngestConfig(out=tmp_path / f"s{i}", model="tiny", min_count=1, top_m=6, progress=False, shard=f"{i}/2")
        inp = tiny_inputs(n_samples=5)
        keep = select_shard(len(inp.tokens), cfg)
        inp.tokens = [inp.tokens[j] for j in keep]
        inp.sample_ids = [inp.sample_ids[j] for j in keep]
        inp.texts = [inp.texts[j] for j in keep]
        run(cfg, inp)
        shards.append(tmp_path / f"s{i}")
    for _ in range(2):
        merge(MergeConfig(out=tmp_path / "merged", shards=tuple(shards), min_count=1))
        con_m, con_f = connect(tmp_path / "merged"), connect(tmp_path / "full")
        for table, cols in (("rows", "*"), ("pairs", "*"), ("samples", "*"),
                            ("channels", "layer, head, feat_q, feat_k, count, ind_count")):
            a = con_m.execute(f"SELECT {cols} FROM {table} ORDER BY ALL").fetchall()
            b = con_f.execute(f"SELECT {cols} FROM {table} ORDER BY ALL").fetchall()
            assert a == b, table
        sums = "SELECT layer, head, feat_q, feat_k, sum, min, max FROM channels ORDER BY layer, head, feat_q, feat_k"
        for x, y in zip(con_m.execute(sums).fetchall(), con_f.execute(sums).fetchall()):
            assert x[:4] == y[:4] and x[4:] == pytest.approx(y[4:], rel=1e-5, abs=1e-5)  # fp32 addition order
        f = "SELECT layer, feature, index_frequency, bos_rate FROM features ORDER BY ALL"
        for x, y in zip(con_m.execute(f).fetchall(), con_f.execute(f).fetchall()):
            assert x == pytest.approx(y)
    with pytest.raises(IndexError_, match="more than once"):
        merge(MergeConfig(out=tmp_path / "bad", shards=(shards[0], shards[0])))
