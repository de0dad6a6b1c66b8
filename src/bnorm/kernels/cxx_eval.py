"""The layers' evaluation entry compiled to machine code: the Python around the kernel, in C++.

Why: evaluation is one pass over the data, and on a 1 MB input numba's kernel takes about as long
as ``x.clone()``; the Python that recognizes the common case, takes the output and calls the
kernel costs 7-10 µs more, a third to a half of the pass (measured: README, *Per-call cost*).
``_cxx_eval.cpp`` does those steps in C++ and calls numba's evaluation kernel through a C entry
(a numba ``cfunc`` of ``_numba_loops.eval_forward_f32/f64``'s body, with the same compiler
options; on torch's thread pool each thread runs the very callback the Python path's kernel
starts), so both paths compute the same result, bit for bit (tests/kernels/test_cxx_eval.py);
only the glue differs, and where outputs come from: below :data:`MAX_BYTES` from torch's
allocator, as torch's own outputs do, above it from bnorm's recycled buffers on the Python path.

How it is built: like numba's kernels, on first use and cached on disk, so there is no build
step at install. The first evaluation through a layer starts a background thread that makes the
cfuncs (numba compiles them once, about 5 s, then loads them from its cache) and, if the
extension for this source, torch and Python is not in the cache yet, compiles it with the C++
compiler (``$CXX`` or ``c++``, about 25 s on 2 cores, in a detached process so that it finishes
even if this one exits). Until it is ready, and wherever it cannot be built (no compiler, no
Python headers, torch not on GNU OpenMP), evaluation takes the Python path: the same numbers,
a few microseconds slower. :func:`status` says which; ``BNORM_CXX_EVAL=0`` switches it off.

Where: ``$BNORM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bnorm`` (``~/.cache/bnorm``), one file
per hash of the source, torch's version and ABI, and Python's extension suffix.

The layers read :data:`eval_forward` (``None`` until ready, and inside
:func:`bnorm.kernels.use_backend`, which forces another backend).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from numba import carray

    from . import _numba_loops as loops
except ImportError:  # pragma: no cover - numba is a declared dependency
    loops = None  # type: ignore[assignment]

__all__ = [
    "MAX_BYTES",
    "SOURCE",
    "cache_path",
    "eval_forward",
    "resume",
    "start",
    "started",
    "status",
    "suspend",
    "suspended",
    "wait",
]

#: the C++ source of the extension
SOURCE = Path(__file__).with_name("_cxx_eval.cpp")

#: outputs from this size on take the Python path, which recycles their memory (buffers.py).
#: Below it the output comes from torch's allocator, as torch's own outputs do: glibc's malloc
#: serves blocks under 32 MiB (its largest mmap threshold) from memory freed before, once the
#: first such block has been freed, while blocks of 32 MiB and more are mapped afresh, their
#: pages faulted in, at every call. Measured on the 2-core AMD machine, evaluation of 6-12 MB
#: in bnorm bench: 1.04-1.24x a clone with malloc'd outputs (3 runs), 1.07-1.52x with recycled
#: ones, whose separate buffer the other contenders' outputs evict from the cache.
MAX_BYTES = 32 << 20

#: the compiled ``eval(x, weight, bias, running_mean, running_var, eps)`` (Tensor or None), or
#: None: not built yet, not buildable, switched off or suspended
eval_forward: Callable[..., Any] | None = None

_lock = threading.Lock()
_state = "not started"  # -> "building" -> "ready" | "unavailable: <why>" | "off (BNORM_CXX_EVAL=0)"
_function: Callable[..., Any] | None = None
_suspended = 0
_thread: threading.Thread | None = None
#: whether :func:`start` has been called in this process (the layers read it on every call)
started = False


def _publish() -> None:
    """Point :data:`eval_forward` at the compiled function, or at None (called under _lock)."""
    global eval_forward
    eval_forward = _function if _suspended == 0 else None


def suspend() -> None:
    """Stop the layers from taking the compiled path (nested: one :func:`resume` each)."""
    global _suspended
    with _lock:
        _suspended += 1
        _publish()


def resume() -> None:
    """Undo one :func:`suspend`."""
    global _suspended
    with _lock:
        _suspended = max(0, _suspended - 1)
        _publish()


def suspended() -> bool:
    """Whether :func:`suspend` is in effect (the layers then take the Python path)."""
    return _suspended > 0


def status() -> str:
    """``"ready"``, ``"not started"``, ``"building"``, ``"off (BNORM_CXX_EVAL=0)"`` or
    ``"unavailable: <why>"``."""
    return _state


def start() -> None:
    """Start building or loading the extension in the background (once per process; later
    calls return at once)."""
    global _state, _thread, started
    with _lock:
        started = True
        if _state != "not started":
            return
        if os.environ.get("BNORM_CXX_EVAL", "1") == "0":
            _state = "off (BNORM_CXX_EVAL=0)"
            return
        _state = "building"
        _thread = threading.Thread(target=_build_and_load, name="bnorm-cxx-eval", daemon=True)
        _thread.start()


def wait(timeout: float | None = None) -> str:
    """Start (if needed) and wait for the extension; returns :func:`status`."""
    start()
    thread = _thread
    if thread is not None:
        thread.join(timeout)
    return _state


def _cache_dir() -> Path:
    env = os.environ.get("BNORM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnorm"


def _torch_dir() -> Path:
    return Path(torch.__file__).parent


def cache_path() -> Path:
    """Where the extension for this source, torch and Python is (or will be) cached."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    for part in (torch.__version__, str(abi), sys.version, str(_torch_dir())):
        key.update(part.encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return _cache_dir() / f"_cxx_eval-{key.hexdigest()[:16]}{suffix}"


def _cxx() -> list[str]:
    """The C++ compiler's command: ``$CXX`` (split as a shell would), else ``c++``."""
    return shlex.split(os.environ.get("CXX", "") or "c++")


def _compile_command(out: Path) -> list[str]:
    """The compiler call that builds the extension into ``out``."""
    root = _torch_dir()
    lib = root / "lib"
    cxx = _cxx()
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [
        *cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-w",  # -w: torch's headers warn a lot
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE), "-o", str(out),
        f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _compile(path: Path) -> str | None:
    """Build the extension at ``path``; None if done, else why not."""
    cxx = _cxx()
    if not cxx or shutil.which(cxx[0]) is None:
        return f"no C++ compiler ({cxx[0] if cxx else 'CXX is empty'} not found)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's headers (Python.h) are not installed"
    header = _torch_dir() / "include" / "torch" / "csrc" / "autograd" / "python_variable.h"
    if not header.exists():
        return "torch's C++ headers are not installed"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the cache directory {path.parent}: {err}"
    # Built under a temporary name and renamed when complete, by a shell in a session of its
    # own: it finishes even if this process exits first, and no process ever loads half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    script = f"{shlex.join(_compile_command(tmp))} && mv -f {shlex.quote(str(tmp))} "
    script += f"{shlex.quote(str(path))}"
    try:
        done = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, timeout=900,
            start_new_session=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        return f"the compiler did not run: {err}"
    if done.returncode != 0 or not path.exists():
        lines = (done.stderr or done.stdout).strip().splitlines()
        errors = [line for line in lines if "error" in line] or lines
        tmp.unlink(missing_ok=True)
        return f"the compiler failed: {errors[0] if errors else f'exit code {done.returncode}'}"
    return None


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        "bnorm.kernels._cxx_eval", path, loader=importlib.machinery.ExtensionFileLoader(
            "bnorm.kernels._cxx_eval", str(path)
        ),
    )  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the kernels' C entries ---------------------------------------------------------------------


def _eval_f32(px, py, A, C, B, prm, prv, pw, pb, flags, eps, nthreads, pomp):
    n = A * C * B
    f = loops._f32
    loops._eval_forward(
        carray(f(px), n), carray(f(py), n), A, C, B, carray(f(prm), C), carray(f(prv), C),
        carray(f(pw), C), carray(f(pb), C), flags, eps, nthreads, loops._table(pomp),
    )  # fmt: skip


def _eval_f64(px, py, A, C, B, prm, prv, pw, pb, flags, eps, nthreads, pomp):
    n = A * C * B
    f = loops._f64
    loops._eval_forward(
        carray(f(px), n), carray(f(py), n), A, C, B, carray(f(prm), C), carray(f(prv), C),
        carray(f(pw), C), carray(f(pb), C), flags, eps, nthreads, loops._table(pomp),
    )  # fmt: skip


def _entries() -> tuple[int, int]:
    """The addresses of numba's evaluation kernel as C functions, for float32 and float64
    data (compiled, or loaded from numba's cache, at the first call).

    Each is ``_numba_loops.eval_forward_f32/f64``'s body with its compiler options, less the
    parallel one: the C path runs only on torch's OpenMP pool, where the work is split by the
    same compiled callbacks (the loops' shares) the Python path's kernel calls, and a cached
    function with numba's parallel loops in it needs numba's threading layer loaded before it
    (numba issues #4807, #8578)."""
    from numba import cfunc, types

    i8, f8 = types.int64, types.float64
    signature = types.void(i8, i8, i8, i8, i8, i8, i8, i8, i8, i8, f8, i8, i8)
    options = {k: v for k, v in loops._OPTS.items() if k != "nogil"}  # (no GIL in a cfunc)
    f32, f64 = (cfunc(signature, **options)(f).address for f in (_eval_f32, _eval_f64))
    return f32, f64


def _build_and_load() -> None:
    global _state
    try:
        why = _build_and_load_or_why()
    except Exception as err:  # whatever went wrong, evaluation keeps its Python path
        why = f"{type(err).__name__}: {err}"
    with _lock:
        _state = "ready" if why is None else f"unavailable: {why}"
        _publish()


def _build_and_load_or_why() -> str | None:
    global _function
    from . import numba_cpu

    if loops is None:
        return "numba is not installed"
    if numba_cpu._TORCH_OPENMP is None:
        return "the kernels run on numba's pool here (only torch's OpenMP pool is supported)"
    try:
        f32, f64 = _entries()
    except Exception as err:  # numba could not compile or load them
        return f"numba's C entries failed: {err}"
    path = cache_path()
    for attempt in range(2):
        if not path.exists():
            why = _compile(path)
            if why is not None:
                return why
        try:
            module = _load(path)
            break
        except (ImportError, OSError) as err:
            if attempt == 1:
                return f"the extension did not load: {err}"
            path.unlink(missing_ok=True)  # a damaged file in the cache: built again, once
    module.setup(
        f32, f64, numba_cpu._pool(torch.float32), numba_cpu._pool(torch.float64),
        numba_cpu.PARALLEL_MIN_NUMEL, numba_cpu._MAX_THREADS, MAX_BYTES,
    )  # fmt: skip
    _function = module.eval
    return None


def _after_fork_in_child() -> None:
    # a build thread does not survive a fork: a child whose parent was building starts again
    global _state, _thread, _lock, started
    _lock = threading.Lock()
    if _state == "building":
        _state, _thread, started = "not started", None, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
