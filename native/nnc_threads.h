// nnc_threads.h - thread-count helpers and per-thread grow-only scratch buffers.
//
// The thread count is a run-time setting (nnc::set_threads), never baked into generated code.
// Kernels call nnc::usable_threads() to learn how many threads they may fork: inside an enclosing
// parallel region that is 1, so a kernel called per batch item from a parallel loop runs serially.
//
// Scratch buffers (packing panels, per-row temporaries) are allocated once per thread and slot,
// grow only, are 64-byte aligned, and live until the thread exits: no malloc on the hot path
// once the largest size has been seen.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nnc {

inline void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : 1);
#else
    (void)n;
#endif
}

inline int get_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Threads a kernel may fork right now: 1 when already inside a parallel region.
inline int usable_threads() {
#ifdef _OPENMP
    if (omp_in_parallel()) return 1;
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Split [0, n) into `parts` nearly equal chunks whose boundaries are multiples of `grain`;
// returns chunk `index` as [begin, end).
inline void split_range(long n, int parts, int index, long grain, long* begin, long* end) {
    long units = (n + grain - 1) / grain;
    long base = units / parts;
    long extra = units % parts;
    long first = index * base + (index < extra ? index : extra);
    long count = base + (index < extra ? 1 : 0);
    long b = first * grain;
    long e = (first + count) * grain;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

namespace detail {

struct ScratchSlot {
    float* data = nullptr;
    size_t capacity = 0;  // in floats
    ~ScratchSlot() { std::free(data); }
};

constexpr int kScratchSlots = 5;

}  // namespace detail

// Slots used by the runtime (a caller adding its own scratch uses a different slot).
enum ScratchUse : int { SCRATCH_PACK_A = 0, SCRATCH_PACK_B = 1, SCRATCH_ROW = 2, SCRATCH_MISC = 3, SCRATCH_GEMV = 4 };

// A 64-byte aligned buffer of at least `count` floats, private to the calling thread.
// Contents are not preserved when it grows.
inline float* thread_scratch(int slot, size_t count) {
    thread_local detail::ScratchSlot slots[detail::kScratchSlots];
    detail::ScratchSlot& s = slots[slot];
    if (s.capacity < count) {
        std::free(s.data);
        size_t grown = count + count / 4 + 64;
        size_t bytes = (grown * sizeof(float) + 63) / 64 * 64;
        s.data = static_cast<float*>(std::aligned_alloc(64, bytes));
        if (s.data == nullptr) throw std::bad_alloc();
        s.capacity = grown;
    }
    return s.data;
}

}  // namespace nnc
