"""Loop builders shared by the C++ emit rules: broadcast-aware elementwise loops (AVX2 + scalar tail)
and strided copies. They produce plain C++ text; the op rules decide what goes inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PARALLEL_MIN = 1 << 15      # elements below which a loop runs on one thread


@dataclass
class Operand:
    ptr: str                 # C expression of the base pointer
    shape: tuple[int, ...]
    ctype: str = "float"


def contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


def broadcast_strides(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    """Strides of ``shape`` read at the indices of ``out_shape`` (0 along broadcast dims)."""
    pad = len(out_shape) - len(shape)
    own = contiguous_strides(shape)
    found = []
    for d, size in enumerate(out_shape):
        k = d - pad
        found.append(0 if k < 0 or shape[k] == 1 else own[k])
    return found


def collapse(out_shape: tuple[int, ...], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand walks contiguously; drop size-1 dims."""
    dims = [(size, [s[d] for s in strides]) for d, size in enumerate(out_shape) if size != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, ss in dims:
        if merged:
            prev_size, prev = merged[-1]
            if all(p == s * size for p, s in zip(prev, ss)):
                merged[-1] = (prev_size * size, ss)
                continue
        merged.append((size, ss))
    sizes = [m[0] for m in merged]
    per_operand = [[m[1][k] for m in merged] for k in range(len(strides))]
    return sizes, per_operand


def unravel_offsets(var: str, sizes: list[int], strides: list[list[int]], names: list[str]) -> list[str]:
    """C statements computing ``names[k] = offset of operand k`` for flat outer index ``var``."""
    if not sizes:
        return [f"const int64_t {n} = 0;" for n in names]
    if len(sizes) == 1:
        return [f"const int64_t {n} = {var} * {s[0]};" for n, s in zip(names, strides)]
    lines = [f"int64_t rem_ = {var};"] + [f"int64_t {n} = 0;" for n in names]
    for d in reversed(range(len(sizes))):
        lines.append(f"{{ const int64_t i_ = rem_ % {sizes[d]}; rem_ /= {sizes[d]};")
        for n, s in zip(names, strides):
            if s[d]:
                lines.append(f"  {n} += i_ * {s[d]};")
        lines.append("}")
    return lines


def elementwise_loop(out: Operand, operands: list[Operand], vector_expr, scalar_expr, *, vectorize: bool = True,
                     needs_index: bool = False, vector512_expr=None) -> str:
    """out[i] = f(operands broadcast to out at i), for every i of ``out.shape``.

    ``vector_expr(loads) -> (setup lines, result expr)`` over __m256 operand values and
    ``scalar_expr(values, index_expr) -> (setup lines, result expr)`` over scalars. Operands whose
    inner stride is 0 are loaded once per row. ``vector512_expr`` (same contract over __m512 values),
    when given, runs each row's 16-lane part first, in a lambda compiled for AVX-512F and called only
    when ``nnc::simd_use_avx512()``; the 8-lane loop and the scalar tail finish the row.
    """
    numel = math.prod(out.shape)
    strides = [broadcast_strides(op.shape, out.shape) for op in operands]
    sizes, per_operand = collapse(out.shape, strides + [contiguous_strides(out.shape)])
    if not sizes:
        sizes, per_operand = [1], [[0] for _ in per_operand]
    inner = sizes[-1]
    outer_sizes = sizes[:-1]
    inner_strides = [s[-1] for s in per_operand[:-1]]
    outer_strides = [s[:-1] for s in per_operand[:-1]]
    rows = math.prod(outer_sizes) if outer_sizes else 1
    names = [f"o{k}_" for k in range(len(operands))]
    lines = []
    chunked = rows == 1 and inner >= 2 * PARALLEL_MIN
    if chunked:
        # one long row: split it into chunks so both threads work
        chunk = 8192
        lines.append(f"#pragma omp parallel for schedule(static)")
        lines.append(f"for (int64_t c_ = 0; c_ < {(inner + chunk - 1) // chunk}; ++c_) {{")
        lines.append(f"    const int64_t r_ = 0; (void)r_;")
        lines.append(f"    const int64_t j0_ = c_ * {chunk}, j1_ = j0_ + {chunk} < {inner} ? j0_ + {chunk} : {inner};")
        lines += [f"    const int64_t {n} = 0;" for n in names]
    else:
        parallel = numel >= PARALLEL_MIN and rows > 1
        if parallel:
            lines.append("#pragma omp parallel for schedule(static)")
        lines.append(f"for (int64_t r_ = 0; r_ < {rows}; ++r_) {{")
        lines += ["    " + s for s in unravel_offsets("r_", outer_sizes, outer_strides, names)]
        lines.append(f"    const int64_t j0_ = 0, j1_ = {inner};")
    lines.append(f"    {out.ctype}* const out_ = {out.ptr} + r_ * {inner};")
    scalar_loads = []
    for k, op in enumerate(operands):
        if inner_strides[k] == 0:
            lines.append(f"    const {op.ctype} s{k}_ = {op.ptr}[{names[k]}];")
            scalar_loads.append(f"s{k}_")
        else:
            scalar_loads.append(f"{op.ptr}[{names[k]} + j_]")
    vector = vectorize and out.ctype == "float" and all(op.ctype == "float" for op in operands)
    if vector:
        vec_loads = []
        for k, op in enumerate(operands):
            if inner_strides[k] == 0:
                lines.append(f"    const __m256 b{k}_ = _mm256_set1_ps(s{k}_);")
                vec_loads.append(f"b{k}_")
            else:
                vec_loads.append(f"_mm256_loadu_ps({op.ptr} + {names[k]} + j_)")
        start = "j0_"
        if vector512_expr is not None and min(inner, 8192) >= 16:
            lines += _zmm_part(operands, inner_strides, names, vector512_expr)
            start = "jz_"
        setup, expr = vector_expr(vec_loads)
        lines.append(f"    for (int64_t j_ = {start}; j_ + 8 <= j1_; j_ += 8) {{")
        lines += ["        " + s for s in setup]
        lines.append(f"        _mm256_storeu_ps(out_ + j_, {expr});")
        lines.append("    }")
    index = f"(r_ * {inner} + j_)"
    setup, expr = scalar_expr(scalar_loads, index)
    lines.append(f"    const int64_t tail_ = {f'{start} + (j1_ - {start}) / 8 * 8' if vector else 'j0_'};")
    if not vector and not needs_index:
        lines.append("    #pragma omp simd")
    lines.append("    for (int64_t j_ = tail_; j_ < j1_; ++j_) {")
    lines += ["        " + s for s in setup]
    lines.append(f"        out_[j_] = {expr};")
    lines.append("    }")
    lines.append("}")
    return "\n".join(lines)


def _zmm_part(operands: list[Operand], inner_strides: list[int], names: list[str], vector512_expr) -> list[str]:
    """Lines running [j0_, jz_) of a row 16 lanes at a time on AVX-512F CPUs (jz_ = j0_ elsewhere)."""
    loads = []
    for k, op in enumerate(operands):
        loads.append(f"_mm512_set1_ps(s{k}_)" if inner_strides[k] == 0 else
                     f"_mm512_loadu_ps({op.ptr} + {names[k]} + j_)")
    setup, expr = vector512_expr(loads)
    lines = ["    int64_t jz_ = j0_;",
             "    if (nnc::simd_use_avx512()) {",
             '        jz_ = [&]() __attribute__((target("avx512f"))) -> int64_t {',
             "            int64_t j_ = j0_;",
             "            for (; j_ + 16 <= j1_; j_ += 16) {"]
    lines += ["                " + s for s in setup]
    lines += [f"                _mm512_storeu_ps(out_ + j_, {expr});",
              "            }",
              "            return j_;",
              "        }();",
              "    }"]
    return lines


def strided_copy(dst: str, src: str, out_shape: tuple[int, ...], src_strides: list[int], src_offset: int | str = 0,
                 ctype: str = "float") -> str:
    """dst (contiguous, ``out_shape``) = src read with ``src_strides`` (elements) from ``src_offset``."""
    sizes, (s_src, s_dst) = collapse(out_shape, [src_strides, contiguous_strides(out_shape)])
    if not sizes:
        return f"{dst}[0] = {src}[{src_offset}];"
    inner, inner_stride = sizes[-1], s_src[-1]
    rows = math.prod(sizes[:-1]) if len(sizes) > 1 else 1
    lines = []
    if math.prod(out_shape) >= PARALLEL_MIN and rows > 1:
        lines.append("#pragma omp parallel for schedule(static)")
    lines.append(f"for (int64_t r_ = 0; r_ < {rows}; ++r_) {{")
    lines += ["    " + s for s in unravel_offsets("r_", sizes[:-1], [s_src[:-1]], ["o_"])]
    lines.append(f"    const {ctype}* const s_ = {src} + {src_offset} + o_;")
    lines.append(f"    {ctype}* const d_ = {dst} + r_ * {inner};")
    if inner_stride == 1 and ctype == "float" and inner % 8 == 0 and inner <= 256:
        # short contiguous runs (e.g. one head's row): an inlined vector copy instead of a memcpy call
        lines.append(f"    for (int64_t j_ = 0; j_ < {inner}; j_ += 8) _mm256_storeu_ps(d_ + j_, _mm256_loadu_ps(s_ + j_));")
    elif inner_stride == 1:
        lines.append(f"    std::memcpy(d_, s_, sizeof({ctype}) * {inner});")
    else:
        lines.append(f"    for (int64_t j_ = 0; j_ < {inner}; ++j_) d_[j_] = s_[j_ * {inner_stride}];")
    lines.append("}")
    return "\n".join(lines)
