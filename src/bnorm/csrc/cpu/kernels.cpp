// The four batch-norm loops (see kernels.h for their contracts).
//
// Work is split with at::parallel_for, on PyTorch's own intra-op thread pool, so
// torch.set_num_threads governs these loops as it governs torch's. Below kGrain values a loop
// runs on the calling thread: waking the pool costs more than the work.
//
// The innermost loops are plain C++ written for the compiler's vectorizer (`omp simd`, enabled
// by -fopenmp: it allows the reordered float64 reductions without -ffast-math). On x86-64
// they are compiled twice, for AVX2+FMA and for the baseline, and the processor picks one at
// load time (GCC's target_clones): the build then runs on any x86-64 and uses AVX2 where it is.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BNORM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BNORM_CLONES
#endif
// The loops' bodies must be inlined into each clone, or they are compiled once, for the
// baseline, and called from both (measured: the AVX2 clone then ran SSE2 code).
#if defined(__GNUC__)
#define BNORM_INLINE inline __attribute__((always_inline))
#else
#define BNORM_INLINE inline
#endif

namespace bnorm::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // values per task, at least
constexpr int64_t kColumns = 1024;  // columns per task of the row loops (their sums fit in L1)
// The fused training loops' limit on one channel's bytes: with its second array (y, or dy and
// dx) it must stay in a core's L2 (2 MiB on the Xeon measured, 512 KiB-1 MiB on most others)
// between the two passes over it.
constexpr int64_t kFusedBytes = 256 * 1024;

// ---- innermost loops -------------------------------------------------------------------------
// The float64 reductions keep kLanes partial sums per quantity in a fixed array: the compiler
// holds them in four AVX2 registers each, so the adds of consecutive values
// do not wait on each other's latency, and the float -> double conversions overlap. (An `omp
// simd reduction` left GCC with two registers per sum: about half this speed, measured.)
// Each is instantiated for float and double through the overload set below; target_clones is put
// on the non-template overloads, which GCC versions reliably.

constexpr int64_t kLanes = 16;

// Adds the lanes pairwise (a fixed order: the result does not depend on anything but the data).
BNORM_INLINE double lane_total(const double* a) {
  double t[kLanes / 2];
  for (int64_t j = 0; j < kLanes / 2; ++j) t[j] = a[j] + a[j + kLanes / 2];
  for (int64_t w = kLanes / 4; w >= 1; w /= 2) {
    for (int64_t j = 0; j < w; ++j) t[j] += t[j + w];
  }
  return t[0];
}

// Feeds values i..e-1 to `add(v, j)` (value index v, lane j) in lanes: blocks of kW lanes,
// then one block each of kW/2, kW/4 ... down to kMin lanes while enough values remain, and
// returns where it stopped (fewer than kMin values are left for the caller's scalar tail). Every
// lane index is a constant after unrolling, so the lanes can stay in registers; a runtime index
// would keep them in memory.
template <int64_t kW, int64_t kMin, typename Add>
BNORM_INLINE int64_t in_lanes(int64_t i, int64_t e, Add add) {
  for (; i + kW <= e; i += kW) {
#pragma omp simd
    for (int64_t j = 0; j < kW; ++j) add(i + j, j);
  }
  for (int64_t w = kW / 2; w >= kMin; w /= 2) {
    if (e - i >= w) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) add(i + j, j);
      i += w;
    }
  }
  return i;
}

// The run loops sum `runs` runs of n values, `stride` apart (one channel's runs in a plane
// tensor, or a single run), so a channel of short runs costs one call, not one per run.
template <typename T>
BNORM_INLINE void run_sums_impl(const T* p, int64_t stride, int64_t runs, int64_t n, double k,
                                double& s1, double& s2) {
  double a1[kLanes] = {}, a2[kLanes] = {}, r1 = 0.0, r2 = 0.0;
  for (int64_t r = 0; r < runs; ++r) {
    const T* q = p + r * stride;
    int64_t i = in_lanes<kLanes, 4>(0, n, [&](int64_t v, int64_t j) {
      const double d = static_cast<double>(q[v]) - k;
      a1[j] += d;
      a2[j] += d * d;
    });
    for (; i < n; ++i) {  // fewer than 4 values
      const double d = static_cast<double>(q[i]) - k;
      r1 += d;
      r2 += d * d;
    }
  }
  s1 = lane_total(a1) + r1;
  s2 = lane_total(a2) + r2;
}

// float32 runs: blocks of values are summed in float32, in kLanesF lanes (no conversion in the
// loop: about twice the float64 loop's speed), and each block's lane sums are added in
// float64. Each lane adds at most kTerms + 1 = 17 terms and the fold two more, so a block's sum
// of squares is within 20 float32 roundings (1.2e-6) of exact, relative, in the worst case, and
// the statistics keep their digits because the terms are small: x - k with k near the data
// (see shift_of and statistics' retake), exact by Sterbenz's lemma when x is within a factor 2
// of k, as data far from zero is.
constexpr int64_t kLanesF = 32;
constexpr int64_t kTerms = 16;  // terms a float32 lane adds before its block is folded
constexpr int64_t kFold = 8;  // float64 lanes the blocks' float32 lanes are folded into

// Folds a block's kLanesF float32 lanes into kFold float64 lanes (three float32 adds per lane:
// two more roundings), vectorized: a scalar total per block cost 40% of the loop (measured).
BNORM_INLINE void fold(const float* a, double* t) {
#pragma omp simd
  for (int64_t j = 0; j < kFold; ++j) {
    t[j] += static_cast<double>((a[j] + a[j + kFold]) + (a[j + 2 * kFold] + a[j + 3 * kFold]));
  }
}

BNORM_INLINE double fold_total(const double* t) {
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

// Sums `runs` runs of n float32 values in blocks of at most kTerms terms per lane. `add(q, i,
// e, a1, a2)` adds values i..e-1 of the run at q into the lanes.
template <typename Add>
BNORM_INLINE void float_blocks(int64_t runs, int64_t n, double* t1, double* t2, Add add) {
  float a1[kLanesF] = {}, a2[kLanesF] = {};
  int64_t terms = 0;
  for (int64_t r = 0; r < runs; ++r) {
    int64_t i = 0;
    while (i < n) {
      const int64_t e = std::min(n, i + (kTerms - terms) * kLanesF);
      add(r, i, e, a1, a2);
      terms += (e - i) / kLanesF + 2;  // the tail's 16 and 8 lanes: two more at most
      i = e;
      if (terms >= kTerms) {
        fold(a1, t1);
        fold(a2, t2);
        std::fill_n(a1, kLanesF, 0.0f);
        std::fill_n(a2, kLanesF, 0.0f);
        terms = 0;
      }
    }
  }
  if (terms > 0) {
    fold(a1, t1);
    fold(a2, t2);
  }
}

BNORM_INLINE void run_sums_impl(const float* p, int64_t stride, int64_t runs, int64_t n, double k,
                                double& s1, double& s2) {
  const float kf = static_cast<float>(k);  // k is a float value (shift_of rounds it)
  double t1[kFold] = {}, t2[kFold] = {}, r1 = 0.0, r2 = 0.0;
  float_blocks(runs, n, t1, t2, [&](int64_t r, int64_t i, int64_t e, float* a1, float* a2) {
    const float* q = p + r * stride;
    i = in_lanes<kLanesF, 8>(i, e, [&](int64_t v, int64_t j) {
      const float d = q[v] - kf;
      a1[j] += d;
      a2[j] += d * d;
    });
    for (; i < e; ++i) {  // fewer than 8 values: float64
      const double d = static_cast<double>(q[i]) - k;
      r1 += d;
      r2 += d * d;
    }
  });
  s1 = fold_total(t1) + r1;
  s2 = fold_total(t2) + r2;
}

// The row loops take kRows rows at a time (rows `stride` apart): the per-column sums live in
// memory, and reading and writing them once per four rows instead of once per row keeps the
// loop on the data.
constexpr int64_t kRows = 4;

template <typename T>
BNORM_INLINE void row_sums_impl(const T* p, int64_t stride, int64_t rows, int64_t n, const double* k,
                          double* a1, double* a2) {
  if (rows == kRows) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double d0 = static_cast<double>(p[j]) - k[j];
      const double d1 = static_cast<double>(p[stride + j]) - k[j];
      const double d2 = static_cast<double>(p[2 * stride + j]) - k[j];
      const double d3 = static_cast<double>(p[3 * stride + j]) - k[j];
      a1[j] += (d0 + d1) + (d2 + d3);
      a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* q = p + r * stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double d = static_cast<double>(q[j]) - k[j];
      a1[j] += d;
      a2[j] += d * d;
    }
  }
}

template <typename T>
BNORM_INLINE void run_affine_impl(const T* x, T* y, int64_t stride, int64_t runs, int64_t n, T hi,
                                  T sc, T of) {
  for (int64_t r = 0; r < runs; ++r) {
    const T* xr = x + r * stride;
    T* yr = y + r * stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - hi) * sc + of;
  }
}

template <typename T>
BNORM_INLINE void row_affine_impl(const T* x, T* y, int64_t n, const T* hi, const T* sc, const T* of) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - hi[j]) * sc[j] + of[j];
}

template <typename T>
BNORM_INLINE void run_grad_sums_impl(const T* dy, const T* x, int64_t stride, int64_t runs,
                                     int64_t n, double m, double& s1, double& s2) {
  double a1[kLanes] = {}, a2[kLanes] = {}, r1 = 0.0, r2 = 0.0;
  for (int64_t r = 0; r < runs; ++r) {
    const T* g = dy + r * stride;
    const T* q = x + r * stride;
    int64_t i = in_lanes<kLanes, 4>(0, n, [&](int64_t u, int64_t j) {
      const double v = static_cast<double>(g[u]);
      a1[j] += v;
      a2[j] += v * (static_cast<double>(q[u]) - m);
    });
    for (; i < n; ++i) {
      const double v = static_cast<double>(g[i]);
      r1 += v;
      r2 += v * (static_cast<double>(q[i]) - m);
    }
  }
  s1 = lane_total(a1) + r1;
  s2 = lane_total(a2) + r2;
}

// float32 runs, in float32 blocks as run_sums: sum(dy * (x - m)) is taken as
// sum(dy * (x - hi)) - (m - hi) * sum(dy), hi = m rounded to float (x - hi exact near the data).
BNORM_INLINE void run_grad_sums_impl(const float* dy, const float* x, int64_t stride,
                                     int64_t runs, int64_t n, double m, double& s1, double& s2) {
  const float hi = static_cast<float>(m);
  double t1[kFold] = {}, t2[kFold] = {}, r1 = 0.0, r2 = 0.0;
  float_blocks(runs, n, t1, t2, [&](int64_t r, int64_t i, int64_t e, float* a1, float* a2) {
    const float* g = dy + r * stride;
    const float* q = x + r * stride;
    i = in_lanes<kLanesF, 8>(i, e, [&](int64_t v, int64_t j) {
      a1[j] += g[v];
      a2[j] += g[v] * (q[v] - hi);
    });
    for (; i < e; ++i) {  // fewer than 8 values: float64, around m itself
      const double v = static_cast<double>(g[i]);
      r1 += v;
      r2 += v * (static_cast<double>(q[i]) - m);
    }
  });
  const double f1 = fold_total(t1);
  s1 = f1 + r1;
  s2 = fold_total(t2) - (m - static_cast<double>(hi)) * f1 + r2;
}

template <typename T>
BNORM_INLINE void row_grad_sums_impl(const T* dy, const T* x, int64_t stride, int64_t rows, int64_t n,
                               const double* m, double* a1, double* a2) {
  if (rows == kRows) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double g0 = static_cast<double>(dy[j]);
      const double g1 = static_cast<double>(dy[stride + j]);
      const double g2 = static_cast<double>(dy[2 * stride + j]);
      const double g3 = static_cast<double>(dy[3 * stride + j]);
      a1[j] += (g0 + g1) + (g2 + g3);
      a2[j] += (g0 * (static_cast<double>(x[j]) - m[j]) +
                g1 * (static_cast<double>(x[stride + j]) - m[j])) +
               (g2 * (static_cast<double>(x[2 * stride + j]) - m[j]) +
                g3 * (static_cast<double>(x[3 * stride + j]) - m[j]));
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double g = static_cast<double>(dy[r * stride + j]);
      a1[j] += g;
      a2[j] += g * (static_cast<double>(x[r * stride + j]) - m[j]);
    }
  }
}

template <typename T>
BNORM_INLINE void run_grad_impl(const T* dy, const T* x, T* dx, int64_t stride, int64_t runs,
                                int64_t n, T a, T hi, T b, T k) {
  for (int64_t r = 0; r < runs; ++r) {
    const T* g = dy + r * stride;
    const T* q = x + r * stride;
    T* d = dx + r * stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = g[i] * a + (q[i] - hi) * b + k;
  }
}

template <typename T>
BNORM_INLINE void row_grad_impl(const T* dy, const T* x, T* dx, int64_t n, const T* a, const T* hi,
                          const T* b, const T* k) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dx[j] = dy[j] * a[j] + (x[j] - hi[j]) * b[j] + k[j];
}

// Calls f(std::integral_constant<int64_t, kS>) with kS = S for the common 2x2 and 4x4 planes,
// so that a channel's S values are one or two whole vectors, and kS = 0 (S at run time) else.
template <typename F>
BNORM_INLINE void with_plane_size(int64_t S, F f) {
  if (S == 16) return f(std::integral_constant<int64_t, 16>());
  if (S == 4) return f(std::integral_constant<int64_t, 4>());
  f(std::integral_constant<int64_t, 0>());
}

// One sample of small planes (C channels of S values, in order), each channel's coefficients
// broadcast over its S values.
template <typename T>
BNORM_INLINE void planes_affine_impl(const T* x, T* y, int64_t C, int64_t S, const T* hi,
                                     const T* sc, const T* of) {
  with_plane_size(S, [&](auto ks) {
    const int64_t n = ks.value > 0 ? ks.value : S;
    for (int64_t c = 0; c < C; ++c) {
      const T h = hi[c], m = sc[c], o = of[c];
      const T* p = x + c * n;
      T* q = y + c * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) q[i] = (p[i] - h) * m + o;
    }
  });
}

template <typename T>
BNORM_INLINE void planes_grad_impl(const T* dy, const T* x, T* dx, int64_t C, int64_t S,
                                   const T* a, const T* hi, const T* b, const T* k) {
  with_plane_size(S, [&](auto ks) {
    const int64_t n = ks.value > 0 ? ks.value : S;
    for (int64_t c = 0; c < C; ++c) {
      const T ac = a[c], h = hi[c], bc = b[c], kc = k[c];
      const T* g = dy + c * n;
      const T* p = x + c * n;
      T* d = dx + c * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = g[i] * ac + (p[i] - h) * bc + kc;
    }
  });
}

#define BNORM_OVERLOADS(T)                                                                    \
  BNORM_CLONES void planes_affine(const T* x, T* y, int64_t C, int64_t S, const T* hi,        \
                                  const T* sc, const T* of) {                                 \
    planes_affine_impl(x, y, C, S, hi, sc, of);                                               \
  }                                                                                           \
  BNORM_CLONES void planes_grad(const T* dy, const T* x, T* dx, int64_t C, int64_t S,         \
                                const T* a, const T* hi, const T* b, const T* k) {            \
    planes_grad_impl(dy, x, dx, C, S, a, hi, b, k);                                           \
  }                                                                                           \
  BNORM_CLONES void run_sums(const T* p, int64_t stride, int64_t runs, int64_t n, double k,  \
                             double& s1, double& s2) {                                        \
    run_sums_impl(p, stride, runs, n, k, s1, s2);                                             \
  }                                                                                           \
  BNORM_CLONES void row_sums(const T* p, int64_t stride, int64_t rows, int64_t n,            \
                             const double* k, double* a1, double* a2) {                       \
    row_sums_impl(p, stride, rows, n, k, a1, a2);                                             \
  }                                                                                           \
  BNORM_CLONES void run_affine(const T* x, T* y, int64_t stride, int64_t runs, int64_t n, T hi, \
                               T sc, T of) {                                                  \
    run_affine_impl(x, y, stride, runs, n, hi, sc, of);                                       \
  }                                                                                           \
  BNORM_CLONES void row_affine(const T* x, T* y, int64_t n, const T* hi, const T* sc,         \
                               const T* of) {                                                 \
    row_affine_impl(x, y, n, hi, sc, of);                                                     \
  }                                                                                           \
  BNORM_CLONES void run_grad_sums(const T* dy, const T* x, int64_t stride, int64_t runs,     \
                                  int64_t n, double m, double& s1, double& s2) {              \
    run_grad_sums_impl(dy, x, stride, runs, n, m, s1, s2);                                    \
  }                                                                                           \
  BNORM_CLONES void row_grad_sums(const T* dy, const T* x, int64_t stride, int64_t rows,     \
                                  int64_t n, const double* m, double* a1, double* a2) {       \
    row_grad_sums_impl(dy, x, stride, rows, n, m, a1, a2);                                    \
  }                                                                                           \
  BNORM_CLONES void run_grad(const T* dy, const T* x, T* dx, int64_t stride, int64_t runs,    \
                             int64_t n, T a, T hi, T b, T k) {                                \
    run_grad_impl(dy, x, dx, stride, runs, n, a, hi, b, k);                                   \
  }                                                                                           \
  BNORM_CLONES void row_grad(const T* dy, const T* x, T* dx, int64_t n, const T* a,           \
                             const T* hi, const T* b, const T* k) {                           \
    row_grad_impl(dy, x, dx, n, a, hi, b, k);                                                 \
  }

BNORM_OVERLOADS(float)
BNORM_OVERLOADS(double)
#undef BNORM_OVERLOADS

// ---- work splitting --------------------------------------------------------------------------

// Plane data with this many channels or more, and planes larger than kSmallPlane, is split by
// channel: each channel's N runs in one call (a fixed rule, so the split, and with it the result,
// does not depend on the thread count).
constexpr int64_t kChannelsMin = 8;

// Small planes (at most kSmallPlane values per sample and channel) are read as rows: sample n's
// C*S values make one row, whose column j belongs to channel j / S. Split by channel, each of a
// channel's N runs of S values lies in its own cache line and page (C*S values apart), and the
// loops pay a TLB miss per few values (the changelog has the measurements); as rows, every pass
// reads memory in order. The row loops sum in float64, so these statistics need no retake.
constexpr int64_t kSmallPlane = 16;

bool planes_as_rows(const Geometry& g) { return !g.rows && g.s > 1 && g.s <= kSmallPlane; }

bool by_channel(const Geometry& g) {
  return !g.rows && g.c >= kChannelsMin && !planes_as_rows(g);
}

int64_t channel_grain(const Geometry& g) {  // channels per task: enough values to wake the pool
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(g.count(), 1));
}

// Per-channel float64 sums of `term` over every value of the channel, for both geometries.
// `run(offset, runs, c, s1, s2)` sums `runs` plane runs of channel c from element `offset`
// (C*S apart); `row(r, nr, c0, len, a1, a2)` adds columns [c0, c0+len) of rows r .. r+nr-1
// into a1/a2.
template <typename Run, typename Row>
void channel_sums(const Geometry& g, double* out1, double* out2, Run run, Row row) {
  const int64_t C = g.c;
  if (by_channel(g)) {
    at::parallel_for(0, C, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) run(c * g.s, g.n, c, out1[c], out2[c]);
    });
    return;
  }
  if (!g.rows) {
    // One pair of sums per (sample, channel) run, then added per channel in sample order: the
    // result does not depend on how the runs were split across threads.
    const int64_t P = g.n * C;
    std::vector<double> p1(P), p2(P);
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.s, 1));
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) run(p * g.s, 1, p % C, p1[p], p2[p]);
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t n = 0; n < g.n; ++n) {
        s1 += p1[n * C + c];
        s2 += p2[n * C + c];
      }
      out1[c] = s1;
      out2[c] = s2;
    }
    return;
  }
  // Rows: tasks are (block of rows) x (block of columns); each block of rows sums into its own
  // slice, and the slices are added in block order (again independent of the thread count).
  const int64_t M = g.count();
  const int64_t col_blocks = (C + kColumns - 1) / kColumns;
  const int64_t wanted = std::max<int64_t>(1, g.numel() / (4 * kGrain));
  const int64_t row_blocks =
      std::clamp<int64_t>(wanted / col_blocks, 1, std::min<int64_t>(M, 64));
  const int64_t rows_per = (M + row_blocks - 1) / row_blocks;
  std::vector<double> s1(row_blocks * C, 0.0), s2(row_blocks * C, 0.0);
  // tasks per thread: at least kGrain values, so that a small input is not shared out (waking
  // the pool costs more than its passes); the tasks and their order of addition stay the same
  const int64_t tasks = row_blocks * col_blocks;
  const int64_t task_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.numel() / tasks));
  at::parallel_for(0, tasks, task_grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / col_blocks, cb = t % col_blocks;
      const int64_t c0 = cb * kColumns, len = std::min(kColumns, C - c0);
      double* a1 = s1.data() + rb * C + c0;
      double* a2 = s2.data() + rb * C + c0;
      const int64_t r_end = std::min(M, (rb + 1) * rows_per);
      for (int64_t r = rb * rows_per; r < r_end; r += kRows) {
        row(r, std::min(kRows, r_end - r), c0, len, a1, a2);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      a += s1[rb * C + c];
      b += s2[rb * C + c];
    }
    out1[c] = a;
    out2[c] = b;
  }
}

// An elementwise pass over both geometries: `run(offset, runs, c)` handles `runs` plane runs of
// channel c from element `offset`, `row(r)` handles row r.
template <typename Run, typename Row>
void elementwise(const Geometry& g, Run run, Row row) {
  if (by_channel(g)) {
    at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) run(c * g.s, g.n, c);
    });
  } else if (!g.rows) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.s, 1));
    at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) run(p * g.s, 1, p % g.c);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.c, 1));
    at::parallel_for(0, g.count(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r);
    });
  }
}

Geometry as_rows(const Geometry& g) { return Geometry{g.n, g.c * g.s, 1, true}; }

// A per-channel array repeated for each of the channel's S columns.
template <typename V>
std::vector<V> per_column(const V* v, const Geometry& g) {
  std::vector<V> out(g.c * g.s);
  for (int64_t c = 0; c < g.c; ++c) std::fill_n(out.begin() + c * g.s, g.s, v[c]);
  return out;
}

// Per-channel sums of small planes from the row loops' per-column sums, added in column order.
template <typename Row>
void small_plane_sums(const Geometry& g, double* out1, double* out2, Row row) {
  const Geometry r = as_rows(g);
  std::vector<double> a(r.c), b(r.c);
  channel_sums(r, a.data(), b.data(), [](int64_t, int64_t, int64_t, double&, double&) {}, row);
  for (int64_t c = 0; c < g.c; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j = c * g.s; j < (c + 1) * g.s; ++j) {
      s1 += a[j];
      s2 += b[j];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

template <typename Row>
void small_plane_elementwise(const Geometry& g, Row row) {
  elementwise(as_rows(g), [](int64_t, int64_t, int64_t) {}, row);
}

}  // namespace

namespace {

constexpr int64_t kPilot = 16;  // values per channel averaged for the shift

// The shift of channel c's sums: the mean of its first value in each of the first kPilot
// samples (rows), rounded to T so that x - k is exact near the data. Close to the channel's
// mean, so the sums stay small and their rounding with them.
template <typename T>
double shift_of(const T* x, const Geometry& g, int64_t c) {
  const int64_t samples = std::min<int64_t>(kPilot, g.rows ? g.count() : g.n);
  const int64_t step = g.rows ? g.c : g.c * g.s;
  const int64_t first = g.rows ? c : c * g.s;
  double t = 0.0;
  for (int64_t i = 0; i < samples; ++i) t += static_cast<double>(x[first + i * step]);
  return static_cast<double>(static_cast<T>(t / static_cast<double>(samples)));
}

// Mean and biased variance from sums of x - k over n values.
BNORM_INLINE void moments(double k, double s1, double s2, double n, double* mean, double* var) {
  const double m = s1 / n;
  *mean = k + m;
  *var = std::max(s2 / n - m * m, 0.0);  // rounding may leave a tiny negative
}

// Whether the shift was far from the mean (more than 3 standard deviations): the rounding of
// the sums grows with (mean - k)^2 / var, so the channel's sums are taken again around its mean.
inline bool far_shift(double k, double mean, double var) {
  const double d = mean - k;
  return d * d > 9.0 * var;
}

// One plane channel's sums around k, in one call over its N runs (as channel_sums takes them
// when it splits by channel, so every route gives the same bits).
template <typename T>
void plane_channel_sums(const T* x, const Geometry& g, int64_t c, double k, double* s1,
                        double* s2) {
  run_sums(x + c * g.s, g.c * g.s, g.n, g.s, k, *s1, *s2);
}

// A plane channel's mean and variance from its sums around k, retaken around the mean when k
// was far from it.
template <typename T>
void plane_channel_moments(const T* x, const Geometry& g, int64_t c, double k, double s1,
                           double s2, double* mean, double* var) {
  const double n = static_cast<double>(g.count());
  moments(k, s1, s2, n, mean, var);
  if (far_shift(k, *mean, *var)) {
    const double k2 = static_cast<double>(static_cast<T>(*mean));
    plane_channel_sums(x, g, c, k2, &s1, &s2);
    moments(k2, s1, s2, n, mean, var);
  }
}

}  // namespace

template <typename T>
void statistics(const T* x, const Geometry& g, double* mean, double* var) {
  const int64_t C = g.c, S = g.s;
  std::vector<double> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(x, g, c);
  if (planes_as_rows(g)) {
    const std::vector<double> kc = per_column(k.data(), g);
    const int64_t W = C * S;
    std::vector<double> s1(C), s2(C);
    small_plane_sums(g, s1.data(), s2.data(),
                     [&](int64_t r, int64_t nr, int64_t c0, int64_t len, double* a, double* b) {
                       row_sums(x + r * W + c0, W, nr, len, kc.data() + c0, a, b);
                     });
    const double n = static_cast<double>(g.count());
    for (int64_t c = 0; c < C; ++c) moments(k[c], s1[c], s2[c], n, &mean[c], &var[c]);
    return;
  }
  std::vector<double> s1(C), s2(C);
  channel_sums(
      g, s1.data(), s2.data(),
      [&](int64_t o, int64_t runs, int64_t c, double& a, double& b) {
        run_sums(x + o, C * S, runs, S, k[c], a, b);
      },
      [&](int64_t r, int64_t nr, int64_t c0, int64_t len, double* a, double* b) {
        row_sums(x + r * C + c0, C, nr, len, k.data() + c0, a, b);
      });
  const double n = static_cast<double>(g.count());
  for (int64_t c = 0; c < C; ++c) {
    if (g.rows) {
      moments(k[c], s1[c], s2[c], n, &mean[c], &var[c]);  // float64 sums: no retake needed
    } else {
      plane_channel_moments(x, g, c, k[c], s1[c], s2[c], &mean[c], &var[c]);
    }
  }
}

template <typename T>
void transform(const T* x, T* y, const Geometry& g, const T* hi, const T* scale, const T* off) {
  const int64_t C = g.c, S = g.s;
  if (planes_as_rows(g)) {
    const int64_t W = C * S;
    small_plane_elementwise(
        g, [&](int64_t r) { planes_affine(x + r * W, y + r * W, C, S, hi, scale, off); });
    return;
  }
  elementwise(
      g,
      [&](int64_t o, int64_t runs, int64_t c) {
        run_affine(x + o, y + o, C * S, runs, S, hi[c], scale[c], off[c]);
      },
      [&](int64_t r) { row_affine(x + r * C, y + r * C, C, hi, scale, off); });
}

template <typename T>
void backward_reduce(const T* dy, const T* x, const Geometry& g, const double* mean,
                     double* sum_dy, double* sum_dy_xmu) {
  const int64_t C = g.c, S = g.s;
  if (planes_as_rows(g)) {
    const std::vector<double> mc = per_column(mean, g);
    const int64_t W = C * S;
    small_plane_sums(g, sum_dy, sum_dy_xmu,
                     [&](int64_t r, int64_t nr, int64_t c0, int64_t len, double* a, double* b) {
                       row_grad_sums(dy + r * W + c0, x + r * W + c0, W, nr, len, mc.data() + c0,
                                     a, b);
                     });
    return;
  }
  channel_sums(
      g, sum_dy, sum_dy_xmu,
      [&](int64_t o, int64_t runs, int64_t c, double& a, double& b) {
        run_grad_sums(dy + o, x + o, C * S, runs, S, mean[c], a, b);
      },
      [&](int64_t r, int64_t nr, int64_t c0, int64_t len, double* a, double* b) {
        row_grad_sums(dy + r * C + c0, x + r * C + c0, C, nr, len, mean + c0, a, b);
      });
}

template <typename T>
void backward_elementwise(const T* dy, const T* x, T* dx, const Geometry& g, const T* a,
                          const T* hi, const T* b, const T* k) {
  const int64_t C = g.c, S = g.s;
  if (planes_as_rows(g)) {
    const int64_t W = C * S;
    small_plane_elementwise(g, [&](int64_t r) {
      planes_grad(dy + r * W, x + r * W, dx + r * W, C, S, a, hi, b, k);
    });
    return;
  }
  elementwise(
      g,
      [&](int64_t o, int64_t runs, int64_t c) {
        run_grad(dy + o, x + o, dx + o, C * S, runs, S, a[c], hi[c], b[c], k[c]);
      },
      [&](int64_t r) { row_grad(dy + r * C, x + r * C, dx + r * C, C, a, hi, b, k); });
}

bool fused(const Geometry& g, int64_t itemsize) {
  if (!by_channel(g) || g.s < 2) return false;
  const int64_t channel_bytes = g.count() * itemsize;
  // channels to share out: without a few per thread one thread would do the last alone
  return channel_bytes <= kFusedBytes && g.c >= 4 * at::get_num_threads();
}

template <typename T>
void train_forward(const T* x, T* y, const Geometry& g, const double* w, const double* b,
                   double eps, double* mean, double* var) {
  const int64_t C = g.c, S = g.s, N = g.n;
  at::parallel_for(0, C, channel_grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      // statistics(): the same shift, sums and retake
      const double k = shift_of(x, g, c);
      double s1, s2;
      plane_channel_sums(x, g, c, k, &s1, &s2);
      plane_channel_moments(x, g, c, k, s1, s2, &mean[c], &var[c]);
      const AffineCoef<T> f(mean[c], w[c] * invstd_of(var[c], eps), b[c]);
      run_affine(x + c * S, y + c * S, C * S, N, S, f.hi, f.sc, f.of);
    }
  });
}

template <typename T>
void train_backward(const T* dy, const T* x, T* dx, const Geometry& g, const double* mean,
                    const double* invstd, const double* w, double* sum_dy, double* sum_dy_xmu) {
  const int64_t C = g.c, S = g.s, N = g.n;
  const double n = static_cast<double>(g.count());
  at::parallel_for(0, C, channel_grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double s1, s2;
      run_grad_sums(dy + c * S, x + c * S, C * S, N, S, mean[c], s1, s2);
      sum_dy[c] = s1;
      sum_dy_xmu[c] = s2;
      const GradCoef<T> f(mean[c], invstd[c], w[c], s1, s2, n);
      run_grad(dy + c * S, x + c * S, dx + c * S, C * S, N, S, f.a, f.hi, f.b, f.k);
    }
  });
}

#define BNORM_INSTANTIATE(T)                                                                  \
  template void statistics<T>(const T*, const Geometry&, double*, double*);                   \
  template void transform<T>(const T*, T*, const Geometry&, const T*, const T*, const T*);    \
  template void backward_reduce<T>(const T*, const T*, const Geometry&, const double*,        \
                                   double*, double*);                                         \
  template void backward_elementwise<T>(const T*, const T*, T*, const Geometry&, const T*,    \
                                        const T*, const T*, const T*);            \
  template void train_forward<T>(const T*, T*, const Geometry&, const double*, const double*, \
                                 double, double*, double*);                                  \
  template void train_backward<T>(const T*, const T*, T*, const Geometry&, const double*,    \
                                  const double*, const double*, double*, double*);

BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::cpu
