"""``emit_cuda`` rules: elementwise ops, fused chains, GEMM-based ops and data movement.

Each rule is ``rule(ctx, node) -> str`` (host statements; kernels are defined through
``CudaContext.launch`` / ``kernel``). An elementwise op or fused chain is one grid-stride kernel: each
thread computes one output element from its operands read at broadcast offsets (dims collapsed at
compile time, so most operands are read at ``i_`` or at a single stride). A fused chain headed by
linear / matmul / conv2d runs the GEMM (``native/cuda/nnc_gemm.cuh``) with bias, activation and
residual in its epilogue, and any remaining steps as one in-place elementwise kernel.
"""
from __future__ import annotations

import math

from nncompile.codegen.cpp import CTYPES
from nncompile.codegen.cpp_loops import broadcast_strides, collapse, contiguous_strides
from nncompile.codegen.cpp_ops import _absorb_epilogue, _dropout_scalar, f
from nncompile.codegen.cuda import CudaContext, cuda_ctype
from nncompile.errors import BuildError
from nncompile.ir.graph import Node
from nncompile.ops.base import broadcast_shapes, normalize_axis, set_rule
from nncompile.ops.fused import steps


def _clamp(a, lo, hi):
    if lo is not None:
        a = f"fmaxf({a}, {f(lo)})"
    if hi is not None:
        a = f"fminf({a}, {f(hi)})"
    return a


def _pow(a, exponent):
    if exponent == 2:
        return f"({a} * {a})"
    if exponent == 1:
        return a
    if exponent == 0.5:
        return f"sqrtf({a})"
    return f"powf({a}, {f(exponent)})"


# op -> scalar device expression over argument expressions (same formulas as the C++ scalar table)
SCALAR = {
    "relu": lambda a, **k: f"({a[0]} > 0.0f ? {a[0]} : 0.0f)",
    "gelu": lambda a, approximate="none", **k: f"nnc::cuda::gelu_{'tanh' if approximate == 'tanh' else 'erf'}({a[0]})",
    "tanh": lambda a, **k: f"tanhf({a[0]})",
    "sigmoid": lambda a, **k: f"nnc::cuda::sigmoid({a[0]})",
    "silu": lambda a, **k: f"({a[0]} * nnc::cuda::sigmoid({a[0]}))",
    "exp": lambda a, **k: f"expf({a[0]})",
    "log": lambda a, **k: f"logf({a[0]})",
    "sqrt": lambda a, **k: f"sqrtf({a[0]})",
    "rsqrt": lambda a, **k: f"(1.0f / sqrtf({a[0]}))",
    "neg": lambda a, **k: f"(-{a[0]})",
    "abs": lambda a, **k: f"fabsf({a[0]})",
    "erf": lambda a, **k: f"erff({a[0]})",
    "leaky_relu": lambda a, negative_slope=0.01, **k: f"({a[0]} > 0.0f ? {a[0]} : {a[0]} * {f(negative_slope)})",
    "clamp": lambda a, min=None, max=None, **k: _clamp(a[0], min, max),
    "scale": lambda a, factor, **k: f"({a[0]} * {f(factor)})",
    "add_scalar": lambda a, value, **k: f"({a[0]} + {f(value)})",
    "pow_scalar": lambda a, exponent, **k: _pow(a[0], exponent),
    "add": lambda a, **k: f"({a[0]} + {a[1]})",
    "sub": lambda a, **k: f"({a[0]} - {a[1]})",
    "mul": lambda a, **k: f"({a[0]} * {a[1]})",
    "div": lambda a, **k: f"({a[0]} / {a[1]})",
    "maximum": lambda a, **k: f"({a[0]} < {a[1]} ? {a[1]} : {a[0]})",     # std::max
    "minimum": lambda a, **k: f"({a[1]} < {a[0]} ? {a[1]} : {a[0]})",     # std::min
    "where": lambda a, **k: f"({a[0]} ? {a[1]} : {a[2]})",
    "identity": lambda a, **k: a[0],
    "gt": lambda a, **k: f"({a[0]} > {a[1]})",
    "ge": lambda a, **k: f"({a[0]} >= {a[1]})",
    "eq": lambda a, **k: f"({a[0]} == {a[1]})",
}

ACTS = {"relu": "ACT_RELU", "tanh": "ACT_TANH", "sigmoid": "ACT_SIGMOID", "silu": "ACT_SILU"}


def chain_expressions(body, inputs: list[str], index: str = "i_") -> tuple[list[str], str]:
    """Device statements and the result expression of an elementwise ``body`` over ``inputs``."""
    temps: list[str] = []
    setup: list[str] = []
    for k, (op, args, attrs) in enumerate(body):
        values = [inputs[int(a[1:])] if a[0] == "x" else temps[int(a[1:])] for a in args]
        if op == "dropout":
            expr = _dropout_scalar(values[0], f"(uint32_t)({index})", attrs.get("p", 0.5), attrs.get("seed", 0),
                                   attrs.get("training", True), values[1] if len(values) > 1 else None)
            expr = expr.replace("nnc_dropout_hash(", "nnc::cuda::dropout_hash(")
        elif op == "cast":
            expr = f"({CTYPES[attrs['dtype']]})({values[0]})"
        elif op in SCALAR:
            expr = SCALAR[op](values, **attrs)
        else:
            raise BuildError(f"op '{op}' has no elementwise CUDA form")
        name = f"t{k}_"
        setup.append(f"const auto {name} = {expr};")
        temps.append(name)
    return setup, temps[-1]


def unravel(index: str, sizes: list[int], strides: list[list[int]], names: list[str]) -> list[str]:
    """Device statements computing ``names[k]`` = the offset of operand k at flat index ``index``."""
    if not sizes:
        return [f"const long long {n} = 0;" for n in names]
    if len(sizes) == 1:
        return [f"const long long {n} = {index} * {s[0]}LL;" if s[0] else f"const long long {n} = 0;"
                for n, s in zip(names, strides)]
    lines = [f"long long rem_ = {index};"] + [f"long long {n} = 0;" for n in names]
    for d in reversed(range(len(sizes))):
        lines.append(f"{{ const long long d_ = rem_ % {sizes[d]}; rem_ /= {sizes[d]};"
                     + "".join(f" {n} += d_ * {s[d]};" for n, s in zip(names, strides) if s[d]) + " }")
    return lines


def emit_chain(ctx: CudaContext, body, operands: list[str], out_ptr: str, out_shape, out_names=None) -> str:
    """One kernel computing an elementwise ``body`` over the values ``operands`` into ``out_ptr``."""
    out_shape = tuple(out_shape)
    numel = math.prod(out_shape)
    strides = [broadcast_strides(ctx.type(n).shape, out_shape) for n in operands]
    sizes, per_operand = collapse(out_shape, strides + [contiguous_strides(out_shape)])
    names = [f"o{k}_" for k in range(len(operands))]
    lines = unravel("i_", sizes, per_operand[:-1], names)
    loads = [f"{ctx.ptr(n)}[{o}]" for n, o in zip(operands, names)]
    setup, expr = chain_expressions(body, loads)
    lines += setup
    lines.append(f"{out_ptr}[i_] = {expr};")
    return ctx.launch(lines, numel, [ctx.node.name, *operands])


def emit_elementwise(ctx: CudaContext, node: Node) -> str:
    body = [(node.op, tuple(f"x{i}" for i in range(len(node.inputs))), dict(node.attrs))]
    return emit_chain(ctx, body, list(node.inputs), ctx.out, node.type.shape)


# GEMM-headed chains --------------------------------------------------------------------------------


def epilogue_decl(fields: dict[str, str], name: str = "epi_") -> list[str]:
    lines = [f"nnc::cuda::Epilogue {name};"]
    for key, value in fields.items():
        if key == "ldr":
            continue
        if key == "act":
            value = value.replace("nnc::", "nnc::cuda::")
        lines.append(f"{name}.{key} = {value};")
    return lines


def _require_f32(ctx: CudaContext, op: str, names) -> None:
    for name in names:
        if ctx.type(name).dtype != "f32":
            raise BuildError(f"{op}: the CUDA backend needs f32 here, got {ctx.type(name)}", ctx.node.loc)


def gemm_call(ctx: CudaContext, op: str, args: list[str], out_ptr: str, epi: str) -> list[str]:
    """Host statements computing ``op`` (linear / matmul) into out_ptr with epilogue ``epi``."""
    _require_f32(ctx, op, args)
    types = [ctx.type(a) for a in args]
    ptrs = [ctx.ptr(a) for a in args]
    if op == "linear":
        x, w = types[0], types[1]
        k, n = x.shape[-1], w.shape[0]
        m = x.numel // k if k else 0
        lines = [f"{epi}.col_bias = {ptrs[2]};"] if len(args) == 3 else []
        lines.append(f"nnc::cuda::sgemm(stream_, false, true, {m}, {n}, {k}, {ptrs[0]}, {k}, {ptrs[1]}, {k}, "
                     f"{out_ptr}, {n}, {epi});")
        return lines
    a, b = types
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = ctx.out_type.numel // (m * n) if m * n else 0
    if math.prod(b_shape[:-2]) == 1 and math.prod(a_shape[:-2]) == batch:
        rows = math.prod(a_shape[:-1])
        return [f"nnc::cuda::sgemm(stream_, false, false, {rows}, {n}, {k}, {ptrs[0]}, {k}, {ptrs[1]}, {n}, "
                f"{out_ptr}, {n}, {epi});"]
    out_batch = broadcast_shapes("matmul", a_shape[:-2], b_shape[:-2])
    a_strides = broadcast_strides(a_shape[:-2], out_batch)
    b_strides = broadcast_strides(b_shape[:-2], out_batch)
    own = contiguous_strides(out_batch)

    def uniform(strides):
        if all(s == 0 for s in strides):
            return 0
        if strides == own:
            return 1
        return None

    ua, ub = uniform(a_strides), uniform(b_strides)
    if ua is not None and ub is not None:
        return [f"nnc::cuda::sgemm(stream_, false, false, {m}, {n}, {k}, {ptrs[0]}, {k}, {ptrs[1]}, {n}, {out_ptr}, {n}, "
                f"{epi}, {batch}, {ua * m * k}LL, {ub * k * n}LL, {m * n}LL);"]
    # general broadcasting of the batch dims: one launch per batch
    lines = [f"for (long long bt_ = 0; bt_ < {batch}; ++bt_) {{", "    long long rem_ = bt_, oa_ = 0, ob_ = 0;"]
    for d in reversed(range(len(out_batch))):
        lines.append(f"    {{ const long long i_ = rem_ % {out_batch[d]}; rem_ /= {out_batch[d]}; "
                     f"oa_ += i_ * {a_strides[d]}; ob_ += i_ * {b_strides[d]}; }}")
    lines += [f"    nnc::cuda::Epilogue e_ = {epi};",
              f"    if (e_.residual) e_.residual += bt_ * {m * n};",
              f"    nnc::cuda::sgemm(stream_, false, false, {m}, {n}, {k}, {ptrs[0]} + oa_ * {m * k}, {k}, "
              f"{ptrs[1]} + ob_ * {k * n}, {n}, {out_ptr} + bt_ * {m * n}, {n}, e_);", "}"]
    return lines


def emit_gemm_op(ctx: CudaContext, node: Node) -> str:
    return "\n".join(epilogue_decl({}) + gemm_call(ctx, node.op, list(node.inputs), ctx.out, "epi_"))


def emit_fused(ctx: CudaContext, node: Node) -> str:
    body = steps(node.attrs["body"])
    externals = list(node.inputs)
    head_op = body[0][0]
    if head_op not in ("linear", "matmul", "conv2d"):
        return emit_chain(ctx, body, externals, ctx.out, node.type.shape)
    fields, used = _absorb_epilogue(ctx, body, externals)
    later_reads = {a for _, args, _ in body[used:] for a in args}
    if any(f"t{j}" in later_reads for j in range(used - 1)):
        fields, used = {}, 1
    head_args = [externals[int(a[1:])] for a in body[0][1]]
    lines = epilogue_decl(fields)
    if head_op == "conv2d":
        from nncompile.codegen.cuda_ops_nn import conv2d_call

        lines += conv2d_call(ctx, head_args, body[0][2], ctx.out, "epi_")
    else:
        lines += gemm_call(ctx, head_op, head_args, ctx.out, "epi_")
    if used < len(body):
        # the rest: one in-place kernel over the GEMM's output (which stands for the last absorbed step)
        result_ref = f"t{used - 1}"
        kept = list(dict.fromkeys(a for _, args, _ in body[used:] for a in args if a[0] == "x"))
        remap = {ref: f"x{i}" for i, ref in enumerate(kept)}
        remap[result_ref] = f"x{len(kept)}"
        rest = [(op, tuple(remap.get(a, f"t{int(a[1:]) - used}" if a[0] == "t" else a) for a in args), attrs)
                for op, args, attrs in body[used:]]
        operands = [externals[int(ref[1:])] for ref in kept] + [node.name]
        lines.append(emit_chain(ctx, rest, operands, ctx.out, node.type.shape))
    return "\n".join(lines)


# Data movement -------------------------------------------------------------------------------------


def strided_gather(ctx: CudaContext, src: str, out_shape, src_strides: list[int], src_offset: int = 0) -> str:
    """out (contiguous, ``out_shape``) = src read with ``src_strides`` from ``src_offset``."""
    sizes, (s_src, _) = collapse(tuple(out_shape), [list(src_strides), contiguous_strides(tuple(out_shape))])
    lines = unravel("i_", sizes, [s_src], ["o_"])
    lines.append(f"{ctx.out}[i_] = {ctx.ptr(src)}[{src_offset}LL + o_];")
    return ctx.launch(lines, math.prod(out_shape), [ctx.node.name, src])


def emit_view(ctx: CudaContext, node: Node) -> str:
    if ctx.same_storage(node.name, node.inputs[0]):
        return "// view: shares its input's storage"
    return f"cudaMemcpyAsync({ctx.out}, {ctx.ptr(node.inputs[0])}, {node.type.nbytes}, cudaMemcpyDeviceToDevice, stream_);"


def emit_permute(ctx: CudaContext, node: Node) -> str:
    src = ctx.type(node.inputs[0])
    if node.op == "transpose":
        dims = list(range(src.rank))
        d0, d1 = (normalize_axis("transpose", node.attrs[a], src.rank) for a in ("dim0", "dim1"))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    else:
        dims = [normalize_axis("permute", d, src.rank) for d in node.attrs["dims"]]
    own = contiguous_strides(src.shape)
    return strided_gather(ctx, node.inputs[0], node.type.shape, [own[d] for d in dims])


def emit_slice(ctx: CudaContext, node: Node) -> str:
    src = ctx.type(node.inputs[0])
    axis = normalize_axis("slice", node.attrs["axis"], src.rank)
    start, _, step = slice(node.attrs["start"], node.attrs["end"], node.attrs["step"]).indices(src.shape[axis])
    own = contiguous_strides(src.shape)
    strides = list(own)
    strides[axis] = own[axis] * step
    return strided_gather(ctx, node.inputs[0], node.type.shape, strides, start * own[axis])


def emit_expand(ctx: CudaContext, node: Node) -> str:
    return emit_chain(ctx, [("identity", ("x0",), {})], [node.inputs[0]], ctx.out, node.type.shape)


def emit_concat(ctx: CudaContext, node: Node) -> str:
    out = node.type
    axis = normalize_axis("concat", node.attrs["axis"], out.rank)
    outer = math.prod(out.shape[:axis])
    size = {"f32": 4, "f64": 8, "i64": 8, "i32": 4, "bool": 1}[out.dtype]
    out_row = math.prod(out.shape[axis:]) * size
    lines, offset = [], 0
    for name in node.inputs:
        row = math.prod(ctx.type(name).shape[axis:]) * size
        if row and outer:
            lines.append(f"cudaMemcpy2DAsync((char*){ctx.out} + {offset}, {out_row}, {ctx.ptr(name)}, {row}, {row}, {outer}, "
                         "cudaMemcpyDeviceToDevice, stream_);")
        offset += row
    return "\n".join(lines) or "// empty"


def emit_full(ctx: CudaContext, node: Node) -> str:
    value = node.attrs["value"]
    dtype = node.type.dtype
    literal = f(value) if dtype == "f32" else repr(float(value)) if dtype == "f64" else str(int(value))
    if dtype == "bool":
        literal = "true" if value else "false"
    return ctx.launch([f"{ctx.out}[i_] = ({cuda_ctype(dtype)}){literal};"], node.type.numel, [node.name])


def emit_slice_scatter(ctx: CudaContext, node: Node) -> str:
    shape = node.type.shape
    axis = normalize_axis("slice_scatter", node.attrs["axis"], len(shape))
    start, _, step = slice(node.attrs["start"], node.attrs["end"], node.attrs["step"]).indices(shape[axis])
    own = contiguous_strides(shape)
    dst = list(own)
    dst[axis] = own[axis] * step
    src_shape = ctx.type(node.inputs[0]).shape
    sizes, (s_dst, _) = collapse(tuple(src_shape), [dst, contiguous_strides(tuple(src_shape))])
    lines = unravel("i_", sizes, [s_dst], ["o_"])
    lines.append(f"{ctx.out}[{start * own[axis]}LL + o_] = {ctx.ptr(node.inputs[0])}[i_];")
    return "\n".join([f"cudaMemsetAsync({ctx.out}, 0, {node.type.nbytes}, stream_);",
                      ctx.launch(lines, math.prod(src_shape), [node.name, node.inputs[0]])])


def emit_sparse_mask(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    g, w = (ctx.ptr(v) for v in node.inputs)
    return ctx.launch([f"{ctx.out}[i_] = {w}[i_] != 0.0f ? {g}[i_] : 0.0f;"], node.type.numel,
                      [node.name, *node.inputs])


def emit_sparse_weight_grad(ctx: CudaContext, node: Node) -> str:
    """dW[n, k] = sum_m grad[m, n] x[m, k] where W[n, k] != 0 (the pattern), else 0: one thread per entry."""
    _require_f32(ctx, node.op, node.inputs)
    grad, x, w = (ctx.ptr(v) for v in node.inputs)
    m, n = ctx.type(node.inputs[0]).shape
    k = ctx.type(node.inputs[1]).shape[1]
    return ctx.launch([f"const long long n_ = i_ / {k}, k_ = i_ % {k};",
                       "float acc_ = 0.0f;",
                       f"if ({w}[i_] != 0.0f) for (long long m_ = 0; m_ < {m}; ++m_) "
                       f"acc_ += {grad}[m_ * {n} + n_] * {x}[m_ * {k} + k_];",
                       f"{ctx.out}[i_] = acc_;"], node.type.numel, [node.name, *node.inputs])


def emit_sparse_input_grad(ctx: CudaContext, node: Node) -> str:
    """dX[m, k] = sum_n grad[m, n] W[n, k] (the pruned entries of W are zero): one thread per entry."""
    _require_f32(ctx, node.op, node.inputs)
    grad, w = (ctx.ptr(v) for v in node.inputs)
    m, n = ctx.type(node.inputs[0]).shape
    k = ctx.type(node.inputs[1]).shape[1]
    return ctx.launch([f"const long long m_ = i_ / {k}, k_ = i_ % {k};",
                       "float acc_ = 0.0f;",
                       f"for (long long n_ = 0; n_ < {n}; ++n_) acc_ += {grad}[m_ * {n} + n_] * {w}[n_ * {k} + k_];",
                       f"{ctx.out}[i_] = acc_;"], node.type.numel, [node.name, *node.inputs])


ELEMENTWISE_OPS = sorted(set(SCALAR) | {"dropout", "cast", "pow_scalar"})


def register() -> None:
    for op in ELEMENTWISE_OPS:
        set_rule(op, "emit_cuda", emit_elementwise)
    for op in ("linear", "matmul"):
        set_rule(op, "emit_cuda", emit_gemm_op)
    set_rule("fused", "emit_cuda", emit_fused)
    for op in ("reshape", "flatten", "squeeze", "unsqueeze", "identity"):
        set_rule(op, "emit_cuda", emit_view)
    for op in ("transpose", "permute"):
        set_rule(op, "emit_cuda", emit_permute)
    set_rule("slice", "emit_cuda", emit_slice)
    set_rule("concat", "emit_cuda", emit_concat)
    set_rule("expand", "emit_cuda", emit_expand)
    set_rule("full", "emit_cuda", emit_full)
    set_rule("slice_scatter", "emit_cuda", emit_slice_scatter)
    import nncompile.ops.sparse  # noqa: F401  (the training ops of sparse weights)

    set_rule("sparse_mask", "emit_cuda", emit_sparse_mask)
    set_rule("sparse_weight_grad", "emit_cuda", emit_sparse_weight_grad)
    set_rule("sparse_input_grad", "emit_cuda", emit_sparse_input_grad)
