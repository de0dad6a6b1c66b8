// bnorm's compiled evaluation entry: the layers' evaluation fast path without Python around it.
//
// Why: in evaluation a batch norm is one pass over the data, y = (x - mean) * s + o per channel,
// and on a 1 MB input that pass takes about as long as x.clone(). The Python that recognizes the
// common case, takes the output buffer and calls numba's kernel costs 7-10 us more (a third to a
// half of the pass). This function does the same steps in C++ and calls the same compiled numba
// kernel (its C entry, kernels/cxx_eval.py), so its results are those of the Python path, bit for
// bit. It is built by kernels/cxx_eval.py on first use and cached on disk.
//
// eval(x, weight, bias, running_mean, running_var, eps) -> Tensor, or None where the case is not
// the common one (the caller then takes the Python path, whose checks and errors are the
// reference). The common case, a subset of functional.fused_eval's: x a plain CPU float32/float64
// tensor of rank >= 2 with at least one value, contiguous or channels_last(_3d), smaller than
// the limit given to setup (larger outputs go through the Python path, which recycles their
// memory: kernels/buffers.py; smaller ones come from torch's allocator, see cxx_eval.MAX_BYTES);
// the four per-channel tensors (weight, bias may be None) of C
// values of x's dtype, contiguous, on the CPU; eps > 0; autograd not recording the call.
// The caller has checked x's rank and channel count against the layer.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>

namespace {

// numba's eval_forward_f32/f64 entry points as C functions (kernels/cxx_eval.py: _entry); the
// arguments are _numba_loops.eval_forward_f32's
using EvalFn = void (*)(int64_t px, int64_t py, int64_t A, int64_t C, int64_t B, int64_t prm,
                        int64_t prv, int64_t pw, int64_t pb, int64_t flags, double eps,
                        int64_t nthreads, int64_t pomp);

EvalFn eval_f32 = nullptr;
EvalFn eval_f64 = nullptr;
int64_t pool_f32 = 0;  // the thread-pool tables numba_cpu._pool gives the kernels
int64_t pool_f64 = 0;
int64_t parallel_min_numel = 1 << 15;  // numba_cpu.PARALLEL_MIN_NUMEL
int64_t max_threads = 1;               // numba_cpu._MAX_THREADS
int64_t max_bytes = 0;                 // outputs from this size on: the Python path

// A per-channel tensor the kernel can read as C values of dtype dt; None gives nullptr.
bool per_channel(PyObject* obj, const at::Tensor*& out, at::ScalarType dt, int64_t c) {
  if (obj == Py_None) {
    out = nullptr;
    return true;
  }
  if (!THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.layout() != at::kStrided || t.scalar_type() != dt || !t.device().is_cpu() ||
      !t.has_storage() || !t.is_contiguous() || t.numel() != c)
    return false;
  out = &t;
  return true;
}

int64_t address(const at::Tensor* t) {
  return t == nullptr ? 0 : reinterpret_cast<int64_t>(t->data_ptr());
}

// setup(eval_f32, eval_f64, pool_f32, pool_f64, parallel_min_numel, max_threads, max_bytes)
PyObject* setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "setup takes 7 integers");
    return nullptr;
  }
  int64_t v[7];
  for (int i = 0; i < 7; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  eval_f32 = reinterpret_cast<EvalFn>(v[0]);
  eval_f64 = reinterpret_cast<EvalFn>(v[1]);
  pool_f32 = v[2];
  pool_f64 = v[3];
  parallel_min_numel = v[4];
  max_threads = v[5];
  max_bytes = v[6];
  Py_RETURN_NONE;
}

PyObject* eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6 || eval_f32 == nullptr || !THPVariable_CheckExact(args[0]) ||
      args[3] == Py_None || args[4] == Py_None || !PyFloat_CheckExact(args[5]))
    Py_RETURN_NONE;
  try {
    const at::Tensor& x = THPVariable_Unpack(args[0]);
    const at::ScalarType dt = x.scalar_type();
    // (no storage: a wrapper such as functorch's batched tensors, whose data is elsewhere)
    if ((dt != at::kFloat && dt != at::kDouble) || x.layout() != at::kStrided ||
        !x.device().is_cpu() || !x.has_storage() || x.dim() < 2)
      Py_RETURN_NONE;
    const int64_t numel = x.numel();
    if (numel == 0 || static_cast<int64_t>(x.nbytes()) >= max_bytes) Py_RETURN_NONE;
    const int64_t c = x.size(1);
    const at::Tensor *w, *b, *rm, *rv;
    if (!per_channel(args[1], w, dt, c) || !per_channel(args[2], b, dt, c) ||
        !per_channel(args[3], rm, dt, c) || !per_channel(args[4], rv, dt, c))
      Py_RETURN_NONE;
    const double eps = PyFloat_AS_DOUBLE(args[5]);
    if (!(eps > 0)) Py_RETURN_NONE;
    if (c10::GradMode::is_enabled() &&
        (x.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad())))
      Py_RETURN_NONE;  // autograd records it: the Python path's Function
    int64_t a, inner;  // how the loops see x (numba_cpu.geometry)
    if (x.is_contiguous()) {
      a = x.size(0);
      inner = numel / (a * c);
    } else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
               (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
      a = numel / c;
      inner = 1;
    } else {
      Py_RETURN_NONE;
    }
    int64_t threads = 1;  // numba_cpu._threads
    if (numel >= parallel_min_numel) {
      threads = at::get_num_threads();
      if (threads > max_threads) threads = max_threads;
    }
    at::Tensor y = at::empty_like(x);  // x's strides: contiguous or channels_last
    const int64_t flags = (w ? 1 : 0) | (b ? 2 : 0);
    const bool f32 = dt == at::kFloat;
    const int64_t px = address(&x), py = address(&y), prm = address(rm), prv = address(rv),
                  pw = address(w), pb = address(b);
    Py_BEGIN_ALLOW_THREADS;  // as numba's nogil entry points do
    (f32 ? eval_f32 : eval_f64)(px, py, a, c, inner, prm, prv, pw, pb, flags, eps, threads,
                                f32 ? pool_f32 : pool_f64);
    Py_END_ALLOW_THREADS;
    return THPVariable_Wrap(std::move(y));
  } catch (const std::exception& e) {  // e.g. the output's allocation failed
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup)), METH_FASTCALL,
     "setup(eval_f32, eval_f64, pool_f32, pool_f64, parallel_min_numel, max_threads, max_bytes)"},
    {"eval", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eval)), METH_FASTCALL,
     "eval(x, weight, bias, running_mean, running_var, eps) -> Tensor or None"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cxx_eval", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cxx_eval() { return PyModule_Create(&module); }
