"""Shape and indexing helpers of the torch frontends (a mixin of ``Lowering``).

They take torch's conventions (negative dims, ``-1`` sizes, Python slices, ``squeeze`` of a
non-unit axis being a no-op) and emit canonical IR ops, skipping ops that would change nothing:

    low.reshape(x, (2, -1)); low.select(x, 1, -1); low.split(x, [3, 5], dim=2)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nncompile.frontend.fx_lower import Value


class ShapeOps:
    """Needs ``emit``, ``shape``, ``rank``, ``type``, ``tensor``, ``cast`` and ``unsupported`` from the host."""

    def axis(self, dim: int, rank: int) -> int:
        if not -max(rank, 1) <= dim < max(rank, 1):
            raise self.unsupported(f"dimension {dim} is out of range for a rank-{rank} tensor")
        return dim % rank if rank else 0

    def reshape(self, x: Value, shape) -> Value:
        shape = tuple(int(d) for d in flat_ints(shape))
        if shape == self.shape(x):
            return x
        return self.emit("reshape", [x], {"shape": shape})

    def flatten(self, x: Value, start: int = 0, end: int = -1) -> Value:
        rank = self.rank(x)
        if rank == 0:
            return self.reshape(x, (1,))
        s, e = self.axis(start, rank), self.axis(end, rank)
        if s >= e:
            return x
        return self.emit("flatten", [x], {"start": s, "end": e})

    def unflatten(self, x: Value, dim: int, sizes) -> Value:
        shape = list(self.shape(x))
        d = self.axis(dim, len(shape))
        sizes = [int(s) for s in sizes]
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            sizes[sizes.index(-1)] = shape[d] // known
        return self.reshape(x, shape[:d] + sizes + shape[d + 1:])

    def transpose(self, x: Value, dim0: int, dim1: int) -> Value:
        rank = self.rank(x)
        if rank < 2 or self.axis(dim0, rank) == self.axis(dim1, rank):
            return x
        return self.emit("transpose", [x], {"dim0": self.axis(dim0, rank), "dim1": self.axis(dim1, rank)})

    def permute(self, x: Value, dims) -> Value:
        dims = tuple(self.axis(int(d), self.rank(x)) for d in flat_ints(dims))
        if dims == tuple(range(len(dims))):
            return x
        return self.emit("permute", [x], {"dims": dims})

    def t(self, x: Value) -> Value:
        return self.transpose(x, 0, 1) if self.rank(x) == 2 else x

    def squeeze(self, x: Value, dims=None) -> Value:
        shape = self.shape(x)
        if dims is None:
            axes = tuple(i for i, d in enumerate(shape) if d == 1)
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            axes = tuple(sorted({self.axis(d, len(shape)) for d in dims if shape[self.axis(d, len(shape))] == 1}))
        return self.emit("squeeze", [x], {"axes": axes}) if axes else x

    def unsqueeze(self, x: Value, dim: int) -> Value:
        return self.emit("unsqueeze", [x], {"axis": self.axis(dim, self.rank(x) + 1)})

    def expand(self, x: Value, sizes) -> Value:
        sizes = tuple(int(d) for d in flat_ints(sizes))
        rank = self.rank(x)
        pad = len(sizes) - rank
        resolved = tuple(self.shape(x)[i - pad] if d == -1 and i >= pad else d for i, d in enumerate(sizes))
        if resolved == self.shape(x):
            return x
        return self.emit("expand", [x], {"shape": sizes})

    def slice(self, x: Value, dim: int, start, end, step: int = 1) -> Value:
        size = self.shape(x)[self.axis(dim, self.rank(x))]
        start = 0 if start is None else int(start)
        end = None if end is None or end >= 2**62 else int(end)
        if step is None:
            step = 1
        if step < 1:
            raise self.unsupported(f"slicing with step {step} is not supported (step must be >= 1)")
        if range(*slice(start, end, step).indices(size)) == range(size):
            return x
        return self.emit("slice", [x], {"axis": self.axis(dim, self.rank(x)), "start": start, "end": end,
                                        "step": int(step)})

    def select(self, x: Value, dim: int, index: int) -> Value:
        axis = self.axis(dim, self.rank(x))
        size = self.shape(x)[axis]
        if not -size <= index < size:
            raise self.unsupported(f"index {index} is out of range for dimension {dim} of size {size}")
        index %= size
        part = self.slice(x, axis, index, index + 1)
        return self.emit("squeeze", [part], {"axes": (axis,)})

    def split(self, x: Value, sizes, dim: int) -> tuple[Value, ...]:
        """``torch.split``: an int chunk size or a list of sizes."""
        total = self.shape(x)[self.axis(dim, self.rank(x))]
        if isinstance(sizes, int):
            sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
        parts, start = [], 0
        for size in sizes:
            parts.append(self.slice(x, dim, start, start + size))
            start += size
        return tuple(parts)

    def chunk(self, x: Value, chunks: int, dim: int) -> tuple[Value, ...]:
        total = self.shape(x)[self.axis(dim, self.rank(x))]
        return self.split(x, max(1, -(-total // chunks)), dim)

    def cat(self, xs, dim: int) -> Value:
        xs = [self.tensor(v) for v in xs]
        xs = [v for v in xs if self.shape(v) != (0,)] or xs[:1]
        if len(xs) == 1:
            return xs[0]
        dtype = self.type(xs[0]).dtype
        return self.emit("concat", [self.cast(v, dtype) for v in xs], {"axis": self.axis(dim, self.rank(xs[0]))})

    def stack(self, xs, dim: int) -> Value:
        xs = [self.tensor(v) for v in xs]
        axis = self.axis(dim, self.rank(xs[0]) + 1)
        return self.cat([self.unsqueeze(v, axis) for v in xs], axis)


def flat_ints(values) -> list[int]:
    """A shape given as ints, a list/tuple/torch.Size, or nested once (``view(*shape)``)."""
    if isinstance(values, int):
        return [values]
    out = []
    for v in values:
        if isinstance(v, (list, tuple, torch.Size)):
            out.extend(int(d) for d in v)
        else:
            out.append(int(v))
    return out
