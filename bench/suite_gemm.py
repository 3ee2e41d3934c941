"""GEMM suite: machine ceilings and nnc::sgemm against numpy (OpenBLAS) and torch.mm.

    python -m bench --only gemm [--quick]

Measured side by side in one run:
  * fp32 FMA peak (bench/fma_peak.cpp, compiled on the fly), 1 and 2 threads, AVX2 and AVX-512;
  * DRAM bandwidth (STREAM triad, 2 threads);
  * GFLOP/s of square GEMMs 64..2048 and MLP shapes for nnc::sgemm (native/nnc_gemm.h, through the
    test bindings of tests/backend/native_harness.py, timed in C++), numpy.matmul and torch.mm.

The GEMM timings run in a subprocess without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, so numpy uses
the OpenBLAS kernel it would pick for this CPU; a second subprocess keeps the environment as it is
(those variables pin OpenBLAS to its Haswell/AVX2 kernel here) and times numpy alone; a third runs
everything on one thread and times it in CPU time of the calling thread, which other processes on
the (shared) machine barely disturb. All figures are medians over repeated rounds.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THREADS = 2
PINNING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    squares = [64, 256, 512, 1024] if quick else [64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    mlp = [(128, 1024, 784), (128, 1024, 1024), (1, 1024, 1024)]
    if not quick:
        mlp += [(32, 4096, 1024), (1, 4096, 4096)]
    return [(s, s, s) for s in squares] + mlp


# ---------------------------------------------------------------------------------------------
# Worker (runs in a subprocess with the chosen environment)
# ---------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _reps_for(flops: float, target_seconds: float, rate_guess: float = 1e11) -> int:
    return max(1, min(5000, int(target_seconds * rate_guess / flops)))


def _time_python(fn, flops: float, rounds: int) -> float:
    fn()
    reps = _reps_for(flops, 0.08)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return _median(samples)


def _openblas_core() -> str:
    import numpy

    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*.so*"))
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(handle, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def _time_python_cpu(fn, flops: float, rounds: int) -> float:
    """Like _time_python, in CPU seconds of the calling thread (single-threaded libraries only)."""
    fn()
    reps = _reps_for(flops, 0.08)
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(reps):
            fn()
        samples.append((time.thread_time() - start) / reps)
    return _median(samples)


def single_thread_worker(quick: bool) -> dict:
    """One thread everywhere, timed in CPU time of the calling thread (OpenBLAS and torch run
    single-threaded GEMMs on the caller's thread), so other processes on the machine barely matter."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests" / "backend"))
    import native_harness

    nat = native_harness.load_native()
    nat.set_threads(1)
    torch.set_num_threads(1)
    rounds = 3 if quick else 5
    out = {"rows": []}
    rng = np.random.default_rng(0)
    for M, N, K in shapes(quick):
        flops = 2.0 * M * N * K
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        reps = _reps_for(flops, 0.08)
        out["rows"].append({
            "shape": [M, N, K],
            "nnc": flops / _median(nat.time_sgemm(False, False, M, N, K, reps, rounds, True)),
            "numpy": flops / _time_python_cpu(lambda: np.matmul(a, b, out=c), flops, rounds),
            "torch": flops / _time_python_cpu(lambda: torch.mm(ta, tb, out=tc), flops, rounds),
        })
    return out


def worker(quick: bool, numpy_only: bool) -> dict:
    import numpy as np

    rounds = 3 if quick else 5
    out = {"openblas_core": _openblas_core(), "rows": []}
    if not numpy_only:
        sys.path.insert(0, str(REPO / "tests" / "backend"))
        import native_harness
        import torch

        nat = native_harness.load_native()
        nat.set_threads(THREADS)
        torch.set_num_threads(THREADS)
        out["has_avx512"] = bool(nat.has_avx512())
        default_avx512 = nat.get_avx512()
    rng = np.random.default_rng(0)
    for M, N, K in shapes(quick):
        flops = 2.0 * M * N * K
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        row = {"shape": [M, N, K], "numpy": flops / _time_python(lambda: np.matmul(a, b, out=c), flops, rounds)}
        if not numpy_only:
            ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
            row["torch"] = flops / _time_python(lambda: torch.mm(ta, tb, out=tc), flops, rounds)
            reps = _reps_for(flops, 0.08)
            for label, avx512, threads in [("nnc", default_avx512, THREADS), ("nnc_avx2", False, THREADS)]:
                nat.set_avx512(avx512)
                nat.set_threads(threads)
                row[label] = flops / _median(nat.time_sgemm(False, False, M, N, K, reps, rounds, False))
            nat.set_avx512(default_avx512)
            nat.set_threads(THREADS)
        out["rows"].append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _build_fma_peak(directory: Path) -> Path:
    exe = directory / "fma_peak"
    cmd = ["g++", "-O3", "-fopenmp", "-march=x86-64-v3", "-std=c++17", str(HERE / "fma_peak.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _ceiling(exe: Path, threads: int, *args: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([str(exe), *args], env=env, check=True, capture_output=True, text=True)
    return float(result.stdout.strip())


def _run_worker(quick: bool, numpy_only: bool, unpin: bool, single: bool = False) -> dict:
    threads = 1 if single else THREADS
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    if unpin:
        for name in PINNING_VARS:
            env.pop(name, None)
    cmd = [sys.executable, "-m", "bench.suite_gemm", "--worker"]
    if quick:
        cmd.append("--quick")
    if numpy_only:
        cmd.append("--numpy-only")
    if single:
        cmd.append("--single")
    result = subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gf(value: float) -> str:
    return f"{value / 1e9:.1f}"


def run(quick: bool) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        exe = _build_fma_peak(Path(tmp))
        peak = {(t, isa): _ceiling(exe, t, "peak", isa) for t in (1, THREADS) for isa in ("avx2", "avx512")}
        triad = _ceiling(exe, THREADS, "triad")
    load_before = os.getloadavg()[0]
    main = _run_worker(quick, numpy_only=False, unpin=True)
    pinned = _run_worker(quick, numpy_only=True, unpin=False) if any(os.environ.get(v) for v in PINNING_VARS) else None
    single = _run_worker(quick, numpy_only=False, unpin=True, single=True)
    load_after = os.getloadavg()[0]
    has512 = main.get("has_avx512", False)
    peak_main = peak[(THREADS, "avx512")] if has512 else peak[(THREADS, "avx2")]
    peak_avx2 = peak[(THREADS, "avx2")]
    peak1_main = peak[(1, "avx512")] if has512 else peak[(1, "avx2")]

    lines = ["## GEMM (fp32, row-major C = A @ B)", ""]
    lines.append(
        f"Ceilings (FMA peak in per-thread CPU time): AVX2 {peak[(1, 'avx2')]:.0f} GFLOP/s (1 thread) / {peak_avx2:.0f} ({THREADS} threads); "
        + (f"AVX-512 {peak[(1, 'avx512')]:.0f} / {peak[(THREADS, 'avx512')]:.0f}; " if has512 else "")
        + f"DRAM triad {triad:.1f} GB/s ({THREADS} threads, wall clock)."
    )
    lines.append("")
    lines.append(
        f"GFLOP/s, {THREADS} threads, wall clock. `nnc` = nnc::sgemm as generated code calls it "
        f"({'AVX-512 micro-kernel picked at run time' if has512 else 'AVX2 micro-kernel'}); `nnc avx2` = the "
        f"x86-64-v3 kernel alone; numpy's OpenBLAS core: {main['openblas_core']}"
        + (f" (with OPENBLAS_CORETYPE as set: {pinned['openblas_core']})" if pinned else "")
        + "."
    )
    lines.append("")
    header = ["M x N x K", "nnc", "% peak", "nnc avx2", "% avx2 peak", "numpy", "torch.mm"]
    if pinned:
        header.append("numpy pinned")
    header += ["nnc / numpy", "nnc / torch"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for i, row in enumerate(main["rows"]):
        M, N, K = row["shape"]
        cells = [f"{M} x {N} x {K}", _gf(row["nnc"]), f"{100 * row['nnc'] / 1e9 / peak_main:.0f}%",
                 _gf(row["nnc_avx2"]), f"{100 * row['nnc_avx2'] / 1e9 / peak_avx2:.0f}%", _gf(row["numpy"]),
                 _gf(row["torch"])]
        if pinned:
            cells.append(_gf(pinned["rows"][i]["numpy"]))
        cells += [f"{row['nnc'] / row['numpy']:.2f}", f"{row['nnc'] / row['torch']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "`% peak` is against the measured FMA peak of the instruction set the kernel uses. numpy/torch "
        "are timed in Python loops with preallocated outputs (`out=`); nnc in a C++ loop. "
        "`numpy pinned` is numpy with the machine's OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE left set. "
        f"1-minute load average of the machine (2 cores, shared): {load_before:.1f} before, "
        f"{load_after:.1f} after; wall-clock figures above are only as good as that allows."
    )
    lines.append("")
    lines.append(
        "Single thread, CPU time of the calling thread (insensitive to other processes sharing the "
        f"cores): `% peak` against the 1-thread FMA peak ({peak1_main:.0f} GFLOP/s)."
    )
    lines.append("")
    lines.append("| M x N x K | nnc | % peak | numpy | torch.mm | nnc / numpy | nnc / torch |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for row in single["rows"]:
        M, N, K = row["shape"]
        lines.append(
            f"| {M} x {N} x {K} | {_gf(row['nnc'])} | {100 * row['nnc'] / 1e9 / peak1_main:.0f}% | "
            f"{_gf(row['numpy'])} | {_gf(row['torch'])} | {row['nnc'] / row['numpy']:.2f} | "
            f"{row['nnc'] / row['torch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--worker" in sys.argv and "--single" in sys.argv:
        print(json.dumps(single_thread_worker(quick="--quick" in sys.argv)))
    elif "--worker" in sys.argv:
        result = worker(quick="--quick" in sys.argv, numpy_only="--numpy-only" in sys.argv)
        print(json.dumps(result))
    else:
        print(run(quick="--quick" in sys.argv))
