"""PyTorch's own test inputs for its batch-norm modules and function, run against bnorm's.

Sources: ``module_inputs_torch_nn_BatchNorm1d/2d/3d`` and
``module_error_inputs_torch_nn_BatchNorm1d_2d_3d`` (torch.testing._internal.common_modules), and
``sample_inputs_batch_norm`` via the ``nn.functional.batch_norm`` OpInfo
(torch.testing._internal.common_methods_invocations).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import settings

import bnorm

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
# importing torch's test utilities loads their own hypothesis profile; the project's (conftest)
# must stay in force for the test files collected after this one
settings.load_profile("ci")

OURS = {
    torch.nn.BatchNorm1d: bnorm.BatchNorm1d,
    torch.nn.BatchNorm2d: bnorm.BatchNorm2d,
    torch.nn.BatchNorm3d: bnorm.BatchNorm3d,
}
INFOS = {info.module_cls: info for info in common_modules.module_db if info.module_cls in OURS}
DTYPES = [torch.float32, torch.float64]


def _module_cases():
    for torch_cls, info in INFOS.items():
        for training in (True, False):
            for dtype in DTYPES:
                inputs = info.module_inputs_func(info, "cpu", dtype, True, training)
                mode = "train" if training else "eval"
                for i, mi in enumerate(inputs):
                    name = f"{torch_cls.__name__}-{mi.desc or i}-{mode}-{dtype}"
                    yield pytest.param(torch_cls, mi, training, dtype, id=name)


@pytest.mark.parametrize("torch_cls,module_input,training,dtype", list(_module_cases()))
def test_module_inputs_give_torch_results(torch_cls, module_input, training, dtype):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = torch_cls(*args, **kwargs).to(dtype).train(training)
    ours = OURS[torch_cls](*args, **kwargs).to(dtype).train(training)
    ours.load_state_dict(theirs.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for _ in range(2):  # twice: the second call sees the running statistics the first left
        outs = []
        for m in (theirs, ours):
            x = module_input.forward_input.args[0].detach().clone().requires_grad_()
            y = m(x)
            y.backward(torch.ones_like(y) + y.detach())
            outs.append((y, x.grad, [p.grad for p in m.parameters()], m.state_dict()))
            m.zero_grad()
        (y_t, dx_t, gp_t, s_t), (y_o, dx_o, gp_o, s_o) = outs
        assert_close(y_o, y_t, atol=tol, rtol=tol, what="output")
        assert_close(dx_o, dx_t, atol=tol * 10, rtol=tol, what="input grad")
        for a, b in zip(gp_o, gp_t, strict=True):
            assert_close(a, b, atol=tol * 10, rtol=tol, what="parameter grad")
        assert list(s_o) == list(s_t)
        for k in s_t:
            assert_close(s_o[k].double(), s_t[k].double(), atol=tol, rtol=tol, what=k)


def _error_cases():
    for torch_cls, info in INFOS.items():
        for err in info.module_error_inputs_func(info, "cpu", torch.float32, False, True):
            yield pytest.param(torch_cls, err, id=f"{torch_cls.__name__}-{err.error_regex}")


@pytest.mark.parametrize("torch_cls,error_input", list(_error_cases()))
def test_module_error_inputs_raise_torch_errors(torch_cls, error_input):
    mi = error_input.module_error_input
    assert error_input.error_on == common_modules.ModuleErrorEnum.FORWARD_ERROR
    m = OURS[torch_cls](*mi.constructor_input.args, **mi.constructor_input.kwargs)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        m(*mi.forward_input.args, **mi.forward_input.kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _functional_cases():
    op = next(o for o in common_methods.op_db if o.name == "nn.functional.batch_norm")
    for dtype in DTYPES:
        for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
            yield pytest.param(sample, id=f"{i}-{dtype}")


@pytest.mark.parametrize("sample", list(_functional_cases()))
def test_functional_sample_inputs_give_torch_results(sample):
    momentum = sample.kwargs.get("momentum", 0.1)
    if not 0.0 <= momentum <= 1.0:
        # torch's samples include momentum -1.2 and -1.0 (an extrapolating update that torch
        # accepts); bnorm refuses momentum outside [0, 1] before touching the buffers (issue 24)
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in sample.args]
        with pytest.raises(ValueError, match="momentum must be a finite number in"):
            bnorm.functional.batch_norm(sample.input.detach(), *args, **sample.kwargs)
        assert all(
            a is None or torch.equal(a, b) for a, b in zip(args[:2], sample.args[:2], strict=True)
        )
        return
    tol = 1e-5 if sample.input.dtype == torch.float32 else 1e-12
    outs = []
    for fn in (F.batch_norm, bnorm.functional.batch_norm):
        x = sample.input.detach().clone().requires_grad_()
        args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in sample.args]
        for j in (2, 3):  # weight and bias take gradients
            if args[j] is not None:
                args[j].requires_grad_()
        y = fn(x, *args, **sample.kwargs)
        if y.numel():
            y.backward(torch.ones_like(y) + y.detach())
        outs.append((y, x.grad, args))
    (y_t, dx_t, a_t), (y_o, dx_o, a_o) = outs
    assert_close(y_o, y_t, atol=tol, rtol=tol, what="output")
    if dx_t is not None:
        assert_close(dx_o, dx_t, atol=tol * 10, rtol=tol, what="input grad")
    for j, name in enumerate(["running_mean", "running_var", "weight", "bias"]):
        if a_t[j] is not None:
            assert_close(a_o[j], a_t[j], atol=tol, rtol=tol, what=name)
            if a_t[j].grad is not None:
                assert_close(a_o[j].grad, a_t[j].grad, atol=tol * 10, rtol=tol, what=name + " grad")
