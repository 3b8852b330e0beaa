// The CPU inner loop of `fra ingest` (loaded by fused.py through ctypes; plain C++17, no torch or
// Python headers, so one build serves every Python environment and torch version).
//
// fra_reduce_block: one block of FA values V[h, i, k, b] (rows i = query slots (row_q[i], row_a[i])
// in (q, a) order, keys k0..k0+nk-1, as torch.matmul wrote them) reduced into the sample's
// channel slots. Each value is read once, from the block the matmul just wrote:
//   - its slot s = table[local[q, a] * U1 + local[k, b]] (int32; s == S: the trash, for entries of
//     channels not kept and of dead slots);
//   - per (head, slot): sum and sum of squares (float64), the entry of largest |value| (first in
//     (q, k) order on ties) and its position (q << 16) | k; on induction targets (ind[q, k]) the
//     induction sum, sum of squares and (head 0 only) count;
//   - per (head, q, k): the sum of |value| over the feature pairs (ffabs [groups, H, T, T], float32,
//     one partial sum per slot item's feature range; their sum is the total).
// Only keys visible from q are read: k <= q and q - k < window (window <= 0: no window).
//
// Work is split into items that own disjoint outputs, so no two threads write one address and the
// results do not depend on the number of threads: items are (head, range g of query-side
// features u) and own the slots (u, *), which are contiguous because slots are sorted by (u, w),
// and the partial |value| sums ffabs[g, h]. Within an item the scan is in (q, a, k, b) order, so a
// slot sees its entries in (q, k) order.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

template <class F>
void run_items(int64_t n_items, int64_t n_threads, F&& work) {
  std::atomic<int64_t> next{0};
  auto loop = [&]() {
    for (int64_t i = next++; i < n_items; i = next++) work(i);
  };
  const int64_t n = std::max<int64_t>(1, std::min(n_threads, n_items));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) pool.emplace_back(loop);
  loop();
  for (auto& th : pool) th.join();
}

// One sample's slot statistics of one head; each array has a trash entry at index S that takes
// every entry without a slot (so the inner loop has no branch and vectorises: within one key
// position the slots of distinct features are distinct, only the trash repeats).
struct SlotRefs {
  double *sum, *sumsq;
  float* best;
  int32_t* bpos;
  double *ind_sum, *ind_sumsq;
  int64_t* ind_count;  // head 0 only, else null
};

// GCC builds the inner loop for several x86 levels and picks one at load time
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FRA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FRA_CLONES
#endif

// the values V[q, a, k, b] of one (head, q, a) row for keys klo..khi (v indexed by absolute k)
FRA_CLONES void slot_row(const float* v, int64_t q, int64_t klo, int64_t khi, int64_t A, const int32_t* local,
                         const int32_t* trow, const uint8_t* ind_row, const SlotRefs& r, float* fa_row) {
  double* __restrict s_h = r.sum;
  double* __restrict ss_h = r.sumsq;
  float* __restrict b_h = r.best;
  int32_t* __restrict p_h = r.bpos;
  for (int64_t k = klo; k <= khi; ++k) {
    const float* __restrict vk = v + k * A;
    const int32_t* __restrict lk = local + k * A;
    const int32_t pos = (int32_t)((q << 16) | k);
    float acc = 0.f;
#pragma GCC ivdep
    for (int64_t b = 0; b < A; ++b) {
      const int32_t s = trow[lk[b]];
      const float x = vk[b];
      const double xd = x;
      acc += std::fabs(x);
      s_h[s] += xd;
      ss_h[s] += xd * xd;
      const bool better = std::fabs(x) > std::fabs(b_h[s]);
      b_h[s] = better ? x : b_h[s];
      p_h[s] = better ? pos : p_h[s];
    }
    fa_row[k] += acc;
    if (ind_row[k]) {
      for (int64_t b = 0; b < A; ++b) {
        const int32_t s = trow[lk[b]];
        const double xd = vk[b];
        r.ind_sum[s] += xd;
        r.ind_sumsq[s] += xd * xd;
        if (r.ind_count) r.ind_count[s] += 1;
      }
    }
  }
}

}  // namespace

extern "C" {

int fra_kernel_version() { return 6; }

void fra_reduce_block(const float* V, int64_t H, int64_t n_rows, int64_t A, int64_t nk, const int32_t* row_q,
                      const int32_t* row_a, int64_t k0, int64_t T, const int32_t* local, const int32_t* table,
                      int64_t U1, int64_t S, int64_t window, const uint8_t* ind, double* sum, double* sumsq,
                      float* best, int32_t* bpos, int64_t* ind_count, double* ind_sum, double* ind_sumsq,
                      float* ffabs, int64_t groups, int64_t n_threads) {
  const int64_t U = U1 - 1, P = S + 1;  // per-head arrays hold S slots and the trash
  const int64_t row_stride = nk * A;    // one (h, row) of V
  const int64_t head_stride = n_rows * row_stride;

  // slot items: (h, g), g = a range of query-side features
  run_items(H * groups, n_threads, [&](int64_t item) {
    const int64_t h = item / groups, g = item % groups;
    const int64_t u_lo = U * g / groups, u_hi = U * (g + 1) / groups;
    SlotRefs r{sum + h * P, sumsq + h * P, best + h * P, bpos + h * P, ind_sum + h * P, ind_sumsq + h * P,
               h == 0 ? ind_count : nullptr};
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t q = row_q[i];
      const int64_t u = local[q * A + row_a[i]];
      if (u < u_lo || u >= u_hi) continue;  // dead slots (u == U) fall out here
      // visible keys of q, within the block's keys k0..k0+nk-1
      const int64_t klo = std::max(window > 0 ? q - window + 1 : 0, k0), khi = std::min(q, k0 + nk - 1);
      const float* vrow = V + h * head_stride + i * row_stride;
      slot_row(vrow - k0 * A, q, klo, khi, A, local, table + u * U1, ind + q * T, r,
               ffabs + ((g * H + h) * T + q) * T);
    }
  });
}

// Merge one sample's slots into a chunk of global channels. Slot s goes to chunk row rowof[s]
// (rows are distinct). Slot stats are [H, S]; chunk sums [n, H] float64; examples [n, H, E]
// (value float32, sample int32, position int32), ordered by |value| descending then sample
// ascending, an empty example (sample -1) being the worst: the slot's best entry replaces the
// worst kept example when it ranks above it.
void fra_merge_slots(int64_t S, int64_t H, int64_t E, const int64_t* rowof, const double* lsum, const double* lsumsq,
                     const float* lbest, const int32_t* lbpos, double* gsum, double* gsumsq, float* exval,
                     int32_t* exsample, int32_t* expos, int32_t sample) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = rowof[s];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t li = h * S + s, gi = row * H + h;
      gsum[gi] += lsum[li];
      gsumsq[gi] += lsumsq[li];
      const float x = lbest[li], ax = std::fabs(x);
      if (ax == 0.f) continue;
      float* e = exval + gi * E;
      int32_t* es = exsample + gi * E;
      auto eff = [&](int64_t j) { return es[j] < 0 ? INT32_MAX : es[j]; };
      int64_t lo = 0;
      for (int64_t j = 1; j < E; ++j) {
        const float aj = std::fabs(e[j]), al = std::fabs(e[lo]);
        if (aj < al || (aj == al && eff(j) > eff(lo))) lo = j;
      }
      const float al = std::fabs(e[lo]);
      if (ax > al || (ax == al && sample < eff(lo))) {
        e[lo] = x;
        es[lo] = sample;
        expos[gi * E + lo] = lbpos[li];
      }
    }
  }
}

}  // extern "C"
