"""The arena over time as a PNG picture (NumPy + zlib, no plotting library).

Time (schedule steps) runs left to right, arena addresses bottom (offset 0) to top; every buffer
is a filled rectangle with a dark border (values in colours, kernel scratch in grey), the max-live
lower bound is a red line, the area above the arena is white.

    write_memory_png("build/memory.png", plan_json["memory"])   # a MemoryPlan.to_json() dict
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as PNG."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def _colour(index: int) -> np.ndarray:
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = (np.clip(np.abs((hue * 6 + k) % 6 - 3) - 1, 0, 1) for k in (0, 4, 2))
    return (np.array([r, g, b]) * 150 + 90).astype(np.uint8)


def memory_image(memory: dict, width: int = 1200, height: int = 480) -> np.ndarray:
    """Draw ``memory["buffers"]`` (start, end, offset, size, kind) scaled to the picture."""
    buffers = memory.get("buffers", [])
    arena = max(int(memory.get("arena_bytes", 0)), 1)
    steps = max((b["end"] for b in buffers), default=1)
    pad = 8
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    image = np.full((height, width, 3), 255, np.uint8)
    image[pad:pad + inner_h, pad:pad + inner_w] = 245

    def x_of(t):
        return pad + int(round(t * inner_w / steps))

    def y_of(address):
        return pad + inner_h - int(round(address * inner_h / arena))

    for index, b in enumerate(sorted(buffers, key=lambda b: (b["start"], b["offset"]))):
        x0, x1 = x_of(b["start"]), max(x_of(b["end"]), x_of(b["start"]) + 1)
        y1, y0 = y_of(b["offset"]), min(y_of(b["offset"] + b["size"]), y_of(b["offset"]) - 1)
        colour = np.array([170, 170, 170], np.uint8) if b.get("kind") == "work" else _colour(index)
        image[y0:y1, x0:x1] = colour
        border = (colour // 2).astype(np.uint8)
        image[y0:y1, x0] = border
        image[y0:y1, x1 - 1] = border
        image[y0, x0:x1] = border
        image[y1 - 1, x0:x1] = border
    bound = int(memory.get("lower_bound", 0))
    if 0 < bound <= arena:
        y = min(y_of(bound), height - 1)
        image[y, pad:pad + inner_w] = (220, 30, 30)
    return image


def write_memory_png(path: str | Path, memory: dict, width: int = 1200, height: int = 480) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(memory_image(memory, width, height)))
    return path
