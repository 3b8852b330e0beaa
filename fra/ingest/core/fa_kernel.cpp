// The CPU inner loop of `fra ingest` (loaded by fused.py through ctypes; plain C++17, no torch or
// Python headers, so one build serves every Python environment and torch version).
//
// fra_fused_sample: one sample's FA values V[h, q, a, k, b] = <Q[h, q, a], K[h, k, b]>, formed
// tile by tile in registers and reduced at once into the sample's channel slots; no value is
// written to memory. Per value:
//   - its slot s = table[local[q, a] * U1 + local[k, b]] (int32; s >= S: a trash slot, for entries of
//     channels not kept and of dead slots);
//   - per (head, slot): sum and sum of squares (float64), the entry of largest |value| (the first
//     in (q, k) order on ties) and its position (q << 16) | k; on induction targets (ind[q, k]) the
//     induction sum, sum of squares and (head 0 only) count;
//   - per (head, q, k), where ffabs is given: the sum of |value| over the feature pairs (ffabs
//     [groups, H, T, T], one partial sum per work item's feature range; their sum is the total).
// Only keys visible from q are formed: k <= q and q - k < window (window <= 0: no window).
//
// Order of work. Items are (head, range g of query-side local features u); an item owns the slots
// (u, *) of its features, which are contiguous because slots are sorted by (u, w), and the partial
// sums ffabs[g, h]: no two threads write one address, and the results do not depend on the number
// of threads. Within an item, for each query q, its rows (q, a) are formed up to MAX_R at a time
// against every visible key: a tile of MAX_R x A values in registers (the micro-kernel: rows x
// 16-wide vectors of key slots b, K given transposed as [k, e, b]), each a float32 dot product
// over d_head, reduced before the next key.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// What one value updates: its slot's record (one cache line or two at most). The strongest entry
// is kept as one integer whose order is the order of entries: |value|'s float bits (which order
// like the values), then the earlier position (q, k), then the sign; so it is updated by max.
struct Record {
  double sum, sumsq;
  uint64_t best;
};

inline uint64_t entry_key(float v, int32_t pos) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint64_t low = ((uint64_t)(0x7FFFFFFF - pos) << 1) | (bits >> 31);
  return ((uint64_t)(bits & 0x7FFFFFFF) << 32) | low;
}

// the entry of a key: its value (0 for no entry, or where the largest |value| is 0) and position
inline void entry_of(uint64_t key, float* v, int32_t* pos) {
  const uint32_t abs_bits = (uint32_t)(key >> 32), low = (uint32_t)key;
  const uint32_t bits = abs_bits | ((low & 1u) << 31);
  if (abs_bits == 0) {
    *v = 0.f;
    *pos = 0;
    return;
  }
  std::memcpy(v, &bits, 4);
  *pos = 0x7FFFFFFF - (int32_t)(low >> 1);
}
static_assert(sizeof(Record) == 24, "Record must match SlotStats.record_HP3");

// One head's slot statistics, S slots and TRASH scratch slots after them (the table sends every
// entry of no kept channel to one of those, so the inner loop has no branch for it)
struct SlotRefs {
  Record* rec;
  double *ind_sum, *ind_sumsq;
  int64_t* ind_count;  // head 0 only, else null
};

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads and stores
constexpr int64_t VW = 16;  // floats per vector
constexpr int64_t TRASH = 16;  // reduce.TRASH
constexpr int MAX_R = 6;    // query rows per tile (6 x 4 accumulators + 4 key vectors fit 32 registers)

// out[r, b0 + 16 j + l] = sum_e q[r][e] * kt[e, b0 + 16 j + l] for R rows and NV vectors
template <int R, int NV>
inline void micro(const float* const* q, const float* kt, int64_t E, int64_t A16, int64_t b0, float* out) {
  v16 acc[R][NV];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = v16{};
  const float* k = kt + b0;
  for (int64_t e = 0; e < E; ++e, k += A16) {
    v16 kv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) kv[j] = *(const v16u*)(k + VW * j);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const v16 qb = v16{} + q[r][e];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += qb * kv[j];
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) *(v16u*)(out + r * A16 + b0 + VW * j) = acc[r][j];
}

template <int R>
inline void tile_rows(const float* const* q, const float* kt, int64_t E, int64_t A16, float* out) {
  int64_t b0 = 0;
  for (; b0 + 4 * VW <= A16; b0 += 4 * VW) micro<R, 4>(q, kt, E, A16, b0, out);
  for (; b0 < A16; b0 += VW) micro<R, 1>(q, kt, E, A16, b0, out);
}

// the values of rows q[0..n) (n <= MAX_R) against one key: out [n, A16]
void tile(const float* const* q, int n, const float* kt, int64_t E, int64_t A16, float* out) {
  switch (n) {
    case 6: tile_rows<6>(q, kt, E, A16, out); break;
    case 5: tile_rows<5>(q, kt, E, A16, out); break;
    case 4: tile_rows<4>(q, kt, E, A16, out); break;
    case 3: tile_rows<3>(q, kt, E, A16, out); break;
    case 2: tile_rows<2>(q, kt, E, A16, out); break;
    default: tile_rows<1>(q, kt, E, A16, out); break;
  }
}

// reduce the values x[0..A) of one (q, a) row at key k into the row's slots (trow: its table row)
inline float reduce_row(const float* __restrict x, int64_t A, const int32_t* __restrict lk,
                        const int32_t* __restrict trow, int32_t pos, bool induction, const SlotRefs& r) {
  Record* __restrict rec = r.rec;
  float acc = 0.f;
  for (int64_t b = 0; b < A; ++b) {
    Record& o = rec[trow[lk[b]]];
    const float v = x[b];
    const double vd = v;
    acc += std::fabs(v);
    o.sum += vd;
    o.sumsq += vd * vd;
    o.best = std::max(o.best, entry_key(v, pos));
  }
  if (induction) {
    for (int64_t b = 0; b < A; ++b) {
      const int32_t s = trow[lk[b]];
      const double vd = x[b];
      r.ind_sum[s] += vd;
      r.ind_sumsq[s] += vd * vd;
      if (r.ind_count) r.ind_count[s] += 1;
    }
  }
  return acc;
}

}  // namespace

extern "C" {

int fra_kernel_version() { return 9; }

// Q [H, T, A, E] and KT [G, T, E, A16] float32 (key slots b >= A are zero), kv [H]: the key-value
// head of each query head; local [T, A16] int32 (U for dead and padding slots); mode [U]: 0 skip
// the rows of feature u, 1 reduce them into its slots, 2 also add them to ffabs (which may be null
// when no u has mode 2).
void fra_fused_sample(const float* Q, const float* KT, const int64_t* kv, int64_t H, int64_t T, int64_t A,
                      int64_t A16, int64_t E, const int32_t* local, const int32_t* table, int64_t U1, int64_t S,
                      int64_t window, const uint8_t* ind,
                      const uint8_t* mode, Record* rec, float* best, int32_t* bpos, int64_t* ind_count,
                      double* ind_sum, double* ind_sumsq, float* ffabs, int64_t groups, int64_t n_threads) {
  const int64_t U = U1 - 1, P = S + TRASH;  // per-head arrays hold S slots and the trash
  // the query rows (q, a) of each feature u, q ascending (a counting sort)
  std::vector<int32_t> row_ptr(U + 2, 0), row_of(T * A);
  for (int64_t i = 0; i < T * A; ++i) ++row_ptr[local[(i / A) * A16 + i % A] + 1];
  for (int64_t u = 0; u <= U; ++u) row_ptr[u + 1] += row_ptr[u];
  {
    std::vector<int32_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t i = 0; i < T * A; ++i) row_of[fill[local[(i / A) * A16 + i % A]]++] = (int32_t)i;
  }
  run_items(H * groups, n_threads, [&](int64_t item) {
    const int64_t h = item / groups, g = item % groups;
    const SlotRefs r{rec + h * P, ind_sum + h * P, ind_sumsq + h * P, h == 0 ? ind_count : nullptr};
    const float* Qh = Q + h * T * A * E;
    const float* Kh = KT + kv[h] * T * E * A16;
    float* fa = ffabs ? ffabs + (g * H + h) * T * T : nullptr;
    std::vector<float> out(MAX_R * A16);
    const float* qrow[MAX_R];
    int64_t qs[MAX_R];
    // feature by feature: u's slots and table row stay in cache while its rows are reduced
    for (int64_t u = U * g / groups; u < U * (g + 1) / groups; ++u) {
      if (!mode[u]) continue;
      const bool with_abs = mode[u] == 2 && fa;
      const int32_t* trow = table + u * U1;
      for (int64_t i0 = row_ptr[u]; i0 < row_ptr[u + 1]; i0 += MAX_R) {
        const int n = (int)std::min<int64_t>(MAX_R, row_ptr[u + 1] - i0);
        for (int j = 0; j < n; ++j) {
          qs[j] = row_of[i0 + j] / A;
          qrow[j] = Qh + (int64_t)row_of[i0 + j] * E;
        }
        // key k is visible from the rows [lo, hi) of the group (q ascending): q >= k, q - k < window
        const int64_t k_first = window > 0 ? std::max<int64_t>(0, qs[0] - window + 1) : 0;
        int lo = 0, hi = 0;
        for (int64_t k = k_first; k <= qs[n - 1]; ++k) {
          while (lo < n && qs[lo] < k) ++lo;
          while (hi < n && (window <= 0 || qs[hi] - k < window)) ++hi;
          if (lo >= hi) continue;
          tile(qrow + lo, hi - lo, Kh + k * E * A16, E, A16, out.data());
          const int32_t* lk = local + k * A16;
          for (int j = lo; j < hi; ++j) {
            const int64_t q = qs[j];
            const float acc = reduce_row(out.data() + (j - lo) * A16, A, lk, trow, (int32_t)((q << 16) | k),
                                         ind[q * T + k] != 0, r);
            if (with_abs) fa[q * T + k] += acc;
          }
        }
      }
    }
  });
  // each slot's strongest entry, out of its key: best and bpos [H, S]
  run_items(H, n_threads, [&](int64_t h) {
    for (int64_t i = 0; i < S; ++i) entry_of(rec[h * P + i].best, best + h * S + i, bpos + h * S + i);
  });
}

// Merge one sample's slots into a chunk of global channels. Slot s goes to chunk row rowof[s]
// (rows are distinct). The slots are `fra_fused_sample`'s: records rec [H, P] (P = S + TRASH),
// best / bpos [H, S], ind_count [S], ind_sum / ind_sumsq [H, P]. Chunk sums are [n, H] float64,
// ind_count [n]; examples [n, H, E] (value float32, sample int32, position int32), kept sorted by
// |value| descending then sample ascending, empty examples (sample -1) last: the slot's best entry
// goes in where it ranks, when it ranks above the last.
void fra_merge_slots(int64_t S, int64_t H, int64_t E, const int64_t* rowof, const Record* rec, const float* lbest,
                     const int32_t* lbpos, const int64_t* lind_count, const double* lind_sum,
                     const double* lind_sumsq, double* gsum, double* gsumsq, int64_t* gind_count, double* gind_sum,
                     double* gind_sumsq, float* exval, int32_t* exsample, int32_t* expos, int32_t sample) {
  const int64_t P = S + TRASH;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = rowof[s];
    gind_count[row] += lind_count[s];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t li = h * S + s, gi = row * H + h;
      gsum[gi] += rec[h * P + s].sum;
      gsumsq[gi] += rec[h * P + s].sumsq;
      gind_sum[gi] += lind_sum[h * P + s];
      gind_sumsq[gi] += lind_sumsq[h * P + s];
      const float x = lbest[li], ax = std::fabs(x);
      if (ax == 0.f) continue;
      // the chunk's examples stay sorted, best first: insert the candidate before the first
      // example it ranks above, dropping the last
      float* e = exval + gi * E;
      int32_t* es = exsample + gi * E;
      int32_t* ep = expos + gi * E;
      auto above = [&](int64_t j) {  // the candidate ranks above example j
        const float aj = std::fabs(e[j]);
        return ax > aj || (ax == aj && sample < (es[j] < 0 ? INT32_MAX : es[j]));
      };
      if (!above(E - 1)) continue;  // most candidates, once the examples are full
      int64_t j = 0;
      while (!above(j)) ++j;
      for (int64_t m = E - 1; m > j; --m) {
        e[m] = e[m - 1];
        es[m] = es[m - 1];
        ep[m] = ep[m - 1];
      }
      e[j] = x;
      es[j] = sample;
      ep[j] = lbpos[li];
    }
  }
}

}  // extern "C"
