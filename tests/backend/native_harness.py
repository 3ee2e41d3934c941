"""Build and load the pybind11 test module over the native runtime headers (native/).

``load_native()`` compiles ``tests/backend/native_bindings.cpp`` once with the flags generated code
uses (``g++ -O3 -fopenmp -march=x86-64-v3 -std=c++17``) into a cache directory keyed by a hash of
the sources, the compiler command and version, and the Python / pybind11 versions, then imports
it. A file lock makes concurrent builds (pytest-xdist workers, the benchmark) wait for one another;
the module is written under a temporary name and renamed into place.

Used by tests/backend/test_native_kernels.py and bench/suite_gemm.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "native"
BINDINGS = Path(__file__).resolve().parent / "native_bindings.cpp"
MODULE_NAME = "nnc_native_test"
CXXFLAGS = ["-O3", "-fopenmp", "-march=x86-64-v3", "-std=c++17", "-fPIC", "-shared"]

_loaded = None


def compiler() -> str | None:
    """The C++ compiler to use, or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _compile_command(output: Path) -> list[str]:
    import pybind11

    includes = [f"-I{NATIVE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    return [compiler(), *CXXFLAGS, *includes, str(BINDINGS), "-o", str(output)]


def _cache_key() -> str:
    import pybind11

    digest = hashlib.sha256()
    for path in sorted(NATIVE.glob("*.h")) + [BINDINGS]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    digest.update(" ".join(CXXFLAGS).encode())
    digest.update(version.encode())
    digest.update(sys.version.encode())
    digest.update(pybind11.__version__.encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    root = os.environ.get("NNC_NATIVE_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "nnc-native-test")
    return Path(root) / _cache_key()


def build() -> Path:
    """Compile the test module if no cached build exists; returns the shared library's path."""
    if compiler() is None:
        raise RuntimeError("no C++ compiler (g++) found")
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = directory / f"{MODULE_NAME}{suffix}"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = directory / f".{MODULE_NAME}.{os.getpid()}.tmp{suffix}"
            result = subprocess.run(_compile_command(partial), capture_output=True, text=True)
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"building the native test module failed:\n{result.stderr[-4000:]}")
            os.replace(partial, target)
    return target


def load_native():
    """Build (cached) and import the test module."""
    global _loaded
    if _loaded is None:
        path = build()
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded = module
    return _loaded
