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

import numpy as np

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


# Shared by the GEMM tests (test_native_kernels.py, test_gemm_paths.py): operands, references, one checked call.

def act_code(nat, name: str) -> int:
    return getattr(nat, f"ACT_{name.upper()}")


def act_ref(x: np.ndarray, name: str) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    out = {
        "none": lambda v: v,
        "relu": F.relu,
        "gelu_erf": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
    }[name](t)
    return out.numpy()


def rand(rng, *shape, scale=1.0):
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)


def stored(rng, rows, cols, trans, pad):
    """A logical rows x cols operand, stored transposed or not with `pad` extra leading-dim floats."""
    logical = rand(rng, rows, cols)
    phys = logical.T if trans else logical
    ld = phys.shape[1] + pad
    buf = rand(rng, phys.shape[0], ld) * 100.0  # garbage in the padding must not leak in
    buf[:, : phys.shape[1]] = phys
    return logical, np.ascontiguousarray(buf), ld


def run_sgemm(nat, rng, M, N, K, ta, tb, pad, beta, alpha, use_col, use_row, act, use_res):
    a, A, lda = stored(rng, M, K, ta, pad)
    b, B, ldb = stored(rng, K, N, tb, pad)
    ldc = N + pad
    C = rand(rng, M, ldc)
    if beta == 0.0:
        C[:, :N] = np.nan  # beta == 0 must never read C
    c_old = C[:, :N].astype(np.float64)
    col_bias = rand(rng, N) if use_col else None
    row_bias = rand(rng, M) if use_row else None
    residual = rand(rng, M, N + 3) if use_res else None
    nat.sgemm(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, beta, col_bias, row_bias, act_code(nat, act), residual,
              N + 3, alpha)
    ref = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    if beta != 0.0:
        ref = ref + beta * c_old
    if use_col:
        ref = ref + col_bias
    if use_row:
        ref = ref + row_bias[:, None]
    ref = act_ref(ref, act)
    if use_res:
        ref = ref + residual[:, :N]
    tol = 2e-6 * (K + 4) + 1e-5
    np.testing.assert_allclose(C[:, :N], ref, rtol=1e-4, atol=tol)
    if pad:
        assert np.isfinite(C[:, N:]).all() or beta == 0.0
