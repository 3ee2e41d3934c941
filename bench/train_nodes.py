"""Per-node CPU time of a compiled training step, measured inside the step (1 thread).

    python bench/train_nodes.py [examples/mlp.nn] [--set B=128] [--steps 60]

Compiles the model's training step with the CLI (``nncompile --train``), instruments the generated
``kernels_train.cpp`` (a CPU-time stamp of the calling thread before every node), links it with a small
driver that runs forward + backward + the SGD-momentum update (``nnc::sgd_update``, as the trainer calls
it) on random data, and prints each node's median milliseconds per step: the GEMMs in the context of the
real step (operands as cold or warm as they are there), not in isolation.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DRIVER = r"""
#include <time.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "nnc_optim.h"
#include "nnc_threads.h"

struct nnc_value_sig { const char* name; const char* type; int dtype; int rank; long long shape[8]; };
struct nnc_signature { int n_inputs; const nnc_value_sig* inputs; int n_outputs; const nnc_value_sig* outputs;
                       long long arena_bytes; long long param_bytes; int n_errors; const char* const* errors; };
extern "C" int nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena);
extern "C" const nnc_signature* nnc_get_signature();
extern "C" void* nnc_binding_init(const char*) { return nullptr; }
extern double nnc_node_seconds_[];
extern const char* nnc_node_names_[];
extern int nnc_node_count_;

static void* aligned(long long bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, std::max<long long>(bytes, 64))) std::abort();
    std::memset(p, 0, std::max<long long>(bytes, 64));
    return p;
}

static long long numel(const nnc_value_sig& v) {
    long long n = 1;
    for (int d = 0; d < v.rank; ++d) n *= v.shape[d];
    return n;
}

int main(int argc, char** argv) {
    const int steps = argc > 1 ? std::atoi(argv[1]) : 60;
    const bool skip_update = argc > 2 && std::strcmp(argv[2], "no-update") == 0;  // weights stay cache-warm
    nnc::set_threads(1);
    const nnc_signature* sig = nnc_get_signature();
    srand(1);
    std::vector<void*> ins, outs;
    for (int i = 0; i < sig->n_inputs; ++i) {
        const nnc_value_sig& v = sig->inputs[i];
        const long long n = numel(v);
        if (v.dtype == 0) {
            float* p = (float*)aligned(n * 4);
            for (long long k = 0; k < n; ++k) p[k] = (rand() / (float)RAND_MAX) * 2.0f - 1.0f;
            ins.push_back(p);
        } else {  // integer labels / tokens: small non-negative values
            long long* p = (long long*)aligned(n * 8);
            for (long long k = 0; k < n; ++k) p[k] = rand() % 10;
            ins.push_back(p);
        }
    }
    long long grad_floats = 0;
    for (int i = 0; i < sig->n_outputs; ++i) {
        const long long n = numel(sig->outputs[i]);
        outs.push_back(aligned(n * 8));
        if (i > 0) grad_floats += n;
    }
    const long long pfloats = sig->param_bytes / 4;
    float* params = (float*)aligned(sig->param_bytes);
    for (long long k = 0; k < pfloats; ++k) params[k] = ((rand() / (float)RAND_MAX) * 2.0f - 1.0f) * 0.03f;
    float* grads = (float*)aligned(pfloats * 4);
    float* momentum = (float*)aligned(pfloats * 4);
    char* arena = (char*)aligned(sig->arena_bytes);
    std::vector<std::vector<double>> samples(nnc_node_count_ + 1);
    for (int s = 0; s < steps; ++s) {
        std::fill(nnc_node_seconds_, nnc_node_seconds_ + nnc_node_count_, 0.0);
        nnc_forward(ins.data(), outs.data(), (char*)params, arena);
        // the trainer's gradient block is one contiguous range; so is this stand-in
        timespec a, b;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        if (!skip_update) nnc::sgd_update(params, grads, momentum, pfloats, 1e-6f, 0.9f, 0.0f, 0.0f, false, s == 0);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        if (s < 3) continue;
        for (int k = 0; k < nnc_node_count_; ++k) samples[k].push_back(nnc_node_seconds_[k]);
        samples[nnc_node_count_].push_back((b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec));
    }
    double total = 0.0;
    for (int k = 0; k <= nnc_node_count_; ++k) {
        std::vector<double>& v = samples[k];
        std::sort(v.begin(), v.end());
        const double ms = v[v.size() / 2] * 1e3;
        total += ms;
        std::printf("%8.3f ms  %s\n", ms, k < nnc_node_count_ ? nnc_node_names_[k] : "sgd_update (momentum)");
    }
    std::printf("%8.3f ms  total (sum of medians)\n", total);
    (void)grad_floats;
    return 0;
}
"""

CLOCK = r"""
#include <time.h>
static inline double nnc_now_() {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
"""


def instrument(source: str) -> str:
    """Stamps the thread CPU clock between the node blocks of nnc_forward."""
    lines = source.splitlines()
    out, names = [], []
    inside = False
    for line in lines:
        if line.startswith("int nnc_forward("):
            inside = True
            out.append(line)
            out.append("    double nnc_t_ = nnc_now_(), nnc_u_ = 0.0;")
            continue
        if inside and re.match(r"    // \S+ = ", line):
            if names:
                out.append(f"    nnc_u_ = nnc_now_(); nnc_node_seconds_[{len(names) - 1}] += nnc_u_ - nnc_t_; "
                           "nnc_t_ = nnc_u_;")
            names.append(line.strip()[3:].split("  @")[0])
        if inside and line == "    return status_;":
            out.append(f"    nnc_node_seconds_[{len(names) - 1}] += nnc_now_() - nnc_t_;")
            inside = False
        out.append(line)
    header = [CLOCK, f"double nnc_node_seconds_[{len(names)}];", f"int nnc_node_count_ = {len(names)};",
              "const char* nnc_node_names_[] = {" + ", ".join(f'"{n[:90]}"' for n in names) + "};"]
    # after the includes
    first = next(i for i, l in enumerate(out) if l.startswith("static inline uint32_t") or l.startswith("struct"))
    return "\n".join(out[:first] + header + out[first:]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(REPO / "examples" / "mlp.nn"))
    parser.add_argument("--set", action="append", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--native", default=str(REPO / "native"), help="folder of the nnc_*.h headers to build with")
    parser.add_argument("--keep", default=None, help="build in this folder and keep it (e.g. to run perf on ./step)")
    args = parser.parse_args()
    sets = args.set or ["B=128"]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        build = Path(tmp) / "build"
        cmd = [sys.executable, "-c", "import sys; from nncompile.cli import main; sys.exit(main())", "--train",
               "-o", str(build), args.model] + [x for s in sets for x in ("--set", s)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        src = Path(tmp) / "kernels.cpp"
        src.write_text(instrument((build / "kernels_train.cpp").read_text()))
        (Path(tmp) / "driver.cpp").write_text(DRIVER)
        exe = Path(tmp) / "step"
        flags = ["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v3", "-fno-math-errno", "-fno-trapping-math",
                 "-w", f"-I{args.native}"]
        subprocess.run(["g++", *flags, str(src), str(Path(tmp) / "driver.cpp"), "-o", str(exe)], check=True)
        print(subprocess.run([str(exe), str(args.steps)], check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
