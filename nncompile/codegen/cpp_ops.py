"""``emit_cpp`` rules: elementwise ops, fused chains, GEMM-based ops and data movement.

Each rule is ``rule(ctx, node) -> str`` (C++ statements; see ``CppContext``). Elementwise ops share one
table of vector (__m256) and scalar expressions, so a fused chain becomes one AVX2 loop whose scalar
tail runs the same polynomials (``native/nnc_math.h``); a chain with a transcendental step also gets a
16-lane zmm loop (``VECTOR512``, ``native/nnc_math512.h``) taken at run time on AVX-512F CPUs. Rules are attached to the op table with
``set_rule`` when this module is imported.
"""
from __future__ import annotations

import math
import weakref

from nncompile.codegen.cpp import CTYPES, CppContext, ctype
from nncompile.codegen.cpp_loops import Operand, broadcast_strides, contiguous_strides, elementwise_loop, strided_copy
from nncompile.errors import BuildError
from nncompile.ir.graph import Node
from nncompile.ops.base import broadcast_shapes, get_op, normalize_axis, set_rule
from nncompile.ops.fused import steps
from nncompile.passes.plan_memory import VIEW_OPS


def f(value: float) -> str:
    """A float literal in C++."""
    if math.isinf(value):
        return "INFINITY" if value > 0 else "-INFINITY"
    return f"{float(value)!r}f"


# op -> (vector rule, scalar rule); each gets argument expressions and the attrs, returns an expression
ZERO, ONE = "_mm256_setzero_ps()", "_mm256_set1_ps(1.0f)"
SIGN = "_mm256_set1_ps(-0.0f)"

VECTOR = {
    "relu": lambda a, **k: f"_mm256_max_ps({a[0]}, {ZERO})",
    "gelu": lambda a, approximate="none", **k: f"nnc::gelu_{'tanh' if approximate == 'tanh' else 'erf'}_ps({a[0]})",
    "tanh": lambda a, **k: f"nnc::tanh_ps({a[0]})",
    "sigmoid": lambda a, **k: f"nnc::sigmoid_ps({a[0]})",
    "silu": lambda a, **k: f"_mm256_mul_ps({a[0]}, nnc::sigmoid_ps({a[0]}))",
    "exp": lambda a, **k: f"nnc::exp_ps({a[0]})",
    "log": lambda a, **k: f"nnc::log_ps({a[0]})",
    "sqrt": lambda a, **k: f"_mm256_sqrt_ps({a[0]})",
    "rsqrt": lambda a, **k: f"_mm256_div_ps({ONE}, _mm256_sqrt_ps({a[0]}))",
    "neg": lambda a, **k: f"_mm256_xor_ps({a[0]}, {SIGN})",
    "abs": lambda a, **k: f"_mm256_andnot_ps({SIGN}, {a[0]})",
    "erf": lambda a, **k: f"nnc::erf_ps({a[0]})",
    "leaky_relu": lambda a, negative_slope=0.01, **k:
        f"_mm256_blendv_ps(_mm256_mul_ps({a[0]}, _mm256_set1_ps({f(negative_slope)})), {a[0]}, "
        f"_mm256_cmp_ps({a[0]}, {ZERO}, _CMP_GT_OQ))",
    "clamp": lambda a, min=None, max=None, **k: _clamp_vec(a[0], min, max),
    "scale": lambda a, factor, **k: f"_mm256_mul_ps({a[0]}, _mm256_set1_ps({f(factor)}))",
    "add_scalar": lambda a, value, **k: f"_mm256_add_ps({a[0]}, _mm256_set1_ps({f(value)}))",
    "add": lambda a, **k: f"_mm256_add_ps({a[0]}, {a[1]})",
    "sub": lambda a, **k: f"_mm256_sub_ps({a[0]}, {a[1]})",
    "mul": lambda a, **k: f"_mm256_mul_ps({a[0]}, {a[1]})",
    "div": lambda a, **k: f"_mm256_div_ps({a[0]}, {a[1]})",
    "maximum": lambda a, **k: f"_mm256_max_ps({a[0]}, {a[1]})",
    "minimum": lambda a, **k: f"_mm256_min_ps({a[0]}, {a[1]})",
    "identity": lambda a, **k: a[0],
    "gt": lambda a, **k: f"_mm256_cmp_ps({a[0]}, {a[1]}, _CMP_GT_OQ)",
    "ge": lambda a, **k: f"_mm256_cmp_ps({a[0]}, {a[1]}, _CMP_GE_OQ)",
    "eq": lambda a, **k: f"_mm256_cmp_ps({a[0]}, {a[1]}, _CMP_EQ_OQ)",
    "where": lambda a, **k: f"_mm256_blendv_ps({a[2]}, {a[1]}, {a[0]})",
}


# The zmm (AVX-512F) forms of the ops a chain may hold to get a 16-lane loop, chosen at run time
# (native/nnc_math512.h); each computes what its VECTOR twin computes, lane by lane.
Z_ZERO, Z_ONE = "_mm512_setzero_ps()", "_mm512_set1_ps(1.0f)"

VECTOR512 = {
    "relu": lambda a, **k: f"_mm512_max_ps({a[0]}, {Z_ZERO})",
    "gelu": lambda a, approximate="none", **k: f"nnc::gelu_{'tanh' if approximate == 'tanh' else 'erf'}_ps512({a[0]})",
    "tanh": lambda a, **k: f"nnc::tanh_ps512({a[0]})",
    "sigmoid": lambda a, **k: f"nnc::sigmoid_ps512({a[0]})",
    "silu": lambda a, **k: f"_mm512_mul_ps({a[0]}, nnc::sigmoid_ps512({a[0]}))",
    "exp": lambda a, **k: f"nnc::exp_ps512({a[0]})",
    "sqrt": lambda a, **k: f"_mm512_sqrt_ps({a[0]})",
    "rsqrt": lambda a, **k: f"_mm512_div_ps({Z_ONE}, _mm512_sqrt_ps({a[0]}))",
    "neg": lambda a, **k: f"nnc::neg_ps512({a[0]})",
    "abs": lambda a, **k: f"nnc::abs_ps512({a[0]})",
    "erf": lambda a, **k: f"nnc::erf_ps512({a[0]})",
    "clamp": lambda a, min=None, max=None, **k: _clamp_vec(a[0], min, max, "_mm512"),
    "scale": lambda a, factor, **k: f"_mm512_mul_ps({a[0]}, _mm512_set1_ps({f(factor)}))",
    "add_scalar": lambda a, value, **k: f"_mm512_add_ps({a[0]}, _mm512_set1_ps({f(value)}))",
    "add": lambda a, **k: f"_mm512_add_ps({a[0]}, {a[1]})",
    "sub": lambda a, **k: f"_mm512_sub_ps({a[0]}, {a[1]})",
    "mul": lambda a, **k: f"_mm512_mul_ps({a[0]}, {a[1]})",
    "div": lambda a, **k: f"_mm512_div_ps({a[0]}, {a[1]})",
    "maximum": lambda a, **k: f"_mm512_max_ps({a[0]}, {a[1]})",
    "minimum": lambda a, **k: f"_mm512_min_ps({a[0]}, {a[1]})",
    "identity": lambda a, **k: a[0],
}

# A chain gets the zmm loop only when it holds one of these (compute-bound: polynomials and divides
# per element); a chain of adds and multiplies runs at memory speed on either width.
WIDE_WORTH = {"gelu", "tanh", "sigmoid", "silu", "exp", "erf"}


def _clamp_vec(a, lo, hi, prefix="_mm256"):
    if lo is not None:
        a = f"{prefix}_max_ps({a}, {prefix}_set1_ps({f(lo)}))"
    if hi is not None:
        a = f"{prefix}_min_ps({a}, {prefix}_set1_ps({f(hi)}))"
    return a


def _clamp_scalar(a, lo, hi):
    if lo is not None:
        a = f"std::fmax({a}, {f(lo)})"
    if hi is not None:
        a = f"std::fmin({a}, {f(hi)})"
    return a


def _pow_scalar(a, exponent):
    if exponent == 2:
        return f"({a} * {a})"
    if exponent == 1:
        return a
    if exponent == 0.5:
        return f"std::sqrt({a})"
    return f"std::pow({a}, {f(exponent)})"


SCALAR = {
    "relu": lambda a, **k: f"({a[0]} > 0.0f ? {a[0]} : 0.0f)",
    "gelu": lambda a, approximate="none", **k: f"nnc::gelu_{'tanh' if approximate == 'tanh' else 'erf'}_scalar({a[0]})",
    "tanh": lambda a, **k: f"nnc::tanh_scalar({a[0]})",
    "sigmoid": lambda a, **k: f"nnc::sigmoid_scalar({a[0]})",
    "silu": lambda a, **k: f"({a[0]} * nnc::sigmoid_scalar({a[0]}))",
    "exp": lambda a, **k: f"nnc::exp_scalar({a[0]})",
    "log": lambda a, **k: f"nnc::log_scalar({a[0]})",
    "sqrt": lambda a, **k: f"std::sqrt({a[0]})",
    "rsqrt": lambda a, **k: f"(1.0f / std::sqrt({a[0]}))",
    "neg": lambda a, **k: f"(-{a[0]})",
    "abs": lambda a, **k: f"std::fabs({a[0]})",
    "erf": lambda a, **k: f"nnc::erf_scalar({a[0]})",
    "leaky_relu": lambda a, negative_slope=0.01, **k: f"({a[0]} > 0.0f ? {a[0]} : {a[0]} * {f(negative_slope)})",
    "clamp": lambda a, min=None, max=None, **k: _clamp_scalar(a[0], min, max),
    "scale": lambda a, factor, **k: f"({a[0]} * {f(factor)})",
    "add_scalar": lambda a, value, **k: f"({a[0]} + {f(value)})",
    "pow_scalar": lambda a, exponent, **k: _pow_scalar(a[0], exponent),
    "add": lambda a, **k: f"({a[0]} + {a[1]})",
    "sub": lambda a, **k: f"({a[0]} - {a[1]})",
    "mul": lambda a, **k: f"({a[0]} * {a[1]})",
    "div": lambda a, **k: f"({a[0]} / {a[1]})",
    "maximum": lambda a, **k: f"std::max({a[0]}, {a[1]})",
    "minimum": lambda a, **k: f"std::min({a[0]}, {a[1]})",
    "where": lambda a, **k: f"({a[0]} ? {a[1]} : {a[2]})",
    "identity": lambda a, **k: a[0],
    "gt": lambda a, **k: f"({a[0]} > {a[1]})",
    "ge": lambda a, **k: f"({a[0]} >= {a[1]})",
    "eq": lambda a, **k: f"({a[0]} == {a[1]})",
}


def _pow_vec(a, exponent, prefix="_mm256"):
    if exponent == 2:
        return f"{prefix}_mul_ps({a}, {a})"
    if exponent == 1:
        return a
    if exponent == 0.5:
        return f"{prefix}_sqrt_ps({a})"
    return None


def _dropout_scalar(a, index, p, seed, training, offset=None):
    if not training or p == 0:
        return a
    threshold = min(int(math.ceil(p * 2**32)), 2**32 - 1)
    seed_expr = f"{seed}u" if offset is None else f"((uint32_t){seed}u + (uint32_t)({offset}) * 0x9E3779B1u)"
    return f"(nnc_dropout_hash({seed_expr}, (uint32_t){index}) >= {threshold}u ? {a} * {f(1.0 / (1.0 - p))} : 0.0f)"


DROPOUT_HASH = """
static inline uint32_t nnc_dropout_hash(uint32_t seed, uint32_t i) {
    uint32_t h = i * 0x9E3779B1u + seed * 0x85EBCA77u + 0x165667B1u;
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}
"""


def chain_expressions(body, inputs: list[str], vector: bool, index: str = "0", lanes: int = 8):
    """Expressions for every step of an elementwise ``body``; None when a step has no vector form.
    ``lanes``: 8 (__m256, the VECTOR table) or 16 (__m512, VECTOR512) for the vector form."""
    temps: list[str] = []
    setup: list[str] = []
    vtype, prefix, table_v = ("__m512", "_mm512", VECTOR512) if lanes == 16 else ("__m256", "_mm256", VECTOR)
    for k, (op, args, attrs) in enumerate(body):
        values = [inputs[int(a[1:])] if a[0] == "x" else temps[int(a[1:])] for a in args]
        if op == "dropout":
            if vector and attrs.get("training", True) and attrs.get("p", 0.5) > 0:
                return None
            expr = values[0] if vector else _dropout_scalar(values[0], index, attrs.get("p", 0.5), attrs.get("seed", 0),
                                                            attrs.get("training", True),
                                                            values[1] if len(values) > 1 else None)
        elif op == "pow_scalar" and vector:
            expr = _pow_vec(values[0], attrs["exponent"], prefix)
            if expr is None:
                return None
        elif op == "cast":
            if vector:
                return None
            expr = f"({CTYPES[attrs['dtype']]})({values[0]})"
        else:
            table = table_v if vector else SCALAR
            if op not in table:
                if vector:
                    return None
                raise BuildError(f"op '{op}' has no elementwise C++ form")
            expr = table[op](values, **attrs)
        name = f"{'v' if vector else 's'}t{k}_"
        setup.append(f"const {vtype if vector else 'auto'} {name} = {expr};")
        temps.append(name)
    return setup, temps[-1]


def emit_chain(ctx: CppContext, body, operands: list[Operand], out_ptr: str) -> str:
    """One loop computing an elementwise ``body`` over ``operands`` into ``out_ptr``."""
    out = Operand(out_ptr, ctx.out_type.shape, ctype(ctx.out_type.dtype))
    names = [f"a{i}" for i in range(len(operands))]
    vectorizable = chain_expressions(body, names, True) is not None
    needs_index = any(op == "dropout" for op, _, _ in body)
    wide = (vectorizable and any(op in WIDE_WORTH for op, _, _ in body)
            and chain_expressions(body, names, True, lanes=16) is not None)
    return elementwise_loop(
        out, operands,
        lambda loads: chain_expressions(body, loads, True),
        lambda loads, index: chain_expressions(body, loads, False, index),
        vectorize=vectorizable and out.ctype == "float", needs_index=needs_index,
        vector512_expr=(lambda loads: chain_expressions(body, loads, True, lanes=16)) if wide else None)


def operand(ctx: CppContext, name: str) -> Operand:
    t = ctx.type(name)
    return Operand(ctx.ptr(name), t.shape, ctype(t.dtype))


def emit_elementwise(ctx: CppContext, node: Node) -> str:
    if node.op == "mul" and node.name in products_read_in_place(ctx.emitter):
        return "// no product: every reader is a sum / mean multiplying the two factors itself"
    body = [(node.op, tuple(f"x{i}" for i in range(len(node.inputs))), dict(node.attrs))]
    return emit_chain(ctx, body, [operand(ctx, n) for n in node.inputs], ctx.out)


# GEMM-headed chains --------------------------------------------------------------------------------

EPILOGUE_ACTS = {"relu": "nnc::ACT_RELU", "tanh": "nnc::ACT_TANH", "sigmoid": "nnc::ACT_SIGMOID", "silu": "nnc::ACT_SILU"}


def _act_code(op: str, attrs: dict) -> str | None:
    if op == "gelu":
        return "nnc::ACT_GELU_TANH" if attrs.get("approximate") == "tanh" else "nnc::ACT_GELU_ERF"
    return EPILOGUE_ACTS.get(op)


def _absorb_epilogue(ctx: CppContext, body, externals: list[str]) -> tuple[dict, int]:
    """Match bias -> activation -> residual after the head; returns Epilogue fields and steps used."""
    head_op, _, head_attrs = body[0]
    out_shape = ctx.out_type.shape
    fields: dict[str, str] = {}
    used = 1
    cursor = "t0"

    def other_arg(args):
        if len(args) == 2 and cursor in args and args[0] != args[1]:
            other = args[1] if args[0] == cursor else args[0]
            if other.startswith("x"):
                return externals[int(other[1:])]
        return None

    if used < len(body) and body[used][0] == "add" and head_op != "conv2d":
        other = other_arg(body[used][1])
        has_bias = head_op == "linear" and len(body[0][1]) == 3
        if other is not None and not has_bias and ctx.type(other).shape == (out_shape[-1],):
            fields["col_bias"] = ctx.ptr(other)
            cursor, used = f"t{used}", used + 1
    if used < len(body):
        op, args, attrs = body[used]
        code = _act_code(op, attrs)
        if code is not None and args == (cursor,):
            fields["act"] = code
            cursor, used = f"t{used}", used + 1
    if used < len(body) and body[used][0] == "add":
        other = other_arg(body[used][1])
        if other is not None and ctx.type(other).shape == out_shape and ctx.type(other).dtype == "f32":
            fields["residual"] = ctx.ptr(other)
            fields["ldr"] = str(out_shape[-1] if head_op != "conv2d" else 0)
            cursor, used = f"t{used}", used + 1
    return fields, used


def epilogue_decl(fields: dict[str, str], name: str = "epi_") -> list[str]:
    lines = [f"nnc::Epilogue {name};"]
    for key, value in fields.items():
        lines.append(f"{name}.{key} = {value};")
    return lines


_FOLDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PRODUCT_FOLDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _steps_follow_graph(emitter) -> bool:
    """Whether the memory plan's steps are the graph's node order (the folds below reason in steps)."""
    lifetimes = emitter.plan.lifetimes
    return all(lifetimes[node.name][0] == i for i, node in enumerate(emitter.graph.nodes) if node.name in lifetimes)


def _others_over(plan, buffer: dict, after: int, upto: int) -> bool:
    """Whether another arena buffer over ``buffer``'s bytes is live at some step in (after, upto]."""
    lo, hi = buffer["offset"], buffer["offset"] + buffer["size"]
    return any(other is not buffer and other["offset"] < hi and lo < other["offset"] + other["size"]
               and other["start"] <= upto and other["end"] > after for other in plan.buffers)


def _storage_untouched(emitter):
    """``untouched(source, from_step, reader_step)``: whether ``source``'s storage holds its value
    unchanged from step ``from_step`` up to step ``reader_step`` (no value written into its buffer, and
    no other arena buffer over its bytes once it is dead), so a node at ``reader_step`` may read it in
    place of a copy or product made at ``from_step``; None when the plan's steps do not follow the
    graph's order."""
    if not _steps_follow_graph(emitter):
        return None
    graph, plan = emitter.graph, emitter.plan
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    outputs = set(graph.outputs)
    buffer_of = {v: b for b in plan.buffers if b.get("kind") == "value" for v in b["values"]}

    def untouched(source: str, from_step: int, reader_step: int) -> bool:
        kind = plan.storage[source][0]
        if kind == "input":
            return True
        between = graph.nodes[from_step + 1:reader_step]
        if kind in ("param", "output"):
            # caller-owned memory: nothing in between may write a graph output (an in-graph update of a
            # parameter, e.g. running statistics, is written as an output)
            return not any(n.name in outputs or plan.storage[n.name][0] == "output" for n in between)
        base = source
        while base not in buffer_of and base in index and graph.nodes[index[base]].op in VIEW_OPS:
            base = graph.nodes[index[base]].inputs[0]   # a view (reshape, ...): its base's buffer holds it
        buffer = buffer_of.get(base)
        if kind != "arena" or buffer is None:
            return False
        if buffer["end"] <= reader_step:
            # the source died at or after from_step: no arena buffer overlapping it may be live between
            # its end and the reader
            if _others_over(plan, buffer, buffer["end"], reader_step):
                return False
        return not any(from_step < index.get(v, -1) <= reader_step for v in buffer["values"] if v != base)

    return untouched


def _scan_folds(emitter, cache, fold) -> dict:
    """Nodes the emitter folds into their readers, cached per emitter: ``fold(node, readers, untouched)``
    returns what to record for ``node`` (not a graph output, with at least one reader) or None, where
    ``untouched(name, reader)`` tells whether ``name``'s storage holds its value from ``node``'s step up
    to ``reader``'s (see _storage_untouched). Nothing folds when the plan's steps do not follow the
    graph's order."""
    found = cache.get(emitter)
    if found is not None:
        return found
    graph = emitter.graph
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    users = graph.users()
    outputs = set(graph.outputs)
    untouched = _storage_untouched(emitter)
    found = {}
    for node in graph.nodes if untouched is not None else ():
        readers = [graph.node(u) for u in users.get(node.name, [])]
        if node.name in outputs or not readers:
            continue
        value = fold(node, readers, lambda name, reader: untouched(name, index[node.name], index[reader.name]))
        if value is not None:
            found[node.name] = value
    cache[emitter] = found
    return found


def transposes_read_in_place(emitter) -> dict[str, str]:
    """2-D transposes whose every reader is a 2-D ``matmul`` that can read the transpose's source in place
    (``nnc::sgemm`` with the operand's transposed flag): transpose name -> source name. Those transposes
    emit no copy. A fold needs the source's storage untouched from the transpose up to each reader (no
    value written into its buffer, and no other arena buffer over its bytes once it is dead), since the
    reader now reads the source later than the transpose did."""
    graph = emitter.graph

    def fold(node, readers, untouched):
        if node.op != "transpose" or node.type.rank != 2:
            return None
        source = node.inputs[0]
        ok = all(r.op == "matmul" and len(r.inputs) == 2 and all(graph.type_of(a).rank == 2 for a in r.inputs)
                 and untouched(source, r) for r in readers)
        return source if ok else None

    return _scan_folds(emitter, _FOLDS, fold)


def products_read_in_place(emitter) -> dict[str, tuple[str, str]]:
    """f32 ``mul`` nodes of two same-shape operands whose every reader is a sum / mean that reads the
    two factors and multiplies them itself (``cpp_ops_nn.reads_product``; e.g. the layer-norm backward's
    ``mean(g * xhat)``): mul name -> its two operands. Those muls emit nothing, which saves writing the
    product and reading it back; the reader forms the same float product, so results are unchanged. A
    fold needs both operands' storage untouched from the mul up to each reader."""
    from nncompile.codegen.cpp_ops_nn import reads_product

    graph = emitter.graph

    def fold(node, readers, untouched):
        if (node.op != "mul" or node.type.dtype != "f32"
                or any(graph.type_of(a) != node.type for a in node.inputs)):
            return None
        ok = all(reads_product(graph, r) and all(untouched(a, r) for a in node.inputs) for r in readers)
        return (node.inputs[0], node.inputs[1]) if ok else None

    return _scan_folds(emitter, _PRODUCT_FOLDS, fold)


def gemm_call(ctx: CppContext, op: str, args: list[str], attrs: dict, out_ptr: str, epi: str) -> list[str]:
    """C++ statements computing ``op`` (linear / matmul) into out_ptr with epilogue ``epi``."""
    types = [ctx.type(a) for a in args]
    for t in types:
        if t.dtype != "f32":
            raise BuildError(f"{op}: the C++ backend's GEMM needs f32 inputs, got {t.dtype}", ctx.node.loc)
    ptrs = [ctx.ptr(a) for a in args]
    if op == "linear":
        if types[1].sparsity is not None:   # a fixed pattern: the sparse kernel when the chooser picks it
            from nncompile.codegen.cpp_sparse import sparse_linear_call

            found = sparse_linear_call(ctx, args, out_ptr, epi) or []
            if len(found) > 1:
                return found
        x, w = types[0], types[1]
        k, n = x.shape[-1], w.shape[0]
        m = x.numel // k if k else 0
        lines = found if types[1].sparsity is not None else []
        if len(args) == 3:
            lines.append(f"{epi}.col_bias = {ptrs[2]};")
        lines.append(f"nnc::sgemm(false, true, {m}, {n}, {k}, {ptrs[0]}, {k}, {ptrs[1]}, {k}, {out_ptr}, {n}, 0.0f, {epi});")
        return lines
    a, b = types
    folds = transposes_read_in_place(ctx.emitter) if op == "matmul" and a.rank == b.rank == 2 else {}
    if args[0] in folds or args[1] in folds:
        # a 2-D transpose feeding this matmul is read in place: C = op(A) @ op(B) with the flags set
        (m, k), n = a.shape, b.shape[1]
        ta, tb = args[0] in folds, args[1] in folds
        pa = ctx.ptr(folds[args[0]]) if ta else ptrs[0]
        pb = ctx.ptr(folds[args[1]]) if tb else ptrs[1]
        return [f"nnc::sgemm({'true' if ta else 'false'}, {'true' if tb else 'false'}, {m}, {n}, {k}, {pa}, "
                f"{m if ta else k}, {pb}, {k if tb else n}, {out_ptr}, {n}, 0.0f, {epi});"]
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = ctx.out_type.numel // (m * n) if m * n else 0
    b_batch = math.prod(b_shape[:-2])
    if b_batch == 1:
        # every batch shares B: fold the batch into M
        rows = math.prod(a_shape[:-1])
        a_rows_batch = math.prod(a_shape[:-2])
        if a_rows_batch * 1 == batch:
            return [f"nnc::sgemm(false, false, {rows}, {n}, {k}, {ptrs[0]}, {k}, {ptrs[1]}, {n}, {out_ptr}, {n}, 0.0f, {epi});"]
    out_batch_shape = broadcast_shapes("matmul", a_shape[:-2], b_shape[:-2])
    a_strides = broadcast_strides(a_shape[:-2], out_batch_shape)
    b_strides = broadcast_strides(b_shape[:-2], out_batch_shape)
    lines = [f"for (int64_t bt_ = 0; bt_ < {batch}; ++bt_) {{", "    int64_t rem_ = bt_, oa_ = 0, ob_ = 0;"]
    for d in reversed(range(len(out_batch_shape))):
        lines.append(f"    {{ const int64_t i_ = rem_ % {out_batch_shape[d]}; rem_ /= {out_batch_shape[d]}; "
                     f"oa_ += i_ * {a_strides[d]}; ob_ += i_ * {b_strides[d]}; }}")
    lines.append(f"    nnc::sgemm(false, false, {m}, {n}, {k}, {ptrs[0]} + oa_ * {m * k}, {k}, {ptrs[1]} + ob_ * {k * n}, {n}, "
                 f"{out_ptr} + bt_ * {m * n}, {n}, 0.0f, {epi});")
    lines.append("}")
    return lines


def emit_gemm_op(ctx: CppContext, node: Node) -> str:
    return "\n".join(epilogue_decl({}) + gemm_call(ctx, node.op, list(node.inputs), dict(node.attrs), ctx.out, "epi_"))


_SUM_FOLDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sums_computed_by_producer(emitter) -> dict[str, str]:
    """sum / mean nodes over the leading axes (bias gradients) of a ``fused`` node's output, or of a view
    of it: reduction name -> producer name. The producer adds the column sums right after writing its
    output, while it is still in cache (the reduction otherwise runs later, after GEMMs that evicted
    it), and the reduction emits nothing. Its output is then written early, so its storage must be
    caller memory or an arena buffer that nothing else uses from the producer's step to its own."""
    found = _SUM_FOLDS.get(emitter)
    if found is not None:
        return found
    from nncompile.codegen.cpp_ops_nn import reads_leading

    graph, plan = emitter.graph, emitter.plan
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    buffer_of = {v: b for b in plan.buffers if b.get("kind") == "value" for v in b["values"]}
    products = products_read_in_place(emitter)
    found = {}
    if not _steps_follow_graph(emitter):
        _SUM_FOLDS[emitter] = found
        return found

    def storage_free(name: str, first: int, last: int) -> bool:
        kind = plan.storage[name][0]
        if kind == "output":
            return True
        buffer = buffer_of.get(name)
        if kind != "arena" or buffer is None or buffer["start"] != last:
            return False
        if any(v != name and plan.lifetimes.get(v, (last + 1, 0))[0] <= last for v in buffer["values"]):
            return False
        return not _others_over(plan, buffer, first, last)

    for node in graph.nodes:
        if node.op not in ("sum", "mean") or node.inputs[0] in products or not reads_leading(graph, node):
            continue
        source = node.inputs[0]
        while source in index and graph.nodes[index[source]].op in VIEW_OPS:
            source = graph.nodes[index[source]].inputs[0]
        producer = graph.nodes[index[source]] if source in index else None
        if (producer is None or producer.op != "fused" or producer.type.dtype != "f32"
                or producer.type.numel != graph.type_of(node.inputs[0]).numel):
            continue
        if storage_free(node.name, index[producer.name], index[node.name]):
            found[node.name] = producer.name
    _SUM_FOLDS[emitter] = found
    return found


def emit_fused(ctx: CppContext, node: Node) -> str:
    """The fused node's code, then the column sums of any reduction folded into it
    (``sums_computed_by_producer``)."""
    from nncompile.codegen.cpp_ops_nn import leading_sum_code

    code = [_emit_fused_body(ctx, node)]
    for reduction, producer in sums_computed_by_producer(ctx.emitter).items():
        if producer == node.name:
            code.append(f"// {reduction}: column sums while the output is in cache")
            code.append(leading_sum_code(ctx.emitter.graph.node(reduction), ctx.emitter.graph, ctx.out,
                                         ctx.ptr(reduction)))
    return "\n".join(code)


def _emit_fused_body(ctx: CppContext, node: Node) -> str:
    body = steps(node.attrs["body"])
    externals = list(node.inputs)
    head_op = body[0][0]
    if head_op not in ("linear", "matmul", "conv2d"):
        return emit_chain(ctx, body, [operand(ctx, n) for n in externals], ctx.out)
    fields, used = _absorb_epilogue(ctx, body, externals)
    later_reads = {a for _, args, _ in body[used:] for a in args}
    if any(f"t{j}" in later_reads for j in range(used - 1)):
        fields, used = {}, 1      # a later step reads an absorbed intermediate: keep the epilogue empty
    head_args = [externals[int(a[1:])] for a in body[0][1]]
    lines = epilogue_decl(fields)
    if head_op == "conv2d":
        from nncompile.codegen.cpp_ops_nn import conv2d_call

        lines += conv2d_call(ctx, head_args, body[0][2], ctx.out, "epi_")
    else:
        lines += gemm_call(ctx, head_op, head_args, body[0][2], ctx.out, "epi_")
    if used < len(body):
        # the rest runs as one in-place loop over the GEMM's output: operands are the externals the
        # rest reads, plus the output itself standing for the last absorbed step
        result_ref = f"t{used - 1}"
        read = [a for _, args, _ in body[used:] for a in args if a[0] == "x"]
        kept = list(dict.fromkeys(read))
        remap = {ref: f"x{i}" for i, ref in enumerate(kept)}
        remap[result_ref] = f"x{len(kept)}"
        rest = [(op, tuple(remap.get(a, f"t{int(a[1:]) - used}" if a[0] == "t" else a) for a in args), attrs)
                for op, args, attrs in body[used:]]
        operands = [operand(ctx, externals[int(ref[1:])]) for ref in kept]
        operands.append(Operand(ctx.out, ctx.out_type.shape, ctype(ctx.out_type.dtype)))
        lines.append(emit_chain(ctx, rest, operands, ctx.out))
    return "\n".join(lines)


# Data movement -------------------------------------------------------------------------------------


def emit_view(ctx: CppContext, node: Node) -> str:
    if ctx.same_storage(node.name, node.inputs[0]):
        return "// view: shares its input's storage"
    return f"std::memcpy({ctx.out}, {ctx.ptr(node.inputs[0])}, {node.type.nbytes});"


def emit_permute(ctx: CppContext, node: Node) -> str:
    if node.name in transposes_read_in_place(ctx.emitter):
        return "// no copy: every reader is a matmul reading the source with its transposed flag"
    src = ctx.type(node.inputs[0])
    if node.op == "transpose":
        dims = list(range(src.rank))
        d0, d1 = (normalize_axis("transpose", node.attrs[a], src.rank) for a in ("dim0", "dim1"))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    else:
        dims = [normalize_axis("permute", d, src.rank) for d in node.attrs["dims"]]
    if (node.op == "transpose" and src.rank >= 2 and sorted((d0, d1)) == [src.rank - 2, src.rank - 1]
            and node.type.dtype == "f32" and src.shape[-1] >= 8 and src.shape[-2] >= 8):
        return _transpose_last_two(ctx, node, src)
    own = contiguous_strides(src.shape)
    return strided_copy(ctx.out, ctx.ptr(node.inputs[0]), node.type.shape, [own[d] for d in dims],
                        ctype=ctype(node.type.dtype))


def _transpose_last_two(ctx: CppContext, node: Node, src) -> str:
    """out[b, j, i] = x[b, i, j] through ``nnc::transpose_last_two`` (8 x 8 register-transpose tiles)."""
    rows, cols = src.shape[-2], src.shape[-1]
    return (f"nnc::transpose_last_two({ctx.ptr(node.inputs[0])}, {src.numel // (rows * cols)}, {rows}, {cols}, "
            f"{ctx.out});")


def emit_slice(ctx: CppContext, node: Node) -> str:
    src = ctx.type(node.inputs[0])
    axis = normalize_axis("slice", node.attrs["axis"], src.rank)
    start, _, step = slice(node.attrs["start"], node.attrs["end"], node.attrs["step"]).indices(src.shape[axis])
    own = contiguous_strides(src.shape)
    strides = list(own)
    strides[axis] = own[axis] * step
    return strided_copy(ctx.out, ctx.ptr(node.inputs[0]), node.type.shape, strides, start * own[axis],
                        ctype=ctype(node.type.dtype))


def emit_concat(ctx: CppContext, node: Node) -> str:
    out = node.type
    axis = normalize_axis("concat", node.attrs["axis"], out.rank)
    outer = math.prod(out.shape[:axis])
    out_row = math.prod(out.shape[axis:])
    lines, offset = [], 0
    cty = ctype(out.dtype)
    for name in node.inputs:
        t = ctx.type(name)
        row = math.prod(t.shape[axis:])
        lines.append(f"for (int64_t r_ = 0; r_ < {outer}; ++r_) "
                     f"std::memcpy({ctx.out} + r_ * {out_row} + {offset}, {ctx.ptr(name)} + r_ * {row}, sizeof({cty}) * {row});")
        offset += row
    return "\n".join(lines)


def emit_full(ctx: CppContext, node: Node) -> str:
    value = node.attrs["value"]
    literal = f(value) if node.type.dtype == "f32" else repr(value) if node.type.dtype == "f64" else str(int(value))
    if node.type.dtype == "bool":
        literal = "true" if value else "false"
    return f"std::fill({ctx.out}, {ctx.out} + {node.type.numel}, ({ctype(node.type.dtype)}){literal});"


def emit_expand(ctx: CppContext, node: Node) -> str:
    body = [("identity", ("x0",), {})]
    return emit_chain(ctx, body, [operand(ctx, node.inputs[0])], ctx.out)


ELEMENTWISE_OPS = sorted(set(SCALAR) | {"dropout", "cast", "pow_scalar"})


def register() -> None:
    for op in ELEMENTWISE_OPS:
        set_rule(op, "emit_cpp", emit_elementwise)
    for op in ("linear", "matmul"):
        set_rule(op, "emit_cpp", emit_gemm_op)
    set_rule("fused", "emit_cpp", emit_fused)
    for op in ("reshape", "flatten", "squeeze", "unsqueeze"):
        set_rule(op, "emit_cpp", emit_view)
    set_rule("identity", "emit_cpp", emit_view)
    for op in ("transpose", "permute"):
        set_rule(op, "emit_cpp", emit_permute)
    set_rule("slice", "emit_cpp", emit_slice)
    set_rule("concat", "emit_cpp", emit_concat)
    set_rule("expand", "emit_cpp", emit_expand)
    set_rule("full", "emit_cpp", emit_full)
    get_op("fused")
