// Batch-norm loops over raw CPU buffers: the four steps every bnorm operator is built from.
//
//   statistics          per-channel mean and biased variance (float64), around a shift
//   transform           y = (x - hi) * scale + off                (per-channel coefficients)
//   backward_reduce     per-channel sum(dy) and sum(dy * (x - mean)) (float64)
//   backward_elementwise dx = dy * a + (x - hi) * b + c           (per-channel coefficients)
//
// The operators (../ops.cpp) compute the per-channel coefficients in float64 and round them to
// the data's type; these loops only stream the data. Two geometries cover every layout bnorm
// accepts:
//   planes: a contiguous (N, C, S) tensor, S > 1: N*C runs of S values, one channel each;
//   rows:   (M, C) rows of C values (channels_last, channels_last_3d, or contiguous with S == 1).
//
// Precision: sums are taken on x - k with k near the channel's data (the mean of its first value
// in up to 16 samples), so data far from zero relative to its spread keeps its digits; they
// are float64, except that float32 plane runs are summed in float32 blocks of at most 17 terms
// per lane, added in float64 (the channel's sums are taken again around its mean when k was
// more than 3 standard deviations from it). The elementwise steps subtract hi = the mean
// rounded to the data's type first: near the data that subtraction is exact (Sterbenz).
//
// Plane data with 8 channels or more is split by channel (each channel's N runs in one call);
// fewer channels, by run. Either way the result does not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

namespace bnorm::cpu {

struct Geometry {
  int64_t n = 0;  // batch size N
  int64_t c = 0;  // channels C
  int64_t s = 0;  // values per (sample, channel): the product of the spatial sizes
  bool rows = false;  // true: (N*S, C) rows; false: (N, C, S) planes

  int64_t numel() const { return n * c * s; }
  int64_t count() const { return n * s; }  // values per channel
};

// The per-channel coefficients, computed in float64 and rounded to T once.
// transform: (x - mean) * scale + off  ==  (x - hi) * sc + of, with hi = mean rounded to T and
// what that rounding left out moved into the offset.
template <typename T>
struct AffineCoef {
  T hi, sc, of;
  AffineCoef(double mean, double scale, double off)
      : hi(static_cast<T>(mean)),
        sc(static_cast<T>(scale)),
        of(static_cast<T>(off - (mean - static_cast<double>(hi)) * scale)) {}
};

// training backward: dx = a*dy + b*(x - mean) + k0 with a = w*invstd,
// b = -a*invstd^2*sum_dy_xmu/n, k0 = -a*sum_dy/n; again around hi = mean rounded to T.
template <typename T>
struct GradCoef {
  T a, hi, b, k;
  GradCoef(double mean, double invstd, double w, double sum_dy, double sum_dy_xmu, double n) {
    const double ad = w * invstd;
    const double bd = -ad * invstd * invstd * sum_dy_xmu / n;
    a = static_cast<T>(ad);
    hi = static_cast<T>(mean);
    b = static_cast<T>(bd);
    k = static_cast<T>(-ad * sum_dy / n - bd * (mean - static_cast<double>(hi)));
  }
};

inline double invstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

// mean[c], var[c] (biased), float64.
template <typename T>
void statistics(const T* x, const Geometry& g, double* mean, double* var);

// y = (x - hi[c]) * scale[c] + off[c]; y may alias x.
template <typename T>
void transform(const T* x, T* y, const Geometry& g, const T* hi, const T* scale, const T* off);

// sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean[c])), float64.
template <typename T>
void backward_reduce(const T* dy, const T* x, const Geometry& g, const double* mean,
                     double* sum_dy, double* sum_dy_xmu);

// dx = dy * a[c] + (x - hi[c]) * b[c] + k[c]; dx may alias dy.
template <typename T>
void backward_elementwise(const T* dy, const T* x, T* dx, const Geometry& g, const T* a,
                          const T* hi, const T* b, const T* k);

// Whether the fused training loops below serve g: planes whose channel (N runs of S values)
// fits in a core's cache with room for a second array, and enough channels to share out.
bool fused(const Geometry& g, int64_t itemsize);

// Training forward, fused per channel (planes only): the channel's statistics, then its
// transform with scale = w*invstd_of(var, eps) and off = b, while the channel is in cache.
// Bit for bit statistics() then transform() with those coefficients.
template <typename T>
void train_forward(const T* x, T* y, const Geometry& g, const double* w, const double* b,
                   double eps, double* mean, double* var);

// Training backward, fused per channel (planes only): backward_reduce, then
// backward_elementwise with GradCoef, per channel while it is in cache. Bit for bit the two.
template <typename T>
void train_backward(const T* dy, const T* x, T* dx, const Geometry& g, const double* mean,
                    const double* invstd, const double* w, double* sum_dy, double* sum_dy_xmu);

}  // namespace bnorm::cpu
