"""The MLP training step's GEMMs with operands warm (repeated calls) and cold (from DRAM), 1 thread.

    python bench/gemm_cold.py [--rounds 7] [--reps 20] [--base REV] [--headers NAME=DIR] [--threads 1] [--square]

Compiles a small driver against the headers in native/ (and, with ``--base REV``, a second one
against ``native/`` as git revision REV has it) that calls ``nnc::sgemm`` with the shapes, strides,
transpose flags and epilogues of the generated MLP step (B=128, examples/mlp.nn), and times each call
in CPU time of the calling thread (wall clock with ``--threads`` > 1):

  * warm: the same call back to back (operands in L2/L3, as ``train_probe.py --gemms`` sees them);
  * cold: before each call a 64 MB buffer is read and written (as the SGD update sweeps ~37 MB of
    weights, gradients and momentum between steps), so A, B and C come from DRAM and the caches hold
    dirty lines, as inside the real step (bench/train_nodes.py).

With ``--base`` the two drivers run in alternating rounds and the table shows both side by side
with the ratio base / current. Prints medians over the rounds (each round: the median of ``--reps``
cold calls, the mean of ``--reps`` warm calls).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (name, transA, transB, M, N, K, lda, ldb, relu-bias epilogue) as kernels_train.cpp of the MLP step calls them.
SHAPES = [
    ("fc1 fwd x@W1^T", 0, 1, 128, 1024, 784, 784, 784, 1),
    ("fc2 fwd h1@W2^T", 0, 1, 128, 1024, 1024, 1024, 1024, 1),
    ("fc2 dW dY^T@h1", 1, 0, 1024, 1024, 128, 1024, 1024, 0),
    ("fc2 dX dY@W2", 0, 0, 128, 1024, 1024, 1024, 1024, 0),
    ("fc1 dW dY^T@x", 1, 0, 1024, 784, 128, 1024, 784, 0),
]

# --square: the gemm suite's square shapes, to check that the blocking for the step's shapes costs them nothing.
SQUARES = [(f"square {n}", 0, 0, n, n, n, n, n, 0) for n in (256, 512, 1024)]

DRIVER = r"""
#include <time.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "nnc_gemm.h"

static clockid_t clock_id = CLOCK_THREAD_CPUTIME_ID;

static double now() {
    timespec t;
    clock_gettime(clock_id, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float* buffer(long n, unsigned seed) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, std::max<long>(n, 16) * 4)) std::abort();
    float* f = static_cast<float*>(p);
    srand(seed);
    for (long i = 0; i < n; ++i) f[i] = (rand() / (float)RAND_MAX) * 2.0f - 1.0f;
    return f;
}

// argv: threads reps then groups of ta tb M N K lda ldb relu
int main(int argc, char** argv) {
    nnc::set_threads(std::atoi(argv[1]));
    if (std::atoi(argv[1]) > 1) clock_id = CLOCK_MONOTONIC;  // the calling thread's CPU time counts its waits
    const int reps = std::atoi(argv[2]);
    const long sweep_floats = 16L << 20;  // 64 MB
    float* sweep = buffer(sweep_floats, 7);
    for (int a = 3; a + 8 <= argc; a += 8) {
        const int ta = std::atoi(argv[a]), tb = std::atoi(argv[a + 1]);
        const int M = std::atoi(argv[a + 2]), N = std::atoi(argv[a + 3]), K = std::atoi(argv[a + 4]);
        const int lda = std::atoi(argv[a + 5]), ldb = std::atoi(argv[a + 6]), relu = std::atoi(argv[a + 7]);
        float* A = buffer(static_cast<long>(ta ? K : M) * lda, 1);
        float* B = buffer(static_cast<long>(tb ? N : K) * ldb, 2);
        float* C = buffer(static_cast<long>(M) * N, 3);
        float* bias = buffer(N, 4);
        nnc::Epilogue ep;
        if (relu) {
            ep.col_bias = bias;
            ep.act = nnc::ACT_RELU;
        }
        auto call = [&] { nnc::sgemm(ta, tb, M, N, K, A, lda, B, ldb, C, N, 0.0f, ep); };
        call();
        double t0 = now();
        for (int r = 0; r < reps; ++r) call();
        const double warm = (now() - t0) / reps;
        std::vector<double> cold;
        for (int r = 0; r < reps; ++r) {
            for (long i = 0; i < sweep_floats; i += 16) sweep[i] += 1.0f;  // one store per line: read + dirty
            t0 = now();
            call();
            cold.push_back(now() - t0);
        }
        std::sort(cold.begin(), cold.end());
        std::printf("%.6f %.6f\n", warm * 1e3, cold[cold.size() / 2] * 1e3);
        free(A);
        free(B);
        free(C);
        free(bias);
    }
    return 0;
}
"""

FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v3", "-fno-math-errno", "-fno-trapping-math", "-w"]


def build(native: Path, out: Path) -> Path:
    src = out.with_suffix(".cpp")
    src.write_text(DRIVER)
    subprocess.run(["g++", *FLAGS, f"-I{native}", str(src), "-o", str(out)], check=True)
    return out


def base_headers(rev: str, folder: Path) -> Path:
    """native/*.h as git revision rev has them, written to folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", rev, "native/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(".h"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{name}"], check=True,
                                  capture_output=True, text=True).stdout
            (folder / Path(name).name).write_text(text)
    return folder


def run(exe: Path, threads: int, reps: int, shapes: list) -> list[tuple[float, float]]:
    args = [str(exe), str(threads), str(reps)]
    for _, *numbers in shapes:
        args += [str(x) for x in numbers]
    lines = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split("\n")
    return [tuple(float(x) for x in line.split()) for line in lines if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--square", action="store_true", help="also time square GEMMs (256, 512, 1024)")
    parser.add_argument("--base", default=None, help="git revision whose native/ headers to time alongside")
    parser.add_argument("--headers", action="append", default=[], metavar="NAME=DIR",
                        help="also time a folder of nnc_*.h headers (e.g. an experiment), as NAME")
    args = parser.parse_args()
    shapes = SHAPES + (SQUARES if args.square else [])
    with tempfile.TemporaryDirectory() as tmp:
        exes = {"current": build(REPO / "native", Path(tmp) / "current")}
        for spec in args.headers:
            name, folder = spec.split("=", 1)
            exes[name] = build(Path(folder), Path(tmp) / f"headers_{len(exes)}")
        if args.base:
            exes[args.base] = build(base_headers(args.base, Path(tmp) / "base"), Path(tmp) / "base_exe")
        samples = {name: [] for name in exes}
        for _ in range(args.rounds):
            for name, exe in exes.items():
                samples[name].append(run(exe, args.threads, args.reps, shapes))
    names = list(exes)
    clock = "CPU" if args.threads == 1 else "wall-clock"
    print(f"MLP step GEMMs, {args.threads} thread(s), {clock} ms per call, median of {args.rounds} rounds "
          f"(warm: back to back; cold: after a 64 MB sweep)")
    header = f"{'':34s}" + "".join(f"{n + ' warm':>16s}{n + ' cold':>16s}" for n in names)
    if args.base:
        header += f"{'cold base/cur':>15s}"
    print(header)
    totals = {n: [0.0, 0.0] for n in names}
    for s, (label, ta, tb, M, N, K, *_rest) in enumerate(shapes):
        row = f"{label + f' {M}x{N}x{K}' + (' tA' if ta else '') + (' tB' if tb else ''):34s}"
        cold = {}
        for n in names:
            warm = statistics.median(r[s][0] for r in samples[n])
            cold[n] = statistics.median(r[s][1] for r in samples[n])
            totals[n][0] += warm
            totals[n][1] += cold[n]
            row += f"{warm:16.3f}{cold[n]:16.3f}"
        if args.base:
            row += f"{cold[args.base] / cold['current']:15.3f}"
        print(row)
    row = f"{'sum':34s}" + "".join(f"{totals[n][0]:16.3f}{totals[n][1]:16.3f}" for n in names)
    if args.base:
        row += f"{totals[args.base][1] / totals['current'][1]:15.3f}"
    print(row)


if __name__ == "__main__":
    sys.exit(main())
