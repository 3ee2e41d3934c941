"""Compile generated CUDA (``kernels.cu``) into a shared library with nvcc, through the build cache.

The cache rules are the C++ target's (``build.py``): the key covers the generated source, the
``native/cuda`` headers, the nvcc command line and nvcc's version; a build takes a file lock on its
key, compiles into a temporary directory and renames the result into place. nvcc errors are reported
against ``kernels.cu`` and the graph node whose code holds the failing line.

The target architecture is ``--cuda-arch`` (``sm_90``), else ``NNCOMPILE_CUDA_ARCH``, else the
capability of the visible GPU (through torch), else ``sm_80``.

    path, hit = build_cuda_module(source, CudaBuildOptions(arch="sm_90"))
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nncompile.codegen.build import NATIVE_DIR, cached_build, keep_failed
from nncompile.codegen.cpp import GeneratedSource
from nncompile.errors import BuildError

CUDA_NATIVE_DIR = NATIVE_DIR / "cuda"
DEFAULT_ARCH = "sm_80"


def find_nvcc(nvcc: str | None = None) -> str | None:
    """The nvcc to use: the given one, $NVCC, nvcc on PATH, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc."""
    for candidate in (nvcc, os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise BuildError(f"nvcc '{nvcc}' is not usable: {err}") from None
    return out.strip().splitlines()[-1]


def detect_arch() -> str:
    """sm_XY of the first visible GPU, or DEFAULT_ARCH when there is none (or no torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"sm_{major}{minor}"
    except Exception:   # noqa: BLE001 - a broken CUDA install must not stop a cross-compile
        pass
    return DEFAULT_ARCH


def resolve_arch(arch: str | None) -> str:
    arch = arch or os.environ.get("NNCOMPILE_CUDA_ARCH") or detect_arch()
    if re.fullmatch(r"\d{2,3}a?", arch):
        arch = "sm_" + arch
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise BuildError(f"--cuda-arch must look like sm_80 or sm_90 (got '{arch}')")
    return arch


@lru_cache(maxsize=None)
def cuda_native_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(CUDA_NATIVE_DIR.glob("*.cuh")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CudaBuildOptions:
    arch: str | None = None          # None: NNCOMPILE_CUDA_ARCH, the visible GPU, or sm_80
    opt: str = "-O3"
    tf32: bool = False               # TF32 tensor cores (WMMA) in the large-tile GEMM
    nvcc: str | None = None
    extra_flags: tuple[str, ...] = ()

    def compile_flags(self) -> list[str]:
        arch = resolve_arch(self.arch)
        flags = [self.opt, "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                 "-cudart", "static", f"-I{CUDA_NATIVE_DIR}", "-diag-suppress", "177,550"]
        if self.tf32:
            flags.append("-DNNC_CUDA_TF32")
        return flags + list(self.extra_flags)


def cache_key(source: GeneratedSource, options: CudaBuildOptions, nvcc: str) -> str:
    digest = hashlib.sha256()
    for part in ("cuda", source.kernels, source.module_name, " ".join(options.compile_flags()), nvcc_version(nvcc),
                 cuda_native_digest()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _explain(stderr: str, source: GeneratedSource, path: Path) -> str:
    """The first nvcc error, with the graph node whose generated code holds it."""
    lines = [line for line in stderr.splitlines() if "error" in line]
    first = lines[0] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "unknown error"
    node = None
    found = re.search(r"kernels\.cu\((\d+)\)", first)
    if found:
        number = int(found.group(1))
        node = max((n for n in source.node_lines if n[0] <= number), default=None, key=lambda n: n[0])
    where = f" (in the code of node {node[1]})" if node else ""
    return f"nvcc rejected the generated CUDA{where}:\n{first}\n(full source kept at {path})"


def build_cuda_module(source: GeneratedSource, options: CudaBuildOptions = CudaBuildOptions(), *,
                      verbose: bool = False) -> tuple[Path, bool]:
    """Compile (or find in the cache) the CUDA module; returns (path to the .so, cache hit?)."""
    nvcc = find_nvcc(options.nvcc)
    if nvcc is None:
        raise BuildError("nvcc not found: the CUDA target needs the CUDA toolkit (put nvcc on PATH or set CUDA_HOME)")
    key = cache_key(source, options, nvcc)
    filename = f"{source.module_name}.so"

    def build(work: Path) -> None:
        kernels = work / "kernels.cu"
        kernels.write_text(source.kernels)
        start = time.perf_counter()
        result = subprocess.run([nvcc, *options.compile_flags(), str(kernels), "-o", str(work / filename)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(_explain(result.stderr, source, keep_failed(work, key) / "kernels.cu"))
        if verbose:
            print(f"[nncompile] nvcc compiled {source.module_name} in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)

    return cached_build(key, filename, build)
