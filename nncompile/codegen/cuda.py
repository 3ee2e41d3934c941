"""The CUDA emitter: one graph + its memory plan -> one ``kernels.cu`` (device kernels + a host function).

Generated code::

    __global__ void k3_relu(float* v5_h, const float* v0_x) { ... grid-stride loop ... }
    ...
    extern "C" int nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena, void* stream) {
        const float* const v0_x = (const float*)inputs[0];     // device pointers
        float* const v5_h = (float*)(arena + 4096);
        // h = relu(x)  @ mlp.nn:6:7
        { NNC_LAUNCH(k3_relu, grid, 256, 0, stream_)(v5_h, v0_x); }   // k3_relu<<<grid, 256, 0, stream_>>>
        ...
    }

The memory plan is the C++ target's: inputs and outputs where the caller keeps them (device memory),
parameters at their offsets in one device parameter block, every intermediate at its planned offset
in one device arena allocation. Each node's code comes from its op's ``emit_cuda`` rule
(``codegen/cuda_ops*.py``), called with a ``CudaContext``: a rule defines its kernels through
``ctx.launch`` / ``ctx.kernel`` (kernel parameters carry the same names as the host pointers, so one
expression works on both sides) and returns the host statements that launch them, in graph order, on
the caller's stream.

Kernels that can meet bad data (an index out of range) set an error word placed after the arena
(``error_offset``); the host function reads it back at the end (one synchronization, only in modules
that have such nodes) and returns its code; ``nnc_error_message`` names the node. A CUDA launch
error returns -1 with ``nnc_last_error``.

The module is a plain shared library (no Python headers: nvcc compiles it alone, and the runtime
calls it through ctypes with device pointers, see ``nncompile/runtime_cuda.py``).
"""
from __future__ import annotations

import json
import re

from nncompile.codegen.cpp import CTYPES, CppContext, GeneratedSource, cpp_identifier
from nncompile.errors import BuildError, MissingRuleError
from nncompile.ir.graph import Graph, Node
from nncompile.ops.base import get_op
from nncompile.passes.plan_memory import MemoryPlan

BLOCK = 256
ERROR_ALIGN = 256


def cuda_ctype(dtype: str) -> str:
    try:
        return CTYPES[dtype]
    except KeyError:
        raise BuildError(f"dtype {dtype} is not supported by the CUDA backend") from None


def error_offset(arena_bytes: int) -> int:
    """Where the error word lives: after the planned arena, aligned."""
    return (arena_bytes + ERROR_ALIGN - 1) // ERROR_ALIGN * ERROR_ALIGN


def device_arena_bytes(arena_bytes: int) -> int:
    """Bytes the runtime allocates for the arena (the plan's plus the error word)."""
    return error_offset(arena_bytes) + ERROR_ALIGN


class CudaContext(CppContext):
    """What an ``emit_cuda`` rule may ask: pointers, types and scratch (as for C++), and kernels to define
    and launch."""

    def __init__(self, emitter: "CudaEmitter", node: Node, index: int):
        super().__init__(emitter, node)
        self.index = index
        self._kernels = 0

    def ctype(self, name: str) -> str:
        return cuda_ctype(self.type(name).dtype)

    def error_code(self) -> int:
        return self.emitter.error_code(self.node)

    # kernels
    def _name(self) -> str:
        self._kernels += 1
        op = re.sub(r"[^A-Za-z0-9_]", "_", self.node.op)
        return f"k{self.index}_{op}_{self._kernels}"

    def _params(self, names) -> tuple[list[str], list[str]]:
        decls, args = [], []
        for name in dict.fromkeys(names):
            ident = self.ptr(name)
            const = "const " if self.emitter.plan.storage[name][0] == "input" else ""
            decls.append(f"{const}{self.ctype(name)}* {ident}")
            args.append(ident)
        return decls, args

    def kernel(self, body: str | list[str], names, grid: str, block: str | int = BLOCK, *, shared: str | int = 0,
               error: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> str:
        """Define ``__global__ void k(<pointers of names>, <extra decls>) { body }``; returns the launch.
        ``extra`` holds (parameter declaration, host argument expression) pairs."""
        name = self._name()
        decls, args = self._params(names)
        for decl, arg in extra:
            decls.append(decl)
            args.append(arg)
        if error:
            decls.append("int* nnc_err_")
            args.append("err_")
        lines = body.splitlines() if isinstance(body, str) else body
        self.emitter.kernel_defs.append((self.node, "\n".join(
            [f"__global__ void __launch_bounds__({block if isinstance(block, int) else 1024}) {name}({', '.join(decls)}) {{"]
            + ["    " + line if line else "" for line in lines] + ["}", ""])))
        return f"NNC_LAUNCH({name}, {grid}, {block}, {shared}, stream_)({', '.join(args)});"

    def launch(self, body: str | list[str], count, names, *, error: bool = False,
               extra: tuple[tuple[str, str], ...] = ()) -> str:
        """A grid-stride loop: ``body`` runs once per ``i_`` in [0, count)."""
        lines = body.splitlines() if isinstance(body, str) else list(body)
        loop = [f"for (long long i_ = blockIdx.x * (long long)blockDim.x + threadIdx.x; i_ < {count}LL; "
                f"i_ += (long long)gridDim.x * blockDim.x) {{"] + ["    " + s for s in lines] + ["}"]
        return self.kernel(loop, names, f"nnc::cuda::grid_for({count}LL)", BLOCK, error=error, extra=extra)

    def error_set(self) -> str:
        """Device statement flagging this node's error."""
        return f"*nnc_err_ = {self.error_code()};"


class CudaEmitter:
    """Emits CUDA for the GPU target. One instance per graph."""

    target = "cuda"

    def __init__(self, graph: Graph, plan: MemoryPlan, module_name: str = "nnc_module"):
        self.graph = graph
        self.plan = plan
        self.module_name = module_name
        self.pointer_names: dict[str, str] = {}
        self.error_nodes: list[Node] = []
        self.kernel_defs: list[tuple[Node, str]] = []

    def error_code(self, node: Node) -> int:
        if node not in self.error_nodes:
            self.error_nodes.append(node)
        return self.error_nodes.index(node) + 1

    def _declare(self, name: str, index: int) -> str:
        kind, where, offset = self.plan.storage[name]
        cty = cuda_ctype(self.graph.type_of(name).dtype)
        ident = cpp_identifier(index, name)
        self.pointer_names[name] = ident
        if kind == "input":
            return f"    const {cty}* const {ident} = (const {cty}*)inputs[{where}];"
        if kind == "param":
            return f"    {cty}* const {ident} = ({cty}*)(params + {offset});"
        if kind == "output":
            return f"    {cty}* const {ident} = ({cty}*)outputs[{where}];"
        return f"    {cty}* const {ident} = ({cty}*)(arena + {where});"

    def emit_kernels(self) -> tuple[str, list[tuple[int, str]]]:
        decls = []
        index = 0
        for item in (*self.graph.inputs, *self.graph.params):
            decls.append(self._declare(item.name, index))
            index += 1
        for node in self.graph.nodes:
            decls.append(self._declare(node.name, index))
            index += 1
        host: list[tuple[Node, list[str]]] = []
        for k, node in enumerate(self.graph.nodes):
            try:
                rule = get_op(node.op).rule("emit_cuda")
            except MissingRuleError as err:
                raise err.with_loc(node.loc)
            code = rule(CudaContext(self, node, k), node)
            host.append((node, code.strip("\n").splitlines()))
        err_off = error_offset(self.plan.arena_bytes)
        lines = ['#include "nnc_cuda.cuh"', '#include "nnc_gemm.cuh"', '#include "nnc_conv.cuh"', '#include "nnc_optim.cuh"',
                 "#include <cstdint>", "#include <cstring>", "",
                 "// the module is built with hidden visibility: only these entry points are exported",
                 '#define NNC_EXPORT __attribute__((visibility("default")))', ""]
        node_lines: list[tuple[int, str]] = []

        def text(node: Node) -> str:
            where = f"  @ {node.loc}" if node.loc else ""
            return f"{node.name} = {node.op}({', '.join(node.inputs)}){where}"

        for node, kernel in self.kernel_defs:
            lines.append(f"// {text(node)}")
            node_lines.append((len(lines) + 1, text(node)))
            lines.extend(kernel.splitlines())
        lines += ["static const char* nnc_last_error_ = \"\";", "", 'extern "C" {', "",
                  "NNC_EXPORT int nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena, void* stream) {",
                  "    (void)inputs; (void)outputs; (void)params;",
                  "    cudaStream_t stream_ = (cudaStream_t)stream;",
                  f"    int* const err_ = (int*)(arena + {err_off}); (void)err_;"]
        lines += decls
        if self.error_nodes:
            lines.append("    cudaMemsetAsync(err_, 0, sizeof(int), stream_);")
        for node, code in host:
            lines.append(f"    // {text(node)}")
            node_lines.append((len(lines) + 1, text(node)))
            lines.append("    {")
            lines.extend("        " + line if line else "" for line in code)
            lines.append("    }")
        lines.extend(self._copy_outputs())
        lines += ["    cudaError_t e_ = cudaGetLastError();",
                  "    if (e_ != cudaSuccess) { nnc_last_error_ = cudaGetErrorString(e_); return -1; }"]
        if self.error_nodes:
            lines += ["    int status_ = 0;",
                      "    cudaMemcpyAsync(&status_, err_, sizeof(int), cudaMemcpyDeviceToHost, stream_);",
                      "    e_ = cudaStreamSynchronize(stream_);",
                      "    if (e_ != cudaSuccess) { nnc_last_error_ = cudaGetErrorString(e_); return -1; }",
                      "    return status_;"]
        else:
            lines.append("    return 0;")
        lines += ["}", ""] + self._exports()
        return "\n".join(lines) + "\n", node_lines

    def _copy_outputs(self) -> list[str]:
        lines = []
        for index, name in enumerate(self.graph.outputs):
            if self.plan.storage[name] == ("output", index, 0):
                continue
            t = self.graph.type_of(name)
            lines.append(f"    // output {index}: {name} is stored elsewhere; copy it")
            lines.append(f"    cudaMemcpyAsync(outputs[{index}], {self.pointer_names[name]}, {t.nbytes}, "
                         "cudaMemcpyDeviceToDevice, stream_);")
        return lines

    def _exports(self) -> list[str]:
        messages = ['""'] + [json.dumps(f"{n.op} node '{n.name}'" + (f" ({n.loc})" if n.loc else "")
                                        + ": an index is out of range") for n in self.error_nodes]
        return [
            f"static const char* const nnc_errors_[] = {{{', '.join(messages)}}};",
            f"NNC_EXPORT const char* nnc_error_message(int code) {{ return code > 0 && code < {len(messages)} ? nnc_errors_[code] "
            ": nnc_last_error_; }",
            f"NNC_EXPORT long long nnc_arena_bytes() {{ return {device_arena_bytes(self.plan.arena_bytes)}LL; }}",
            f"NNC_EXPORT long long nnc_param_bytes() {{ return {self.plan.param_bytes}LL; }}",
            "",
            "// optimizers over the fp32 parameter range [0, n) (torch.optim semantics, native/nnc_optim.h)",
            "NNC_EXPORT int nnc_sgd_step(float* p, const float* g, float* buf, long long n, float lr, float momentum, float dampening,",
            "                 float weight_decay, int nesterov, int first, void* stream) {",
            "    NNC_LAUNCH(nnc::cuda::sgd_kernel, nnc::cuda::grid_for(n), nnc::cuda::kBlock, 0, (cudaStream_t)stream)(",
            "        p, g, buf, n, lr, momentum, dampening, weight_decay, nesterov != 0, first != 0);",
            "    return cudaGetLastError() == cudaSuccess ? 0 : -1;",
            "}",
            "NNC_EXPORT int nnc_adam_step(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1, float beta2,",
            "                  float eps, float weight_decay, int decoupled, long long step, void* stream) {",
            "    const nnc::cuda::AdamScalars a = nnc::cuda::adam_scalars(lr, beta1, beta2, weight_decay, decoupled != 0, step);",
            "    NNC_LAUNCH(nnc::cuda::adam_kernel, nnc::cuda::grid_for(n), nnc::cuda::kBlock, 0, (cudaStream_t)stream)(",
            "        p, g, m, v, n, a.step_size, a.bc2_sqrt, beta1, beta2, eps, weight_decay, a.decay, decoupled != 0);",
            "    return cudaGetLastError() == cudaSuccess ? 0 : -1;",
            "}",
            "NNC_EXPORT int nnc_accumulate(float* acc, const float* g, long long n, int first, void* stream) {",
            "    NNC_LAUNCH(nnc::cuda::accumulate_kernel, nnc::cuda::grid_for(n), nnc::cuda::kBlock, 0, (cudaStream_t)stream)(acc, g, n, first != 0);",
            "    return cudaGetLastError() == cudaSuccess ? 0 : -1;",
            "}",
            "NNC_EXPORT int nnc_divide(float* dst, const float* src, long long n, float divisor, void* stream) {",
            "    NNC_LAUNCH(nnc::cuda::divide_kernel, nnc::cuda::grid_for(n), nnc::cuda::kBlock, 0, (cudaStream_t)stream)(dst, src, n, divisor);",
            "    return cudaGetLastError() == cudaSuccess ? 0 : -1;",
            "}",
            "",
            '}  // extern "C"',
        ]

    def emit(self) -> GeneratedSource:
        kernels, node_lines = self.emit_kernels()
        return GeneratedSource(kernels, "", self.module_name, {"forward": "nnc_forward"}, node_lines)
