"""Tensor types: static shape, dtype and optional weight sparsity."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nncompile.errors import InputError, ShapeError

# dtype name -> (numpy dtype or None when numpy has none, bytes per element)
DTYPES: dict[str, tuple[type | None, int]] = {
    "f32": (np.float32, 4),
    "f64": (np.float64, 8),
    "f16": (np.float16, 2),
    "bf16": (None, 2),
    "i64": (np.int64, 8),
    "i32": (np.int32, 4),
    "bool": (np.bool_, 1),
}
FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")
INT_DTYPES = ("i64", "i32")


def numpy_dtype(dtype: str) -> np.dtype:
    np_type = DTYPES[dtype][0]
    if np_type is None:
        raise ShapeError(f"dtype {dtype} has no NumPy equivalent")
    return np.dtype(np_type)


def dtype_of_array(array: np.ndarray) -> str:
    for name, (np_type, _) in DTYPES.items():
        if np_type is not None and array.dtype == np.dtype(np_type):
            return name
    raise InputError(f"unsupported array dtype {array.dtype}")


SPARSITY_KINDS = ("unstructured", "block", "nm", "mask", "local")


@dataclass(frozen=True)
class Sparsity:
    """A fixed sparsity pattern of a weight, decided at compile time.

    kinds: ``unstructured`` (density, seed), ``block`` (block=(bh, bw), density, seed),
    ``nm`` (n of every m consecutive weights along the last axis, seed), ``mask`` (path to .npy/.npz),
    ``local`` (a locally connected layer: in_size, in_channels, kernel, stride, padding; layout in ``_local_mask``).
    """

    kind: str
    density: float | None = None
    seed: int = 0
    block: tuple[int, int] | None = None
    n: int | None = None
    m: int | None = None
    path: str | None = None
    in_size: tuple[int, ...] | None = None
    in_channels: int | None = None
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in SPARSITY_KINDS:
            raise ShapeError(f"unknown sparsity kind '{self.kind}' (expected one of {', '.join(SPARSITY_KINDS)})")
        if self.kind in ("unstructured", "block"):
            if self.density is None or not 0.0 <= self.density <= 1.0:
                raise ShapeError(f"{self.kind} sparsity needs a density in [0, 1], got {self.density}")
        if self.kind == "block" and (self.block is None or min(self.block) < 1):
            raise ShapeError("block sparsity needs a block size (bh, bw) >= 1")
        if self.kind == "nm" and (self.n is None or self.m is None or not 0 < self.n <= self.m):
            raise ShapeError(f"N:M sparsity needs 0 < N <= M, got {self.n}:{self.m}")
        if self.kind == "mask" and not self.path:
            raise ShapeError("mask sparsity needs a file path")
        if self.kind == "local":
            self._check_local()

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The boolean pattern (True = nonzero) for a weight of ``shape``; deterministic."""
        rng = np.random.default_rng(self.seed)
        size = math.prod(shape)
        if self.kind == "unstructured":
            keep = int(round(self.density * size))
            flat = np.zeros(size, dtype=bool)
            flat[rng.permutation(size)[:keep]] = True
            return flat.reshape(shape)
        if self.kind == "block":
            if len(shape) != 2:
                raise ShapeError(f"block sparsity needs a 2-D weight, got shape {list(shape)}")
            bh, bw = self.block
            if shape[0] % bh or shape[1] % bw:
                raise ShapeError(f"weight shape {list(shape)} is not divisible by block {bh}x{bw}")
            grid = (shape[0] // bh, shape[1] // bw)
            keep = int(round(self.density * grid[0] * grid[1]))
            blocks = np.zeros(grid[0] * grid[1], dtype=bool)
            blocks[rng.permutation(blocks.size)[:keep]] = True
            return np.kron(blocks.reshape(grid), np.ones((bh, bw), dtype=bool)).astype(bool)
        if self.kind == "nm":
            if shape[-1] % self.m:
                raise ShapeError(f"last dimension {shape[-1]} is not divisible by M={self.m} for {self.n}:{self.m} sparsity")
            groups = size // self.m
            scores = rng.random((groups, self.m))
            order = np.argsort(scores, axis=1)[:, : self.n]
            mask = np.zeros((groups, self.m), dtype=bool)
            np.put_along_axis(mask, order, True, axis=1)
            return mask.reshape(shape)
        if self.kind == "local":
            return self._local_mask(shape)
        return self._load_mask(shape)

    def _load_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        path = Path(self.path)
        if not path.exists():
            raise InputError(f"mask file '{self.path}' not found")
        data = np.load(path)
        if isinstance(data, np.lib.npyio.NpzFile):
            data = data[data.files[0]]
        if tuple(data.shape) != tuple(shape):
            raise ShapeError(f"mask file '{self.path}' has shape {list(data.shape)}, the weight is {list(shape)}")
        return data != 0

    # locally connected layers ----------------------------------------------------------------------

    def _check_local(self) -> None:
        """Normalize in_size/kernel/stride/padding to tuples of one length (1-D or 2-D) and check them."""
        if self.in_size is None or self.in_channels is None or self.kernel is None:
            raise ShapeError("local sparsity needs in_size, in_channels and kernel")
        rank = len(self.in_size) if isinstance(self.in_size, (tuple, list)) else 1
        if rank not in (1, 2):
            raise ShapeError(f"local sparsity is 1-D or 2-D, got in_size {list(self.in_size)}")
        defaults = {"stride": 1, "padding": 0}
        for field, minimum in (("in_size", 1), ("kernel", 1), ("stride", 1), ("padding", 0)):
            value = getattr(self, field)
            value = defaults[field] if value is None else value
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
            if len(value) != rank or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ShapeError(f"local sparsity: {field} must be {rank} integer{'s' if rank > 1 else ''} "
                                 f"(the rank of in_size), got {list(value)}")
            if min(value) < minimum:
                raise ShapeError(f"local sparsity: {field} must be >= {minimum}, got {list(value)}")
            object.__setattr__(self, field, value)
        if not isinstance(self.in_channels, int) or isinstance(self.in_channels, bool) or self.in_channels < 1:
            raise ShapeError(f"local sparsity: in_channels must be an integer >= 1, got {self.in_channels!r}")
        for size, k, p in zip(self.in_size, self.kernel, self.padding):
            if k > size + 2 * p:
                raise ShapeError(f"local sparsity: kernel {list(self.kernel)} is larger than the padded input "
                                 f"{[s + 2 * q for s, q in zip(self.in_size, self.padding)]}")

    @property
    def out_size(self) -> tuple[int, ...]:
        """Output positions per spatial axis of a ``local`` pattern: (size + 2 padding - kernel) // stride + 1."""
        return tuple((size + 2 * p - k) // s + 1
                     for size, k, s, p in zip(self.in_size, self.kernel, self.stride, self.padding))

    def _axis_windows(self) -> list[np.ndarray]:
        """Per spatial axis, [out, in] bool: output o sees input i when 0 <= i - (o * stride - padding) < kernel."""
        windows = []
        for size, k, s, p, out in zip(self.in_size, self.kernel, self.stride, self.padding, self.out_size):
            offset = np.arange(size)[None, :] - (np.arange(out) * s - p)[:, None]
            windows.append((offset >= 0) & (offset < k))
        return windows

    def local_out_channels(self, shape: tuple[int, ...]) -> int:
        """Output channels of a ``local`` weight of ``shape`` [N, K] (N = out_channels * prod(out_size))."""
        positions = math.prod(self.out_size)
        in_features = self.in_channels * math.prod(self.in_size)
        if len(shape) != 2:
            raise ShapeError(f"local sparsity needs a 2-D weight [out features, in features], got shape {list(shape)}")
        if shape[1] != in_features:
            raise ShapeError(f"local sparsity: weight shape {list(shape)} has {shape[1]} columns, expected "
                             f"{in_features} (in_channels {self.in_channels} x input {_dims(self.in_size)})")
        if shape[0] == 0 or shape[0] % positions:
            raise ShapeError(f"local sparsity: weight shape {list(shape)} has {shape[0]} rows, not a positive multiple "
                             f"of the {positions} output positions (output {_dims(self.out_size)} from input "
                             f"{_dims(self.in_size)}, kernel {_dims(self.kernel)}, stride {_dims(self.stride)}, "
                             f"padding {_dims(self.padding)})")
        return shape[0] // positions

    def _local_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Row ``o * P_out + q`` (out channel o, output position q) keeps column ``c * P_in + i`` (in channel c,
        input position i) when i lies in q's window: both sides are flattened channel-first (NCHW order)."""
        out_channels = self.local_out_channels(shape)
        windows = self._axis_windows()
        connect = windows[0]   # [output positions, input positions]
        if len(windows) == 2:
            along_h, along_w = windows
            connect = (along_h[:, None, :, None] & along_w[None, :, None, :]).reshape(
                along_h.shape[0] * along_w.shape[0], -1)
        positions_out, positions_in = connect.shape
        full = np.broadcast_to(connect[None, :, None, :], (out_channels, positions_out, self.in_channels, positions_in))
        return full.reshape(shape)

    @property
    def expected_density(self) -> float | None:
        if self.kind == "nm":
            return self.n / self.m
        if self.kind == "local":
            return math.prod(float(a.mean()) for a in self._axis_windows())
        return self.density

    def __str__(self) -> str:
        if self.kind == "unstructured":
            return f"unstructured(density={self.density!r}, seed={self.seed})"
        if self.kind == "block":
            return f"block(bh={self.block[0]}, bw={self.block[1]}, density={self.density!r}, seed={self.seed})"
        if self.kind == "nm":
            return f"nm(n={self.n}, m={self.m}, seed={self.seed})"
        if self.kind == "local":
            return (f"local(in_size={self.in_size}, in_channels={self.in_channels}, kernel={self.kernel}, "
                    f"stride={self.stride}, padding={self.padding})")
        quoted = '"' + str(self.path).replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"mask(path={quoted})"


def _dims(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


@dataclass(frozen=True)
class TensorType:
    """Static shape + dtype (+ sparsity for weights with a fixed pattern)."""

    shape: tuple[int, ...]
    dtype: str = "f32"
    sparsity: Sparsity | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ShapeError(f"unknown dtype '{self.dtype}' (expected one of {', '.join(DTYPES)})")
        if any(d < 0 for d in self.shape):
            raise ShapeError(f"negative dimension in shape {list(self.shape)}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def dense(self) -> "TensorType":
        return TensorType(self.shape, self.dtype)

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"
        if self.sparsity is not None:
            text += f" sparse {self.sparsity}"
        return text


def stable_seed(*parts) -> int:
    """A seed derived from names and numbers, stable across runs and Python versions."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
