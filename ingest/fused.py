"""A fused CPU pass for the inner loop: one read of each block of values updates the channel
count, sum, sum of squares, min and max, and the per-(q, k) |FA| sum and block maximum.

The same work in plain PyTorch takes about eight passes over the values (abs, two reductions,
two index_adds, a square and two scatter_reduces), which is what bounds the CPU ingest. The
kernel is compiled on first use with torch's own C++ toolchain (`torch.utils.cpp_extension`)
and cached; where no compiler is available, `available()` is False and the PyTorch path runs.
Both paths are tested against the same brute-force reference.
"""

from __future__ import annotations

import os

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// V [H, nq, A, nk, A] float32, keys [nq, A, nk, A] int64 (trash slot for masked entries),
// count [P] int64, sum/sumsq/mn/mx [H, P] float32, ffabs/blkmax [H, nq, nk] float32.
void fused_block(torch::Tensor V, torch::Tensor keys, torch::Tensor count, torch::Tensor sum,
                 torch::Tensor sumsq, torch::Tensor mn, torch::Tensor mx, torch::Tensor ffabs,
                 torch::Tensor blkmax) {
  const int64_t H = V.size(0), nq = V.size(1), A = V.size(2), nk = V.size(3);
  const int64_t N = nq * A * nk * A;
  const int64_t P = sum.size(1);
  const float* v = V.data_ptr<float>();
  const int64_t* kk = keys.data_ptr<int64_t>();
  int64_t* c = count.data_ptr<int64_t>();
  for (int64_t e = 0; e < N; ++e) c[kk[e]] += 1;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* vh = v + h * N;
      float* s = sum.data_ptr<float>() + h * P;
      float* ss = sumsq.data_ptr<float>() + h * P;
      float* lo = mn.data_ptr<float>() + h * P;
      float* hi = mx.data_ptr<float>() + h * P;
      float* fa = ffabs.data_ptr<float>() + h * nq * nk;
      float* bm = blkmax.data_ptr<float>() + h * nq * nk;
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t a = 0; a < A; ++a)
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t base = ((q * A + a) * nk + k) * A;
            float acc = 0.f, m = bm[q * nk + k];
            for (int64_t b = 0; b < A; ++b) {
              const float x = vh[base + b];
              const int64_t key = kk[base + b];
              s[key] += x;
              ss[key] += x * x;
              if (x < lo[key]) lo[key] = x;
              if (x > hi[key]) hi[key] = x;
              const float ax = std::fabs(x);
              acc += ax;
              if (ax > m) m = ax;
            }
            fa[q * nk + k] += acc;
            bm[q * nk + k] = m;
          }
    }
  });
}

// Merge one sample's local accumulators into the global, channel-major ones. Local slot sel[s]
// maps to global channel glob[s]; the global keys of one merge are distinct, so the loop over s
// runs in parallel without races. Local stats are [H, P_local]; global [P, H].
void fused_merge(torch::Tensor glob, torch::Tensor sel, torch::Tensor lcount, torch::Tensor lsum,
                 torch::Tensor lsumsq, torch::Tensor lmin, torch::Tensor lmax, torch::Tensor gcount,
                 torch::Tensor gsum, torch::Tensor gsumsq, torch::Tensor gmin, torch::Tensor gmax) {
  const int64_t S = glob.size(0), H = lsum.size(0), PL = lsum.size(1);
  const int64_t* g = glob.data_ptr<int64_t>();
  const int64_t* sl = sel.data_ptr<int64_t>();
  const int64_t* lc = lcount.data_ptr<int64_t>();
  const float *ls = lsum.data_ptr<float>(), *lss = lsumsq.data_ptr<float>();
  const float *lmn = lmin.data_ptr<float>(), *lmx = lmax.data_ptr<float>();
  int64_t* gc = gcount.data_ptr<int64_t>();
  float *gs = gsum.data_ptr<float>(), *gss = gsumsq.data_ptr<float>();
  float *gmn = gmin.data_ptr<float>(), *gmx = gmax.data_ptr<float>();
  at::parallel_for(0, S, 4096, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t key = g[s], loc = sl[s];
      gc[key] += lc[loc];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t li = h * PL + loc, gi = key * H + h;
        gs[gi] += ls[li];
        gss[gi] += lss[li];
        if (lmn[li] < gmn[gi]) gmn[gi] = lmn[li];
        if (lmx[li] > gmx[gi]) gmx[gi] = lmx[li];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_block", &fused_block);
  m.def("fused_merge", &fused_merge);
}
"""

_module = None
_failed = False


def load():
    """The compiled module, or None where it cannot be built (FRA_NO_FUSED=1 also disables it)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("FRA_NO_FUSED", "0") not in ("0", ""):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline("fra_fused", cpp_sources=_SOURCE, extra_cflags=["-O3"], verbose=False)
    except Exception:  # noqa: BLE001 - no compiler / ninja: fall back to the PyTorch path
        _failed = True
    return _module


def available() -> bool:
    return load() is not None
