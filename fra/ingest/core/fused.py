"""The CPU kernel of the ingest inner loop (`fa_kernel.cpp`), built on first use and cached.

Why this way. The kernel is plain C++ with a C interface, called through ctypes: it includes no
torch or Python header, so it compiles in a few seconds and one build serves every Python
environment and torch version. The cached library's name is a hash of everything that goes into
it (source, compiler and its version, flags, platform), so builds that differ never overwrite each
other. A build compiles into a temporary file and renames it into place (atomic), so there is no
lock to wait on: a build killed half-way leaves only a temporary file, and two processes that
build at once both end with the same library.

Where no compiler is found, the build fails or takes longer than FRA_KERNEL_BUILD_TIMEOUT seconds
(default 300), one warning says so and `load()` returns None: the ingest then runs the same loop in
PyTorch ops (`reduce.py`), with the same results. FRA_NO_FUSED=1 disables the kernel.
Cache directory: FRA_KERNEL_DIR, else $TORCH_EXTENSIONS_DIR/fra, else ~/.cache/fra/kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("fa_kernel.cpp")
# built for the CPU it runs on (-march=native): the cache key includes that CPU's identity
FLAGS = ("-O3", "-std=c++17", "-march=native", "-shared", "-fPIC", "-pthread")
KERNEL_VERSION = 9  # fra_kernel_version() of the source this module calls

_lib = None
_tried = False

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "fra_fused_sample": [_P, _P, _P] + [_I] * 5 + [_P, _P, _I, _I, _I] + [_P] * 2 + [_P] * 7 + [_I, _I],
    "fra_merge_slots": [_I, _I, _I] + [_P] * 15 + [ctypes.c_int32],
}


def cache_dir() -> Path:
    if os.environ.get("FRA_KERNEL_DIR"):
        return Path(os.environ["FRA_KERNEL_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fra"
    return Path.home() / ".cache" / "fra" / "kernels"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def library_path(cxx: str) -> Path:
    """The cached library for this source, compiler, flags and platform."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(f"{platform.system()}-{platform.machine()}-{cpu_identity()}".encode())
    return cache_dir() / f"fra_kernel-{key.hexdigest()[:16]}.so"


def cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and feature flags (Linux), else its name."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return hashlib.sha256(
            "\n".join(sorted({ln for ln in info if ln.startswith(("model name", "flags"))})).encode()
        ).hexdigest()
    except OSError:
        return platform.processor()


def build(cxx: str, dest: Path) -> None:
    """Compile into a temporary file next to `dest`, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    timeout = float(os.environ.get("FRA_KERNEL_BUILD_TIMEOUT", "300"))
    try:
        p = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{cxx} exited with {p.returncode}: {p.stderr.strip()[-500:]}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def load():
    """The kernel library (ctypes), or None where it cannot be had (after one warning)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("FRA_NO_FUSED", "0") not in ("0", ""):
        return None
    try:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        lib = ctypes.CDLL(str(path))
        if lib.fra_kernel_version() != KERNEL_VERSION:
            raise RuntimeError(f"{path} is kernel version {lib.fra_kernel_version()}, not {KERNEL_VERSION}")
        for name, args in _SIGNATURES.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = None
        _lib = lib
    except Exception as exc:  # noqa: BLE001 - any failure means the PyTorch path, said once
        warnings.warn(
            f"the CPU kernel of the ingest could not be built or loaded ({type(exc).__name__}: {str(exc)[:400]}); "
            "running the PyTorch path instead (same results, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _lib


def available() -> bool:
    return load() is not None


def _ptr(t) -> ctypes.c_void_p:
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("the CPU kernel needs contiguous CPU tensors")
    return ctypes.c_void_p(t.data_ptr())


def fused_sample(Q, KT, kv, local, table, window, ind, mode, slots, ffabs, groups, n_threads):
    """fra_fused_sample on tensors (see fa_kernel.cpp): Q [H, T, A, E] and KT [G, T, E, A16] float32,
    kv [H] int64, local [T, A16] int32, table int32, ind [T, T] uint8, mode [U] uint8; `slots` a
    `reduce.SlotStats` being filled; ffabs [groups, H, T, T] float32 or None."""
    H, T, A, E = Q.shape
    A16, S = KT.shape[-1], slots.n_slots
    U1 = int(round(table.numel() ** 0.5))
    if slots.record_HP3.device.type != "cpu" or not slots.record_HP3.is_contiguous():
        raise ValueError("slot statistics must be made by SlotStats.zeros on the CPU")
    ind_slots = (slots.ind_count_S, slots.ind_sum_HS, slots.ind_sumsq_HS)  # views of buffers with TRASH more entries
    _lib.fra_fused_sample(
        _ptr(Q), _ptr(KT), _ptr(kv), H, T, A, A16, E, _ptr(local), _ptr(table), U1, S, window or 0, _ptr(ind),
        _ptr(mode), _ptr(slots.record_HP3), _ptr(slots.best_HS), _ptr(slots.best_pos_HS),
        *(ctypes.c_void_p(t.data_ptr()) for t in ind_slots),
        None if ffabs is None else _ptr(ffabs), groups, n_threads,
    )  # fmt: skip


def merge_slots(row_S, slots, chunk, sample) -> None:
    """fra_merge_slots: one sample's `slots` (a `reduce.SlotStats` the kernel filled) into the
    `channels.ChannelChunk` rows `row_S` (int64)."""
    H, S = slots.best_HS.shape
    ind = (slots.ind_count_S, slots.ind_sum_HS, slots.ind_sumsq_HS)  # views of buffers with TRASH more entries
    _lib.fra_merge_slots(
        S, H, chunk.ex_val_NHE.shape[2], _ptr(row_S), _ptr(slots.record_HP3), _ptr(slots.best_HS),
        _ptr(slots.best_pos_HS), *(ctypes.c_void_p(t.data_ptr()) for t in ind),
        *(_ptr(t) for t in (chunk.sum_NH, chunk.sumsq_NH, chunk.ind_count_N, chunk.ind_sum_NH, chunk.ind_sumsq_NH,
                            chunk.ex_val_NHE, chunk.ex_sample_NHE, chunk.ex_pos_NHE)),
        int(sample),
    )  # fmt: skip
