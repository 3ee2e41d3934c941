"""Read Galvatron's profile files as they are and turn them into a ``ModelCost``.

A profile directory holds (names as in Galvatron's repository):

* ``computation_profiling_bf16_hidden{H}_head{A}_seqlen{S}.json`` or ``..._{model}_all.json``:
  ``layertype_0`` (forward ms per sample of one layer), or ``layertype_0_bsz{b}_seq{S}`` and
  ``layertype_other_bsz{b}_seq{S}`` points per batch size; ``layernum[N]_bsz{b}[_seq{S}]`` whole
  model forward times (used to derive the embedding/head time when no ``layertype_other`` exists).
* ``memory_profiling_bf16_*.json``: ``layertype_0`` (or ``layertype_0_sp`` keyed by sequence length)
  with ``parameter_size`` and ``tp_activation_per_bsz_dict``; ``other_memory_pp_off``,
  ``other_memory_pp_on_first`` and ``other_memory_pp_on_last`` (plain numbers, or per TP degree).
* a model config (``gpt-1.5b.json``: ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``...).

    model = load_galvatron_profile("../shared/datasets/galvatron/gpt", "gpt-6.7b")
    model.num_layers, model.layers[0].param_mb      # (32, 768.86)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nncompile.errors import InputError
from nncompile.parallel.model import LayerCost, ModelCost, VocabCost

# Shapes of models whose config is not shipped beside their profiles (Llama 2 7B: Touvron et al. 2023).
BUILTIN_CONFIGS = {
    "llama2-7b": {"n_layer": 32, "n_embd": 4096, "n_head": 32, "vocab_size": 32000, "n_positions": 2048},
    "llama-7b": {"n_layer": 32, "n_embd": 4096, "n_head": 32, "vocab_size": 32000, "n_positions": 2048},
}

_CONFIG_KEYS = {
    "n_layer": ("n_layer", "num_hidden_layers", "num_layers"),
    "n_embd": ("n_embd", "hidden_size"),
    "n_head": ("n_head", "num_attention_heads"),
    "vocab_size": ("vocab_size",),
    "n_positions": ("n_positions", "max_position_embeddings", "seq_length"),
}


def read_json(path: Path, what: str):
    """Parse a JSON file; a missing or malformed file is an ``InputError`` that names it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: {what} is not valid JSON: {err.msg}") from None


def load_model_config(spec: str, profile_dir: Path | None = None) -> tuple[str, dict]:
    """A model config from a file path, ``NAME`` (``NAME.json`` in the profile folder) or a built-in name."""
    path = Path(spec)
    if not path.is_file() and profile_dir is not None and (Path(profile_dir) / f"{spec}.json").is_file():
        path = Path(profile_dir) / f"{spec}.json"
    if path.is_file():
        raw = read_json(path, "model config")
        name = path.stem
    elif spec in BUILTIN_CONFIGS:
        raw, name = BUILTIN_CONFIGS[spec], spec
    else:
        known = ", ".join(sorted(BUILTIN_CONFIGS))
        raise InputError(f"model config '{spec}': no such file, and not a built-in name ({known})")
    if not isinstance(raw, dict):
        raise InputError(f"model config {spec}: expected a JSON object")
    config = {}
    for key, aliases in _CONFIG_KEYS.items():
        for alias in aliases:
            if alias in raw:
                config[key] = int(raw[alias])
                break
    missing = [k for k in ("n_layer", "n_embd", "n_positions") if k not in config]
    if missing:
        raise InputError(f"model config {spec}: missing {', '.join(missing)}")
    return name, config


def _layer_memory_entry(memory: dict, seq: int, path: Path) -> dict:
    for key in ("layertype_0", "layertype_0_sp"):
        if key in memory:
            entry = memory[key]
            if "parameter_size" not in entry:
                entry = entry.get(str(seq))
                if entry is None:
                    raise InputError(f"{path}: {key} has no figures for sequence length {seq}")
            return entry
    raise InputError(f"{path}: no layertype_0 entry (not a Galvatron memory profile?)")


def _other_memory(memory: dict, where: str, seq: int, path: Path) -> tuple[dict, dict]:
    for key in (f"other_memory_{where}", f"other_memory_{where}_sp"):
        if key in memory:
            entry = memory[key]
            if "model_states" not in entry:
                entry = entry.get(str(seq))
                if entry is None:
                    raise InputError(f"{path}: {key} has no figures for sequence length {seq}")
            states, act = entry["model_states"], entry["activation"]
            states = states if isinstance(states, dict) else {1: states}
            act = act if isinstance(act, dict) else {1: act}
            return {int(k): float(v) for k, v in states.items()}, {int(k): float(v) for k, v in act.items()}
    raise InputError(f"{path}: no other_memory_{where} entry")


_POINT = re.compile(r"layertype_(0|other)_bsz(\d+)(?:_seq(\d+))?$")
_WHOLE = re.compile(r"layernum\[(\d+)\]_bsz(\d+)(?:_seq(\d+))?$")


def _compute_points(compute: dict, seq: int):
    """(layer points, other points) as ((batch, ms per sample), ...) from a computation profile."""
    layer, other = {}, {}
    for key, value in compute.items():
        match = _POINT.match(key)
        if match and (match.group(3) is None or int(match.group(3)) == seq):
            (layer if match.group(1) == "0" else other)[int(match.group(2))] = float(value)
    if not layer and "layertype_0" in compute:
        layer[1] = float(compute["layertype_0"])
    if not other:
        # embedding + head time per sample = whole-model time minus the layers, per sample
        per_sample = [(float(v) - int(m.group(1)) * int(m.group(2)) * _at(layer, int(m.group(2)))) / int(m.group(2))
                      for k, v in compute.items() if (m := _WHOLE.match(k)) and layer
                      and (m.group(3) is None or int(m.group(3)) == seq)]
        if per_sample:
            other[1] = max(0.0, sum(per_sample) / len(per_sample))
    return tuple(sorted(layer.items())), tuple(sorted(other.items()))


def _at(points: dict, batch: int) -> float:
    if batch in points:
        return points[batch]
    return points[min(points, key=lambda b: abs(b - batch))]


def _candidates(folder: Path, kind: str, name: str, config: dict) -> list[Path]:
    files = sorted(folder.glob(f"{kind}_profiling_*.json"))
    shape = f"hidden{config['n_embd']}_head{config.get('n_head', 0)}_seqlen{config['n_positions']}"
    by_shape = [f for f in files if shape in f.name]
    by_name = [f for f in files if f"_{name}_" in f.name or f.name.endswith(f"_{name}.json")]
    return by_shape or by_name or (files if len(files) == 1 else [])


def _pick(folder: Path, kind: str, name: str, config: dict, needs) -> tuple[Path, dict]:
    tried = _candidates(folder, kind, name, config)
    for path in tried:
        data = read_json(path, f"{kind} profile")
        if isinstance(data, dict) and needs(data):
            return path, data
    shape = f"hidden{config['n_embd']}_head{config.get('n_head', 0)}_seqlen{config['n_positions']}"
    raise InputError(f"{folder}: no usable {kind}_profiling_*.json for model {name} "
                     f"(looked for '{shape}' or '_{name}_' in the name; tried {[p.name for p in tried]})")


def load_galvatron_profile(profile_dir: str | Path, model_config: str, mixed_precision: bool = True) -> ModelCost:
    """Build a ``ModelCost`` from a Galvatron profile folder and a model config (path or name)."""
    folder = Path(profile_dir)
    if not folder.is_dir():
        raise InputError(f"profile folder {folder} does not exist")
    name, config = load_model_config(model_config, folder)
    seq, hidden = config["n_positions"], config["n_embd"]
    compute_path, compute = _pick(folder, "computation", name, config,
                                  lambda d: any(k == "layertype_0" or k.startswith("layertype_0_bsz") for k in d))
    memory_path, memory = _pick(folder, "memory", name, config,
                                lambda d: "layertype_0" in d or "layertype_0_sp" in d)
    layer_points, other_points = _compute_points(compute, seq)
    entry = _layer_memory_entry(memory, seq, memory_path)
    act = {k: float(v) for k, v in entry["tp_activation_per_bsz_dict"].items() if k != "checkpoint"}
    ckpt = entry["tp_activation_per_bsz_dict"].get("checkpoint")
    bytes_per = 2 if mixed_precision else 4
    boundary_mb = seq * hidden * bytes_per / 2**20
    layer = LayerCost(
        name="layer",
        fwd_ms_points=layer_points,
        param_mb=float(entry["parameter_size"]),
        act_mb_per_sample=act,
        ckpt_act_mb_per_sample=float(ckpt) if ckpt is not None else boundary_mb,
        boundary_mb_per_sample=boundary_mb,
        tp_allreduces=2,
        flops_per_sample=float(seq * (24 * hidden * hidden + 4 * seq * hidden)),
    )
    off_states, off_act = _other_memory(memory, "pp_off", seq, memory_path)
    first_states, first_act = _other_memory(memory, "pp_on_first", seq, memory_path)
    last_states, last_act = _other_memory(memory, "pp_on_last", seq, memory_path)
    # the embedding lookup is negligible next to the head's vocabulary GEMM and the loss
    vocab = VocabCost(off_states, off_act, first_states, first_act, last_states, last_act,
                      fwd_ms_points_first=(), fwd_ms_points_last=other_points)
    info = {"config": config, "compute_profile": str(compute_path), "memory_profile": str(memory_path)}
    return ModelCost(name, (layer,) * config["n_layer"], vocab, mixed_precision, info)
