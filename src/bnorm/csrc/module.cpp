// The Python module `bnorm._C`: importing it loads the library, whose static initializers register
// the operators (TORCH_LIBRARY in ops.cpp). Its one Python function reports the running-statistics
// updates skipped for a non-finite batch; everything else is reached through torch.ops.bnorm.
#include <Python.h>

#include <cstdint>

namespace bnorm {
int64_t nonfinite_skips_on_this_thread();
}

static PyObject* nonfinite_skips(PyObject*, PyObject*) {
  return PyLong_FromLongLong(bnorm::nonfinite_skips_on_this_thread());
}

static PyMethodDef methods[] = {
    {"nonfinite_skips", nonfinite_skips, METH_NOARGS,
     "How many running-statistics updates this thread skipped for NaN/Inf batches."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef bnorm_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "bnorm's operators (reached as torch.ops.bnorm.*)", -1,
                                   methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&bnorm_module); }
