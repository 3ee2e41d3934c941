"""Cluster description: devices, memory, and the measured bandwidth tables (Galvatron's format).

A cluster file is JSON::

    {"name": "2x8-a100-40gb", "nodes": 2, "devices_per_node": 8, "memory_mb": 40960,
     "allreduce_bandwidth": "path/to/allreduce_bandwidth_2nodes_8gpus_per_node.json",
     "p2p_bandwidth": "path/to/p2p_bandwidth_2nodes_8gpus_per_node.json",
     "overlap_coefficient": "path/to/overlap_coefficient.json",
     "compute_speed": 1.0, "context_memory_mb": 1024, "max_tp": 8, "latency_ms": 0.0}

Tables may be paths (relative to the cluster file) or inline objects with Galvatron's keys:
``allreduce_size_{n}_consec_{0|1}`` (bus bandwidth, GB/s) and ``pp_size_{n}`` (GB/s);
``overlap_coefficient`` is a number or ``{"overlap_coe": x}``. ``compute_speed`` divides every
profiled compute time (2.0 = devices twice as fast as the profiled ones); ``latency_ms`` is a
fixed cost per collective or p2p message (default 0).

Bandwidth of a rank group: the table entry ``allreduce_size_{n}_consec_1`` was measured on ranks
``0..n-1`` and ``consec_0`` on ranks ``0, N/n, 2N/n, ...``; a group is matched to the entry of the same
size that spans the same number of nodes (and, among those, the same contiguity).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nncompile.errors import InputError
from nncompile.parallel.profile import read_json

SHIPPED = Path(__file__).resolve().parent / "clusters"
GB_PER_S_TO_MB_PER_MS = 1024.0 / 1000.0
_ALLREDUCE_KEY = re.compile(r"allreduce_size_(\d+)_consec_([01])$")
_P2P_KEY = re.compile(r"pp_size_(\d+)$")


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster of ``nodes * devices_per_node`` devices."""

    name: str
    nodes: int
    devices_per_node: int
    memory_mb: float
    allreduce_gbps: tuple[tuple[int, int, float], ...]   # (group size, consec flag, GB/s)
    p2p_gbps: tuple[tuple[int, float], ...]               # (pipeline size, GB/s)
    overlap_coe: float = 1.0
    compute_speed: float = 1.0
    context_memory_mb: float = 1024.0
    max_tp: int = 0
    latency_ms: float = 0.0                               # fixed cost of any collective or p2p message

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def tp_limit(self) -> int:
        """Largest TP degree worth considering: ``max_tp`` when given; else TP stays inside a node
        when the fastest cross-node group is under half as fast as the slowest in-node one."""
        if self.max_tp:
            return self.max_tp
        if self.nodes == 1:
            return self.devices_per_node
        intra, inter = [], []
        world = self.num_devices
        for size, consec, gbps in self.allreduce_gbps:
            ranks = list(range(size)) if consec else list(range(0, world, max(1, world // size)))[:size]
            (intra if self._nodes_spanned(ranks) == 1 else inter).append(gbps)
        if not intra or (inter and max(inter) >= 0.5 * min(intra)):
            return self.num_devices
        return self.devices_per_node

    def with_memory(self, memory_mb: float) -> "Cluster":
        from dataclasses import replace
        return replace(self, memory_mb=float(memory_mb))

    def _nodes_spanned(self, ranks) -> int:
        return len({r // self.devices_per_node for r in ranks})

    def group_bandwidth(self, ranks: tuple[int, ...]) -> float:
        """All-reduce bus bandwidth (MB/ms) of a group of global ranks."""
        return _group_bandwidth(self, tuple(ranks))

    def _group_bandwidth_uncached(self, ranks: tuple[int, ...]) -> float:
        n = len(ranks)
        if n <= 1:
            return math.inf
        spanned = self._nodes_spanned(ranks)
        contiguous = max(ranks) - min(ranks) == n - 1
        exact, same_size, same_class = [], [], []
        world = self.num_devices
        for size, consec, gbps in self.allreduce_gbps:
            measured = range(size) if consec else range(0, world, max(1, world // size))
            measured_spanned = self._nodes_spanned(list(measured)[:size])
            if size == n and measured_spanned == spanned:
                (exact if bool(consec) == contiguous else same_size).append(gbps)
            if (measured_spanned == 1) == (spanned == 1):
                same_class.append(gbps)
        for choice in (exact, same_size, same_class):
            if choice:
                return min(choice) * GB_PER_S_TO_MB_PER_MS
        return min(g for _, _, g in self.allreduce_gbps) * GB_PER_S_TO_MB_PER_MS

    def p2p_bandwidth(self, pp_deg: int) -> float:
        """Point-to-point bandwidth (MB/ms) between neighbouring stages of a ``pp_deg``-stage pipeline."""
        table = dict(self.p2p_gbps)
        if pp_deg in table:
            return table[pp_deg] * GB_PER_S_TO_MB_PER_MS
        if not table:
            raise InputError(f"cluster {self.name}: no p2p bandwidth table")
        below = [k for k in table if k <= pp_deg]
        return table[max(below) if below else min(table)] * GB_PER_S_TO_MB_PER_MS


@lru_cache(maxsize=65536)
def _group_bandwidth(cluster: Cluster, ranks: tuple[int, ...]) -> float:
    return cluster._group_bandwidth_uncached(ranks)


def _table(value, base: Path, what: str) -> dict:
    if isinstance(value, str):
        path = Path(value)
        path = path if path.is_absolute() else base / path
        value = read_json(path, what)
    if not isinstance(value, dict):
        raise InputError(f"cluster: {what} must be a JSON object or a path to one")
    return value


def load_cluster(spec: str | Path) -> Cluster:
    """Read a cluster file; a bare name (``2x8-40gb``) picks one shipped in ``parallel/clusters/``."""
    path = Path(spec)
    if not path.exists() and (SHIPPED / f"{spec}.json").exists():
        path = SHIPPED / f"{spec}.json"
    raw = read_json(path, "cluster file")
    return cluster_from_dict(raw, path.parent, str(path))


def cluster_from_dict(raw: dict, base: Path = Path("."), where: str = "cluster") -> Cluster:
    """Build a ``Cluster`` from the parsed JSON object (paths resolved against ``base``)."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object")
    for key in ("nodes", "devices_per_node", "memory_mb", "allreduce_bandwidth", "p2p_bandwidth"):
        if key not in raw:
            raise InputError(f"{where}: missing '{key}'")
    try:
        nodes, per_node, memory = int(raw["nodes"]), int(raw["devices_per_node"]), float(raw["memory_mb"])
    except (TypeError, ValueError):
        raise InputError(f"{where}: nodes, devices_per_node and memory_mb must be numbers") from None
    if nodes < 1 or per_node < 1 or memory <= 0:
        raise InputError(f"{where}: nodes, devices_per_node and memory_mb must be positive")
    allreduce = []
    for key, gbps in _table(raw["allreduce_bandwidth"], base, "all-reduce bandwidth table").items():
        match = _ALLREDUCE_KEY.match(key)
        if not match:
            raise InputError(f"{where}: unexpected all-reduce table key '{key}' (want allreduce_size_N_consec_0|1)")
        allreduce.append((int(match.group(1)), int(match.group(2)), float(gbps)))
    p2p = []
    for key, gbps in _table(raw["p2p_bandwidth"], base, "p2p bandwidth table").items():
        match = _P2P_KEY.match(key)
        if not match:
            raise InputError(f"{where}: unexpected p2p table key '{key}' (want pp_size_N)")
        p2p.append((int(match.group(1)), float(gbps)))
    if not allreduce or any(g <= 0 for _, _, g in allreduce) or any(g <= 0 for _, g in p2p):
        raise InputError(f"{where}: bandwidth tables must be non-empty with positive figures")
    overlap = raw.get("overlap_coefficient", 1.0)
    if isinstance(overlap, str):
        overlap = _table(overlap, base, "overlap coefficient")
    if isinstance(overlap, dict):
        overlap = overlap.get("overlap_coe", 1.0)
    return Cluster(
        name=str(raw.get("name", Path(where).stem)),
        nodes=nodes,
        devices_per_node=per_node,
        memory_mb=memory,
        allreduce_gbps=tuple(sorted(allreduce)),
        p2p_gbps=tuple(sorted(p2p)),
        overlap_coe=float(overlap),
        compute_speed=float(raw.get("compute_speed", 1.0)),
        context_memory_mb=float(raw.get("context_memory_mb", 1024.0)),
        max_tp=int(raw.get("max_tp", 0)),
        latency_ms=float(raw.get("latency_ms", 0.0)),
    )
