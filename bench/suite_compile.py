"""Compile time of the examples: cold (a fresh, empty NNCOMPILE_CACHE_DIR, so every module, the shared
binding included, goes through g++) and cached (the same again: parse + passes + cache look-up + load)."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import nncompile as nnc

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
PLOTS = HERE / "plots"
GPT = {"T": 128, "d": 256, "heads": 4, "layers": 4, "vocab": 512}
CASES = [("mlp", "mlp.nn", {"B": 128}), ("lenet", "lenet.nn", {"B": 128}), ("gpt", "gpt.nn", {"B": 8, **GPT})]


def _compile(path: str, dims: dict, train: bool) -> float:
    t0 = time.perf_counter()
    nnc.compile(nnc.parse(EXAMPLES / path, set=dims), train=train)
    return time.perf_counter() - t0


def run(quick: bool) -> str:
    repeats = 1  # a cold compile of the gpt training step is minutes of g++ on the shared machine
    saved = os.environ.get("NNCOMPILE_CACHE_DIR")
    rows = []
    try:
        for name, path, dims in CASES:
            for train in (False, True):
                cold, cached = [], []
                for _ in range(repeats):
                    with tempfile.TemporaryDirectory(prefix="nnc_bench_cache_") as cache:
                        os.environ["NNCOMPILE_CACHE_DIR"] = cache
                        cold.append(_compile(path, dims, train))
                        cached.append(_compile(path, dims, train))
                rows.append((f"{name} {'inference + training step' if train else 'inference'}",
                             statistics.median(cold), statistics.median(cached)))
                print(f"[compile] {rows[-1][0]}: cold {rows[-1][1]:.2f} s, cached {rows[-1][2]:.3f} s", flush=True)
    finally:
        if saved is None:
            os.environ.pop("NNCOMPILE_CACHE_DIR", None)
        else:
            os.environ["NNCOMPILE_CACHE_DIR"] = saved
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [
        "## Compile time (`nnc.compile`), cold and cached",
        "",
        "`python -m bench --only compile`. Wall clock of `nnc.compile(nnc.parse(example), train=...)`: **cold** in a "
        "fresh empty `NNCOMPILE_CACHE_DIR` (passes, code generation and g++ for every module, including the "
        "model-independent binding), **cached** right after in the same directory (parse, passes, cache look-up, "
        f"load). One fresh directory per row. Shapes: mlp and lenet B=128, gpt B=8 d=256 4 heads T=128 "
        f"4 layers. 1-minute load average after the run: {load} (2 cores, shared: g++ competes with other work).",
        "",
        "| model | cold s | cached s | cold / cached |",
        "|---|---:|---:|---:|",
    ]
    for label, cold, cached in rows:
        lines.append(f"| {label} | {cold:.2f} | {cached:.3f} | {cold / cached:.0f}x |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r[1] for r in rows], 0.4, label="cold")
        ax.barh([y - 0.2 for y in ys], [r[2] for r in rows], 0.4, label="cached")
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r[0] for r in rows], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_title("nnc.compile time")
        ax.legend()
        fig.tight_layout()
        PLOTS.mkdir(exist_ok=True)
        fig.savefig(PLOTS / "compile_time.png", dpi=110)
        plt.close(fig)
        lines += ["", "![compile time](plots/compile_time.png)"]
    except ImportError:
        lines += ["", "(no plot: matplotlib is not installed; `pip install '.[bench]'`)"]
    return "\n".join(lines) + "\n"
