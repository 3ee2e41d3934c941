"""``emit_cpp`` rules for the backward ops of convolution and pooling (``nncompile/ops/conv_grad.py``), f32.

- ``conv2d_grad_input``: per image and group, ``dcol = W_g^T @ dY`` (``nnc::sgemm``) into a column
  buffer, then ``nnc::col2im`` scatter-adds it into dX (a 1x1 / stride 1 / unpadded conv writes the
  GEMM straight into dX).
- ``conv2d_grad_weight``: per image and group, ``nnc::im2col`` of X, then ``dW_g += dY @ col^T``
  (``beta = 1`` after the first image).
- ``max_pool2d_grad`` / ``avg_pool2d_grad``: OpenMP over the N*C planes, each plane zeroed then
  scatter-added (planes never share an element, so no atomics).

Both conv rules choose at run time (the thread count is a run-time setting) between images in turn
with threads inside each GEMM, using the planned scratch (``workspace_bytes``), and, when there are
at least as many images as threads and each image is a small GEMM, one image (-group) per thread with
per-thread buffers (``nnc::thread_scratch``); the weight gradient then sums per-thread partial dW in
thread order, so a run is deterministic for a given thread count. The per-thread buffers use the
scratch slots ``SCRATCH_MISC`` (columns) and ``SCRATCH_ROW`` (partial dW), which the serial GEMM,
im2col and col2im called inside the parallel region never touch.
"""
from __future__ import annotations

from nncompile.codegen.cpp import CppContext
from nncompile.codegen.cpp_loops import PARALLEL_MIN
from nncompile.errors import BuildError
from nncompile.ir.graph import Node
from nncompile.ops.base import set_rule

MAX_PARTS = 256           # the per-thread path runs on at most this many threads (partial dW slots)
SMALL_COL_FLOATS = 1 << 21   # per-thread column buffers up to 8 MiB


def _omp(work: int) -> str:
    return "#pragma omp parallel for schedule(static)" if work >= PARALLEL_MIN else ""


def _require_f32(ctx: CppContext, node: Node) -> None:
    for name in (*node.inputs, node.name):
        if ctx.type(name).dtype != "f32":
            raise BuildError(f"{node.op}: the C++ backend supports f32 here, got {ctx.type(name)}", node.loc)


def conv_grad_geometry(x_shape, w_shape, grad_shape, attrs) -> dict:
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    groups = attrs["groups"]
    g = dict(n=n, c=c, h=h, w=w, o=o, cg=cg, kh=kh, kw=kw, groups=groups, og=o // groups,
             oh=grad_shape[2], ow=grad_shape[3], sh=attrs["stride"][0], sw=attrs["stride"][1],
             ph=attrs["padding"][0], pw=attrs["padding"][1], dh=attrs["dilation"][0], dw=attrs["dilation"][1])
    g["pq"] = g["oh"] * g["ow"]
    g["kdim"] = cg * kh * kw
    g["pointwise"] = kh == kw == 1 and g["sh"] == g["sw"] == 1 and g["ph"] == g["pw"] == 0
    return g


def _conv_shapes(graph_type, node: Node):
    """(x shape, weight shape, grad shape) of a conv backward node."""
    if node.op == "conv2d_grad_input":
        grad, weight = node.inputs
        return node.attrs["input_shape"], graph_type(weight).shape, graph_type(grad).shape
    x, grad = node.inputs
    return graph_type(x).shape, node.attrs["weight_shape"], graph_type(grad).shape


def _window_args(g: dict) -> str:
    """The geometry arguments nnc::im2col / nnc::col2im take after the pointer: C, H, W, R, S, strides..."""
    return (f"{g['cg']}, {g['h']}, {g['w']}, {g['kh']}, {g['kw']}, {g['sh']}, {g['sw']}, {g['ph']}, {g['pw']}, "
            f"{g['dh']}, {g['dw']}, {g['oh']}, {g['ow']}")


def _per_thread_condition(g: dict) -> str:
    """Run-time test for the one-image-per-thread path."""
    gemm_work = g["og"] * g["pq"] * g["kdim"]
    col = 0 if g["pointwise"] else g["kdim"] * g["pq"]
    if col > SMALL_COL_FLOATS:
        return "false"
    return (f"threads_ > 1 && {g['n']} >= threads_ && "
            f"({gemm_work} < 8 * nnc::gemm::kMinParallelWork || {g['n']} % threads_ == 0)")


def emit_conv2d_grad_input(ctx: CppContext, node: Node) -> str:
    _require_f32(ctx, node)
    g = conv_grad_geometry(*_conv_shapes(ctx.type, node), node.attrs)
    grad, weight = (ctx.ptr(v) for v in node.inputs)
    hw, pq, kdim = g["h"] * g["w"], g["pq"], g["kdim"]
    items = g["n"] * g["groups"]

    def item_body(col: str, gemm: str) -> list[str]:
        """dX of image n_, group g_: dcol = W_g^T dY_g, then col2im (or the GEMM straight into dX)."""
        lines = [f"  const int64_t n_ = item_ / {g['groups']}, g_ = item_ % {g['groups']};",
                 f"  float* dx_ = {ctx.out} + (n_ * {g['c']} + g_ * {g['cg']}) * {hw};",
                 f"  const float* dy_ = {grad} + (n_ * {g['o']} + g_ * {g['og']}) * {pq};",
                 f"  const float* w_ = {weight} + g_ * {g['og'] * kdim};"]
        target = "dx_" if g["pointwise"] else col
        lines.append(f"  {gemm}(true, false, {kdim}, {pq}, {g['og']}, w_, {kdim}, dy_, {pq}, {target}, {pq}, 0.0f, plain_);")
        if not g["pointwise"]:
            lines += [f"  std::memset(dx_, 0, sizeof(float) * {g['cg'] * hw});",
                      f"  nnc::col2im({col}, {_window_args(g)}, dx_);"]
        return lines

    lines = ["const nnc::Epilogue plain_;", "const int threads_ = nnc::usable_threads();",
             f"if ({_per_thread_condition(g)}) {{",
             "  #pragma omp parallel num_threads(threads_)",
             "  {",
             f"    float* col_ = {'nullptr' if g['pointwise'] else f'nnc::thread_scratch(nnc::SCRATCH_MISC, {kdim * pq} + 16)'};",
             "    (void)col_;",
             "    #pragma omp for schedule(dynamic, 1)",
             f"    for (int64_t item_ = 0; item_ < {items}; ++item_) {{"]
    lines += ["    " + line for line in item_body("col_", "nnc::gemm::serial")]
    lines += ["    }", "  }", "} else {",
              f"  float* col_ = {'nullptr' if g['pointwise'] else '(float*)' + ctx.work()};",
              "  (void)col_;",
              f"  for (int64_t item_ = 0; item_ < {items}; ++item_) {{"]
    lines += ["  " + line for line in item_body("col_", "nnc::sgemm")]
    lines += ["  }", "}"]
    return "\n".join(lines)


def emit_conv2d_grad_weight(ctx: CppContext, node: Node) -> str:
    _require_f32(ctx, node)
    g = conv_grad_geometry(*_conv_shapes(ctx.type, node), node.attrs)
    x, grad = (ctx.ptr(v) for v in node.inputs)
    hw, pq, kdim = g["h"] * g["w"], g["pq"], g["kdim"]
    wsize = g["o"] * kdim

    def image_group(col: str, gemm: str, dst: str, beta: str) -> list[str]:
        """dW_g (+)= dY_g (og x PQ) @ im2col(X_g)^T (PQ x kdim) for image n_, group g_."""
        lines = [f"const float* x_ = {x} + (n_ * {g['c']} + g_ * {g['cg']}) * {hw};",
                 f"const float* dy_ = {grad} + (n_ * {g['o']} + g_ * {g['og']}) * {pq};"]
        if g["pointwise"]:
            lines.append("const float* cols_ = x_;")
        else:
            lines += [f"nnc::im2col(x_, {_window_args(g)}, {col});", f"const float* cols_ = {col};"]
        lines.append(f"{gemm}(false, true, {g['og']}, {kdim}, {pq}, dy_, {pq}, cols_, {pq}, "
                     f"{dst} + g_ * {g['og'] * kdim}, {kdim}, {beta}, plain_);")
        return lines

    col_floats = 0 if g["pointwise"] else kdim * pq
    lines = ["const nnc::Epilogue plain_;",
             f"const int threads_ = std::min(nnc::usable_threads(), {MAX_PARTS});",
             f"if ({_per_thread_condition(g)}) {{",
             "  // one image per thread into a private partial dW, then the partials summed in thread order",
             f"  float* parts_[{MAX_PARTS}];",
             "  int team_ = 1;",
             "  #pragma omp parallel num_threads(threads_)",
             "  {",
             "    #pragma omp single",
             "    team_ = omp_get_num_threads();   // the team may be smaller than asked",
             "    const int t_ = nnc::thread_id();",
             f"    float* part_ = nnc::thread_scratch(nnc::SCRATCH_ROW, {wsize} + 16);",
             f"    float* col_ = {'nullptr' if g['pointwise'] else f'nnc::thread_scratch(nnc::SCRATCH_MISC, {col_floats} + 16)'};",
             "    (void)col_;",
             "    parts_[t_] = part_;",
             f"    std::memset(part_, 0, sizeof(float) * {wsize});",
             "    #pragma omp for schedule(static)",
             f"    for (int64_t n_ = 0; n_ < {g['n']}; ++n_) {{",
             f"      for (int64_t g_ = 0; g_ < {g['groups']}; ++g_) {{"]
    lines += ["        " + line for line in image_group("col_", "nnc::gemm::serial", "part_", "1.0f")]
    lines += ["      }", "    }",
             "    #pragma omp for schedule(static)",
             f"    for (int64_t e_ = 0; e_ < {wsize}; ++e_) {{",
             "      float s_ = parts_[0][e_];",
             "      for (int p_ = 1; p_ < team_; ++p_) s_ += parts_[p_][e_];",
             f"      {ctx.out}[e_] = s_;",
             "    }",
             "  }",
             "} else {",
             f"  float* col_ = {'nullptr' if g['pointwise'] else '(float*)' + ctx.work()};",
             "  (void)col_;",
             f"  for (int64_t n_ = 0; n_ < {g['n']}; ++n_) {{",
             f"    for (int64_t g_ = 0; g_ < {g['groups']}; ++g_) {{"]
    lines += ["      " + line for line in image_group("col_", "nnc::sgemm", ctx.out, "n_ == 0 ? 0.0f : 1.0f")]
    lines += ["    }", "  }", "}"]
    return "\n".join(lines)


# pooling ----------------------------------------------------------------------------------------------


def emit_max_pool2d_grad(ctx: CppContext, node: Node) -> str:
    _require_f32(ctx, node)
    n, c, h, w = ctx.type(node.inputs[0]).shape
    oh, ow = ctx.type(node.inputs[1]).shape[2:]
    a = node.attrs
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    chunk = min(ow, 512)
    # torch's rule: the first valid element, then a strictly larger value or any NaN (branch-free select)
    take = "const bool take_ = v_ > best_ || v_ != v_; best_ = take_ ? v_ : best_;"
    return "\n".join([
        _omp(n * c * oh * ow * kh * kw),
        f"for (int64_t p_ = 0; p_ < {n * c}; ++p_) {{",
        f"  const float* in_ = {ctx.ptr(node.inputs[0])} + p_ * {h * w};",
        f"  const float* gy_ = {ctx.ptr(node.inputs[1])} + p_ * {oh * ow};",
        f"  float* dx_ = {ctx.out} + p_ * {h * w};",
        f"  std::memset(dx_, 0, sizeof(float) * {h * w});",
        "  // argmax positions of a run of windows first, then their adds: interleaving the loads of x",
        "  // with stores to dx (often 4 KiB apart) stalls on false store-to-load dependencies",
        f"  int64_t where_[{chunk}];",
        f"  for (int64_t oy_ = 0; oy_ < {oh}; ++oy_) for (int64_t c0_ = 0; c0_ < {ow}; c0_ += {chunk}) {{",
        f"    const int64_t c1_ = std::min<int64_t>(c0_ + {chunk}, {ow});",
        "    for (int64_t ox_ = c0_; ox_ < c1_; ++ox_) {",
        f"      const int64_t y0_ = oy_ * {sh} - {ph}, x0_ = ox_ * {sw} - {pw};",
        f"      if (y0_ >= 0 && y0_ + {(kh - 1) * dh} < {h} && x0_ >= 0 && x0_ + {(kw - 1) * dw} < {w}) {{",
        "        // the whole window is inside the input: no bounds checks",
        f"        const int64_t start_ = y0_ * {w} + x0_;",
        "        float best_ = in_[start_]; int64_t at_ = 0;",
        f"        for (int64_t ki_ = 0; ki_ < {kh}; ++ki_) for (int64_t kj_ = 0; kj_ < {kw}; ++kj_) {{",
        f"          const int64_t o_ = ki_ * {dh * w} + kj_ * {dw};",
        f"          const float v_ = in_[start_ + o_]; {take} at_ = take_ ? o_ : at_;",
        "        }",
        "        where_[ox_ - c0_] = start_ + at_;",
        "        continue;",
        "      }",
        "      float best_ = -INFINITY; int64_t at_ = -1;",
        f"      for (int64_t ki_ = 0; ki_ < {kh}; ++ki_) {{",
        f"        const int64_t iy_ = y0_ + ki_ * {dh}; if (iy_ < 0 || iy_ >= {h}) continue;",
        f"        for (int64_t kj_ = 0; kj_ < {kw}; ++kj_) {{",
        f"          const int64_t ix_ = x0_ + kj_ * {dw}; if (ix_ < 0 || ix_ >= {w}) continue;",
        f"          const float v_ = in_[iy_ * {w} + ix_];",
        f"          if (at_ < 0) {{ best_ = v_; at_ = iy_ * {w} + ix_; continue; }}",
        f"          {take} at_ = take_ ? iy_ * {w} + ix_ : at_;",
        "        }",
        "      }",
        "      where_[ox_ - c0_] = at_;",
        "    }",
        "    for (int64_t ox_ = c0_; ox_ < c1_; ++ox_) {",
        f"      if (where_[ox_ - c0_] >= 0) dx_[where_[ox_ - c0_]] += gy_[oy_ * {ow} + ox_];",
        "    }",
        "  }",
        "}"])


def emit_avg_pool2d_grad(ctx: CppContext, node: Node) -> str:
    _require_f32(ctx, node)
    a = node.attrs
    n, c, h, w = a["input_shape"]
    oh, ow = ctx.type(node.inputs[0]).shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if a["count_include_pad"]:
        # the window clipped to the padded input (torch), as the forward divides
        divisor = (f"(std::min<int64_t>(y0_ + {kh}, {h + ph}) - y0_) * "
                   f"(std::min<int64_t>(x0_ + {kw}, {w + pw}) - x0_)")
    else:
        divisor = "(y1_ - ya_) * (x1_ - xa_)"
    return "\n".join([
        _omp(n * c * oh * ow * kh * kw),
        f"for (int64_t p_ = 0; p_ < {n * c}; ++p_) {{",
        f"  const float* gy_ = {ctx.ptr(node.inputs[0])} + p_ * {oh * ow};",
        f"  float* dx_ = {ctx.out} + p_ * {h * w};",
        f"  std::memset(dx_, 0, sizeof(float) * {h * w});",
        f"  for (int64_t oy_ = 0; oy_ < {oh}; ++oy_) for (int64_t ox_ = 0; ox_ < {ow}; ++ox_) {{",
        f"    const int64_t y0_ = oy_ * {sh} - {ph}, x0_ = ox_ * {sw} - {pw};",
        f"    const int64_t ya_ = std::max<int64_t>(y0_, 0), y1_ = std::min<int64_t>(y0_ + {kh}, {h});",
        f"    const int64_t xa_ = std::max<int64_t>(x0_, 0), x1_ = std::min<int64_t>(x0_ + {kw}, {w});",
        f"    const int64_t count_ = {divisor};",
        f"    const float share_ = gy_[oy_ * {ow} + ox_] / (float)(count_ > 0 ? count_ : 1);",
        "    for (int64_t iy_ = ya_; iy_ < y1_; ++iy_) {",
        f"      float* row_ = dx_ + iy_ * {w};",
        "      for (int64_t ix_ = xa_; ix_ < x1_; ++ix_) row_[ix_] += share_;",
        "    }",
        "  }",
        "}"])


# scratch and registration -----------------------------------------------------------------------------


def workspace_bytes(graph, node: Node) -> int | None:
    """Scratch bytes of this module's ops (the images-in-turn column buffer); None for other ops."""
    if node.op in ("conv2d_grad_input", "conv2d_grad_weight"):
        g = conv_grad_geometry(*_conv_shapes(graph.type_of, node), node.attrs)
        return 0 if g["pointwise"] else 4 * g["kdim"] * g["pq"]
    if node.op in ("max_pool2d_grad", "avg_pool2d_grad"):
        return 0
    return None


def register() -> None:
    """Attach the rules to the op table (the ops must be defined: ``import nncompile.ops.conv_grad``)."""
    import nncompile.ops.conv_grad  # noqa: F401

    set_rule("conv2d_grad_input", "emit_cpp", emit_conv2d_grad_input)
    set_rule("conv2d_grad_weight", "emit_cpp", emit_conv2d_grad_weight)
    set_rule("max_pool2d_grad", "emit_cpp", emit_max_pool2d_grad)
    set_rule("avg_pool2d_grad", "emit_cpp", emit_avg_pool2d_grad)
