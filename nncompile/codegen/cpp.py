"""The C++ emitter: one graph + its memory plan -> one kernels translation unit + one binding unit.

Generated code::

    extern "C" void nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena) {
        const float* const v0_x = (const float*)inputs[0];
        float* const v1_h = (float*)(arena + 4096);
        ...
        // h = fused(x, fc1.weight, fc1.bias)  @ mlp.nn:6:7
        { nnc::sgemm(...); }
    }

Values are typed pointers declared once at the top: inputs and parameters where the caller keeps them,
intermediates at their planned arena offsets, outputs straight in the caller's arrays. Each node's code
comes from its op's ``emit_cpp`` rule (``codegen/cpp_ops.py``), called with a ``CppContext``. The binding
checks every array (shape, dtype, contiguity, writability) before a pointer is touched, then runs the
kernels with the GIL released.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from nncompile.errors import BuildError, MissingRuleError
from nncompile.ir.graph import Graph, Node
from nncompile.ir.types import TensorType
from nncompile.ops.base import get_op
from nncompile.passes.plan_memory import MemoryPlan

CTYPES = {"f32": "float", "f64": "double", "i64": "int64_t", "i32": "int32_t", "bool": "bool"}
NUMPY_NAMES = {"f32": "float32", "f64": "float64", "i64": "int64", "i32": "int32", "bool": "bool"}
DTYPE_CODES = {"f32": 0, "f64": 1, "i64": 2, "i32": 3, "bool": 4}

SIGNATURE_DECL = """
struct nnc_value_sig { const char* name; const char* type; int dtype; int rank; long long shape[8]; };
struct nnc_signature { int n_inputs; const nnc_value_sig* inputs; int n_outputs; const nnc_value_sig* outputs;
                       long long arena_bytes; long long param_bytes; int n_errors; const char* const* errors; };
"""


@dataclass
class GeneratedSource:
    kernels: str
    binding: str
    module_name: str
    entry_points: dict[str, str] = field(default_factory=dict)
    node_lines: list[tuple[int, str]] = field(default_factory=list)   # (first line in kernels, node text)
    packed: dict | None = None   # the persistent packed-values region of sparse weights (CppEmitter.packed_region)


class CppContext:
    """What an ``emit_cpp`` rule may ask: pointers, types, scratch, and unique local names."""

    def __init__(self, emitter: "CppEmitter", node: Node):
        self.emitter = emitter
        self.node = node

    def ptr(self, name: str) -> str:
        return self.emitter.pointer_names[name]

    def type(self, name: str) -> TensorType:
        return self.emitter.graph.type_of(name)

    @property
    def out(self) -> str:
        return self.ptr(self.node.name)

    @property
    def out_type(self) -> TensorType:
        return self.node.type

    def inputs(self) -> list[str]:
        return [self.ptr(n) for n in self.node.inputs]

    def input_types(self) -> list[TensorType]:
        return [self.type(n) for n in self.node.inputs]

    def work(self) -> str:
        """Pointer (char*) to this node's planned scratch in the arena."""
        offset = self.emitter.plan.workspace.get(self.node.name)
        if offset is None:
            raise BuildError(f"node '{self.node.name}' asked for scratch but none was planned")
        return f"(arena + {offset})"

    def same_storage(self, a: str, b: str) -> bool:
        return self.emitter.plan.storage[a] == self.emitter.plan.storage[b]

    def ctype(self, name: str) -> str:
        return ctype(self.type(name).dtype)


def ctype(dtype: str) -> str:
    try:
        return CTYPES[dtype]
    except KeyError:
        raise BuildError(f"dtype {dtype} is not supported by the C++ backend") from None


def cpp_identifier(index: int, name: str) -> str:
    return f"v{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


class CppEmitter:
    """Emits C++ for the CPU target. One instance per graph."""

    target = "cpu"

    def __init__(self, graph: Graph, plan: MemoryPlan, module_name: str = "nnc_module", packed_values: bool = False):
        self.graph = graph
        self.plan = plan
        self.module_name = module_name
        self.pointer_names: dict[str, str] = {}
        self.error_nodes: list[Node] = []
        # packed_values: sparse weights' values are kept packed (pattern order) in a region after the
        # parameters, refreshed when its valid flag is cleared (the runtime does so whenever weights change)
        self.packed_values = packed_values
        self.packed: list[dict] = []
        self.definitions: list[str] = []   # file-scope C++ some rules need (e.g. unrolled sparse kernels)

    def add_definitions(self, lines: list[str]) -> None:
        """File-scope C++ (functions, templates) emitted before the forward function."""
        self.definitions.extend(lines)

    # persistent packed values of sparse weights: [flag, 64 B][values of w1][values of w2]... after the params
    @property
    def packed_base(self) -> int:
        return -(-self.plan.param_bytes // 64) * 64

    def pack_slot(self, weight: str, nnz: int) -> int | None:
        """Byte offset (in the parameter block) of ``weight``'s packed values, or None when this module
        packs them on every call (training modules: the weights change every step)."""
        if not self.packed_values:
            return None
        for entry in self.packed:
            if entry["weight"] == weight:
                return entry["offset"]
        offset = self.packed[-1]["end"] if self.packed else self.packed_base + 64
        self.packed.append({"weight": weight, "offset": offset, "nnz": nnz,
                            "end": offset + -(-max(nnz, 1) * 4 // 64) * 64})
        return offset

    def packed_region(self) -> dict | None:
        """Where the packed values live: the valid flag's offset, the region's end (the parameter block's
        size) and each weight's slot; None when no layer uses them."""
        if not self.packed:
            return None
        return {"flag_offset": self.packed_base, "end": self.packed[-1]["end"],
                "weights": [{k: e[k] for k in ("weight", "offset", "nnz")} for e in self.packed]}

    def error_code(self, node: Node) -> int:
        """A status code the kernels set when ``node`` meets bad data (e.g. an index out of range)."""
        if node not in self.error_nodes:
            self.error_nodes.append(node)
        return self.error_nodes.index(node) + 1

    # pointers
    def _declare(self, name: str, index: int) -> str:
        kind, where, offset = self.plan.storage[name]
        t = self.graph.type_of(name)
        cty = ctype(t.dtype)
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
        from nncompile.codegen.cpp_ops import DROPOUT_HASH

        lines = ['#include "nnc_runtime.h"', "#include <algorithm>", "#include <cmath>", "#include <cstdint>",
                 "#include <cstring>", DROPOUT_HASH, SIGNATURE_DECL, "extern \"C\" {", "",
                 "int nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena) {",
                 "    (void)inputs; (void)outputs; (void)params; (void)arena;",
                 "    int status_ = 0;"]
        body = len(lines)
        index = 0
        for item in (*self.graph.inputs, *self.graph.params):
            lines.append(self._declare(item.name, index))
            index += 1
        for node in self.graph.nodes:
            lines.append(self._declare(node.name, index))
            index += 1
        node_lines = []
        for node in self.graph.nodes:
            where = f"  @ {node.loc}" if node.loc else ""
            lines.append(f"    // {node.name} = {node.op}({', '.join(node.inputs)}){where}")
            node_lines.append((len(lines) + 1, f"{node.name} = {node.op}({', '.join(node.inputs)}){where}"))
            try:
                rule = get_op(node.op).rule("emit_cpp")
            except MissingRuleError as err:
                raise err.with_loc(node.loc)
            code = rule(CppContext(self, node), node)
            lines.append("    {")
            lines.extend("        " + line if line else "" for line in code.strip("\n").splitlines())
            lines.append("    }")
        lines.extend(self._copy_outputs())
        if self.packed:
            # the sparse layers packed their values if the flag was clear: mark them valid (not after an error)
            lines[body:body] = [f"    int32_t* const packed_valid_ = (int32_t*)(params + {self.packed_base});",
                                "    const bool repack_ = *packed_valid_ != 1;"]
            node_lines = [(line + 2, text) for line, text in node_lines]
            lines.append("    if (status_ == 0) *packed_valid_ = 1;")
        if self.definitions:
            at = lines.index('extern "C" {')
            added = "\n".join(self.definitions).split("\n")
            lines[at:at] = added
            node_lines = [(line + len(added), text) for line, text in node_lines]
        lines += ["    return status_;", "}", ""] + self.emit_signature() + [
            "", "void* nnc_binding_init(const char* name);",
            f"__attribute__((visibility(\"default\"))) void* PyInit_{self.module_name}() "
            f"{{ return nnc_binding_init(\"{self.module_name}\"); }}", "", "void nnc_set_threads(int n) { nnc::set_threads(n); }",
                  "int nnc_get_threads() { return nnc::get_threads(); }", "", "}  // extern \"C\"", ""]
        return "\n".join(lines), node_lines

    def _copy_outputs(self) -> list[str]:
        """Outputs that are inputs, params or views of other storage are copied into the caller's array."""
        lines = []
        for index, name in enumerate(self.graph.outputs):
            if self.plan.storage[name] == ("output", index, 0):
                continue
            t = self.graph.type_of(name)
            lines.append(f"    // output {index}: {name} is stored elsewhere; copy it")
            lines.append(f"    std::memcpy(outputs[{index}], {self.pointer_names[name]}, {t.nbytes});")
        return lines

    def emit_signature(self) -> list[str]:
        """Tables the (model-independent) binding reads to check arrays and explain errors."""
        def entry(name: str, t: TensorType) -> str:
            dims = ", ".join(str(d) for d in t.shape) or "0"
            return f"{{{json.dumps(name)}, {json.dumps(str(t.dense()))}, {DTYPE_CODES[t.dtype]}, {t.rank}, {{{dims}}}}}"

        ins = [entry(i.name, i.type) for i in self.graph.inputs]
        outs = [entry(o, self.graph.type_of(o)) for o in self.graph.outputs]
        messages = ['""'] + [json.dumps(f"{n.op} node '{n.name}'" + (f" ({n.loc})" if n.loc else "")
                                        + ": an index is out of range") for n in self.error_nodes]
        max_rank = max([i.type.rank for i in self.graph.inputs] + [self.graph.type_of(o).rank for o in self.graph.outputs] + [1])
        if max_rank > 8:
            raise BuildError("the C++ backend supports tensors of rank <= 8")
        return [
            "static const nnc_value_sig nnc_inputs_[] = {" + ", ".join(ins or ['{"", "", 0, 0, {0}}']) + "};",
            "static const nnc_value_sig nnc_outputs_[] = {" + ", ".join(outs or ['{"", "", 0, 0, {0}}']) + "};",
            "static const char* const nnc_errors_[] = {" + ", ".join(messages) + "};",
            "const nnc_signature* nnc_get_signature() {",
            f"    static const nnc_signature sig = {{{len(ins)}, nnc_inputs_, {len(outs)}, nnc_outputs_, "
            f"{self.plan.arena_bytes}LL, {self.param_bytes}LL, {len(messages)}, nnc_errors_}};",
            "    return &sig;",
            "}",
        ]

    @property
    def param_bytes(self) -> int:
        """The parameter block's size: the parameters, then the packed values of sparse weights."""
        return self.packed[-1]["end"] if self.packed else self.plan.param_bytes

    def emit(self) -> GeneratedSource:
        kernels, node_lines = self.emit_kernels()
        return GeneratedSource(kernels, BINDING_SOURCE, self.module_name, {"forward": "nnc_forward"}, node_lines,
                               self.packed_region())


BINDING_SOURCE = r'''// pybind11 binding, the same for every model: it reads the kernels' signature table, checks every
// array (count, shape, dtype, contiguity, writability) before any pointer is used, then runs the
// kernels with the GIL released. Compiled once per toolchain and cached.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <cstdint>
#include <sstream>
#include "nnc_optim.h"
#include <string>
#include <vector>

namespace py = pybind11;

struct nnc_value_sig { const char* name; const char* type; int dtype; int rank; long long shape[8]; };
struct nnc_signature { int n_inputs; const nnc_value_sig* inputs; int n_outputs; const nnc_value_sig* outputs;
                       long long arena_bytes; long long param_bytes; int n_errors; const char* const* errors; };

extern "C" int nnc_forward(void* const* inputs, void* const* outputs, char* params, char* arena);
extern "C" void nnc_set_threads(int n);
extern "C" int nnc_get_threads();
extern "C" const nnc_signature* nnc_get_signature();

static const char* const DTYPE_NAMES[] = {"float32", "float64", "int64", "int32", "bool"};

static std::string shape_text(const py::array& a) {
    std::ostringstream s;
    s << "[";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? "," : "") << a.shape(i);
    s << "]";
    return s.str();
}

// The dtype objects, made once (building one from its name costs about a microsecond per array per call);
// kept for the life of the process, like the module.
static const py::dtype& dtype_object(int code) {
    static py::dtype* table[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    if (!table[code]) table[code] = new py::dtype(DTYPE_NAMES[code]);
    return *table[code];
}

static void* check_array(const py::handle& obj, const char* kind, const nnc_value_sig& sig, bool writable) {
    // the message is only built on the error paths: the checks themselves stay cheap
    auto what = [&]() { return std::string(kind) + " '" + sig.name + "'"; };
    if (!py::isinstance<py::array>(obj))
        throw py::value_error(what() + " must be a NumPy array of " + sig.type);
    py::array a = py::reinterpret_borrow<py::array>(obj);
    bool ok_shape = a.ndim() == sig.rank;
    for (int i = 0; ok_shape && i < sig.rank; ++i) ok_shape = a.shape(i) == sig.shape[i];
    if (!ok_shape) throw py::value_error(what() + " has shape " + shape_text(a) + ", expected " + sig.type);
    if (!a.dtype().is(dtype_object(sig.dtype)))
        throw py::value_error(what() + " has dtype " + std::string(py::str(a.dtype())) + ", expected " + sig.type);
    if (!(a.flags() & py::array::c_style)) throw py::value_error(what() + " is not C-contiguous (expected " + sig.type + ")");
    if (writable && !a.writeable()) throw py::value_error(what() + " is not writable");
    return writable ? a.mutable_data() : const_cast<void*>(a.data());
}

static char* block_pointer(py::array& a, long long need, const char* what) {
    if (!(a.flags() & py::array::c_style) || a.nbytes() < need || !a.writeable())
        throw py::value_error(std::string(what) + " block must be a writable contiguous array of at least " +
                              std::to_string(need) + " bytes");
    if (((std::uintptr_t)a.data()) % 64 != 0) throw py::value_error(std::string(what) + " block must be 64-byte aligned");
    return (char*)a.mutable_data();
}

static void forward(py::list inputs, py::list outputs, py::array params, py::array arena) {
    const nnc_signature* sig = nnc_get_signature();
    if ((int)py::len(inputs) != sig->n_inputs)
        throw py::value_error("expected " + std::to_string(sig->n_inputs) + " inputs, got " + std::to_string(py::len(inputs)));
    if ((int)py::len(outputs) != sig->n_outputs)
        throw py::value_error("expected " + std::to_string(sig->n_outputs) + " outputs, got " + std::to_string(py::len(outputs)));
    std::vector<void*> in_ptrs(sig->n_inputs + 1), out_ptrs(sig->n_outputs + 1);
    for (int i = 0; i < sig->n_inputs; ++i) in_ptrs[i] = check_array(inputs[i], "input", sig->inputs[i], false);
    for (int i = 0; i < sig->n_outputs; ++i) out_ptrs[i] = check_array(outputs[i], "output", sig->outputs[i], true);
    char* params_ptr = block_pointer(params, sig->param_bytes, "parameter");
    char* arena_ptr = block_pointer(arena, sig->arena_bytes, "arena");
    int status = 0;
    {
        py::gil_scoped_release release;
        status = nnc_forward(in_ptrs.data(), out_ptrs.data(), params_ptr, arena_ptr);
    }
    if (status != 0) throw py::value_error(status < sig->n_errors ? sig->errors[status] : "kernel error");
}

static float* float_range(py::array& block, long long offset, long long count, const char* what) {
    if (!(block.flags() & py::array::c_style) || !block.writeable() || offset < 0 || count < 0 ||
        (offset + count) * 4 > block.nbytes() || ((std::uintptr_t)block.data()) % 64 != 0)
        throw py::value_error(std::string(what) + ": block too small, misaligned or read-only");
    return (float*)block.mutable_data() + offset;
}

static void sgd_step(py::array params, py::array grads, py::array momentum_buf, long long count, float lr,
                     float momentum, float dampening, float weight_decay, bool nesterov, bool first) {
    float* p = float_range(params, 0, count, "parameters");
    float* g = float_range(grads, 0, count, "gradients");
    float* b = momentum != 0.0f ? float_range(momentum_buf, 0, count, "momentum buffer") : nullptr;
    py::gil_scoped_release release;
    nnc::sgd_update(p, g, b, count, lr, momentum, dampening, weight_decay, nesterov, first);
}

static void adam_step(py::array params, py::array grads, py::array m, py::array v, long long count, float lr,
                      float beta1, float beta2, float eps, float weight_decay, bool decoupled, long long step) {
    float* p = float_range(params, 0, count, "parameters");
    float* g = float_range(grads, 0, count, "gradients");
    float* mp = float_range(m, 0, count, "first moments");
    float* vp = float_range(v, 0, count, "second moments");
    py::gil_scoped_release release;
    nnc::adam_update(p, g, mp, vp, count, lr, beta1, beta2, eps, weight_decay, decoupled, step);
}

// Every generated module has its own name (Python caches extension modules by name), so the kernels
// unit defines PyInit_<name> and calls this shared initializer with that name.
extern "C" void* nnc_binding_init(const char* name) {
    static PyModuleDef def;
    try {
        auto m = py::module_::create_extension_module(name, "nncompile generated module", &def);
        m.def("forward", &forward, "run the compiled graph", py::arg("inputs"), py::arg("outputs"),
              py::arg("params"), py::arg("arena"));
        m.def("set_threads", &nnc_set_threads);
        m.def("get_threads", &nnc_get_threads);
        m.def("sgd_step", &sgd_step);
        m.def("adam_step", &adam_step);
        m.def("arena_bytes", []() { return nnc_get_signature()->arena_bytes; });
        m.def("param_bytes", []() { return nnc_get_signature()->param_bytes; });
        return m.release().ptr();
    } catch (py::error_already_set& e) {
        e.restore();
        return nullptr;
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_ImportError, e.what());
        return nullptr;
    }
}
'''
