"""What every pass returns besides its graph: a report of what it decided and the figures behind it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassReport:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "figures": self.figures, "notes": self.notes, "seconds": round(self.seconds, 4)}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
