"""Build script for the native parts of Veilface.

Metadata lives in pyproject.toml; this file only declares the compiled extensions
(pybind11 C++ kernels, Cython helpers) and generates the gRPC stubs from proto/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def generate_grpc_stubs() -> None:
    """Compile proto/veilface/v1/*.proto into engine/_proto/veilface/v1/ (pb2 + grpc stubs).

    The ``-Iengine/_proto=proto`` mapping makes the generated imports absolute
    (``from engine._proto.veilface.v1 import ...``) so no sys.path tricks are needed.
    """
    protos = sorted((ROOT / "proto").rglob("*.proto"))
    if not protos:
        return
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - build-system requires it
        raise SystemExit("veilface: grpcio-tools is needed to generate the gRPC stubs "
                         "(pip install grpcio-tools)") from exc
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out = ROOT
    args = ["grpc_tools.protoc", f"-I{well_known}", "-Iengine/_proto=proto",
            f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
    rel = [f"engine/_proto/{p.relative_to(ROOT / 'proto').as_posix()}" for p in protos]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args + rel) != 0:
            raise SystemExit("veilface: protoc failed on " + ", ".join(rel))
    finally:
        os.chdir(cwd)
    for pkg in {Path("engine/_proto")} | {Path(r).parent for r in rel}:
        while pkg != Path("engine"):
            (ROOT / pkg / "__init__.py").touch()
            pkg = pkg.parent


def _find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


class BuildExt(build_ext):
    """build_ext that fails early and clearly when no C++17 compiler is present."""

    def run(self) -> None:
        if _find_cxx() is None:
            raise SystemExit(
                "veilface: no C++ compiler found. Install g++ (Debian/Ubuntu: "
                "apt-get install g++) or set CXX, then reinstall.")
        super().run()


def _cython_extensions() -> list:
    from Cython.Build import cythonize
    from setuptools import Extension

    pyx = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.pyx"))
    exts = [
        Extension(p[:-4].replace("/", "."), [p], include_dirs=[np.get_include()],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                  extra_compile_args=["-O3"])
        for p in pyx
    ]
    return cythonize(exts, language_level=3, quiet=True) if exts else []


def _native_extensions() -> list:
    if not (ROOT / "csrc" / "bindings.cpp").exists():
        return []
    return [
        Pybind11Extension(
            "engine._kernels",
            ["csrc/bindings.cpp"],
            include_dirs=["csrc"],
            depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.hpp")),
            cxx_std=17,
            # No -march=native: the wheel must run on any x86-64. AVX2/AVX-512 paths are
            # compiled with target attributes and chosen at run time.
            extra_compile_args=["-O3", "-fno-math-errno", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]


generate_grpc_stubs()
setup(ext_modules=_native_extensions() + _cython_extensions(), cmdclass={"build_ext": BuildExt})
