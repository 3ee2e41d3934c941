"""CompiledModel: a loaded native module plus its weights, arena and manifest.

    m = nnc.load("build/")
    y = m(x)                    # numpy in -> numpy out; torch CPU tensors in -> torch tensors out
    m.parameters()["fc1.weight"]   # a view of the module's weights: edits are seen by the next call
    m.set_threads(2)

The arena (every intermediate) and the parameter block are allocated once, 64-byte aligned. Calls
are serialized by a lock (they share the arena); the GIL is released while the kernels run. Inputs
are checked (count, shape, dtype, contiguity) before any pointer is used; a mismatch is a ValueError
naming the input and the expected type.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from nncompile.codegen.build import load_module
from nncompile.errors import InputError
from nncompile.ir.types import TensorType, numpy_dtype

MANIFEST = "model.json"
THREADS_ENV = "NNCOMPILE_NUM_THREADS"


def aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
    """A zeroed uint8 array of ``nbytes`` whose data pointer is ``alignment``-aligned."""
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes]


def _type_from_json(item: dict) -> TensorType:
    return TensorType(tuple(item["shape"]), item["dtype"])


class CompiledModel:
    """A compiled graph, ready to run. Made by ``nnc.compile`` or ``nnc.load``."""

    def __init__(self, module_path: Path, manifest: dict, weights: dict[str, np.ndarray] | None = None,
                 plan: dict | None = None, train_module_path: Path | None = None):
        self.manifest = manifest
        self.module_path = Path(module_path)
        self._module = load_module(self.module_path, manifest["module_name"])
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.input_types = [_type_from_json(i) for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.output_types = [_type_from_json(o) for o in manifest["outputs"]]
        # what __call__'s fast path compares against, computed once
        self._in_sig = [(t.shape, numpy_dtype(t.dtype)) for t in self.input_types]
        self._out_sig = [(t.shape, numpy_dtype(t.dtype)) for t in self.output_types]
        self.plan = plan if plan is not None else manifest.get("plan", {})
        self._lock = threading.Lock()
        self._arena = aligned_empty(max(manifest["arena_bytes"], 1))
        self._param_block = aligned_empty(max(manifest["param_bytes"], 1))
        self._params: dict[str, np.ndarray] = {}
        for p in manifest["params"]:
            t = _type_from_json(p)
            view = self._param_block[p["offset"]:p["offset"] + t.nbytes].view(numpy_dtype(t.dtype)).reshape(t.shape)
            self._params[p["name"]] = view
        # sparse weights whose values the module keeps packed after the parameters: a flag word says
        # whether the packed copy is current; clearing it makes the next call pack again
        packed = manifest.get("packed_values")
        self._packed_flag = None
        self._packed_names: set[str] = set()
        if packed:
            self._packed_flag = self._param_block[packed["flag_offset"]:packed["flag_offset"] + 4].view(np.int32)
            self._packed_names = {w["weight"] for w in packed["weights"]}
        # torch state_dict name -> IR name, for models imported from torch
        self._by_source = {p["source"]: p["name"] for p in manifest["params"] if p.get("source")}
        if weights is not None:
            self.load_weights(weights)
        self._trainer = None
        if "train" in manifest:
            from nncompile.trainer import Trainer

            path = train_module_path or self.module_path.parent / manifest["train"]["module_file"]
            self._trainer = Trainer(self, manifest["train"], path)
        threads = os.environ.get(THREADS_ENV)
        if threads:
            self.set_threads(int(threads))

    # weights
    def parameters(self) -> dict[str, np.ndarray]:
        """name -> array view of the module's weights (writes take effect on the next call). The views
        of sparse weights the module keeps packed are read-only: change those with ``load_weights``."""
        found = dict(self._params)
        for name in self._packed_names:
            view = found[name].view()
            view.flags.writeable = False
            found[name] = view
        return found

    def weights_changed(self) -> None:
        """Tell the module its weights changed behind its back (``load_weights`` and ``train_step`` do
        this themselves): sparse weights' packed values are refreshed on the next call."""
        if self._packed_flag is not None:
            self._packed_flag[0] = 0

    def load_weights(self, weights: dict[str, Any] | str | Path) -> None:
        """Copy weights in by name, from a dict of arrays/tensors or an .npz file; shapes are checked."""
        if isinstance(weights, (str, Path)):
            with np.load(weights) as data:
                weights = {k: data[k] for k in data.files}
        weights = {self._by_source.get(k, k) if k not in self._params else k: v for k, v in weights.items()}
        unknown = set(weights) - set(self._params)
        if unknown:
            raise InputError(f"unknown parameter '{sorted(unknown)[0]}' (the model has: {', '.join(list(self._params)[:6])}, ...)")
        for name, value in weights.items():
            array = _to_numpy(value)
            target = self._params[name]
            if array.shape != target.shape:
                raise InputError(f"parameter '{name}' has shape {list(array.shape)}, expected {list(target.shape)}")
            target[...] = array
        self.weights_changed()

    def state_dict(self) -> dict[str, Any]:
        """The weights as torch tensors (copies) under the torch module's names where the model came
        from torch (``module.load_state_dict(m.state_dict())`` copies trained weights back)."""
        import torch

        names = {v: k for k, v in self._by_source.items()}
        return {names.get(k, k): torch.from_numpy(v.copy()) for k, v in self._params.items()}

    def save_weights(self, path: str | Path) -> None:
        np.savez(path, **self._params)

    # threads
    def set_threads(self, n: int) -> None:
        if n < 1:
            raise InputError(f"thread count must be >= 1, got {n}")
        self._module.set_threads(int(n))
        if self._trainer is not None:
            self._trainer.module.set_threads(int(n))

    # training
    def train_step(self, *args, accumulate: int = 1, **kwargs) -> float:
        """Forward + backward + optimizer update, in place; returns the loss (the mean over the
        ``accumulate`` micro-batches the inputs are split into along their first axis)."""
        if self._trainer is None:
            raise InputError("this model was compiled for inference; compile with train=True (or --train)")
        return self._trainer.step(args, kwargs, accumulate)

    @property
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state blocks (momentum buffer, or Adam's moments) and the step count."""
        if self._trainer is None:
            return {}
        return self._trainer.state()

    def get_threads(self) -> int:
        return int(self._module.get_threads())

    # running
    def _bind(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        values = bind_arguments(self.input_names, args, kwargs)
        arrays = []
        for name, t, value in zip(self.input_names, self.input_types, values):
            array = _to_numpy(value)
            if array.shape != t.shape:
                raise InputError(f"input '{name}' has shape {list(array.shape)}, expected {t}")
            if array.dtype != numpy_dtype(t.dtype):
                raise InputError(f"input '{name}' has dtype {array.dtype}, expected {t}")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def _fast_bind(self, args: tuple) -> list[np.ndarray] | None:
        """The inputs as they are when every one is a C-contiguous ndarray of exactly the expected shape
        and dtype (the common case, a few hundred ns); None sends the call through ``_bind``, which
        converts what it can and raises the errors."""
        if len(args) != len(self._in_sig):
            return None
        for value, (shape, dtype) in zip(args, self._in_sig):
            if type(value) is not np.ndarray or value.shape != shape or value.dtype != dtype \
                    or not value.flags.c_contiguous:
                return None
        return list(args)

    def __call__(self, *args, **kwargs):
        arrays = None if kwargs else self._fast_bind(args)
        torch_in = False
        if arrays is None:
            torch_in = any(_is_torch(v) for v in (*args, *kwargs.values()))
            arrays = self._bind(args, dict(kwargs))
        outputs = [np.empty(shape, dtype) for shape, dtype in self._out_sig]
        with self._lock:
            self._module.forward(arrays, outputs, self._param_block, self._arena)
        if torch_in:
            import torch

            outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {t}" for n, t in zip(self.input_names, self.input_types))
        outs = ", ".join(f"{n}: {t}" for n, t in zip(self.output_names, self.output_types))
        return f"CompiledModel({ins}) -> ({outs}) [arena {self.manifest['arena_bytes']} B]"


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


def bind_arguments(names: list[str], args: tuple, kwargs: dict) -> list:
    """Positional then keyword arguments, in input order; a clear InputError for a wrong count or name."""
    if len(args) + len(kwargs) != len(names):
        raise InputError(f"expected {len(names)} inputs ({', '.join(names)}), got {len(args) + len(kwargs)}")
    values = list(args)
    kwargs = dict(kwargs)
    for name in names[len(args):]:
        if name not in kwargs:
            raise InputError(f"missing input '{name}'")
        values.append(kwargs.pop(name))
    if kwargs:
        raise InputError(f"unexpected input '{sorted(kwargs)[0]}'")
    return values


def _to_numpy(value) -> np.ndarray:
    if _is_torch(value):
        if value.device.type != "cpu":
            raise InputError(f"expected a CPU tensor, got one on {value.device}")
        return value.detach().numpy()
    return np.asarray(value)


def load(path: str | Path) -> CompiledModel:
    """Load a model compiled with ``nncompile MODEL -o DIR`` or ``nnc.compile(..., out_dir=DIR)``."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"'{root}' holds no compiled model ({MANIFEST} not found)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("target") == "cuda":
        from nncompile.runtime_cuda import load_cuda

        return load_cuda(root, manifest)
    weights_path = root / manifest["weights_file"]
    module_path = root / manifest["module_file"]
    if not module_path.exists():
        raise InputError(f"compiled module '{module_path}' is missing")
    model = CompiledModel(module_path, manifest)
    if weights_path.exists():
        model.load_weights(weights_path)
    return model
