"""`fra ingest --engine ray` on a local Ray cluster of 2 CPUs started here: the index equals the
single-process one, table for table and bit for bit, also when a worker dies mid-run."""

from __future__ import annotations

import pytest

from fra.ingest.index.build import IngestConfig, run
from fra.ingest.tools.testing import tiny_inputs
from fra.queries import connect

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fra[ray]')")

pytestmark = pytest.mark.slow  # Ray's start-up and two actors' imports take ~20 s on 2 CPUs

TABLES = ("channels", "examples", "rows", "pairs", "samples", "features")


def make_cfg(out, **overrides):
    return IngestConfig(
        out=out,
        model="tiny",
        min_count=2,
        top_keys=2,
        top_pairs=3,
        examples_per_channel=4,
        block_size=2,
        progress=False,
        **overrides,
    )


def tables(index) -> dict:
    con = connect(index)
    return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_index(tmp_path_factory):
    """The local engine with one torch thread, as Ray's CPU workers run (OMP_NUM_THREADS=1): a
    matmul's float result depends on how many threads split its sums."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("local") / "index"
        run(make_cfg(out), tiny_inputs(n_samples=5))
        return tables(out)
    finally:
        torch.set_num_threads(threads)


def test_ray_index_equals_local_index(cluster, local_index, tmp_path):
    """5 samples in blocks of 2 (3 blocks per pass and layer) on 2 actors: every table equal,
    float64 sums included (exact equality, not a tolerance)."""
    out = run(make_cfg(tmp_path / "index", engine="ray", workers=2), tiny_inputs(n_samples=5))
    got = tables(out)
    for t in TABLES:
        assert got[t] == local_index[t], t
    assert all(len(local_index[t]) > 0 for t in TABLES)


def actor_that(tmp_path, die_at: str | None = None):
    """A subclass of the engine's actor, defined here (so Ray ships it by value to its workers)
    that appends every task it starts to `tmp_path/started`, and dies like a killed process
    (`os._exit`) at the end of task `die_at` once, before its partial is in place (the file
    `tmp_path/died` remembers that it did)."""
    from fra.ingest.index import blocks, ray_engine

    log, marker = str(tmp_path / "started"), str(tmp_path / "died")

    class Actor(ray_engine._Actor):
        def run(self, task):
            import os

            with open(log, "a") as f:
                f.write(task.name + "\n")
            if task.name == die_at and not os.path.exists(marker):
                record = blocks.record_files

                def die(root, skip=()):
                    open(marker, "w").close()
                    os._exit(1)

                blocks.record_files = die
                try:
                    return super().run(task)
                finally:
                    blocks.record_files = record
            return super().run(task)

    return Actor


def started(tmp_path) -> list[str]:
    return (tmp_path / "started").read_text().split()


def test_killed_worker_is_retried(cluster, local_index, tmp_path, monkeypatch):
    """A worker dies (os._exit) at the end of a statistics block, before its partial is in place:
    Ray restarts the actor, the block is handed out again, and the index is complete and exact."""
    from fra.ingest.index import ray_engine

    monkeypatch.setattr(ray_engine, "_Actor", actor_that(tmp_path, die_at="stats:1:1"))
    out = run(make_cfg(tmp_path / "index", engine="ray", workers=2), tiny_inputs(n_samples=5))
    assert (tmp_path / "died").exists()  # the worker did die
    assert started(tmp_path).count("stats:1:1") == 2  # and its block was handed out again
    assert not (tmp_path / "index.staging").exists()
    assert tables(out) == local_index


def test_ray_resumes_an_interrupted_run(cluster, local_index, tmp_path, monkeypatch):
    """A local run dies inside a statistics block of layer 1; `--engine ray` on the same output
    keeps the finished blocks (the partials do not depend on the engine), computes only the
    missing ones, and completes the index."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fra.ingest.index import ray_engine

    code = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
        "from pathlib import Path; from fra.ingest.index import blocks; "
        "from fra.ingest.index.build import IngestConfig, run; from fra.ingest.tools.testing import tiny_inputs; "
        "rec = blocks.record_files; "
        "blocks.record_files = lambda root, skip=(): os._exit(1) if 'layer=1/stats/block=000001' in str(root) "
        "else rec(root, skip); "
        f"run(IngestConfig(out=Path({str(tmp_path / 'index')!r}), model='tiny', min_count=2, top_keys=2, "
        "top_pairs=3, examples_per_channel=4, block_size=2, progress=False), tiny_inputs(n_samples=5))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread, as the Ray workers (see local_index)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert p.returncode == 1, p.stderr.decode()[-2000:]
    done = sorted(p.name for p in (tmp_path / "index.staging" / "partials" / "layer=1" / "stats").iterdir())
    assert "block=000000" in done and "block=000001" not in done
    monkeypatch.setattr(ray_engine, "_Actor", actor_that(tmp_path))
    out = run(make_cfg(tmp_path / "index", engine="ray", workers=2), tiny_inputs(n_samples=5))
    assert tables(out) == local_index
    # only the blocks the local run had not finished were computed: layer 1's statistics blocks 1 and 2
    assert sorted(started(tmp_path)) == ["stats:1:1", "stats:1:2"]
