// bnorm's operators: schemas (TORCH_LIBRARY), CPU kernels, autograd and the composite entry.
//
// Every operator works on (N, C, *) tensors with channels on dim 1, float32/float64 (bfloat16
// and float16 are computed in float32 and rounded back), contiguous or channels_last(_3d) (any
// other strides are made contiguous first). Per-channel statistics and reductions are float64
// tensors of shape (C,).
//
//   stats(x) -> (mean, var)                       the batch's mean and biased variance
//   transform(x, mean, invstd, w?, b?) -> y       (x - mean) * invstd * w + b
//   backward_reduce(dy, x, mean) -> (sum_dy, sum_dy_xmu)
//   backward_elemt(dy, x, mean, invstd, w?, sum_dy, sum_dy_xmu, count) -> dx
//   batch_norm_train(x, w?, b?, eps) -> (y, mean, var)        stats + transform, differentiable
//   batch_norm_eval(x, w?, b?, running_mean, running_var, eps) -> y            differentiable
//   batch_norm_backward(dy, x, w?, mean, var, eps, train, mask) -> (dx, dw, db)
//   update_running_stats_(running_mean!, running_var!, num_batches_tracked!, mean, var, count,
//                         momentum)                 in place; a non-finite batch changes nothing
//   batch_norm(x, w?, b?, running_mean!, running_var!, num_batches_tracked!, use_batch_stats,
//              momentum, eps) -> y                  the whole layer, composed of the above
//
// Meta/fake kernels are registered from Python (bnorm/ops.py), where symbolic shapes are at home.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"

namespace bnorm {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- inputs ----------------------------------------------------------------------------------

void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bnorm::", op, ": expected an input of shape (N, C, *), got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bnorm::", op,
              ": expected a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "bnorm::", op, ": expected a CPU tensor, got ", x.device());
}

void check_per_channel(const char* op, const char* name, const Tensor& t, int64_t channels) {
  TORCH_CHECK(t.numel() == channels, "bnorm::", op, ": expected ", name, " of ", channels,
              " values (one per channel), got shape ", t.sizes());
}

void check_per_channel(const char* op, const char* name, const optional<Tensor>& t,
                       int64_t channels) {
  if (t.has_value() && t->defined()) check_per_channel(op, name, *t, channels);
}

// The dtype the loops run in: float64 stays, everything else is computed in float32.
at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x in a layout and dtype the loops take: contiguous or channels_last(_3d), float32/float64.
Tensor dense(const Tensor& x) {
  Tensor t = x;
  const bool cl = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!x.is_contiguous() && !cl) t = x.contiguous();
  if (t.scalar_type() != compute_type(t)) t = t.to(compute_type(t));  // keeps the layout
  return t;
}

// `t` laid out as `like` (dy must match x's geometry).
Tensor dense_like(const Tensor& t, const Tensor& like) {
  Tensor r = t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
  if (like.is_contiguous()) return r.contiguous();
  return r.contiguous(like.suggest_memory_format());
}

cpu::Geometry geometry(const Tensor& x) {
  cpu::Geometry g;
  g.n = x.size(0);
  g.c = x.size(1);
  g.s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.s *= x.size(d);
  g.rows = !x.is_contiguous() || g.s == 1;  // channels_last, or (N, C): rows of C values
  return g;
}

// Per-channel values as float64, read straight from the tensor: the per-channel work of an
// operator is a few loops over C values, not a chain of small tensor operations (on small
// inputs those would cost more than the data's own pass).
using Vec = std::vector<double>;

Vec per_channel64(const Tensor& t) {
  Tensor c = t.is_contiguous() ? t : t.contiguous();
  Vec v(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bnorm::read", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(p[i]);
  });
  return v;
}

Vec per_channel64(const optional<Tensor>& t, int64_t channels, double fill) {
  if (t.has_value() && t->defined()) return per_channel64(*t);
  return Vec(channels, fill);
}

// Writes float64 values into a per-channel tensor of any floating dtype (in place).
void write_per_channel(Tensor& t, const Vec& v) {
  Tensor c = t.is_contiguous() ? t : at::empty_like(t, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bnorm::write", [&] {
    scalar_t* p = c.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  if (!c.is_same(t)) t.copy_(c);
}

Tensor to_tensor(const Vec& v, at::ScalarType type) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return type == at::kDouble ? t : t.to(type);
}

Vec invstd_of(const Vec& var, double eps) {
  Vec r(var.size());
  for (size_t c = 0; c < var.size(); ++c) r[c] = cpu::invstd_of(var[c], eps);
  return r;
}

// Updates skipped on this thread because the batch held NaN/Inf: bnorm.functional reads it
// around a call to say so (bnorm._C.nonfinite_skips()), without reading the statistics.
thread_local int64_t nonfinite_skips = 0;

// ---- outputs ---------------------------------------------------------------------------------
// Outputs of 32 MiB and more come from a small pool of blocks that earlier outputs gave back
// when their tensors were freed (the tensor's deleter returns the block; no reference counts
// are read). Why: the C library maps such sizes afresh at every allocation, so each call would
// pay a page fault and the zeroing of every page of its output (for a 100 MB training step,
// twice: more time than the batch norm's own passes). Smaller outputs come from torch's
// allocator, whose memory the C library already reuses. The pool keeps at most kPoolBytes.
constexpr size_t kPoolMin = size_t{1} << 20;
constexpr size_t kPoolBytes = size_t{512} << 20;

struct Pool {
  std::mutex mutex;
  std::multimap<size_t, void*> blocks;  // free blocks by size
  size_t held = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = blocks.find(bytes);
      if (it != blocks.end()) {
        void* p = it->second;
        blocks.erase(it);
        held -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TORCH_CHECK(p != nullptr, "bnorm: out of memory allocating ", bytes, " bytes");
    return p;
  }

  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    if (held + bytes > kPoolBytes) {  // full: give the smallest blocks back to the system
      auto it = blocks.begin();
      while (it != blocks.end() && held + bytes > kPoolBytes) {
        held -= it->first;
        std::free(it->second);
        it = blocks.erase(it);
      }
    }
    blocks.emplace(bytes, p);
    held += bytes;
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: deleters may run during interpreter exit
  return *p;
}

// An uninitialized tensor with like's sizes, strides and dtype.
Tensor empty_output(const Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  const bool dense = like.is_non_overlapping_and_dense();
  if (bytes < kPoolMin || !dense || !like.device().is_cpu()) return at::empty_like(like);
  void* p = pool().take(bytes);
  return at::from_blob(
      p, like.sizes(), like.strides(), [bytes](void* q) { pool().give(q, bytes); },
      like.options());
}

// ---- the steps -------------------------------------------------------------------------------

std::tuple<Vec, Vec> stats_impl(const Tensor& xd) {
  const auto g = geometry(xd);
  Vec mean(g.c, 0.0), var(g.c, 0.0);
  if (g.numel() == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::stats", [&] {
    cpu::statistics<scalar_t>(xd.const_data_ptr<scalar_t>(), g, mean.data(), var.data());
  });
  return {mean, var};
}

// y = (x - mean) * scale + off (float64 per channel), into a new tensor like xd.
Tensor affine_impl(const Tensor& xd, const Vec& mean, const Vec& scale, const Vec& off) {
  const auto g = geometry(xd);
  Tensor y = empty_output(xd);
  if (g.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::transform", [&] {
    std::vector<scalar_t> hi(g.c), sc(g.c), of(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      const cpu::AffineCoef<scalar_t> f(mean[c], scale[c], off[c]);
      hi[c] = f.hi;
      sc[c] = f.sc;
      of[c] = f.of;
    }
    cpu::transform<scalar_t>(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g,
                             hi.data(), sc.data(), of.data());
  });
  return y;
}

Tensor transform_impl(const Tensor& xd, const Vec& mean, const Vec& invstd,
                      const optional<Tensor>& weight, const optional<Tensor>& bias) {
  const int64_t C = xd.size(1);
  Vec scale = per_channel64(weight, C, 1.0);
  for (int64_t c = 0; c < C; ++c) scale[c] *= invstd[c];
  return affine_impl(xd, mean, scale, per_channel64(bias, C, 0.0));
}

std::tuple<Vec, Vec> reduce_impl(const Tensor& dyd, const Tensor& xd, const Vec& mean) {
  const auto g = geometry(xd);
  Vec sum_dy(g.c, 0.0), sum_dy_xmu(g.c, 0.0);
  if (g.numel() == 0) return {sum_dy, sum_dy_xmu};
  AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::backward_reduce", [&] {
    cpu::backward_reduce<scalar_t>(dyd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                                   g, mean.data(), sum_dy.data(), sum_dy_xmu.data());
  });
  return {sum_dy, sum_dy_xmu};
}

// dx of training-mode batch norm (coefficients: cpu::GradCoef).
Tensor elemt_impl(const Tensor& dyd, const Tensor& xd, const Vec& mean, const Vec& invstd,
                  const Vec& w, const Vec& sum_dy, const Vec& sum_dy_xmu, int64_t count) {
  const auto g = geometry(xd);
  Tensor dx = empty_output(xd);
  if (g.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::backward_elemt", [&] {
    const double n = static_cast<double>(count);
    std::vector<scalar_t> a(g.c), hi(g.c), b(g.c), k(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      const cpu::GradCoef<scalar_t> f(mean[c], invstd[c], w[c], sum_dy[c], sum_dy_xmu[c], n);
      a[c] = f.a;
      hi[c] = f.hi;
      b[c] = f.b;
      k[c] = f.k;
    }
    cpu::backward_elementwise<scalar_t>(dyd.const_data_ptr<scalar_t>(),
                                        xd.const_data_ptr<scalar_t>(),
                                        dx.mutable_data_ptr<scalar_t>(), g, a.data(), hi.data(),
                                        b.data(), k.data());
  });
  return dx;
}

Tensor as_output(const Tensor& y, const Tensor& input) {
  return y.scalar_type() == input.scalar_type() ? y : y.to(input.scalar_type());
}

// ---- CPU kernels of the operators -----------------------------------------------------------

std::tuple<Tensor, Tensor> stats_cpu(const Tensor& input) {
  check_input("stats", input);
  auto [mean, var] = stats_impl(dense(input));
  return {to_tensor(mean, at::kDouble), to_tensor(var, at::kDouble)};
}

Tensor transform_cpu(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                     const optional<Tensor>& weight, const optional<Tensor>& bias) {
  check_input("transform", input);
  const int64_t C = input.size(1);
  check_per_channel("transform", "mean", mean, C);
  check_per_channel("transform", "invstd", invstd, C);
  check_per_channel("transform", "weight", weight, C);
  check_per_channel("transform", "bias", bias, C);
  return as_output(
      transform_impl(dense(input), per_channel64(mean), per_channel64(invstd), weight, bias),
      input);
}

std::tuple<Tensor, Tensor> backward_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean) {
  check_input("backward_reduce", input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnorm::backward_reduce: grad_out of shape ",
              grad_out.sizes(), " for an input of shape ", input.sizes());
  check_per_channel("backward_reduce", "mean", mean, input.size(1));
  Tensor xd = dense(input);
  auto [sum_dy, sum_dy_xmu] = reduce_impl(dense_like(grad_out, xd), xd, per_channel64(mean));
  return {to_tensor(sum_dy, at::kDouble), to_tensor(sum_dy_xmu, at::kDouble)};
}

Tensor backward_elemt_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                          const Tensor& invstd, const optional<Tensor>& weight,
                          const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count) {
  check_input("backward_elemt", input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnorm::backward_elemt: grad_out of shape ",
              grad_out.sizes(), " for an input of shape ", input.sizes());
  TORCH_CHECK(count > 0, "bnorm::backward_elemt: count must be positive, got ", count);
  const int64_t C = input.size(1);
  Tensor xd = dense(input);
  return as_output(elemt_impl(dense_like(grad_out, xd), xd, per_channel64(mean),
                              per_channel64(invstd), per_channel64(weight, C, 1.0),
                              per_channel64(sum_dy), per_channel64(sum_dy_xmu), count),
                   input);
}

std::tuple<Tensor, Tensor, Tensor> train_cpu(const Tensor& input, const optional<Tensor>& weight,
                                             const optional<Tensor>& bias, double eps) {
  check_input("batch_norm_train", input);
  const int64_t C = input.size(1);
  check_per_channel("batch_norm_train", "weight", weight, C);
  check_per_channel("batch_norm_train", "bias", bias, C);
  TORCH_CHECK(eps > 0, "bnorm::batch_norm_train: eps must be positive, got ", eps);
  Tensor xd = dense(input);
  const auto g = geometry(xd);
  Vec mean, var;
  Tensor y;
  if (g.numel() > 0 && cpu::fused(g, xd.element_size())) {
    // statistics and transform per channel while it is in cache (bit for bit the two steps)
    mean.resize(C);
    var.resize(C);
    const Vec w = per_channel64(weight, C, 1.0), b = per_channel64(bias, C, 0.0);
    y = empty_output(xd);
    AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::batch_norm_train", [&] {
      cpu::train_forward<scalar_t>(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                   g, w.data(), b.data(), eps, mean.data(), var.data());
    });
  } else {
    std::tie(mean, var) = stats_impl(xd);
    y = transform_impl(xd, mean, invstd_of(var, eps), weight, bias);
  }
  return {as_output(y, input), to_tensor(mean, at::kDouble), to_tensor(var, at::kDouble)};
}

Tensor eval_cpu(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                const Tensor& running_mean, const Tensor& running_var, double eps) {
  check_input("batch_norm_eval", input);
  const int64_t C = input.size(1);
  check_per_channel("batch_norm_eval", "weight", weight, C);
  check_per_channel("batch_norm_eval", "bias", bias, C);
  check_per_channel("batch_norm_eval", "running_mean", running_mean, C);
  check_per_channel("batch_norm_eval", "running_var", running_var, C);
  TORCH_CHECK(eps >= 0, "bnorm::batch_norm_eval: eps must be non-negative, got ", eps);
  return as_output(transform_impl(dense(input), per_channel64(running_mean),
                                  invstd_of(per_channel64(running_var), eps), weight, bias),
                   input);
}

// Outputs not asked for by output_mask are returned allocated but not computed.
std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                const optional<Tensor>& weight,
                                                const Tensor& mean, const Tensor& var, double eps,
                                                bool train, std::array<bool, 3> output_mask) {
  check_input("batch_norm_backward", input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnorm::batch_norm_backward: grad_out of shape ",
              grad_out.sizes(), " for an input of shape ", input.sizes());
  const int64_t C = input.size(1);
  check_per_channel("batch_norm_backward", "mean", mean, C);
  check_per_channel("batch_norm_backward", "var", var, C);
  check_per_channel("batch_norm_backward", "weight", weight, C);
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type()
                                                                   : input.scalar_type();
  Tensor xd = dense(input), dyd = dense_like(grad_out, xd);
  Vec mean64 = per_channel64(mean), invstd64 = invstd_of(per_channel64(var), eps);
  Vec w64 = per_channel64(weight, C, 1.0);
  const int64_t count = xd.numel() / std::max<int64_t>(C, 1);
  Vec sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  const auto g = geometry(xd);
  const bool fused = train && output_mask[0] && count > 0 && cpu::fused(g, xd.element_size());
  if (!fused && (output_mask[1] || output_mask[2] || (output_mask[0] && train))) {
    std::tie(sum_dy, sum_dy_xmu) = reduce_impl(dyd, xd, mean64);
  }
  Tensor dx;
  if (fused) {  // reductions and dx per channel while it is in cache (bit for bit the two steps)
    dx = empty_output(xd);
    AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "bnorm::batch_norm_backward", [&] {
      cpu::train_backward<scalar_t>(dyd.const_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                                    dx.mutable_data_ptr<scalar_t>(), g, mean64.data(),
                                    invstd64.data(), w64.data(), sum_dy.data(), sum_dy_xmu.data());
    });
    dx = as_output(dx, input);
  } else if (!output_mask[0]) {
    dx = at::empty_like(input);
  } else if (count == 0) {
    dx = at::zeros_like(input);
  } else if (train) {
    dx = as_output(elemt_impl(dyd, xd, mean64, invstd64, w64, sum_dy, sum_dy_xmu, count), input);
  } else {  // fixed statistics: dx = dy * w * invstd, the transform of dy around zero
    Vec scale(C);
    for (int64_t c = 0; c < C; ++c) scale[c] = w64[c] * invstd64[c];
    dx = as_output(affine_impl(dyd, Vec(C, 0.0), scale, Vec(C, 0.0)), input);
  }
  for (int64_t c = 0; c < C; ++c) sum_dy_xmu[c] *= invstd64[c];  // = dweight
  return {dx, to_tensor(sum_dy_xmu, param_type), to_tensor(sum_dy, param_type)};
}

// Running statistics: r <- (1 - rate) r + rate * batch, in float64, the variance unbiased.
// rate = momentum, or 1/(t+1) for the t-th batch when momentum is None (cumulative average).
void update_running_stats_cpu(const optional<Tensor>& running_mean,
                              const optional<Tensor>& running_var,
                              const optional<Tensor>& num_batches_tracked, const Tensor& mean,
                              const Tensor& var, int64_t count, optional<double> momentum) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  const bool has_count = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (count == 0) {  // an empty batch: nothing to learn from; counted, as torch counts it
    if (has_count) num_batches_tracked->add_(1);
    return;
  }
  const Vec m = per_channel64(mean), v = per_channel64(var);
  const int64_t C = static_cast<int64_t>(m.size());
  TORCH_CHECK(static_cast<int64_t>(v.size()) == C,
              "bnorm::update_running_stats_: mean and var sizes differ");
  if (has_mean) check_per_channel("update_running_stats_", "running_mean", *running_mean, C);
  if (has_var) check_per_channel("update_running_stats_", "running_var", *running_var, C);
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(m[c]) || !std::isfinite(v[c])) {  // leave everything as it was
      ++nonfinite_skips;
      return;
    }
  }
  double rate;
  if (momentum.has_value()) {
    rate = *momentum;
  } else {
    TORCH_CHECK(has_count,
                "bnorm::update_running_stats_: momentum=None (cumulative average) needs "
                "num_batches_tracked");
    rate = 1.0 / (num_batches_tracked->item<double>() + 1.0);
  }
  if (has_var) TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training");
  at::NoGradGuard no_grad;
  if (has_mean) {
    Vec r = per_channel64(*running_mean);
    for (int64_t c = 0; c < C; ++c) r[c] = r[c] * (1.0 - rate) + m[c] * rate;
    Tensor t = *running_mean;
    write_per_channel(t, r);
  }
  if (has_var) {
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    Vec r = per_channel64(*running_var);
    for (int64_t c = 0; c < C; ++c) r[c] = r[c] * (1.0 - rate) + v[c] * (rate * unbias);
    Tensor t = *running_var;
    write_per_channel(t, r);
  }
  if (has_count) num_batches_tracked->add_(1);
}

// ---- autograd --------------------------------------------------------------------------------

// Whether gradients must be a differentiable graph of aten ops: a second derivative is asked
// for (grad mode on inside backward), or dy is a functorch wrapper (vmap over the backward,
// e.g. gradcheck's batched-gradient check), which bnorm's loops cannot read.
bool composite_backward(const Tensor& dy) {
  return at::GradMode::is_enabled() || !dy.unsafeGetTensorImpl()->has_storage() ||
         dy.key_set().has(c10::DispatchKey::FuncTorchBatched);
}

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

// The gradients as aten ops (differentiable). Training: the statistics are recomputed from x,
// around the saved mean as a constant shift (which keeps the precision of data far from zero).
variable_list composite_grads(const Tensor& dy, const Tensor& x, const Tensor& weight,
                              const Tensor& mean, const Tensor& var, double eps, bool train) {
  const auto cd = compute_type(x);
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  Tensor xf = x.to(cd), dyf = dy.to(cd);
  Tensor shift = mean.detach().to(cd).view(shape);
  Tensor xs = xf - shift;
  Tensor xhat, invstd;
  if (train) {
    Tensor xc = xs - xs.mean(dims, true);
    invstd = at::rsqrt((xc * xc).mean(dims, true) + eps);
    xhat = xc * invstd;
  } else {
    invstd = at::rsqrt(var.detach().to(at::kDouble) + eps).to(cd).view(shape);
    xhat = xs * invstd;
  }
  Tensor g = weight.defined() ? dyf * weight.to(cd).view(shape) : dyf;
  Tensor dx;
  if (train) {
    dx = invstd * (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true));
  } else {
    dx = g * invstd;
  }
  return {dx.to(x.scalar_type()), (dyf * xhat).sum(dims), dyf.sum(dims)};
}

Tensor opt(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

void remember_params(AutogradContext* ctx, const optional<Tensor>& weight,
                     const optional<Tensor>& bias) {
  ctx->saved_data["has_weight"] = given(weight);
  ctx->saved_data["has_bias"] = given(bias);
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double)>&
train_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnorm::batch_norm_train", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                           double)>();
  return op;
}

const c10::TypedOperatorHandle<Tensor(const Tensor&, const optional<Tensor>&,
                                      const optional<Tensor>&, const Tensor&, const Tensor&,
                                      double)>&
eval_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnorm::batch_norm_eval", "")
                       .typed<Tensor(const Tensor&, const optional<Tensor>&,
                                     const optional<Tensor>&, const Tensor&, const Tensor&,
                                     double)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, double,
    bool, std::array<bool, 3>)>&
backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnorm::batch_norm_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&,
                           const Tensor&, double, bool, std::array<bool, 3>)>();
  return op;
}

const c10::TypedOperatorHandle<void(const optional<Tensor>&, const optional<Tensor>&,
                                    const optional<Tensor>&, const Tensor&, const Tensor&,
                                    c10::SymInt, optional<double>)>&
update_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnorm::update_running_stats_", "")
                       .typed<void(const optional<Tensor>&, const optional<Tensor>&,
                                   const optional<Tensor>&, const Tensor&, const Tensor&,
                                   c10::SymInt, optional<double>)>();
  return op;
}

// The gradients for the inputs (x, weight, bias) of a forward, by bnorm's kernels or, when
// needed, by the composite graph.
variable_list grads_for(AutogradContext* ctx, const Tensor& dy, bool train) {
  auto saved = ctx->get_saved_variables();
  const Tensor& x = saved[0];
  const Tensor& weight = saved[1];
  const Tensor& mean = saved[2];
  const Tensor& var = saved[3];
  const double eps = ctx->saved_data["eps"].toDouble();
  // autograd numbers only the tensors that were given: an absent weight shifts bias's index
  const bool has_w = ctx->saved_data["has_weight"].toBool();
  const bool has_b = ctx->saved_data["has_bias"].toBool();
  const std::array<bool, 3> mask{ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1),
                                 has_b && ctx->needs_input_grad(has_w ? 2 : 1)};
  if (!dy.defined()) return {Tensor(), Tensor(), Tensor()};
  variable_list g(3);
  if (composite_backward(dy)) {
    g = composite_grads(dy, x, weight, mean, var, eps, train);
  } else {
    auto [dx, dw, db] =
        backward_op().call(dy, x, maybe(weight), mean, var, eps, train, mask);
    g = {dx, dw, db};
  }
  for (int i = 0; i < 3; ++i) {
    if (!mask[i]) g[i] = Tensor();
  }
  return g;
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var] = train_op().call(input, weight, bias, eps);
    ctx->save_for_backward({input, opt(weight), mean, var});
    remember_params(ctx, weight, bias);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto g = grads_for(ctx, grad_outputs[0], /*train=*/true);
    g.emplace_back();  // eps
    return g;
  }
};

class EvalFunction : public torch::autograd::Function<EvalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               const Tensor& running_mean, const Tensor& running_var, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = eval_op().call(input, weight, bias, running_mean, running_var, eps);
    // the running statistics are constants here: saved detached, never differentiated
    ctx->save_for_backward({input, opt(weight), running_mean.detach(), running_var.detach()});
    remember_params(ctx, weight, bias);
    ctx->saved_data["eps"] = eps;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto g = grads_for(ctx, grad_outputs[0], /*train=*/false);
    g.insert(g.end(), {Tensor(), Tensor(), Tensor()});  // running_mean, running_var, eps
    return g;
  }
};

// Whether autograd records this call; if not, the Function's bookkeeping is skipped.
bool records(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  return input.requires_grad() || (given(weight) && weight->requires_grad()) ||
         (given(bias) && bias->requires_grad());
}

std::tuple<Tensor, Tensor, Tensor> train_autograd(const Tensor& input,
                                                  const optional<Tensor>& weight,
                                                  const optional<Tensor>& bias, double eps) {
  if (!records(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op().call(input, weight, bias, eps);
  }
  auto out = TrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor eval_autograd(const Tensor& input, const optional<Tensor>& weight,
                     const optional<Tensor>& bias, const Tensor& running_mean,
                     const Tensor& running_var, double eps) {
  if (!records(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_op().call(input, weight, bias, running_mean, running_var, eps);
  }
  return EvalFunction::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

// ---- the whole layer -------------------------------------------------------------------------

// torch.nn.functional.batch_norm's semantics plus the counter: with batch statistics the given
// running statistics (and num_batches_tracked) are updated; without, the running statistics
// normalize. Composite: autograd, tracing and functionalization see the operators it calls.
Tensor batch_norm_composite(const Tensor& input, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                            const optional<Tensor>& running_var,
                            const optional<Tensor>& num_batches_tracked, bool use_batch_stats,
                            optional<double> momentum, double eps) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  if (!use_batch_stats) {
    TORCH_CHECK(has_mean && has_var,
                "bnorm::batch_norm: running_mean and running_var must be defined in evaluation "
                "mode");
    return eval_op().call(input, weight, bias, *running_mean, *running_var, eps);
  }
  auto [y, mean, var] = train_op().call(input, weight, bias, eps);
  if (has_mean || has_var) {
    // values per channel, in symbolic sizes (this composite also runs under tracing tools)
    c10::SymInt count = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) count = count * input.sym_size(d);
    update_op().call(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  }
  return y;
}

}  // namespace

int64_t nonfinite_skips_on_this_thread() { return nonfinite_skips; }

// bnorm::batch_norm_eval through the dispatcher (for module.cpp's eval_call).
Tensor call_batch_norm_eval(const Tensor& x, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const Tensor& running_mean,
                            const Tensor& running_var, double eps) {
  return eval_op().call(x, weight, bias, running_mean, running_var, eps);
}

TORCH_LIBRARY(bnorm, m) {
  m.def("stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "transform(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> "
      "Tensor");
  m.def(
      "backward_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor "
      "sum_dy_xmu)");
  m.def(
      "backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor sum_dy, Tensor sum_dy_xmu, SymInt count) -> Tensor");
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor out, "
      "Tensor save_mean, Tensor save_var)");
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor "
      "running_var, float eps) -> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor "
      "var, float eps, bool train, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "update_running_stats_(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? "
      "num_batches_tracked, Tensor mean, Tensor var, SymInt count, float? momentum) -> ()");
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool use_batch_stats, "
      "float? momentum, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnorm, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("transform", &transform_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward_elemt", &backward_elemt_cpu);
  m.impl("batch_norm_train", &train_cpu);
  m.impl("batch_norm_eval", &eval_cpu);
  m.impl("batch_norm_backward", &backward_cpu);
  m.impl("update_running_stats_", &update_running_stats_cpu);
}

TORCH_LIBRARY_IMPL(bnorm, Autograd, m) {
  m.impl("batch_norm_train", &train_autograd);
  m.impl("batch_norm_eval", &eval_autograd);
}

TORCH_LIBRARY_IMPL(bnorm, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm_composite);
}

}  // namespace bnorm
