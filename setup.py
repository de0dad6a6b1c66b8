"""Builds bnorm's C++ operators (``bnorm._C``) against the torch installed in this environment.

Install with torch present and without build isolation, so the extension is compiled against
that torch (an isolated build would have to download one)::

    pip install torch==2.13.0 setuptools
    pip install --no-build-isolation -e .

Where torch or a C++ compiler is missing at build time, bnorm is installed without the
extension and runs every layer on its composite path (pure torch ops, the same algorithm);
``import bnorm`` then warns once and says how to build it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = Path("src") / "bnorm" / "csrc"


def _extension_kwargs() -> dict:
    if os.environ.get("BNORM_NO_EXTENSION") == "1":
        print("bnorm: BNORM_NO_EXTENSION=1: building without the C++ extension", file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "bnorm: torch is not importable in the build environment, so the C++ extension is "
            "not built (the layers run on their composite path). Install torch first and use "
            "`pip install --no-build-isolation`.",
            file=sys.stderr,
        )
        return {}
    sources = sorted(str(p) for p in (CSRC).rglob("*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (without it, the loops run
    # on one thread). The library it links, libgomp.so.1, is the one torch already loaded.
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    ext = CppExtension(
        "bnorm._C", sources, extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"]
    )

    class Build(BuildExtension):
        """A failed compilation leaves bnorm installed on its composite path, with a warning."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001 - any compiler failure
                print(
                    f"bnorm: the C++ extension did not build ({error}); the layers will run on "
                    "their composite path",
                    file=sys.stderr,
                )

    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build.with_options(use_ninja=False)}}


setup(**_extension_kwargs())
