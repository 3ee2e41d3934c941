"""Compile generated sources into a Python extension module, through a content-hash cache.

The pybind11 binding is model-independent: it is compiled once per toolchain and linked into every
module, so a cold build compiles only the kernels. The cache key covers the generated sources, the native headers they include, the compiler command
line, the compiler's version, the resolved ISA, the Python ABI and the pybind11 version. A build takes
a real file lock on its key, compiles into a temporary directory and renames the result into place, so concurrent builds of the same model never see a
half-written module. Compiler errors are reported against the generated file and the graph node
whose code holds the failing line.

    path = build_module(source)            # -> .../<key>/<module>.so
    module = load_module(path, source.module_name)
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nncompile.codegen.cpp import GeneratedSource
from nncompile.errors import BuildError

NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"


def cache_root() -> Path:
    root = os.environ.get("NNCOMPILE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "nncompile"


@lru_cache(maxsize=None)
def compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as err:
        raise BuildError(f"C++ compiler '{cxx}' is not usable: {err}") from None


@lru_cache(maxsize=None)
def resolved_isa(cxx: str, march: str) -> str:
    """The ISA features g++ enables for ``-march`` (so 'native' on two machines is told apart)."""
    out = subprocess.run([cxx, f"-march={march}", "-Q", "--help=target"], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"-march={march} is not accepted by {cxx}: {out.stderr.strip()[:300]}")
    enabled = sorted(line.split()[0] for line in out.stdout.splitlines() if "[enabled]" in line)
    arch = [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("-march=")]
    return (arch[0] if arch else march) + ":" + ",".join(enabled)


@lru_cache(maxsize=None)
def native_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(NATIVE_DIR.glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    cxx: str = "g++"
    march: str = "x86-64-v3"
    opt: str = "-O3"
    extra_flags: tuple[str, ...] = ()

    def compile_flags(self) -> list[str]:
        import pybind11

        # hidden visibility: each module's kernels bind to their own binding even when another
        # generated module was loaded with RTLD_GLOBAL (torch does that to the libraries it loads)
        return [self.opt, "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", f"-march={self.march}", "-fno-math-errno",
                "-fno-trapping-math", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
                f"-I{NATIVE_DIR}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                *self.extra_flags]


# Bumped when what a cache entry holds changes meaning: 2 = modules linked with a binding object keyed by
# the native headers (format 1 modules may hold a binding compiled against older headers).
CACHE_FORMAT = "2"


def cache_key(source: GeneratedSource, options: BuildOptions) -> str:
    import pybind11

    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, source.kernels, source.binding, source.module_name, " ".join(options.compile_flags()),
                 compiler_version(options.cxx), resolved_isa(options.cxx, options.march), native_digest(),
                 sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX") or "", pybind11.__version__):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _explain(stderr: str, source: GeneratedSource, path: Path) -> str:
    """The first compiler error, with the graph node whose generated code holds it."""
    lines = [line for line in stderr.splitlines() if "error" in line]
    first = lines[0] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "unknown error"
    node = None
    if path.name == "kernels.cpp" and ":" in first:
        try:
            number = int(first.split(":")[1])
            node = max((n for n in source.node_lines if n[0] <= number), default=None, key=lambda n: n[0])
        except ValueError:
            node = None
    where = f" (in the code of node {node[1]})" if node else ""
    return f"the C++ compiler rejected the generated code{where}:\n{first}\n(full source kept at {path})"


def _compile(cxx: str, flags: list[str], src: Path, obj: Path) -> subprocess.CompletedProcess:
    return subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)


def _binding_object(source: GeneratedSource, options: BuildOptions, root: Path) -> Path:
    """The pybind11 binding is the same for every model: compile it once per toolchain and native/
    headers (it inlines the optimizer sweeps of nnc_optim.h: an object kept across a header change would
    keep the old code) and cache it."""
    import pybind11

    digest = hashlib.sha256()
    for part in (source.binding, " ".join(options.compile_flags()), compiler_version(options.cxx),
                 resolved_isa(options.cxx, options.march), native_digest(), sys.implementation.cache_tag,
                 pybind11.__version__):
        digest.update(part.encode())
        digest.update(b"\0")
    obj = root / f"binding-{digest.hexdigest()[:24]}.o"
    if obj.exists():
        return obj
    with open(root / f"{obj.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if obj.exists():
            return obj
        work = Path(tempfile.mkdtemp(prefix="binding.", dir=root))
        try:
            src = work / "binding.cpp"
            src.write_text(source.binding)
            result = _compile(options.cxx, options.compile_flags(), src, work / "binding.o")
            if result.returncode != 0:
                raise BuildError(f"compiling the pybind11 binding failed:\n{result.stderr.strip()[:2000]}")
            os.replace(work / "binding.o", obj)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return obj


def cached_build(key: str, filename: str, build) -> tuple[Path, bool]:
    """The build cache's protocol: ``<cache>/<key>/<filename>`` if it exists; otherwise, under the
    key's file lock, ``build(work_dir)`` writes ``work_dir/<filename>`` in a fresh directory that is
    then renamed into place atomically (a failed build leaves nothing behind). Returns (path, hit?)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / key
    target = final_dir / filename
    if target.exists():
        return target, True
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target, True
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
        try:
            build(work)
            os.rename(work, final_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target, False


def keep_failed(work: Path, key: str) -> Path:
    """Copy a failed build's directory to ``<cache>/failed/<key>`` (for the user to read); returns it."""
    keep = cache_root() / "failed" / key
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(work, keep)
    return keep


def build_module(source: GeneratedSource, options: BuildOptions = BuildOptions(), *, verbose: bool = False) -> tuple[Path, bool]:
    """Compile (or find in the cache) the module; returns (path to the .so, cache hit?)."""
    if shutil.which(options.cxx) is None:
        raise BuildError(f"C++ compiler '{options.cxx}' not found; install g++ or pass another compiler")
    key = cache_key(source, options)
    filename = f"{source.module_name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"

    def build(work: Path) -> None:
        kernels = work / "kernels.cpp"
        kernels.write_text(source.kernels)
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            kernel_job = pool.submit(_compile, options.cxx, options.compile_flags(), kernels, work / "kernels.o")
            binding_job = pool.submit(_binding_object, source, options, cache_root())
            result = kernel_job.result()
            binding_obj = binding_job.result()
        if result.returncode != 0:
            raise BuildError(_explain(result.stderr, source, keep_failed(work, key) / "kernels.cpp"))
        link = subprocess.run([options.cxx, "-shared", "-fopenmp", "-Wl,-Bsymbolic", str(work / "kernels.o"),
                               str(binding_obj), "-o", str(work / filename)], capture_output=True, text=True)
        if link.returncode != 0:
            raise BuildError(f"linking the generated module failed:\n{link.stderr.strip()[:2000]}")
        if verbose:
            print(f"[nncompile] compiled {source.module_name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        (work / "kernels.o").unlink()

    return cached_build(key, filename, build)


def load_module(path: Path, name: str):
    """Import a compiled extension module from its file (``name`` is its PyInit name)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
