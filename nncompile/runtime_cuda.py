"""CudaCompiledModel: a module compiled for ``target="cuda"``, its weights in one device block, one device arena.

    m = nnc.compile(graph, target="cuda")       # or nnc.load("build/") of a --target cuda build
    y = m(x_cuda)          # torch CUDA tensors in -> torch CUDA tensors out, zero-copy (data pointers)
    y = m(x_numpy)         # numpy in -> copied to the device, result copied back as numpy
    m.train_step(x, labels)    # forward + backward + sgd/adam update, all on the device

The generated library is plain C (no Python headers) and is called through ctypes with device
pointers on torch's current stream; kernels run asynchronously with respect to the host, in stream
order (a module whose graph can meet a bad index synchronizes once at the end to report it).

Compiling needs nvcc only; running needs an NVIDIA GPU that torch can see. Without one, building
the model still works (the build directory is complete), and the first call that needs the device
raises ``CudaUnavailableError`` (an ``UnsupportedError`` and a ``RuntimeError``) saying so.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from nncompile.errors import BuildError, InputError, UnsupportedError
from nncompile.ir.types import TensorType, numpy_dtype

TORCH_DTYPES = {"f32": "float32", "f64": "float64", "i64": "int64", "i32": "int32", "bool": "bool"}


class CudaUnavailableError(UnsupportedError, RuntimeError):
    """The CUDA target was asked to run where no usable GPU is."""


def require_gpu(what: str = "running a model compiled for target 'cuda'"):
    """torch, when it sees a CUDA GPU; else a CudaUnavailableError naming the problem."""
    try:
        import torch
    except ImportError:
        raise CudaUnavailableError(f"{what} needs PyTorch with CUDA support (torch is not installed)") from None
    if not torch.cuda.is_available():
        reason = "this PyTorch build has no CUDA support" if torch.version.cuda is None else \
            "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        raise CudaUnavailableError(f"{what} needs an NVIDIA GPU: {reason}. The build directory is complete; "
                                   "load it with nnc.load(DIR) on a machine with a GPU")
    return torch


def _torch_dtype(torch, dtype: str):
    return getattr(torch, TORCH_DTYPES[dtype])


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


def _type_from_json(item: dict) -> TensorType:
    return TensorType(tuple(item["shape"]), item["dtype"])


class _Library:
    """The generated shared library, with its C signatures."""

    def __init__(self, path: Path):
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as err:
            raise BuildError(f"cannot load the CUDA module '{path}': {err}") from None
        P, L, F, I = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int
        lib = self.lib
        lib.nnc_forward.argtypes = [ctypes.POINTER(P), ctypes.POINTER(P), P, P, P]
        lib.nnc_forward.restype = I
        lib.nnc_error_message.argtypes = [I]
        lib.nnc_error_message.restype = ctypes.c_char_p
        lib.nnc_arena_bytes.restype = L
        lib.nnc_param_bytes.restype = L
        lib.nnc_sgd_step.argtypes = [P, P, P, L, F, F, F, F, I, I, P]
        lib.nnc_adam_step.argtypes = [P, P, P, P, L, F, F, F, F, F, I, L, P]
        lib.nnc_accumulate.argtypes = [P, P, L, I, P]
        lib.nnc_divide.argtypes = [P, P, L, F, P]
        for fn in (lib.nnc_sgd_step, lib.nnc_adam_step, lib.nnc_accumulate, lib.nnc_divide):
            fn.restype = I

    def check(self, status: int, what: str) -> None:
        if status == 0:
            return
        message = self.lib.nnc_error_message(status).decode()
        if status > 0:
            raise InputError(message)
        raise RuntimeError(f"{what}: CUDA error: {message}")

    def forward(self, inputs: list[int], outputs: list[int], params: int, arena: int, stream: int) -> None:
        ins = (ctypes.c_void_p * max(len(inputs), 1))(*inputs)
        outs = (ctypes.c_void_p * max(len(outputs), 1))(*outputs)
        self.check(self.lib.nnc_forward(ins, outs, params, arena, stream), "forward")


class CudaCompiledModel:
    """A graph compiled for the GPU. Made by ``nnc.compile(..., target="cuda")`` or ``nnc.load``."""

    def __init__(self, module_path: Path, manifest: dict, weights: dict[str, Any] | None = None,
                 plan: dict | None = None, train_module_path: Path | None = None):
        self.manifest = manifest
        self.module_path = Path(module_path)
        self.train_module_path = Path(train_module_path) if train_module_path else (
            self.module_path.parent / manifest["train"]["module_file"] if "train" in manifest else None)
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.input_types = [_type_from_json(i) for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.output_types = [_type_from_json(o) for o in manifest["outputs"]]
        self.plan = plan if plan is not None else manifest.get("plan", {})
        self._lock = threading.Lock()
        self._param_types = {p["name"]: _type_from_json(p) for p in manifest["params"]}
        self._offsets = {p["name"]: p["offset"] for p in manifest["params"]}
        self._by_source = {p["source"]: p["name"] for p in manifest["params"] if p.get("source")}
        # weights wait on the host until the device is first needed
        self._staged = {name: np.zeros(t.shape, numpy_dtype(t.dtype)) for name, t in self._param_types.items()}
        self._dev = None
        self._trainer = CudaTrainer(self, manifest["train"]) if "train" in manifest else None
        if weights is not None:
            self.load_weights(weights)

    # device state
    def _device(self):
        if self._dev is None:
            torch = require_gpu()
            lib = _Library(self.module_path)
            device = torch.device("cuda", torch.cuda.current_device())
            block = torch.zeros(max(self.manifest["param_bytes"], 1), dtype=torch.uint8, device=device)
            arena = torch.zeros(max(self.manifest["device_arena_bytes"], 1), dtype=torch.uint8, device=device)
            views = {}
            for name, t in self._param_types.items():
                off = self._offsets[name]
                views[name] = block[off:off + t.nbytes].view(_torch_dtype(torch, t.dtype)).view(t.shape)
                views[name].copy_(torch.from_numpy(self._staged[name]))
            self._dev = {"torch": torch, "lib": lib, "device": device, "block": block, "arena": arena, "views": views}
            self._staged = None
        return self._dev

    @property
    def device(self):
        return self._device()["device"]

    # weights
    def parameters(self) -> dict[str, Any]:
        """name -> torch CUDA tensor view of the module's weights (writes take effect on the next call)."""
        return dict(self._device()["views"])

    def load_weights(self, weights: dict[str, Any] | str | Path) -> None:
        if isinstance(weights, (str, Path)):
            with np.load(weights) as data:
                weights = {k: data[k] for k in data.files}
        weights = {self._by_source.get(k, k) if k not in self._param_types else k: v for k, v in weights.items()}
        unknown = set(weights) - set(self._param_types)
        if unknown:
            raise InputError(f"unknown parameter '{sorted(unknown)[0]}' (the model has: "
                             f"{', '.join(list(self._param_types)[:6])}, ...)")
        for name, value in weights.items():
            shape = tuple(value.shape)
            if shape != self._param_types[name].shape:
                raise InputError(f"parameter '{name}' has shape {list(shape)}, expected {list(self._param_types[name].shape)}")
            if self._dev is None:
                array = value.detach().cpu().numpy() if _is_torch(value) else np.asarray(value)
                self._staged[name][...] = array
            else:
                torch = self._dev["torch"]
                src = value if _is_torch(value) else torch.from_numpy(np.ascontiguousarray(value))
                self._dev["views"][name].copy_(src)

    def state_dict(self) -> dict[str, Any]:
        import torch

        names = {v: k for k, v in self._by_source.items()}
        if self._dev is None:
            return {names.get(k, k): torch.from_numpy(v.copy()) for k, v in self._staged.items()}
        return {names.get(k, k): v.detach().cpu().clone() for k, v in self._dev["views"].items()}

    def save_weights(self, path: str | Path) -> None:
        np.savez(path, **{k: v.numpy() for k, v in self._host_named().items()})

    def _host_named(self) -> dict[str, Any]:
        import torch

        if self._dev is None:
            return {k: torch.from_numpy(v.copy()) for k, v in self._staged.items()}
        return {k: v.detach().cpu().clone() for k, v in self._dev["views"].items()}

    def set_threads(self, n: int) -> None:
        """CPU threads do not apply to the GPU module (kept for interface parity)."""
        if n < 1:
            raise InputError(f"thread count must be >= 1, got {n}")

    def get_threads(self) -> int:
        return 1

    # running
    @staticmethod
    def _check(values: list, names: list[str], types: list[TensorType], what: str = "input") -> None:
        """Shape and dtype of every value (numpy or torch), before any device work."""
        for name, t, value in zip(names, types, values):
            if _is_torch(value):
                dtype = str(value.dtype).replace("torch.", "")
            else:
                value = np.asarray(value)
                dtype = str(value.dtype)
            if tuple(value.shape) != t.shape:
                raise InputError(f"{what} '{name}' has shape {list(value.shape)}, expected {t}")
            if dtype != TORCH_DTYPES[t.dtype]:
                raise InputError(f"{what} '{name}' has dtype {dtype}, expected {t}")

    def _to_device(self, values: list, names: list[str], types: list[TensorType], what: str = "input"):
        """Device tensors for ``values`` (CUDA tensors of the right type and layout are used as they are)."""
        self._check(values, names, types, what)
        dev = self._device()
        torch = dev["torch"]
        found = []
        for value in values:
            tensor = value.detach() if _is_torch(value) else torch.from_numpy(np.ascontiguousarray(np.asarray(value)))
            if tensor.device != dev["device"] or not tensor.is_contiguous():
                tensor = tensor.to(dev["device"]).contiguous()
            found.append(tensor)
        return found

    def _bind(self, args: tuple, kwargs: dict) -> list:
        from nncompile.runtime import bind_arguments

        return bind_arguments(self.input_names, args, kwargs)

    def __call__(self, *args, **kwargs):
        values = self._bind(args, dict(kwargs))
        self._check(values, self.input_names, self.input_types)
        dev = self._device()
        torch = dev["torch"]
        torch_in = [v for v in values if _is_torch(v)]
        tensors = self._to_device(values, self.input_names, self.input_types)
        outputs = [torch.empty(t.shape, dtype=_torch_dtype(torch, t.dtype), device=dev["device"]) for t in self.output_types]
        stream = torch.cuda.current_stream(dev["device"]).cuda_stream
        with self._lock:
            dev["lib"].forward([x.data_ptr() for x in tensors], [o.data_ptr() for o in outputs], dev["block"].data_ptr(),
                               dev["arena"].data_ptr(), stream)
        if not torch_in:
            outputs = [o.cpu().numpy() for o in outputs]
        elif all(v.device.type == "cpu" for v in torch_in):
            outputs = [o.cpu() for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    # training
    def train_step(self, *args, accumulate: int = 1, **kwargs) -> float:
        if self._trainer is None:
            raise InputError("this model was compiled for inference; compile with train=True (or --train)")
        return self._trainer.step(args, kwargs, accumulate)

    @property
    def optimizer_state(self) -> dict[str, Any]:
        return {} if self._trainer is None else self._trainer.state()

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {t}" for n, t in zip(self.input_names, self.input_types))
        outs = ", ".join(f"{n}: {t}" for n, t in zip(self.output_names, self.output_types))
        return f"CudaCompiledModel({ins}) -> ({outs}) [arena {self.manifest['arena_bytes']} B, cuda]"


class CudaTrainer:
    """The training step on the device: the generated forward+backward module, then an optimizer kernel
    over the trainable part of the parameter block (``native/cuda/nnc_optim.cuh``)."""

    def __init__(self, model: CudaCompiledModel, spec: dict):
        from nncompile.trainer import optimizer_hyper

        self.model = model
        self.spec = spec
        self.step_input = spec.get("step_input")
        self.inputs = [(i["name"], _type_from_json(i)) for i in spec["inputs"] if i["name"] != self.step_input]
        self.optimizer = spec["optimizer"]["name"]
        self.hyper = optimizer_hyper(self.optimizer, spec["optimizer"]["hyper"])
        self.count = spec["trainable_bytes"] // 4
        self.updates = 0
        self.micro_steps = 0
        self._dev = None

    def _device(self):
        if self._dev is None:
            dev = self.model._device()
            torch = dev["torch"]
            lib = _Library(self.model.train_module_path)
            param_bytes = max(self.model.manifest["param_bytes"], 1)
            zeros = lambda n: torch.zeros(n, dtype=torch.uint8, device=dev["device"])  # noqa: E731
            grad_block = zeros(param_bytes)
            offsets = self.model._offsets
            by_grad = {value: name for name, value in self.spec["grads"].items()}
            by_update = {value: name for name, value in self.spec["updates"].items()}
            loss, outputs = None, []
            for out in self.spec["outputs"]:
                t = _type_from_json(out)
                if out["name"] == self.spec["loss"]:
                    loss = torch.zeros(t.shape, dtype=_torch_dtype(torch, t.dtype), device=dev["device"])
                    outputs.append(loss)
                elif out["name"] in by_grad:
                    start = offsets[by_grad[out["name"]]]
                    outputs.append(grad_block[start:start + t.nbytes].view(_torch_dtype(torch, t.dtype)).view(t.shape))
                elif out["name"] in by_update:
                    outputs.append(dev["views"][by_update[out["name"]]])
                else:
                    raise InputError(f"training module output '{out['name']}' has no destination")
            state = {}
            if self.optimizer == "sgd" and self.hyper["momentum"] != 0:
                state["momentum"] = zeros(param_bytes)
            elif self.optimizer in ("adam", "adamw"):
                state["exp_avg"], state["exp_avg_sq"] = zeros(param_bytes), zeros(param_bytes)
            self._dev = {"lib": lib, "arena": zeros(max(self.spec["device_arena_bytes"], 1)), "grad": grad_block,
                         "loss": loss, "outputs": outputs, "state": state, "accum": None}
        return self._dev

    def grads(self) -> dict[str, Any]:
        d = self._device()
        names = [o["name"] for o in self.spec["outputs"]]
        return {param: d["outputs"][names.index(value)] for param, value in self.spec["grads"].items()}

    def state(self) -> dict[str, Any]:
        d = self._device()
        torch = self.model._device()["torch"]
        found = {k: v[: self.count * 4].view(torch.float32) for k, v in d["state"].items()}
        found["step"] = np.array(self.updates)
        return found

    def step(self, args: tuple, kwargs: dict, accumulate: int) -> float:
        if accumulate < 1:
            raise InputError(f"accumulate must be >= 1, got {accumulate}")
        names = [n for n, _ in self.inputs]
        if len(args) + len(kwargs) != len(names):
            raise InputError(f"train_step expects {len(names)} inputs ({', '.join(names)}), got {len(args) + len(kwargs)}")
        kwargs = dict(kwargs)
        values = list(args) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
        if kwargs or len(values) != len(names):
            raise InputError(f"train_step: unexpected or missing inputs (expected {', '.join(names)})")
        dev = self.model._device()
        d = self._device()
        torch = dev["torch"]
        # micro-batches: the inputs as given, or split along the first axis
        types = []
        for (name, t), value in zip(self.inputs, values):
            shape = tuple(value.shape)
            if shape == t.shape or accumulate == 1:
                types.append(t)
            else:
                types.append(TensorType((t.shape[0] * accumulate,) + t.shape[1:], t.dtype))
        tensors = self.model._to_device(values, names, types)
        micro = [[x if tuple(x.shape) == t.shape else x.chunk(accumulate)[k].contiguous() for x, (_, t) in zip(tensors, self.inputs)]
                 for k in range(accumulate)]
        stream = torch.cuda.current_stream(dev["device"]).cuda_stream
        lib = d["lib"]
        grad_ptr = d["grad"].data_ptr()
        losses = []
        with self.model._lock:
            for k, arrays in enumerate(micro):
                if self.step_input is not None:
                    arrays = arrays + [torch.tensor(self.micro_steps, dtype=torch.int64, device=dev["device"])]
                lib.forward([x.data_ptr() for x in arrays], [o.data_ptr() for o in d["outputs"]], dev["block"].data_ptr(),
                            d["arena"].data_ptr(), stream)
                self.micro_steps += 1
                losses.append(float(d["loss"]))
                if accumulate > 1:
                    if d["accum"] is None:
                        d["accum"] = torch.zeros(max(self.count, 1), dtype=torch.float32, device=dev["device"])
                    lib.check(lib.lib.nnc_accumulate(d["accum"].data_ptr(), grad_ptr, self.count, int(k == 0), stream),
                              "gradient accumulation")
            if accumulate > 1:
                lib.check(lib.lib.nnc_divide(grad_ptr, d["accum"].data_ptr(), self.count, float(accumulate), stream),
                          "gradient accumulation")
            self._update(lib, dev, d, stream)
        return float(np.mean(losses))

    def _update(self, lib: _Library, dev: dict, d: dict, stream: int) -> None:
        h = self.hyper
        first = self.updates == 0
        self.updates += 1
        params, grads = dev["block"].data_ptr(), d["grad"].data_ptr()
        if self.optimizer == "sgd":
            buf = d["state"].get("momentum", d["grad"]).data_ptr()
            status = lib.lib.nnc_sgd_step(params, grads, buf, self.count, h["lr"], h["momentum"], h["dampening"],
                                          h["weight_decay"], int(bool(h["nesterov"])), int(first), stream)
        else:
            status = lib.lib.nnc_adam_step(params, grads, d["state"]["exp_avg"].data_ptr(), d["state"]["exp_avg_sq"].data_ptr(),
                                           self.count, h["lr"], h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"],
                                           int(self.optimizer == "adamw"), self.updates, stream)
        lib.check(status, "optimizer step")


def load_cuda(root: Path, manifest: dict) -> CudaCompiledModel:
    """``nnc.load`` of a ``--target cuda`` build directory."""
    module_path = root / manifest["module_file"]
    if not module_path.exists():
        raise InputError(f"compiled module '{module_path}' is missing")
    model = CudaCompiledModel(module_path, manifest)
    weights_path = root / manifest["weights_file"]
    if weights_path.exists():
        model.load_weights(weights_path)
    return model
