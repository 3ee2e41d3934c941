"""Build and load the C++ core of the packing search (``native/memplan/search.cpp``, pybind11).

The extension is compiled once per source/compiler/Python combination into a cache folder
(``$NNCOMPILE_CACHE`` or ``~/.cache/nncompile``), under a file lock, written to a temporary name
and renamed. ``load()`` returns the module, or ``None`` when the source or a compiler is missing
or the build fails (the caller then falls back to the pure-Python search); ``build_error()`` says why.
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
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "native" / "memplan" / "search.cpp"
MODULE = "_memplan_search"

_module = None
_error: str | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("NNCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nncompile")
    return Path(root) / "memplan"


def _command(output: Path) -> list[str]:
    import pybind11

    return [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE), "-o", str(output)]


def _build() -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    if not SOURCE.exists():
        raise RuntimeError(f"missing source {SOURCE}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    import pybind11

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), sys.version.encode(), pybind11.__version__.encode(),
                 " ".join(_command(Path("x"))).encode()):
        key.update(part)
    folder = _cache_dir() / key.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = folder / f"{MODULE}{suffix}"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        temporary = folder / f"{MODULE}.{os.getpid()}.tmp{suffix}"
        proc = subprocess.run(_command(temporary), capture_output=True, text=True)
        if proc.returncode != 0:
            temporary.unlink(missing_ok=True)
            raise RuntimeError(f"g++ failed on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(temporary, target)
    return target


def load():
    """The compiled search module, building it on first use; None if it cannot be built."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("NNCOMPILE_NO_NATIVE"):
        _error = "disabled by NNCOMPILE_NO_NATIVE"
        return None
    try:
        path = _build()
        loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
        spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _module = module
    except Exception as err:  # any failure means: use the Python search instead
        _error = str(err)
        _module = None
    return _module


def build_error() -> str | None:
    """Why ``load()`` returned None (or None if it did not)."""
    return _error
