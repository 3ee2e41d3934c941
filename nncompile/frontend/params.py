"""Parameter-side constructs of `.nn`: initializers, sparsity patterns, weights files, optimizers.

Each takes already-evaluated arguments and returns the IR object (``Init``, ``Sparsity``,
arrays, optimizer hyper-parameters), raising a located error when something does not fit.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nncompile.errors import InputError, NameError_, ShapeError, SourceLoc
from nncompile.ir.graph import Init
from nncompile.ir.types import Sparsity
from nncompile.frontend.values import REQUIRED, as_bool, as_int, as_ints, as_number, bind_args, describe

# initializer name -> its arguments (torch's defaults)
INITIALIZERS: dict[str, dict[str, Any]] = {
    "zeros": {},
    "ones": {},
    "constant": {"value": REQUIRED},
    "normal": {"mean": 0.0, "std": 1.0},
    "uniform": {"low": 0.0, "high": 1.0},
    "kaiming_uniform": {"a": 0.0},
    "kaiming_normal": {"a": 0.0},
    "xavier_uniform": {"gain": 1.0},
    "xavier_normal": {"gain": 1.0},
    "load": {"path": REQUIRED, "key": None},
}

# optimizer name -> hyper-parameters with torch's defaults
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.001, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
}

SPARSE_ARGS = {"density": None, "seed": 0, "block": None, "nm": None, "n": None, "m": None, "mask": None,
               "local": None, "channels": None, "kernel": None, "stride": 1, "padding": 0}
LOCAL_ARGS = ("channels", "kernel", "stride", "padding")


def resolve_path(path: str, base_dir: Path) -> Path:
    file = Path(path)
    return file if file.is_absolute() else base_dir / file


def make_init(name: str, positional: Sequence[Any], keywords: Mapping[str, Any], shape: tuple[int, ...],
              loc: SourceLoc | None, base_dir: Path) -> Init:
    """The ``Init`` of ``name(args)``; ``load(path, key)`` is checked against the file now."""
    if name not in INITIALIZERS:
        raise NameError_(f"unknown initializer '{name}' (known: {', '.join(INITIALIZERS)})", loc)
    args = bind_args(name, INITIALIZERS[name], positional, keywords, loc)
    if name == "load":
        if not isinstance(args["path"], str) or not isinstance(args["key"], (str, type(None))):
            raise ShapeError("load: expected load(\"file.npz\", \"key\")", loc)
        file = resolve_path(args["path"], base_dir)
        arrays = read_weights_file(file, args["path"], loc)
        key = args["key"]
        if key is None:
            if len(arrays) != 1:
                raise NameError_(f"load: '{args['path']}' holds {len(arrays)} arrays; name one with a key", loc)
            key = next(iter(arrays))
        if key not in arrays:
            raise NameError_(f"load: '{args['path']}' has no array '{key}' (it has: {', '.join(sorted(arrays)[:8])})", loc)
        if tuple(arrays[key].shape) != tuple(shape):
            raise ShapeError(f"load: array '{key}' in '{args['path']}' has shape {list(arrays[key].shape)}, "
                             f"the parameter is {list(shape)}", loc)
        return Init("file", {"path": str(file), "key": key})
    values = {key: as_number(f"{name}: {key}", value, loc) for key, value in args.items()}
    if name == "normal" and values["std"] < 0:
        raise ShapeError(f"normal: std must be >= 0, got {values['std']}", loc)
    if name == "uniform" and values["low"] > values["high"]:
        raise ShapeError(f"uniform: low {values['low']} is above high {values['high']}", loc)
    return Init(name, values)


def default_init(shape: tuple[int, ...], trainable: bool) -> Init:
    """A parameter declared without an initializer: kaiming_uniform (torch Linear) for rank >= 2, else zeros."""
    if trainable and len(shape) >= 2:
        return Init("kaiming_uniform", {"a": math.sqrt(5.0)})
    return Init("zeros")


def make_sparsity(positional: Sequence[Any], keywords: Mapping[str, Any], loc: SourceLoc | None,
                  base_dir: Path) -> Sparsity:
    """``sparse(density=, seed=)``, ``sparse(block=, density=)``, ``sparse(nm=2:4)`` / ``(n=, m=)``, ``sparse(mask=)``,
    ``sparse(local=[H, W], channels=C, kernel=k, stride=1, padding=0)``."""
    args = bind_args("sparse", SPARSE_ARGS, positional, keywords, loc)
    if args["local"] is not None:
        return _local_sparsity(args, loc)
    if args["channels"] is not None or args["kernel"] is not None:
        raise ShapeError("sparse: channels= and kernel= belong to a locally connected pattern; give local=[H, W] too",
                         loc)
    seed = as_int("sparse: seed", args["seed"], loc, 0)
    density = None if args["density"] is None else as_number("sparse: density", args["density"], loc)
    if args["mask"] is not None:
        if not isinstance(args["mask"], str):
            raise ShapeError(f"sparse: mask must be a file name, got {describe(args['mask'])}", loc)
        file = resolve_path(args["mask"], base_dir)
        if not file.exists():
            raise InputError(f"sparse: mask file '{args['mask']}' not found", loc)
        return _sparsity(loc, kind="mask", path=str(file))
    if args["nm"] is not None or args["n"] is not None or args["m"] is not None:
        if args["nm"] is not None:
            pair = args["nm"]
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ShapeError(f"sparse: nm must be written N:M (e.g. nm=2:4), got {describe(pair)}", loc)
            n, m = pair
        else:
            n, m = args["n"], args["m"]
        return _sparsity(loc, kind="nm", n=as_int("sparse: n", n, loc), m=as_int("sparse: m", m, loc), seed=seed)
    if density is None:
        raise ShapeError("sparse: give a density, a block size with a density, nm=N:M or a mask file", loc)
    if args["block"] is not None:
        block = args["block"]
        if isinstance(block, list):
            if len(block) != 2:
                raise ShapeError("sparse: block must be an integer or [height, width]", loc)
            block = (as_int("sparse: block", block[0], loc, 1), as_int("sparse: block", block[1], loc, 1))
        else:
            size = as_int("sparse: block", block, loc, 1)
            block = (size, size)
        return _sparsity(loc, kind="block", density=density, seed=seed, block=block)
    return _sparsity(loc, kind="unstructured", density=density, seed=seed)


def _local_sparsity(args: Mapping[str, Any], loc: SourceLoc | None) -> Sparsity:
    """``sparse(local=[H, W] or L, channels=C, kernel=, stride=, padding=)``: kernel/stride/padding an int or one
    integer per spatial axis."""
    others = [key for key in ("density", "block", "nm", "n", "m", "mask") if args[key] is not None]
    if others:
        raise ShapeError(f"sparse: local= fixes the whole pattern; it cannot be combined with {', '.join(others)}", loc)
    size = args["local"]
    size = list(size) if isinstance(size, list) else [size]
    if len(size) not in (1, 2):
        raise ShapeError(f"sparse: local= is the input's spatial size, [H, W] or L, got {len(size)} values", loc)
    size = tuple(as_int("sparse: local", v, loc, 1) for v in size)
    if args["channels"] is None or args["kernel"] is None:
        missing = " and ".join(k for k in ("channels", "kernel") if args[k] is None)
        raise ShapeError(f"sparse: local= needs {missing}", loc)
    fields = {"in_size": size, "in_channels": as_int("sparse: channels", args["channels"], loc, 1)}
    for key, minimum in (("kernel", 1), ("stride", 1), ("padding", 0)):
        fields[key] = as_ints(f"sparse: {key}", args[key], loc, minimum, len(size))
    return _sparsity(loc, kind="local", **fields)


def _sparsity(loc: SourceLoc | None, **fields) -> Sparsity:
    try:
        return Sparsity(**fields)
    except ShapeError as err:
        raise err.with_loc(loc)


def check_sparsity(sparsity: Sparsity, shape: tuple[int, ...], loc: SourceLoc | None) -> None:
    """Reject a pattern that cannot apply to a weight of ``shape`` (checked without building the mask)."""
    if sparsity.kind == "block":
        bh, bw = sparsity.block
        if len(shape) != 2:
            raise ShapeError(f"block sparsity needs a 2-D weight, got shape {list(shape)}", loc)
        if shape[0] % bh or shape[1] % bw:
            raise ShapeError(f"weight shape {list(shape)} is not divisible by block {bh}x{bw}", loc)
    elif sparsity.kind == "nm":
        if not shape or shape[-1] % sparsity.m:
            raise ShapeError(f"last dimension of weight shape {list(shape)} is not divisible by M={sparsity.m} "
                             f"for {sparsity.n}:{sparsity.m} sparsity", loc)
    elif sparsity.kind == "local":
        try:
            sparsity.local_out_channels(shape)
        except ShapeError as err:
            raise err.with_loc(loc)
    elif sparsity.kind == "mask":
        try:
            sparsity.mask(shape)
        except (ShapeError, InputError) as err:
            raise err.with_loc(loc)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read mask file '{sparsity.path}': {err}", loc) from None


def bind_optimizer(name: str, positional: Sequence[Any], keywords: Mapping[str, Any],
                   loc: SourceLoc | None) -> dict[str, Any]:
    """Hyper-parameters of optimizer ``name`` with torch's defaults filled in."""
    if name not in OPTIMIZERS:
        raise NameError_(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})", loc)
    hyper = bind_args(f"optimizer {name}", OPTIMIZERS[name], positional, keywords, loc)
    for key, value in hyper.items():
        if key == "nesterov":
            as_bool(f"{name}: nesterov", value, loc)
        elif key == "betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ShapeError(f"{name}: betas must be a list of two numbers", loc)
            hyper[key] = tuple(as_number(f"{name}: betas", v, loc) for v in value)
        else:
            hyper[key] = as_number(f"{name}: {key}", value, loc)
            if hyper[key] < 0:
                raise ShapeError(f"{name}: {key} must be >= 0, got {value}", loc)
    return hyper


# weights files ------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "BOOL": np.bool_}


def read_weights_file(file: Path, shown: str, loc: SourceLoc | None) -> dict[str, np.ndarray]:
    """All arrays of a .npz / .npy / .safetensors file by name (.npy: one array named after the file)."""
    if not file.exists():
        raise InputError(f"weights file '{shown}' not found", loc)
    try:
        if file.suffix == ".safetensors":
            return _read_safetensors(file)
        data = np.load(file, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return {file.stem: data}
        with data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read weights file '{shown}': {err}", loc) from None


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    raw = file.read_bytes()
    if len(raw) < 8:
        raise ValueError("file too short for a safetensors header")
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    body = raw[8 + header_len:]
    arrays = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor '{key}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        flat = np.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        arrays[key] = flat.reshape(info["shape"]).copy()
    return arrays
