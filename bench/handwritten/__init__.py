"""Hand-written C++ baselines (nets.cpp), built with g++ and called through ctypes.

    lib = build("loops")            # or "blas" (needs the scipy-openblas32 wheel: pip install .[bench])
    net = Mlp(lib, params)          # params: name -> float32 array (copied; the baseline owns its weights)
    y = net.forward(x); loss = net.train_step(x, labels, lr=0.1, momentum=0.9)

Built once per source/flags digest into bench/handwritten/build/.
"""
from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "nets.cpp"
BUILD = HERE / "build"
FLAGS = ["-O3", "-march=x86-64-v3", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]

MLP_PARAMS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
LENET_PARAMS = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", *MLP_PARAMS[:4],
                "fc3.weight", "fc3.bias"]


class BaselineUnavailable(RuntimeError):
    pass


def _blas_flags() -> list[str]:
    try:
        import scipy_openblas32 as sob
    except ImportError:
        raise BaselineUnavailable("the BLAS baseline needs the scipy-openblas32 wheel (pip install '.[bench]')") from None
    lib_dir = sob.get_lib_dir()
    return ["-DNNC_BASELINE_BLAS", f"-L{lib_dir}", f"-l{sob.get_library()}", f"-Wl,-rpath,{lib_dir}"]


def build(variant: str) -> ctypes.CDLL:
    """Compile (or reuse) the baseline library: variant 'loops' or 'blas'."""
    if variant not in ("loops", "blas"):
        raise ValueError(f"unknown baseline variant {variant!r}")
    flags = FLAGS + (_blas_flags() if variant == "blas" else [])
    digest = hashlib.sha256((SOURCE.read_text() + " ".join(flags)).encode()).hexdigest()[:12]
    out = BUILD / f"nets_{variant}_{digest}.so"
    if not out.exists():
        BUILD.mkdir(exist_ok=True)
        tmp = out.with_suffix(".tmp.so")
        cmd = ["g++", *FLAGS, str(SOURCE), "-o", str(tmp), *flags[len(FLAGS):]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BaselineUnavailable(f"g++ failed for the {variant} baseline: {res.stderr[-800:]}")
        tmp.replace(out)
    lib = ctypes.CDLL(str(out))
    fp = ctypes.POINTER(ctypes.c_float)
    pp = ctypes.POINTER(fp)
    lib.hw_set_threads.argtypes = [ctypes.c_int]
    lib.mlp_work_floats.restype = ctypes.c_long
    lib.mlp_work_floats.argtypes = [ctypes.c_int]
    lib.lenet_work_floats.restype = ctypes.c_long
    lib.lenet_work_floats.argtypes = [ctypes.c_int]
    lib.mlp_forward.argtypes = [pp, fp, fp, ctypes.c_int, fp]
    lib.lenet_forward.argtypes = [pp, fp, fp, ctypes.c_int, fp]
    lib.mlp_train_step.argtypes = [pp, pp, pp, fp, ctypes.POINTER(ctypes.c_longlong), ctypes.c_int,
                                   ctypes.c_float, ctypes.c_float, ctypes.c_int]
    lib.mlp_train_step.restype = ctypes.c_float
    lib.variant = variant
    return lib


def _fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def _ptr_array(arrays):
    return (ctypes.POINTER(ctypes.c_float) * len(arrays))(*[_fptr(a) for a in arrays])


class _Net:
    names: list[str]
    work_fn: str
    forward_fn: str

    def __init__(self, lib: ctypes.CDLL, params: dict, batch: int, out_features: int = 10):
        self.lib = lib
        self.batch = batch
        self.params = [np.ascontiguousarray(np.array(params[n], dtype=np.float32)) for n in self.names]
        self._p = _ptr_array(self.params)
        self.work = np.empty(getattr(lib, self.work_fn)(batch), np.float32)
        self.out = np.empty((batch, out_features), np.float32)

    def set_threads(self, n: int) -> None:
        self.lib.hw_set_threads(n)

    def forward(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[0] == self.batch
        getattr(self.lib, self.forward_fn)(self._p, _fptr(x), _fptr(self.out), self.batch, _fptr(self.work))
        return self.out


class Mlp(_Net):
    names, work_fn, forward_fn = MLP_PARAMS, "mlp_work_floats", "mlp_forward"

    def __init__(self, lib, params, batch):
        super().__init__(lib, params, batch)
        self.grads = [np.zeros_like(p) for p in self.params]
        self.bufs = [np.zeros_like(p) for p in self.params]
        self._g, self._b = _ptr_array(self.grads), _ptr_array(self.bufs)
        self.steps = 0

    def train_step(self, x: np.ndarray, labels: np.ndarray, lr: float, momentum: float) -> float:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[0] == self.batch
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        loss = self.lib.mlp_train_step(self._p, self._g, self._b, _fptr(x),
                                       labels.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)), self.batch,
                                       lr, momentum, int(self.steps == 0))
        self.steps += 1
        return loss

    def state(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.params))


class LeNet(_Net):
    names, work_fn, forward_fn = LENET_PARAMS, "lenet_work_floats", "lenet_forward"
