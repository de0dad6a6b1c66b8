// The Python module `bnorm._C`: importing it loads the library, whose static initializers register
// the operators (TORCH_LIBRARY in ops.cpp). Everything else is reached through torch.ops.bnorm,
// except two functions:
//   nonfinite_skips()       the running-statistics updates this thread skipped (NaN/Inf batch);
//   eval_call(x, state, ranks)
//                           a bnorm BatchNorm layer's evaluation call on a plain CPU tensor:
//                           its checks, then the operator bnorm::batch_norm_eval through the
//                           dispatcher, or None when the call is not plainly valid (the layer's
//                           Python path then checks it, words the error or serves the tool).
// The caller (the layer's forward) has already ruled out torch.compile and forward-mode AD,
// which this function cannot see.
// Why eval_call: a small evaluation is a few microseconds of work, and the Python around the
// operator (attribute reads, checks, the torch.ops call's argument parsing) cost more than that,
// more than torch's own layer. Here the same checks read the layer's __dict__ directly.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace bnorm {
int64_t nonfinite_skips_on_this_thread();
at::Tensor call_batch_norm_eval(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps);
}  // namespace bnorm

namespace {

PyObject* parameter_type = nullptr;  // torch.nn.Parameter

// Keys of tensors that only Python-level machinery may handle: functorch's wrappers (vmap,
// grad), which look like plain tensors in Python, and Python subclasses' dispatch.
const c10::DispatchKeySet kWrapped({c10::DispatchKey::FuncTorchBatched,
                                    c10::DispatchKey::FuncTorchGradWrapper,
                                    c10::DispatchKey::Python});

// Releases the GIL for its scope (also when the operator throws).
struct WithoutGil {
  PyThreadState* state;
  WithoutGil() : state(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// A plain tensor object: torch.Tensor itself (or a Parameter where allowed), no subclass that
// could override torch functions.
bool plain(PyObject* o, bool parameter_ok) {
  PyObject* t = reinterpret_cast<PyObject*>(Py_TYPE(o));
  return t == THPVariableClass || (parameter_ok && t == parameter_type);
}

// A float that is a Python float or int (not bool), into *out.
bool number(PyObject* o, double* out) {
  if (PyFloat_CheckExact(o)) {
    *out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    *out = PyLong_AsDouble(o);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// A per-channel tensor of the layer: absent (None or missing), or plain of x's dtype and device
// with C values. Sets *out when present.
bool per_channel(PyObject* dict, const char* key, const at::Tensor& x, int64_t C,
                 std::optional<at::Tensor>* out, bool required) {
  PyObject* o = PyDict_GetItemString(dict, key);  // borrowed
  if (o == nullptr || o == Py_None) return !required;
  if (!plain(o, true)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (t.scalar_type() != x.scalar_type() || !t.device().is_cpu() || t.numel() != C ||
      t.key_set().has_any(kWrapped)) {
    return false;
  }
  *out = t;
  return true;
}

PyObject* eval_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyDict_Check(args[1]) || !PyTuple_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "eval_call(x, layer.__dict__, ranks)");
    return nullptr;
  }
  PyObject *xo = args[0], *state = args[1], *ranks = args[2];
  // tools that must see the call in Python: tracing, dispatch and function modes
  if (!plain(xo, false) || torch::jit::tracer::isTracing() ||
      c10::impl::dispatch_mode_enabled() || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  const at::Tensor& x = THPVariable_Unpack(xo);
  const int64_t dim = x.dim();
  if (dim < 2 || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)) {
    Py_RETURN_NONE;
  }
  if (x.key_set().has_any(kWrapped)) Py_RETURN_NONE;
  const Py_ssize_t nranks = PyTuple_GET_SIZE(ranks);
  if (nranks > 0) {  // empty: any rank >= 2
    bool ok = false;
    for (Py_ssize_t i = 0; i < nranks && !ok; ++i) {
      ok = PyLong_AsLongLong(PyTuple_GET_ITEM(ranks, i)) == dim;
    }
    if (!ok) Py_RETURN_NONE;
  }
  PyObject* training = PyDict_GetItemString(state, "training");
  PyObject* features = PyDict_GetItemString(state, "num_features");
  PyObject* eps_o = PyDict_GetItemString(state, "eps");
  PyObject* momentum = PyDict_GetItemString(state, "momentum");
  PyObject* policy = PyDict_GetItemString(state, "on_nonfinite");
  PyObject* params = PyDict_GetItemString(state, "_parameters");
  PyObject* buffers = PyDict_GetItemString(state, "_buffers");
  if (training != Py_False || features == nullptr || !PyLong_CheckExact(features) ||
      eps_o == nullptr || momentum == nullptr || policy == nullptr || params == nullptr ||
      buffers == nullptr || !PyDict_Check(params) || !PyDict_Check(buffers)) {
    Py_RETURN_NONE;
  }
  const int64_t C = PyLong_AsLongLong(features);
  double eps = 0.0, m = 0.0;
  if (x.size(1) != C || !number(eps_o, &eps) || !(eps > 0.0)) Py_RETURN_NONE;
  if (momentum != Py_None && !(number(momentum, &m) && m >= 0.0 && m <= 1.0)) Py_RETURN_NONE;
  if (!PyUnicode_Check(policy) || (PyUnicode_CompareWithASCIIString(policy, "warn") != 0 &&
                                   PyUnicode_CompareWithASCIIString(policy, "raise") != 0)) {
    Py_RETURN_NONE;
  }
  std::optional<at::Tensor> weight, bias, mean, var;
  if (!per_channel(params, "weight", x, C, &weight, false) ||
      !per_channel(params, "bias", x, C, &bias, false) ||
      !per_channel(buffers, "running_mean", x, C, &mean, true) ||
      !per_channel(buffers, "running_var", x, C, &var, true)) {
    Py_RETURN_NONE;
  }
  at::Tensor y;
  try {
    // the operator, through the dispatcher (autograd, profiler and autocast see it as usual)
    WithoutGil released;
    y = bnorm::call_batch_norm_eval(x, weight, bias, *mean, *var, eps);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return THPVariable_Wrap(std::move(y));
}

PyObject* nonfinite_skips(PyObject*, PyObject*) {
  return PyLong_FromLongLong(bnorm::nonfinite_skips_on_this_thread());
}

PyMethodDef methods[] = {
    {"nonfinite_skips", nonfinite_skips, METH_NOARGS,
     "How many running-statistics updates this thread skipped for NaN/Inf batches."},
    {"eval_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(eval_call)),
     METH_FASTCALL,
     "eval_call(x, layer.__dict__, ranks): a bnorm BatchNorm layer's evaluation of a plain CPU "
     "tensor, or None when the call needs the layer's Python path."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef bnorm_module = {PyModuleDef_HEAD_INIT, "_C",
                            "bnorm's operators (reached as torch.ops.bnorm.*)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* nn = PyImport_ImportModule("torch.nn.parameter");
  if (nn == nullptr) return nullptr;
  parameter_type = PyObject_GetAttrString(nn, "Parameter");  // kept for the module's lifetime
  Py_DECREF(nn);
  if (parameter_type == nullptr) return nullptr;
  return PyModule_Create(&bnorm_module);
}
