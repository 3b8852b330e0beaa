"""The CPU kernel's build: leftovers of a killed build never block the next one, a failing or
hanging build falls back to the PyTorch path after one warning, and the cache is keyed by what
goes into the library."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from fra.ingest.core import fused
from fra.ingest.core.reduce import ReduceOptions, SampleFA, reduce_sample


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """fused.py as in a new process, with its cache in tmp_path."""
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_tried", False)
    monkeypatch.setenv("FRA_KERNEL_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FRA_NO_FUSED", raising=False)
    return tmp_path


def _fake_compiler(path, body: str):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_leftovers_of_a_killed_build_do_not_block(tmp_path):
    """A build killed half-way leaves a temporary file (and, from torch's old build scheme, a
    `lock` file). The next process builds and loads the kernel without waiting on either."""
    if fused.compiler() is None:
        pytest.skip("no C++ compiler")
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "FRA_KERNEL_DIR": str(cache)}
    lib = subprocess.run(
        [sys.executable, "-c", "from fra.ingest.core import fused; print(fused.library_path(fused.compiler()))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (cache / "lock").write_text("")  # a dead process's lock
    stale = cache / f"{os.path.basename(lib)}.tmp-999999-deadbeef"
    stale.write_bytes(b"\x7fELF half-written")
    code = "from fra.ingest.core import fused; assert fused.available(); print('ok')"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert os.path.exists(lib)
    assert time.time() - t0 < 240


def test_failing_build_warns_once_and_the_pytorch_path_runs(fresh, monkeypatch):
    monkeypatch.setenv("CXX", _fake_compiler(fresh / "cxx", 'echo "fake compiler error" >&2; exit 1'))
    with pytest.warns(RuntimeWarning, match="fake compiler error") as record:
        assert fused.load() is None
        assert fused.load() is None
        assert not fused.available()
    assert len(record) == 1
    assert not list((fresh / "cache").glob("*.so*"))  # nothing half-written left behind
    g = torch.Generator().manual_seed(0)
    H, T, A, E = 2, 5, 2, 3
    qf, kf = torch.randn(H, T, A, E, generator=g), torch.randn(H, T, A, E, generator=g)
    idx = torch.stack([torch.randperm(6, generator=g)[:A] for _ in range(T)])
    live = torch.ones(T, A, dtype=torch.bool)
    attn = torch.rand(H, T, T, generator=g)
    x = SampleFA(qf, kf, idx, live, torch.zeros(T, T, dtype=torch.bool), attn, attn)
    auto = reduce_sample(x, 6)
    torch.testing.assert_close(auto.slots.sum_HS, reduce_sample(x, 6, opts=ReduceOptions(backend="torch")).slots.sum_HS)
    with pytest.raises(RuntimeError, match="needs float32 CPU tensors and the built C"):
        reduce_sample(x, 6, opts=ReduceOptions(backend="kernel"))


def test_hanging_build_times_out(fresh, monkeypatch):
    """A compiler that never finishes: after FRA_KERNEL_BUILD_TIMEOUT seconds, one warning and
    the PyTorch path, never a silent wait."""
    monkeypatch.setenv("CXX", _fake_compiler(fresh / "cxx", 'case "$1" in --version) echo fake;; *) sleep 60;; esac'))
    monkeypatch.setenv("FRA_KERNEL_BUILD_TIMEOUT", "1")
    t0 = time.time()
    with pytest.warns(RuntimeWarning, match="TimeoutExpired"):
        assert fused.load() is None
    assert time.time() - t0 < 30


def test_cache_key_follows_compiler_and_source(fresh, monkeypatch):
    a = _fake_compiler(fresh / "a", "echo 'cc version 1'")
    b = _fake_compiler(fresh / "b", "echo 'cc version 2'")
    assert fused.library_path(a) != fused.library_path(b)
    assert fused.library_path(a) == fused.library_path(a)
    src = fresh / "k.cpp"
    src.write_text(fused.SOURCE.read_text() + "\n// changed\n")
    before = fused.library_path(a)
    monkeypatch.setattr(fused, "SOURCE", src)
    assert fused.library_path(a) != before


def test_no_compiler_at_all(fresh, monkeypatch):
    monkeypatch.setattr(fused, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert fused.load() is None
