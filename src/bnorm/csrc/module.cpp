// The Python module `bnorm._C`: importing it loads the library, whose static initializers register
// the operators (TORCH_LIBRARY in ops.cpp). It has no Python functions of its own: everything is
// reached through torch.ops.bnorm.
#include <Python.h>

static PyModuleDef bnorm_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "bnorm's operators (reached as torch.ops.bnorm.*)", -1,
                                   nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&bnorm_module); }
