// fma_peak.cpp - machine ceilings for the GEMM benchmark (bench/suite_gemm.py compiles it on the fly).
//
//   fma_peak peak [avx512]   fp32 FMA throughput, GFLOP/s, over OMP_NUM_THREADS threads: each thread
//                            runs 12 independent chains of FMAs (ymm, or zmm with "avx512"), timed
//                            in its own CPU time (robust to other processes on a shared machine).
//                            "avx512" uses 512-bit FMAs (only if the CPU has AVX-512F).
//   fma_peak triad           STREAM triad a = b + s * c on 3 x 64 MiB arrays, GB/s (3 arrays counted).
// Each prints one number: the median of 7 rounds.
// Build: g++ -O3 -fopenmp -march=x86-64-v3 -std=c++17 fma_peak.cpp -o fma_peak
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <time.h>

namespace {

constexpr long kIters = 20'000'000;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Inline assembly so the compiler can neither spill nor merge the chains:
// 12 independent accumulators x 8 lanes x 2 flops per iteration (acc += 0 * 0, no denormals).
float fma_loop_avx2(long iters) {
    float out[8];
    __asm__ volatile(
        "vxorps %%ymm0, %%ymm0, %%ymm0\n\t"
        "vmovaps %%ymm0, %%ymm1\n\t vmovaps %%ymm0, %%ymm2\n\t vmovaps %%ymm0, %%ymm3\n\t"
        "vmovaps %%ymm0, %%ymm4\n\t vmovaps %%ymm0, %%ymm5\n\t vmovaps %%ymm0, %%ymm6\n\t"
        "vmovaps %%ymm0, %%ymm7\n\t vmovaps %%ymm0, %%ymm8\n\t vmovaps %%ymm0, %%ymm9\n\t"
        "vmovaps %%ymm0, %%ymm10\n\t vmovaps %%ymm0, %%ymm11\n\t vmovaps %%ymm0, %%ymm12\n\t"
        "1:\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm0\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm1\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm2\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm3\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm4\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm5\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm6\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm7\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm8\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm9\n\t"
        "vfmadd231ps %%ymm12, %%ymm12, %%ymm10\n\t vfmadd231ps %%ymm12, %%ymm12, %%ymm11\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vaddps %%ymm1, %%ymm0, %%ymm0\n\t"
        "vmovups %%ymm0, %[out]\n\t"
        : [n] "+r"(iters), [out] "=m"(out)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "cc");
    return out[0];
}

// 24 independent accumulators x 16 lanes x 2 flops per iteration.
__attribute__((target("avx512f"))) float fma_loop_avx512(long iters) {
    float out[16];
    __asm__ volatile(
        "vxorps %%zmm0, %%zmm0, %%zmm0\n\t"
        "vmovaps %%zmm0, %%zmm1\n\t vmovaps %%zmm0, %%zmm2\n\t vmovaps %%zmm0, %%zmm3\n\t"
        "vmovaps %%zmm0, %%zmm4\n\t vmovaps %%zmm0, %%zmm5\n\t vmovaps %%zmm0, %%zmm6\n\t"
        "vmovaps %%zmm0, %%zmm7\n\t vmovaps %%zmm0, %%zmm8\n\t vmovaps %%zmm0, %%zmm9\n\t"
        "vmovaps %%zmm0, %%zmm10\n\t vmovaps %%zmm0, %%zmm11\n\t vmovaps %%zmm0, %%zmm12\n\t"
        "1:\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm0\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm1\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm2\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm3\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm4\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm5\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm6\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm7\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm8\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm9\n\t"
        "vfmadd231ps %%zmm12, %%zmm12, %%zmm10\n\t vfmadd231ps %%zmm12, %%zmm12, %%zmm11\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vaddps %%zmm1, %%zmm0, %%zmm0\n\t"
        "vmovups %%zmm0, %[out]\n\t"
        : [n] "+r"(iters), [out] "=m"(out)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "cc");
    return out[0];
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

double thread_cpu_seconds() {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Sum over threads of each thread's FLOPs / its own CPU time: the machine's peak with every thread
// on its own core, even while other processes take turns on the cores.
double peak(bool avx512) {
    const double flops_per_iter = avx512 ? 12.0 * 16 * 2 : 12.0 * 8 * 2;
    const long iters = avx512 ? kIters / 2 : kIters;
    std::vector<double> rates;
    volatile float sink = 0.0f;
    for (int round = 0; round < 7; ++round) {
        double total = 0.0;
#pragma omp parallel reduction(+ : total)
        {
            const double c0 = thread_cpu_seconds();
            const float r = avx512 ? fma_loop_avx512(iters) : fma_loop_avx2(iters);
            const double c1 = thread_cpu_seconds();
#pragma omp atomic
            sink += r;
            total += flops_per_iter * iters / (c1 - c0) / 1e9;
        }
        rates.push_back(total);
    }
    return median(rates);
}

double triad() {
    const long n = 16L * 1024 * 1024;  // 64 MiB per array
    float* a = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    float* b = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    float* c = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) {
        a[i] = 0.0f;
        b[i] = 1.0f;
        c[i] = 2.0f;
    }
    std::vector<double> rates;
    const float s = 3.0f;
    for (int round = 0; round < 7; ++round) {
        const double t0 = now();
#pragma omp parallel for schedule(static)
        for (long i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
        const double t1 = now();
        rates.push_back(3.0 * n * sizeof(float) / (t1 - t0) / 1e9);
    }
    volatile float sink = a[n / 2];
    (void)sink;
    std::free(a);
    std::free(b);
    std::free(c);
    return median(rates);
}

}  // namespace

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "peak";
    if (std::strcmp(mode, "triad") == 0) {
        std::printf("%.2f\n", triad());
        return 0;
    }
    const bool avx512 = argc > 2 && std::strcmp(argv[2], "avx512") == 0;
    if (avx512 && !__builtin_cpu_supports("avx512f")) {
        std::printf("nan\n");
        return 0;
    }
    std::printf("%.2f\n", peak(avx512));
    return 0;
}
