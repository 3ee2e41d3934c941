"""``emit_cuda`` rules for the network ops and their backward ops: conv (implicit GEMM) and pools, norms,
softmax, reductions, losses, embedding and attention.

Row-wise ops (softmax, layer norm, a reduction's output element, a batch-norm channel, an attention
query row) run one thread block per row with block reductions (``nnc::cuda::block_sum``/``block_max``);
the losses reduce in one block, in a fixed order, so they are deterministic. The scatter-adds of
``embedding_grad``, the pooling gradients and the key/value gradients of ``sdpa_grad`` use atomics
(their summation order may vary between runs). Nothing here needs arena scratch (``workspace_bytes`` is 0 for every op).
"""
from __future__ import annotations

import math

from nncompile.codegen.cpp_ops import f
from nncompile.codegen.cpp_ops_grad import _conv_shapes, conv_grad_geometry
from nncompile.codegen.cpp_ops_nn import _conv_geometry, _pool_geometry
from nncompile.codegen.cuda import CudaContext
from nncompile.codegen.cuda_ops import _require_f32, epilogue_decl, unravel
from nncompile.codegen.cpp_loops import contiguous_strides
from nncompile.errors import BuildError
from nncompile.ir.graph import Node
from nncompile.ops.base import normalize_axis, set_rule

ROW_BLOCK = 256
MAX_GRID = 65535 * 16
SDPA_MAX_SHARED = 48 * 1024


def _rows_loop(rows: int, lines: list[str]) -> list[str]:
    """Block-per-row loop (the whole block works on row ``r_``)."""
    return [f"for (long long r_ = blockIdx.x; r_ < {rows}LL; r_ += gridDim.x) {{"] + ["    " + s for s in lines] + ["}"]


def _row_grid(rows: int) -> str:
    return str(max(1, min(rows, MAX_GRID)))


def _geom(g: dict) -> str:
    return ("nnc::cuda::ConvGeom g_{" + ", ".join(str(g[k]) for k in (
        "n", "c", "h", "w", "o", "cg", "og", "kh", "kw", "oh", "ow", "sh", "sw", "ph", "pw", "dh", "dw", "groups")) + "};")


# conv / pools ---------------------------------------------------------------------------------------


def conv2d_call(ctx: CudaContext, args: list[str], attrs: dict, out_ptr: str, epi: str) -> list[str]:
    _require_f32(ctx, "conv2d", args)
    x, w = ctx.type(args[0]), ctx.type(args[1])
    out_shape = (x.shape[0], w.shape[0]) + tuple(ctx.out_type.shape[2:])
    g = _conv_geometry(x.shape, w.shape, attrs, out_shape)
    lines = [_geom(g), f"nnc::cuda::Epilogue e_ = {epi};"]
    if len(args) == 3:
        lines.append(f"e_.row_bias = {ctx.ptr(args[2])};")
    lines.append(f"nnc::cuda::conv2d_forward(stream_, {ctx.ptr(args[0])}, {ctx.ptr(args[1])}, {out_ptr}, g_, e_);")
    return ["{"] + ["    " + s for s in lines] + ["}"]


def emit_conv2d(ctx: CudaContext, node: Node) -> str:
    return "\n".join(epilogue_decl({}) + conv2d_call(ctx, list(node.inputs), dict(node.attrs), ctx.out, "epi_"))


def emit_conv2d_grad_input(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, [*node.inputs, node.name])
    g = conv_grad_geometry(*_conv_shapes(ctx.type, node), node.attrs)
    grad, weight = (ctx.ptr(v) for v in node.inputs)
    return "\n".join([_geom(g), f"nnc::cuda::conv2d_grad_input(stream_, {grad}, {weight}, {ctx.out}, g_);"])


def emit_conv2d_grad_weight(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, [*node.inputs, node.name])
    g = conv_grad_geometry(*_conv_shapes(ctx.type, node), node.attrs)
    x, grad = (ctx.ptr(v) for v in node.inputs)
    return "\n".join([_geom(g), f"nnc::cuda::conv2d_grad_weight(stream_, {x}, {grad}, {ctx.out}, g_);"])


def emit_pool(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    n, c, h, w = ctx.type(node.inputs[0]).shape
    oh, ow = node.type.shape[2:]
    kh, kw, sh, sw, ph, pw, dh, dw = _pool_geometry(node, None)
    is_max = node.op == "max_pool2d"
    include_pad = node.attrs.get("count_include_pad", True)
    combine = "acc_ = (v_ > acc_ || v_ != v_) ? v_ : acc_;" if is_max else "acc_ += v_;"
    if is_max:
        finish = "acc_"
    elif include_pad:
        finish = (f"acc_ / (float)((min(y0_ + {kh}LL, {h + ph}LL) - y0_) * (min(x0_ + {kw}LL, {w + pw}LL) - x0_))")
    else:
        finish = "acc_ / (float)(cnt_ > 0 ? cnt_ : 1)"
    body = [
        f"const long long p_ = i_ / {oh * ow}, q_ = i_ % {oh * ow}, oy_ = q_ / {ow}, ox_ = q_ % {ow};",
        f"const float* in_ = {ctx.ptr(node.inputs[0])} + p_ * {h * w};",
        f"const long long y0_ = oy_ * {sh} - {ph}, x0_ = ox_ * {sw} - {pw};",
        f"float acc_ = {'-INFINITY' if is_max else '0.0f'}; long long cnt_ = 0; (void)cnt_;",
        f"for (int ki_ = 0; ki_ < {kh}; ++ki_) {{",
        f"    const long long iy_ = y0_ + ki_ * {dh}; if (iy_ < 0 || iy_ >= {h}) continue;",
        f"    for (int kj_ = 0; kj_ < {kw}; ++kj_) {{",
        f"        const long long ix_ = x0_ + kj_ * {dw}; if (ix_ < 0 || ix_ >= {w}) continue;",
        f"        const float v_ = in_[iy_ * {w} + ix_]; ++cnt_; {combine}",
        "    }",
        "}",
        f"{ctx.out}[i_] = {finish};"]
    return ctx.launch(body, n * c * oh * ow, [node.name, node.inputs[0]])


def emit_global_avg_pool(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    n, c, h, w = ctx.type(node.inputs[0]).shape
    body = _rows_loop(n * c, [
        f"const float* in_ = {ctx.ptr(node.inputs[0])} + r_ * {h * w};",
        "double acc_ = 0.0;",
        f"for (long long j_ = threadIdx.x; j_ < {h * w}; j_ += blockDim.x) acc_ += in_[j_];",
        "acc_ = nnc::cuda::block_sum(acc_);",
        f"if (threadIdx.x == 0) {ctx.out}[r_] = (float)(acc_ / {h * w});"])
    return ctx.kernel(body, [node.name, node.inputs[0]], _row_grid(n * c), ROW_BLOCK)


def emit_max_pool2d_grad(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, [*node.inputs, node.name])
    n, c, h, w = ctx.type(node.inputs[0]).shape
    oh, ow = ctx.type(node.inputs[1]).shape[2:]
    a = node.attrs
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    body = [
        f"const long long p_ = i_ / {oh * ow}, q_ = i_ % {oh * ow}, oy_ = q_ / {ow}, ox_ = q_ % {ow};",
        f"const float* in_ = {ctx.ptr(node.inputs[0])} + p_ * {h * w};",
        f"const long long y0_ = oy_ * {sh} - {ph}, x0_ = ox_ * {sw} - {pw};",
        "float best_ = -INFINITY; long long at_ = -1;",
        f"for (int ki_ = 0; ki_ < {kh}; ++ki_) {{",
        f"    const long long iy_ = y0_ + ki_ * {dh}; if (iy_ < 0 || iy_ >= {h}) continue;",
        f"    for (int kj_ = 0; kj_ < {kw}; ++kj_) {{",
        f"        const long long ix_ = x0_ + kj_ * {dw}; if (ix_ < 0 || ix_ >= {w}) continue;",
        f"        const float v_ = in_[iy_ * {w} + ix_];",
        f"        if (at_ < 0 || v_ > best_ || v_ != v_) {{ best_ = v_; at_ = iy_ * {w} + ix_; }}   // torch's rule (as the C++ backend)",
        "    }",
        "}",
        f"if (at_ >= 0) atomicAdd({ctx.out} + p_ * {h * w} + at_, {ctx.ptr(node.inputs[1])}[i_]);"]
    return "\n".join([f"cudaMemsetAsync({ctx.out}, 0, {node.type.nbytes}, stream_);",
                      ctx.launch(body, n * c * oh * ow, [node.name, *node.inputs])])


def emit_avg_pool2d_grad(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, [*node.inputs, node.name])
    a = node.attrs
    n, c, h, w = a["input_shape"]
    oh, ow = ctx.type(node.inputs[0]).shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if a["count_include_pad"]:
        divisor = f"(min(y0_ + {kh}LL, {h + ph}LL) - y0_) * (min(x0_ + {kw}LL, {w + pw}LL) - x0_)"
    else:
        divisor = "(y1_ - ya_) * (x1_ - xa_)"
    body = [
        f"const long long p_ = i_ / {oh * ow}, q_ = i_ % {oh * ow}, oy_ = q_ / {ow}, ox_ = q_ % {ow};",
        f"const long long y0_ = oy_ * {sh} - {ph}, x0_ = ox_ * {sw} - {pw};",
        f"const long long ya_ = max(y0_, 0LL), y1_ = min(y0_ + {kh}LL, {h}LL);",
        f"const long long xa_ = max(x0_, 0LL), x1_ = min(x0_ + {kw}LL, {w}LL);",
        f"const long long count_ = {divisor};",
        f"const float share_ = {ctx.ptr(node.inputs[0])}[i_] / (float)(count_ > 0 ? count_ : 1);",
        f"float* dx_ = {ctx.out} + p_ * {h * w};",
        f"for (long long iy_ = ya_; iy_ < y1_; ++iy_) for (long long ix_ = xa_; ix_ < x1_; ++ix_) "
        f"atomicAdd(dx_ + iy_ * {w} + ix_, share_);"]
    return "\n".join([f"cudaMemsetAsync({ctx.out}, 0, {node.type.nbytes}, stream_);",
                      ctx.launch(body, n * c * oh * ow, [node.name, *node.inputs])])


# norms and softmax ----------------------------------------------------------------------------------


def emit_batch_norm(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    x = ctx.type(node.inputs[0])
    n, c = x.shape[0], x.shape[1]
    inner = math.prod(x.shape[2:])
    names = list(node.inputs) + [None] * (5 - len(node.inputs))
    mean, var, weight, bias = (ctx.ptr(v) if v else None for v in names[1:5])
    xp, eps = ctx.ptr(node.inputs[0]), f(node.attrs["eps"])
    lines = []
    if node.attrs["training"]:
        lines += [
            "double s_ = 0.0, ss_ = 0.0;",
            f"for (long long j_ = threadIdx.x; j_ < {n * inner}LL; j_ += blockDim.x) {{",
            f"    const float v_ = {xp}[((j_ / {inner}) * {c} + r_) * {inner} + j_ % {inner}];",
            "    s_ += v_; ss_ += (double)v_ * v_;",
            "}",
            "s_ = nnc::cuda::block_sum(s_); ss_ = nnc::cuda::block_sum(ss_);",
            f"const double m_ = s_ / {n * inner}; double v_ = ss_ / {n * inner} - m_ * m_; if (v_ < 0) v_ = 0;",
            f"const float mean_ = (float)m_, inv_ = 1.0f / sqrtf((float)v_ + {eps});"]
    else:
        lines.append(f"const float mean_ = {mean}[r_], inv_ = 1.0f / sqrtf({var}[r_] + {eps});")
    lines += [f"const float sc_ = inv_ * {weight + '[r_]' if weight else '1.0f'};",
              f"const float sh_ = {bias + '[r_]' if bias else '0.0f'} - mean_ * sc_;",
              f"for (long long j_ = threadIdx.x; j_ < {n * inner}LL; j_ += blockDim.x) {{",
              f"    const long long at_ = ((j_ / {inner}) * {c} + r_) * {inner} + j_ % {inner};",
              f"    {ctx.out}[at_] = {xp}[at_] * sc_ + sh_;",
              "}"]
    return ctx.kernel(_rows_loop(c, lines), [node.name, *node.inputs], _row_grid(c), ROW_BLOCK)


def emit_layer_norm(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    x = ctx.type(node.inputs[0])
    inner = math.prod(x.shape[x.rank - node.attrs["normalized_ndim"]:])
    rows = x.numel // inner if inner else 0
    names = list(node.inputs) + [None] * (3 - len(node.inputs))
    weight, bias = (ctx.ptr(v) if v else None for v in names[1:3])
    lines = [
        f"const float* p_ = {ctx.ptr(node.inputs[0])} + r_ * {inner};",
        f"float* q_ = {ctx.out} + r_ * {inner};",
        "float s_ = 0.0f;",
        f"for (long long j_ = threadIdx.x; j_ < {inner}; j_ += blockDim.x) s_ += p_[j_];",
        f"const float m_ = nnc::cuda::block_sum(s_) / {inner};",
        "float v_ = 0.0f;",
        f"for (long long j_ = threadIdx.x; j_ < {inner}; j_ += blockDim.x) {{ const float d_ = p_[j_] - m_; v_ += d_ * d_; }}",
        f"const float inv_ = 1.0f / sqrtf(nnc::cuda::block_sum(v_) / {inner} + {f(node.attrs['eps'])});",
        f"for (long long j_ = threadIdx.x; j_ < {inner}; j_ += blockDim.x) q_[j_] = (p_[j_] - m_) * inv_"
        f"{' * ' + weight + '[j_]' if weight else ''}{' + ' + bias + '[j_]' if bias else ''};"]
    return ctx.kernel(_rows_loop(rows, lines), [node.name, *node.inputs], _row_grid(rows), ROW_BLOCK)


def _softmax_rows(ctx: CudaContext, src: str, dst: str, n: int, inner: int, log: bool, valid: str | None = None) -> list[str]:
    """Device lines: softmax (or log-softmax) of row r_ (``n`` elements ``inner`` apart) of src into dst.
    ``valid``: an expression for how many leading elements take part (the rest become 0)."""
    count = valid or str(n)
    lines = [
        f"const long long base_ = (r_ / {inner}) * {n * inner} + r_ % {inner};",
        f"const long long valid_ = {count};",
        "float m_ = -INFINITY;",
        f"for (long long k_ = threadIdx.x; k_ < valid_; k_ += blockDim.x) m_ = nnc::cuda::fmax_nan(m_, {src}[base_ + k_ * {inner}]);",
        "m_ = nnc::cuda::block_max(m_);",
        "float s_ = 0.0f;",
        f"for (long long k_ = threadIdx.x; k_ < valid_; k_ += blockDim.x) {{ const float e_ = expf({src}[base_ + k_ * {inner}] - m_); "
        + ("s_ += e_; }" if log else f"{dst}[base_ + k_ * {inner}] = e_; s_ += e_; }}"),
        "s_ = nnc::cuda::block_sum(s_);"]
    if log:
        lines += ["const float ls_ = logf(s_);",
                  f"for (long long k_ = threadIdx.x; k_ < valid_; k_ += blockDim.x) "
                  f"{dst}[base_ + k_ * {inner}] = ({src}[base_ + k_ * {inner}] - m_) - ls_;"]
    else:
        lines += ["const float inv_ = 1.0f / s_;",
                  f"for (long long k_ = threadIdx.x; k_ < valid_; k_ += blockDim.x) {dst}[base_ + k_ * {inner}] *= inv_;"]
    if valid is not None:
        lines.append(f"for (long long k_ = valid_ + threadIdx.x; k_ < {n}; k_ += blockDim.x) {dst}[base_ + k_ * {inner}] = 0.0f;")
    return lines


def emit_softmax(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    x = ctx.type(node.inputs[0])
    axis = normalize_axis(node.op, node.attrs["axis"], x.rank)
    outer, n, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:])
    rows = outer * inner
    lines = _softmax_rows(ctx, ctx.ptr(node.inputs[0]), ctx.out, n, inner, node.op == "log_softmax")
    return ctx.kernel(_rows_loop(rows, lines), [node.name, *node.inputs], _row_grid(rows), ROW_BLOCK)


# reductions and losses ------------------------------------------------------------------------------


def emit_reduce(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    x = ctx.type(node.inputs[0])
    axes = tuple(range(x.rank)) if node.attrs["axes"] is None else \
        tuple(sorted(normalize_axis(node.op, a, x.rank) for a in node.attrs["axes"]))
    kept = [d for d in range(x.rank) if d not in axes]
    strides = contiguous_strides(x.shape)
    red_count = math.prod(x.shape[d] for d in axes)
    out_count = math.prod(x.shape[d] for d in kept)
    is_max = node.op == "max"
    lines = unravel("r_", [x.shape[d] for d in kept], [[strides[d] for d in kept]], ["base_"])
    lines.append("float acc_ = -INFINITY;" if is_max else "double acc_ = 0.0;")
    red = unravel("k_", [x.shape[d] for d in axes], [[strides[d] for d in axes]], ["off_"])
    lines.append(f"for (long long k_ = threadIdx.x; k_ < {red_count}LL; k_ += blockDim.x) {{")
    lines += ["    " + s for s in red]
    lines.append(f"    const float v_ = {ctx.ptr(node.inputs[0])}[base_ + off_];")
    lines.append("    acc_ = nnc::cuda::fmax_nan(acc_, v_);" if is_max else "    acc_ += v_;")
    lines.append("}")
    lines.append("acc_ = nnc::cuda::block_max(acc_);" if is_max else "acc_ = nnc::cuda::block_sum(acc_);")
    finish = "acc_" if is_max else f"(float)(acc_ / {red_count})" if node.op == "mean" else "(float)acc_"
    lines.append(f"if (threadIdx.x == 0) {ctx.out}[r_] = {finish};")
    # unravel declares locals: give each row its own scope
    return ctx.kernel(_rows_loop(out_count, ["{"] + lines + ["}"]), [node.name, *node.inputs], _row_grid(out_count), ROW_BLOCK)


def emit_cross_entropy(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs[:1])
    n, c = ctx.type(node.inputs[0]).shape
    mean = node.attrs["reduction"] == "mean"
    body = [
        "double total_ = 0.0;",
        f"for (long long r_ = threadIdx.x; r_ < {n}; r_ += blockDim.x) {{",
        f"    const float* p_ = {ctx.ptr(node.inputs[0])} + r_ * {c};",
        f"    const long long y_ = (long long){ctx.ptr(node.inputs[1])}[r_];",
        f"    if (y_ < 0 || y_ >= {c}) {{ {ctx.error_set()} continue; }}",
        "    float m_ = -INFINITY;",
        f"    for (long long k_ = 0; k_ < {c}; ++k_) m_ = fmaxf(m_, p_[k_]);",
        "    float s_ = 0.0f;",
        f"    for (long long k_ = 0; k_ < {c}; ++k_) s_ += expf(p_[k_] - m_);",
        "    total_ += (double)(m_ + logf(s_) - p_[y_]);",
        "}",
        "total_ = nnc::cuda::block_sum(total_);",
        f"if (threadIdx.x == 0) {ctx.out}[0] = (float)(total_{' / ' + str(n) if mean else ''});"]
    return ctx.kernel(body, [node.name, *node.inputs], "1", 1024, error=True)


def emit_mse(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    t = ctx.type(node.inputs[0])
    mean = node.attrs["reduction"] == "mean"
    a, b = (ctx.ptr(v) for v in node.inputs)
    body = [
        "double total_ = 0.0;",
        f"for (long long i_ = threadIdx.x; i_ < {t.numel}LL; i_ += blockDim.x) {{ const double d_ = (double){a}[i_] - {b}[i_]; "
        "total_ += d_ * d_; }",
        "total_ = nnc::cuda::block_sum(total_);",
        f"if (threadIdx.x == 0) {ctx.out}[0] = (float)(total_{' / ' + str(t.numel) if mean else ''});"]
    return ctx.kernel(body, [node.name, *node.inputs], "1", 1024)


def emit_embedding(ctx: CudaContext, node: Node) -> str:
    ids, weight = ctx.type(node.inputs[0]), ctx.type(node.inputs[1])
    vocab, dim = weight.shape
    body = [f"const long long row_ = i_ / {dim}, k_ = i_ % {dim};",
            f"const long long id_ = (long long){ctx.ptr(node.inputs[0])}[row_];",
            f"if (id_ < 0 || id_ >= {vocab}) {{ {ctx.error_set()} {ctx.out}[i_] = 0; continue; }}",
            f"{ctx.out}[i_] = {ctx.ptr(node.inputs[1])}[id_ * {dim} + k_];"]
    return ctx.launch(body, ids.numel * dim, [node.name, *node.inputs], error=True)


def emit_cross_entropy_grad(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, [node.inputs[0], node.inputs[2]])
    n, c = ctx.type(node.inputs[0]).shape
    logits, labels, grad = (ctx.ptr(v) for v in node.inputs)
    scale = f"{grad}[0]" + (f" / {n}.0f" if node.attrs["reduction"] == "mean" else "")
    lines = [
        f"const float scale_ = {scale};",
        f"const float* p_ = {logits} + r_ * {c};",
        f"float* q_ = {ctx.out} + r_ * {c};",
        f"const long long y_ = (long long){labels}[r_];",
        f"if ((y_ < 0 || y_ >= {c}) && threadIdx.x == 0) {ctx.error_set()}",
        "float m_ = -INFINITY;",
        f"for (long long k_ = threadIdx.x; k_ < {c}; k_ += blockDim.x) m_ = fmaxf(m_, p_[k_]);",
        "m_ = nnc::cuda::block_max(m_);",
        "float s_ = 0.0f;",
        f"for (long long k_ = threadIdx.x; k_ < {c}; k_ += blockDim.x) s_ += expf(p_[k_] - m_);",
        "const float inv_ = scale_ / nnc::cuda::block_sum(s_);",
        f"for (long long k_ = threadIdx.x; k_ < {c}; k_ += blockDim.x) q_[k_] = expf(p_[k_] - m_) * inv_ - (k_ == y_ ? scale_ : 0.0f);"]
    return ctx.kernel(_rows_loop(n, lines), [node.name, *node.inputs], _row_grid(n), ROW_BLOCK, error=True)


def emit_embedding_grad(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs[1:])
    ids = ctx.type(node.inputs[0])
    vocab, dim = node.type.shape
    body = [f"const long long row_ = i_ / {dim}, k_ = i_ % {dim};",
            f"const long long id_ = (long long){ctx.ptr(node.inputs[0])}[row_];",
            f"if (id_ < 0 || id_ >= {vocab}) {{ {ctx.error_set()} continue; }}",
            f"atomicAdd({ctx.out} + id_ * {dim} + k_, {ctx.ptr(node.inputs[1])}[i_]);"]
    return "\n".join([f"cudaMemsetAsync({ctx.out}, 0, {node.type.nbytes}, stream_);",
                      ctx.launch(body, ids.numel * dim, [node.name, *node.inputs], error=True)])


# attention ----------------------------------------------------------------------------------------


def _attention_rows(ctx: CudaContext, node: Node) -> str:
    """sdpa: one block per query row, its scores in shared memory, the softmax, then the row of P V."""
    q, k = ctx.type(node.inputs[0]), ctx.type(node.inputs[1])
    length, d, s = q.shape[-2], q.shape[-1], k.shape[-2]
    batch = q.numel // (length * d)
    dv = ctx.type(node.inputs[2]).shape[-1]
    if k.numel // (s * d) != batch or ctx.type(node.inputs[2]).numel // (s * dv) != batch:
        raise BuildError(f"{node.op}: the CUDA backend needs q, k and v with the same batch dimensions", node.loc)
    shared = 4 * (s + d)
    if shared > SDPA_MAX_SHARED:
        raise BuildError(f"{node.op}: the CUDA backend keeps a query row's scores in shared memory and supports "
                         f"up to {SDPA_MAX_SHARED // 4 - d} keys, got {s}", node.loc)
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(d)
    qp, kp = ctx.ptr(node.inputs[0]), ctx.ptr(node.inputs[1])
    valid = f"min(i_ + 1, {s}LL)" if node.attrs["causal"] else f"{s}LL"
    lines = [
        "NNC_DYNAMIC_SHARED(float, smem_);",
        f"float* sc_ = smem_; float* qs_ = smem_ + {s};",
        f"const long long b_ = r_ / {length}, i_ = r_ % {length};",
        f"const float* qrow_ = {qp} + r_ * {d};",
        f"const float* kb_ = {kp} + b_ * {s * d};",
        f"__syncthreads();",
        f"for (int t_ = threadIdx.x; t_ < {d}; t_ += blockDim.x) qs_[t_] = qrow_[t_];",
        "__syncthreads();",
        f"const long long valid_ = {valid};",
        "float m_ = -INFINITY;",
        "for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) {",
        f"    const float* krow_ = kb_ + j_ * {d};",
        "    float dot_ = 0.0f;",
        f"    for (int t_ = 0; t_ < {d}; ++t_) dot_ = fmaf(qs_[t_], krow_[t_], dot_);",
        f"    dot_ *= {f(scale)};",
        "    sc_[j_] = dot_; m_ = nnc::cuda::fmax_nan(m_, dot_);",
        "}",
        "m_ = nnc::cuda::block_max(m_);",
        "float s_ = 0.0f;",
        "for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) { const float e_ = expf(sc_[j_] - m_); sc_[j_] = e_; s_ += e_; }",
        "const float inv_ = 1.0f / nnc::cuda::block_sum(s_);",
        "__syncthreads();"]
    vp = ctx.ptr(node.inputs[2])
    lines += [f"const float* vb_ = {vp} + b_ * {s * dv};",
              f"float* orow_ = {ctx.out} + r_ * {dv};",
              f"for (int t_ = threadIdx.x; t_ < {dv}; t_ += blockDim.x) {{",
              "    float acc_ = 0.0f;",
              f"    for (long long j_ = 0; j_ < valid_; ++j_) acc_ = fmaf(sc_[j_], vb_[j_ * {dv} + t_], acc_);",
              "    orow_[t_] = acc_ * inv_;",
              "}",
              "__syncthreads();"]
    rows = batch * length
    return ctx.kernel(_rows_loop(rows, lines), [node.name, *node.inputs], _row_grid(rows), 128, shared=shared)


def emit_sdpa(ctx: CudaContext, node: Node) -> str:
    _require_f32(ctx, node.op, node.inputs)
    return _attention_rows(ctx, node)


def emit_sdpa_grad(ctx: CudaContext, node: Node) -> str:
    """One block per query row: the row's probabilities p and dS = p * (dP - rowsum(dP * p)) * scale in shared
    memory, dq of the row directly, dk += dS^T q and dv += p^T dO by atomics (zeroed first)."""
    _require_f32(ctx, node.op, node.inputs)
    q, k, v = (ctx.type(n) for n in node.inputs[:3])
    length, d, s, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    batch = q.numel // (length * d)
    if k.numel // (s * d) != batch or v.numel // (s * dv) != batch:
        raise BuildError(f"{node.op}: the CUDA backend needs q, k and v with the same batch dimensions", node.loc)
    shared = 4 * (2 * s + d + dv)
    if shared > SDPA_MAX_SHARED:
        raise BuildError(f"{node.op}: the CUDA backend keeps a query row's probabilities and their gradients in "
                         f"shared memory and supports up to {(SDPA_MAX_SHARED // 4 - d - dv) // 2} keys, got {s}",
                         node.loc)
    scale = f(node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(d))
    qp, kp, vp, gp = (ctx.ptr(n) for n in node.inputs)
    out = ctx.out
    dk, dvp = f"{out} + {batch * length * d}LL", f"{out} + {batch * (length + s) * d}LL"
    valid = f"min(i_ + 1, {s}LL)" if node.attrs["causal"] else f"{s}LL"
    lines = [
        "NNC_DYNAMIC_SHARED(float, smem_);",
        f"float* p_ = smem_; float* ds_ = smem_ + {s}; float* qs_ = smem_ + {2 * s}; float* gs_ = qs_ + {d};",
        f"const long long b_ = r_ / {length}, i_ = r_ % {length};",
        f"const float* kb_ = {kp} + b_ * {s * d}LL;",
        f"const float* vb_ = {vp} + b_ * {s * dv}LL;",
        f"float* dkb_ = {dk} + b_ * {s * d}LL;",
        f"float* dvb_ = {dvp} + b_ * {s * dv}LL;",
        "__syncthreads();",
        f"for (int t_ = threadIdx.x; t_ < {d}; t_ += blockDim.x) qs_[t_] = {qp}[r_ * {d}LL + t_];",
        f"for (int t_ = threadIdx.x; t_ < {dv}; t_ += blockDim.x) gs_[t_] = {gp}[r_ * {dv}LL + t_];",
        "__syncthreads();",
        f"const long long valid_ = {valid};",
        "float m_ = -INFINITY;",
        "for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) {",
        f"    const float* krow_ = kb_ + j_ * {d};",
        f"    const float* vrow_ = vb_ + j_ * {dv};",
        "    float dot_ = 0.0f, dp_ = 0.0f;",
        f"    for (int t_ = 0; t_ < {d}; ++t_) dot_ = fmaf(qs_[t_], krow_[t_], dot_);",
        f"    for (int t_ = 0; t_ < {dv}; ++t_) dp_ = fmaf(gs_[t_], vrow_[t_], dp_);",
        f"    dot_ *= {scale};",
        "    p_[j_] = dot_; ds_[j_] = dp_; m_ = nnc::cuda::fmax_nan(m_, dot_);",
        "}",
        "m_ = nnc::cuda::block_max(m_);",
        "float s_ = 0.0f;",
        "for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) { const float e_ = expf(p_[j_] - m_); p_[j_] = e_; s_ += e_; }",
        "const float inv_ = 1.0f / nnc::cuda::block_sum(s_);",
        "float dot_ = 0.0f;",
        "for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) { p_[j_] *= inv_; dot_ += p_[j_] * ds_[j_]; }",
        "const float delta_ = nnc::cuda::block_sum(dot_);",
        f"for (long long j_ = threadIdx.x; j_ < valid_; j_ += blockDim.x) ds_[j_] = p_[j_] * (ds_[j_] - delta_) * {scale};",
        "__syncthreads();",
        f"for (int t_ = threadIdx.x; t_ < {d}; t_ += blockDim.x) {{",
        "    float acc_ = 0.0f;",
        f"    for (long long j_ = 0; j_ < valid_; ++j_) acc_ = fmaf(ds_[j_], kb_[j_ * {d} + t_], acc_);",
        f"    {out}[r_ * {d}LL + t_] = acc_;",
        "}",
        f"for (long long e_ = threadIdx.x; e_ < valid_ * {d}; e_ += blockDim.x) {{",
        f"    const long long j_ = e_ / {d}, t_ = e_ % {d};",
        "    atomicAdd(dkb_ + e_, ds_[j_] * qs_[t_]);",
        "}",
        f"for (long long e_ = threadIdx.x; e_ < valid_ * {dv}; e_ += blockDim.x) {{",
        f"    const long long j_ = e_ / {dv}, t_ = e_ % {dv};",
        "    atomicAdd(dvb_ + e_, p_[j_] * gs_[t_]);",
        "}",
        "__syncthreads();"]
    rows = batch * length
    return "\n".join([f"cudaMemsetAsync({dk}, 0, {4 * batch * s * (d + dv)}, stream_);",
                      ctx.kernel(_rows_loop(rows, lines), [node.name, *node.inputs], _row_grid(rows), 128,
                                 shared=shared)])


def workspace_bytes(graph, node: Node) -> int:
    """Arena scratch of the CUDA kernels: none (implicit-GEMM convolution, attention in shared memory)."""
    return 0


def register() -> None:
    import nncompile.ops.conv_grad  # noqa: F401

    set_rule("conv2d", "emit_cuda", emit_conv2d)
    set_rule("conv2d_grad_input", "emit_cuda", emit_conv2d_grad_input)
    set_rule("conv2d_grad_weight", "emit_cuda", emit_conv2d_grad_weight)
    for op in ("max_pool2d", "avg_pool2d"):
        set_rule(op, "emit_cuda", emit_pool)
    set_rule("global_avg_pool2d", "emit_cuda", emit_global_avg_pool)
    set_rule("max_pool2d_grad", "emit_cuda", emit_max_pool2d_grad)
    set_rule("avg_pool2d_grad", "emit_cuda", emit_avg_pool2d_grad)
    set_rule("batch_norm", "emit_cuda", emit_batch_norm)
    set_rule("layer_norm", "emit_cuda", emit_layer_norm)
    for op in ("softmax", "log_softmax"):
        set_rule(op, "emit_cuda", emit_softmax)
    for op in ("sum", "mean", "max"):
        set_rule(op, "emit_cuda", emit_reduce)
    set_rule("cross_entropy", "emit_cuda", emit_cross_entropy)
    set_rule("mse_loss", "emit_cuda", emit_mse)
    set_rule("embedding", "emit_cuda", emit_embedding)
    set_rule("cross_entropy_grad", "emit_cuda", emit_cross_entropy_grad)
    set_rule("embedding_grad", "emit_cuda", emit_embedding_grad)
    set_rule("sdpa", "emit_cuda", emit_sdpa)
    set_rule("sdpa_grad", "emit_cuda", emit_sdpa_grad)


_registered = False


def register_cuda_rules() -> None:
    """Attach every ``emit_cuda`` rule to the op table (once)."""
    global _registered
    if not _registered:
        from nncompile.codegen import cuda_ops

        cuda_ops.register()
        register()
        _registered = True
