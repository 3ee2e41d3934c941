"""Helpers shared by the subcommands: the ``--json`` line and progress on a terminal."""
from __future__ import annotations

import json
import sys
import time


def print_json(figures: dict) -> None:
    """Print the command's figures as one JSON object on the last line of standard output."""
    print(json.dumps(figures, sort_keys=True, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class Progress:
    """One self-overwriting status line on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def update(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(f"\r{self.label}: {text} [{elapsed:.1f}s]\x1b[K")
            sys.stderr.flush()

    def done(self, text: str = "done") -> None:
        if self.enabled:
            self.update(text)
            sys.stderr.write("\n")
