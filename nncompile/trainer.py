"""The training step of a CompiledModel: the generated forward+backward module plus an optimizer.

The training module writes the loss, every parameter's gradient (into a gradient block laid out like
the parameter block) and the new batch-norm running statistics (straight into the buffers). Then one
vectorized optimizer sweep updates all trainable parameters in place (``native/nnc_optim.h``,
torch.optim semantics). Gradient accumulation runs several micro-batches before one update.
"""
from __future__ import annotations

import numpy as np

from nncompile.codegen.build import load_module
from nncompile.errors import InputError
from nncompile.ir.types import TensorType, numpy_dtype

DEFAULTS = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
}


def optimizer_hyper(name: str, hyper: dict) -> dict:
    if name not in DEFAULTS:
        raise InputError(f"unknown optimizer '{name}' (known: {', '.join(DEFAULTS)})")
    unknown = set(hyper) - set(DEFAULTS[name])
    if unknown:
        raise InputError(f"{name}: unknown hyper-parameter '{sorted(unknown)[0]}' (known: {', '.join(DEFAULTS[name])})")
    merged = {**DEFAULTS[name], **hyper}
    if merged["lr"] <= 0:
        raise InputError(f"{name}: lr must be > 0, got {merged['lr']}")
    if name == "sgd" and merged["nesterov"] and (merged["momentum"] <= 0 or merged["dampening"] != 0):
        raise InputError("sgd: nesterov needs momentum > 0 and dampening = 0")
    if name != "sgd":
        merged["betas"] = tuple(float(b) for b in merged["betas"])
        if len(merged["betas"]) != 2 or not all(0 <= b < 1 for b in merged["betas"]):
            raise InputError(f"{name}: betas must be two numbers in [0, 1), got {merged['betas']}")
    return merged


class Trainer:
    def __init__(self, model, spec: dict, module_path):
        from nncompile.runtime import aligned_empty

        self.model = model
        self.spec = spec
        self.module = load_module(module_path, spec["module_name"])
        self.arena = aligned_empty(max(spec["arena_bytes"], 1))
        self.step_input = spec.get("step_input")
        self.inputs = [(i["name"], TensorType(tuple(i["shape"]), i["dtype"])) for i in spec["inputs"]
                       if i["name"] != self.step_input]
        self.optimizer = spec["optimizer"]["name"]
        self.hyper = optimizer_hyper(self.optimizer, spec["optimizer"]["hyper"])
        param_bytes = model.manifest["param_bytes"]
        self.grad_block = aligned_empty(max(param_bytes, 1))
        self.count = spec["trainable_bytes"] // 4
        offsets = {p["name"]: p["offset"] for p in model.manifest["params"]}
        by_grad = {value: name for name, value in spec["grads"].items()}
        by_update = {value: name for name, value in spec["updates"].items()}
        self.loss = np.zeros((), np.float32)
        self.outputs = []
        for out in spec["outputs"]:
            t = TensorType(tuple(out["shape"]), out["dtype"])
            if out["name"] == spec["loss"]:
                self.loss = np.zeros(t.shape, numpy_dtype(t.dtype))
                self.outputs.append(self.loss)
            elif out["name"] in by_grad:
                start = offsets[by_grad[out["name"]]]
                self.outputs.append(self.grad_block[start:start + t.nbytes].view(numpy_dtype(t.dtype)).reshape(t.shape))
            elif out["name"] in by_update:
                self.outputs.append(model._params[by_update[out["name"]]])
            else:
                raise InputError(f"training module output '{out['name']}' has no destination")
        self.accum = None
        self.state_blocks = {}
        if self.optimizer == "sgd" and self.hyper["momentum"] != 0:
            self.state_blocks["momentum"] = aligned_empty(max(param_bytes, 1))
        elif self.optimizer in ("adam", "adamw"):
            self.state_blocks["exp_avg"] = aligned_empty(max(param_bytes, 1))
            self.state_blocks["exp_avg_sq"] = aligned_empty(max(param_bytes, 1))
        self.updates = 0          # optimizer steps taken
        self.micro_steps = 0      # forward+backward runs (the dropout offset)

    def grads(self) -> dict[str, np.ndarray]:
        """name -> gradient of the last step (views into the gradient block)."""
        found = {}
        for (value_name, out) in zip([o["name"] for o in self.spec["outputs"]], self.outputs):
            for param, grad_value in self.spec["grads"].items():
                if grad_value == value_name:
                    found[param] = out
        return found

    def state(self) -> dict[str, np.ndarray]:
        found = {k: v[: self.count * 4].view(np.float32) for k, v in self.state_blocks.items()}
        found["step"] = np.array(self.updates)
        return found

    def _split(self, args: tuple, kwargs: dict, accumulate: int) -> list[list[np.ndarray]]:
        from nncompile.runtime import _to_numpy, bind_arguments

        try:
            values = bind_arguments([n for n, _ in self.inputs], args, kwargs)
        except InputError as err:
            raise InputError(f"train_step: {err.message}") from None
        micro = [[] for _ in range(accumulate)]
        for (name, t), value in zip(self.inputs, values):
            array = _to_numpy(value)
            if array.dtype != numpy_dtype(t.dtype):
                raise InputError(f"input '{name}' has dtype {array.dtype}, expected {t}")
            if array.shape == t.shape:
                parts = [array] * accumulate
            elif accumulate > 1 and t.rank and array.shape == (t.shape[0] * accumulate,) + t.shape[1:]:
                parts = np.split(array, accumulate)
            else:
                want = f"{t}" if accumulate == 1 else f"{t} or [{t.shape[0] * accumulate}, ...] for accumulate={accumulate}"
                raise InputError(f"input '{name}' has shape {list(array.shape)}, expected {want}")
            for k in range(accumulate):
                micro[k].append(np.ascontiguousarray(parts[k]))
        return micro

    def step(self, args: tuple, kwargs: dict, accumulate: int) -> float:
        if accumulate < 1:
            raise InputError(f"accumulate must be >= 1, got {accumulate}")
        micro = self._split(args, dict(kwargs), accumulate)
        losses = []
        grads_f32 = self.grad_block[: self.count * 4].view(np.float32)
        with self.model._lock:
            for k, arrays in enumerate(micro):
                if self.step_input is not None:
                    arrays = arrays + [np.array(self.micro_steps, dtype=np.int64)]
                self.module.forward(arrays, self.outputs, self.model._param_block, self.arena)
                self.micro_steps += 1
                losses.append(float(self.loss))
                if accumulate > 1:
                    if self.accum is None:
                        self.accum = np.zeros_like(grads_f32)
                    if k == 0:
                        self.accum[...] = grads_f32
                    else:
                        self.accum += grads_f32
            if accumulate > 1:
                grads_f32[...] = self.accum / accumulate
            self._update()
            self.model.weights_changed()
        return float(np.mean(losses))

    def _update(self) -> None:
        h = self.hyper
        params = self.model._param_block
        first = self.updates == 0
        self.updates += 1
        if self.optimizer == "sgd":
            buf = self.state_blocks.get("momentum", self.grad_block)
            self.module.sgd_step(params, self.grad_block, buf, self.count, h["lr"], h["momentum"], h["dampening"],
                                 h["weight_decay"], bool(h["nesterov"]), first)
        else:
            self.module.adam_step(params, self.grad_block, self.state_blocks["exp_avg"], self.state_blocks["exp_avg_sq"],
                                  self.count, h["lr"], h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"],
                                  self.optimizer == "adamw", self.updates)
