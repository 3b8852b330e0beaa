"""A fused CPU pass for the inner loop: one read of each block of values updates every local
channel slot's sum, sum of squares and strongest entry, and the per-(q, k) |FA| sum; a second
function merges a sample's slots into the global channel chunk and its top examples.

The same work in plain PyTorch takes several passes over the values (abs, a reduction, two
index_adds, a square, a scatter_reduce and an argmax by scatter), which bounds the CPU ingest. The
kernel is compiled on first use with torch's own C++ toolchain (`torch.utils.cpp_extension`)
and cached; where no compiler is available, `available()` is False and the PyTorch path runs.
Both paths are tested against the same brute-force reference.
"""

from __future__ import annotations

import os
import warnings

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// V [H, nq, A, nk, A] float32; slots [nq, A, nk, A] int64 (the last slot is the trash that takes
// every masked or not-kept entry); sum/sumsq/best [H, P] float32, bpos [H, P] int64 (best entry's
// (q << 16) | k); ffabs [H, nq, nk] float32. q0 is the block's first query position.
void fused_block(torch::Tensor V, torch::Tensor slots, torch::Tensor sum, torch::Tensor sumsq,
                 torch::Tensor best, torch::Tensor bpos, torch::Tensor ffabs, int64_t q0) {
  const int64_t H = V.size(0), nq = V.size(1), A = V.size(2), nk = V.size(3);
  const int64_t N = nq * A * nk * A;
  const int64_t P = sum.size(1);
  const float* v = V.data_ptr<float>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* vh = v + h * N;
      float* s = sum.data_ptr<float>() + h * P;
      float* ss = sumsq.data_ptr<float>() + h * P;
      float* bv = best.data_ptr<float>() + h * P;
      int64_t* bp = bpos.data_ptr<int64_t>() + h * P;
      float* fa = ffabs.data_ptr<float>() + h * nq * nk;
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t a = 0; a < A; ++a)
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t base = ((q * A + a) * nk + k) * A;
            float acc = 0.f;
            for (int64_t b = 0; b < A; ++b) {
              const float x = vh[base + b];
              const int64_t key = sl[base + b];
              const float ax = std::fabs(x);
              s[key] += x;
              ss[key] += x * x;
              if (ax > std::fabs(bv[key])) { bv[key] = x; bp[key] = ((q0 + q) << 16) | k; }
              acc += ax;
            }
            fa[q * nk + k] += acc;
          }
    }
  });
}

// Merge one sample's local slots into a chunk of global channels. Local slot s maps to chunk row
// rowof[s] (-1: not in this chunk); rows of one merge are distinct, so the loop over s runs in
// parallel. Local stats are [H, P]; global sums [n, H] float64; examples [n, H, E] (value float32,
// sample int32, position int32).
void fused_merge(torch::Tensor rowof, torch::Tensor lsum, torch::Tensor lsumsq, torch::Tensor lbest,
                 torch::Tensor lbpos, torch::Tensor gsum, torch::Tensor gsumsq, torch::Tensor exval,
                 torch::Tensor exsample, torch::Tensor expos, int64_t sample) {
  const int64_t S = rowof.size(0), H = lsum.size(0), P = lsum.size(1), E = exval.size(2);
  const int64_t* r = rowof.data_ptr<int64_t>();
  const float *ls = lsum.data_ptr<float>(), *lss = lsumsq.data_ptr<float>(), *lb = lbest.data_ptr<float>();
  const int64_t* lp = lbpos.data_ptr<int64_t>();
  double *gs = gsum.data_ptr<double>(), *gss = gsumsq.data_ptr<double>();
  float* ev = exval.data_ptr<float>();
  int32_t* es = exsample.data_ptr<int32_t>();
  int32_t* ep = expos.data_ptr<int32_t>();
  at::parallel_for(0, S, 1024, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t row = r[s];
      if (row < 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t li = h * P + s, gi = row * H + h;
        gs[gi] += ls[li];
        gss[gi] += lss[li];
        const float x = lb[li], ax = std::fabs(x);
        if (ax == 0.f) continue;
        // examples are ordered by |value| descending, then sample ascending; an empty slot
        // (sample -1) is the worst. Replace the worst kept one when the candidate ranks above it.
        float* e = ev + gi * E;
        int32_t* es_g = es + gi * E;
        auto eff = [&](int64_t j) { return es_g[j] < 0 ? INT32_MAX : es_g[j]; };
        int64_t lo = 0;
        for (int64_t j = 1; j < E; ++j) {
          const float aj = std::fabs(e[j]), al = std::fabs(e[lo]);
          if (aj < al || (aj == al && eff(j) > eff(lo))) lo = j;
        }
        const float al = std::fabs(e[lo]);
        if (ax > al || (ax == al && sample < eff(lo))) {
          e[lo] = x; es_g[lo] = (int32_t)sample; ep[gi * E + lo] = (int32_t)lp[li];
        }
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

        _module = load_inline("fra_fused_v2", cpp_sources=_SOURCE, extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / ninja: fall back to the PyTorch path
        _failed = True
        warnings.warn(
            f"the fused CPU kernel could not be built ({type(exc).__name__}: {str(exc)[:300]}); "
            "falling back to the slower PyTorch path (same results)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def available() -> bool:
    return load() is not None
