// pybind11 test module over the native runtime (native/nnc_runtime.h), built by native_harness.py.
// Thin wrappers: shapes come from the caller, and each wrapper checks that the arrays are large
// enough for the pointers the kernel will touch before calling it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include <time.h>

#include "nnc_runtime.h"

namespace py = pybind11;
using Arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IArr = py::array_t<int32_t, py::array::c_style>;

namespace {

const float* in_ptr(const Arr& a, long need, const char* what) {
    if (a.size() < need) throw std::invalid_argument(std::string(what) + ": array too small");
    return a.data();
}

float* out_ptr(Arr& a, long need, const char* what) {
    if (a.size() < need) throw std::invalid_argument(std::string(what) + ": array too small");
    return a.mutable_data();
}

const float* opt_ptr(const py::object& o, long need, const char* what) {
    if (o.is_none()) return nullptr;
    // Only exact float32 C arrays: a converted copy would die before the kernel reads it.
    if (!py::isinstance<Arr>(o)) throw std::invalid_argument(std::string(what) + ": need float32 C-contiguous");
    Arr a = o.cast<Arr>();
    return in_ptr(a, need, what);
}

long span(bool trans, int rows, int cols, int ld) {
    // Elements spanned by a row-major rows x cols operand stored (transposed or not) with leading dim ld.
    if (rows == 0 || cols == 0) return 0;
    return trans ? static_cast<long>(cols - 1) * ld + rows : static_cast<long>(rows - 1) * ld + cols;
}

nnc::Epilogue make_epilogue(int M, int N, const py::object& col_bias, const py::object& row_bias, int act,
                            const py::object& residual, int ldr, float alpha, long batch_span) {
    nnc::Epilogue ep;
    ep.col_bias = opt_ptr(col_bias, N, "col_bias");
    ep.row_bias = opt_ptr(row_bias, M, "row_bias");
    ep.act = act;
    ep.residual = opt_ptr(residual, M == 0 ? 0 : static_cast<long>(M - 1) * ldr + N + batch_span, "residual");
    ep.ldr = ldr;
    ep.alpha = alpha;
    return ep;
}

void sgemm_py(bool ta, bool tb, int M, int N, int K, const Arr& A, int lda, const Arr& B, int ldb, Arr& C, int ldc,
              float beta, const py::object& col_bias, const py::object& row_bias, int act, const py::object& residual,
              int ldr, float alpha) {
    const float* a = in_ptr(A, span(ta, M, K, lda), "A");
    const float* b = in_ptr(B, span(tb, K, N, ldb), "B");
    float* c = out_ptr(C, span(false, M, N, ldc), "C");
    nnc::Epilogue ep = make_epilogue(M, N, col_bias, row_bias, act, residual, ldr, alpha, 0);
    py::gil_scoped_release release;
    nnc::sgemm(ta, tb, M, N, K, a, lda, b, ldb, c, ldc, beta, ep);
}

void sgemm_batched_py(int batch, bool ta, bool tb, int M, int N, int K, const Arr& A, int lda, long long sa,
                      const Arr& B, int ldb, long long sb, Arr& C, int ldc, long long sc, float beta,
                      const py::object& residual, int ldr, long long sr, int act, float alpha) {
    const long last = batch - 1;
    const float* a = in_ptr(A, last * sa + span(ta, M, K, lda), "A");
    const float* b = in_ptr(B, last * sb + span(tb, K, N, ldb), "B");
    float* c = out_ptr(C, last * sc + span(false, M, N, ldc), "C");
    nnc::Epilogue ep = make_epilogue(M, N, py::none(), py::none(), act, residual, ldr, alpha, last * sr);
    ep.residual_batch_stride = sr;
    py::gil_scoped_release release;
    nnc::sgemm_batched(batch, ta, tb, M, N, K, a, lda, sa, b, ldb, sb, c, ldc, sc, beta, ep);
}

double thread_cpu_seconds() {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// batch GEMMs C[b] = A[b] @ B[b] issued with nnc::sgemm from inside an OpenMP parallel loop, the
// way generated code calls it per batch item (each call must then run serially on its thread).
void sgemm_from_parallel_py(int batch, int M, int N, int K, const Arr& A, const Arr& B, Arr& C) {
    const float* a = in_ptr(A, static_cast<long>(batch) * M * K, "A");
    const float* b = in_ptr(B, static_cast<long>(batch) * K * N, "B");
    float* c = out_ptr(C, static_cast<long>(batch) * M * N, "C");
    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < batch; ++i) {
        nnc::sgemm(false, false, M, N, K, a + static_cast<long>(i) * M * K, K, b + static_cast<long>(i) * K * N, N,
                   c + static_cast<long>(i) * M * N, N, 0.0f);
    }
}

// Seconds per call of nnc::sgemm for each of `rounds` rounds of `reps` calls (operands filled with
// constants). cpu_time: CPU time of the calling thread instead of wall-clock time (meaningful with
// one thread; insensitive to other processes taking turns on the core).
std::vector<double> time_sgemm(bool ta, bool tb, int M, int N, int K, int reps, int rounds, bool cpu_time) {
    std::vector<float> A(static_cast<size_t>(M) * K, 1.0f / K), B(static_cast<size_t>(K) * N, 1.0f);
    std::vector<float> C(static_cast<size_t>(M) * N);
    py::gil_scoped_release release;
    const int lda = ta ? M : K, ldb = tb ? K : N;
    nnc::sgemm(ta, tb, M, N, K, A.data(), lda, B.data(), ldb, C.data(), N, 0.0f);
    std::vector<double> out;
    for (int r = 0; r < rounds; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = thread_cpu_seconds();
        for (int i = 0; i < reps; ++i) nnc::sgemm(ta, tb, M, N, K, A.data(), lda, B.data(), ldb, C.data(), N, 0.0f);
        const double c1 = thread_cpu_seconds();
        const auto t1 = std::chrono::steady_clock::now();
        const double seconds = cpu_time ? c1 - c0 : std::chrono::duration<double>(t1 - t0).count();
        out.push_back(seconds / reps);
    }
    return out;
}

nnc::Conv2dParams conv_params(py::tuple x_shape, py::tuple w_shape, py::tuple stride, py::tuple pad,
                              py::tuple dil, int groups) {
    nnc::Conv2dParams p;
    p.N = x_shape[0].cast<int>();
    p.C = x_shape[1].cast<int>();
    p.H = x_shape[2].cast<int>();
    p.W = x_shape[3].cast<int>();
    p.K = w_shape[0].cast<int>();
    p.R = w_shape[2].cast<int>();
    p.S = w_shape[3].cast<int>();
    p.stride_h = stride[0].cast<int>();
    p.stride_w = stride[1].cast<int>();
    p.pad_h = pad[0].cast<int>();
    p.pad_w = pad[1].cast<int>();
    p.dil_h = dil[0].cast<int>();
    p.dil_w = dil[1].cast<int>();
    p.groups = groups;
    if (p.C % groups || p.K % groups || w_shape[1].cast<int>() * groups != p.C)
        throw std::invalid_argument("conv: channels do not match groups");
    if (p.P() <= 0 || p.Q() <= 0) throw std::invalid_argument("conv: empty output");
    return p;
}

Arr conv2d_py(const Arr& x, const Arr& w, const py::object& bias, py::tuple stride, py::tuple pad, py::tuple dil,
              int groups, int act, const py::object& residual) {
    nnc::Conv2dParams p = conv_params(py::make_tuple(x.shape(0), x.shape(1), x.shape(2), x.shape(3)),
                                      py::make_tuple(w.shape(0), w.shape(1), w.shape(2), w.shape(3)), stride, pad,
                                      dil, groups);
    Arr y({p.N, p.K, p.P(), p.Q()});
    std::vector<float> ws(static_cast<size_t>(nnc::conv2d_workspace_floats(p)) + 1);
    nnc::Epilogue ep;
    ep.act = act;
    ep.residual = opt_ptr(residual, y.size(), "residual");
    const float* b = opt_ptr(bias, p.K, "bias");
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        nnc::conv2d(p, x.data(), w.data(), b, yp, ws.data(), ep);
    }
    return y;
}

py::tuple conv2d_backward_py(const Arr& x, const Arr& w, const Arr& dy, py::tuple stride, py::tuple pad,
                             py::tuple dil, int groups) {
    nnc::Conv2dParams p = conv_params(py::make_tuple(x.shape(0), x.shape(1), x.shape(2), x.shape(3)),
                                      py::make_tuple(w.shape(0), w.shape(1), w.shape(2), w.shape(3)), stride, pad,
                                      dil, groups);
    in_ptr(dy, static_cast<long>(p.N) * p.K * p.P() * p.Q(), "dy");
    Arr dx({p.N, p.C, p.H, p.W});
    Arr dw({w.shape(0), w.shape(1), w.shape(2), w.shape(3)});
    Arr db({p.K});
    std::vector<float> ws(static_cast<size_t>(nnc::conv2d_workspace_floats(p)) + 1);
    float *dxp = dx.mutable_data(), *dwp = dw.mutable_data(), *dbp = db.mutable_data();
    {
        py::gil_scoped_release release;
        nnc::conv2d_backward_input(p, dy.data(), w.data(), dxp, ws.data());
        nnc::conv2d_backward_weight(p, x.data(), dy.data(), dwp, dbp, ws.data());
    }
    return py::make_tuple(dx, dw, db);
}

nnc::Pool2dParams pool_params(const Arr& x, py::tuple k, py::tuple s, py::tuple pad, py::tuple dil, bool ceil_mode,
                              bool count_include_pad) {
    nnc::Pool2dParams p;
    p.N = x.shape(0);
    p.C = x.shape(1);
    p.H = x.shape(2);
    p.W = x.shape(3);
    p.kh = k[0].cast<int>();
    p.kw = k[1].cast<int>();
    p.stride_h = s[0].cast<int>();
    p.stride_w = s[1].cast<int>();
    p.pad_h = pad[0].cast<int>();
    p.pad_w = pad[1].cast<int>();
    p.dil_h = dil[0].cast<int>();
    p.dil_w = dil[1].cast<int>();
    p.ceil_mode = ceil_mode;
    p.count_include_pad = count_include_pad;
    return p;
}

py::tuple max_pool2d_py(const Arr& x, py::tuple k, py::tuple s, py::tuple pad, py::tuple dil, bool ceil_mode) {
    nnc::Pool2dParams p = pool_params(x, k, s, pad, dil, ceil_mode, true);
    Arr y({p.N, p.C, p.P(), p.Q()});
    IArr idx({p.N, p.C, p.P(), p.Q()});
    nnc::max_pool2d(p, x.data(), y.mutable_data(), idx.mutable_data());
    return py::make_tuple(y, idx);
}

Arr avg_pool2d_py(const Arr& x, py::tuple k, py::tuple s, py::tuple pad, bool ceil_mode, bool count_include_pad) {
    nnc::Pool2dParams p = pool_params(x, k, s, pad, py::make_tuple(1, 1), ceil_mode, count_include_pad);
    Arr y({p.N, p.C, p.P(), p.Q()});
    nnc::avg_pool2d(p, x.data(), y.mutable_data());
    return y;
}

Arr max_pool2d_backward_py(const Arr& x, const Arr& dy, const IArr& idx, py::tuple k, py::tuple s, py::tuple pad,
                           py::tuple dil, bool ceil_mode) {
    nnc::Pool2dParams p = pool_params(x, k, s, pad, dil, ceil_mode, true);
    const long outs = static_cast<long>(p.N) * p.C * p.P() * p.Q();
    in_ptr(dy, outs, "dy");
    if (idx.size() < outs) throw std::invalid_argument("indices: array too small");
    Arr dx({p.N, p.C, p.H, p.W});
    nnc::max_pool2d_backward(p, dy.data(), idx.data(), dx.mutable_data());
    return dx;
}

Arr avg_pool2d_backward_py(const Arr& x, const Arr& dy, py::tuple k, py::tuple s, py::tuple pad, bool ceil_mode,
                           bool count_include_pad) {
    nnc::Pool2dParams p = pool_params(x, k, s, pad, py::make_tuple(1, 1), ceil_mode, count_include_pad);
    in_ptr(dy, static_cast<long>(p.N) * p.C * p.P() * p.Q(), "dy");
    Arr dx({p.N, p.C, p.H, p.W});
    nnc::avg_pool2d_backward(p, dy.data(), dx.mutable_data());
    return dx;
}

Arr unary_py(const Arr& x, const std::string& fn, int act) {
    Arr y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const long n = x.size();
    float* yp = y.mutable_data();
    if (fn == "exp") nnc::vexp(x.data(), yp, n);
    else if (fn == "log") nnc::vlog(x.data(), yp, n);
    else if (fn == "tanh") nnc::vtanh(x.data(), yp, n);
    else if (fn == "erf") nnc::verf(x.data(), yp, n);
    else if (fn == "sigmoid") nnc::vsigmoid(x.data(), yp, n);
    else if (fn == "act") nnc::activate(x.data(), yp, n, act);
    else if (fn == "scalar_act") {
        for (long i = 0; i < n; ++i) yp[i] = nnc::activate_scalar(x.data()[i], act);
    } else throw std::invalid_argument("unknown function " + fn);
    return y;
}

Arr binary_py(const Arr& a, const Arr& b, const std::string& fn) {
    if (a.size() != b.size()) throw std::invalid_argument("size mismatch");
    Arr y(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
    float* yp = y.mutable_data();
    if (fn == "add") nnc::vadd(a.data(), b.data(), yp, a.size());
    else if (fn == "sub") nnc::vsub(a.data(), b.data(), yp, a.size());
    else if (fn == "mul") nnc::vmul(a.data(), b.data(), yp, a.size());
    else if (fn == "div") nnc::vdiv(a.data(), b.data(), yp, a.size());
    else throw std::invalid_argument("unknown function " + fn);
    return y;
}

Arr rows_py(const Arr& x, const std::string& fn) {
    const long n = x.shape(x.ndim() - 1);
    const long rows = n ? x.size() / n : 0;
    Arr y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    if (fn == "softmax") nnc::softmax_rows(x.data(), y.mutable_data(), rows, n);
    else if (fn == "log_softmax") nnc::log_softmax_rows(x.data(), y.mutable_data(), rows, n);
    else throw std::invalid_argument("unknown function " + fn);
    return y;
}

py::tuple layer_norm_py(const Arr& x, const py::object& gamma, const py::object& beta, float eps) {
    const long n = x.shape(x.ndim() - 1);
    const long rows = x.size() / n;
    Arr y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    Arr mean({rows}), rstd({rows});
    nnc::layer_norm(x.data(), y.mutable_data(), rows, n, opt_ptr(gamma, n, "gamma"), opt_ptr(beta, n, "beta"), eps,
                    mean.mutable_data(), rstd.mutable_data());
    return py::make_tuple(y, mean, rstd);
}

Arr batch_norm_py(const Arr& x, const Arr& mean, const Arr& var, const py::object& gamma, const py::object& beta,
                  float eps, int act) {
    const long N = x.shape(0), C = x.shape(1), inner = x.size() / std::max<long>(1, N * C);
    Arr y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    nnc::batch_norm_inference(x.data(), y.mutable_data(), N, C, inner, in_ptr(mean, C, "mean"), in_ptr(var, C, "var"),
                              opt_ptr(gamma, C, "gamma"), opt_ptr(beta, C, "beta"), eps, act);
    return y;
}

Arr reduce_py(const Arr& x, long outer, long n, long inner, int op) {
    in_ptr(x, outer * n * inner, "x");
    Arr y({outer, inner});
    nnc::reduce_axis(x.data(), y.mutable_data(), outer, n, inner, op);
    return y;
}

Arr attention_py(const Arr& q, const Arr& k, const Arr& v, float scale, bool causal, const py::object& mask) {
    const int B = q.shape(0), H = q.shape(1), Lq = q.shape(2), D = q.shape(3);
    const int Lk = k.shape(2), Dv = v.shape(3);
    in_ptr(k, static_cast<long>(B) * H * Lk * D, "k");
    in_ptr(v, static_cast<long>(B) * H * Lk * Dv, "v");
    const float* m = opt_ptr(mask, static_cast<long>(Lq) * Lk, "mask");
    Arr o({B, H, Lq, Dv});
    float* op = o.mutable_data();
    {
        py::gil_scoped_release release;
        nnc::attention(q.data(), k.data(), v.data(), op, B * H, Lq, Lk, D, Dv, scale, causal, m);
    }
    return o;
}

}  // namespace

PYBIND11_MODULE(nnc_native_test, m) {
    m.doc() = "Test bindings for the nncompile native runtime";
    m.def("set_threads", &nnc::set_threads);
    m.def("get_threads", &nnc::get_threads);
    m.def("set_blocking", [](int mc, int kc, int nc) {
        nnc::gemm_blocking().mc = mc;
        nnc::gemm_blocking().kc = kc;
        nnc::gemm_blocking().nc = nc;
    });
    m.def("set_direct_b_rows", [](int rows) { nnc::gemm_blocking().direct_b_rows = rows; });
    m.def("get_direct_b_rows", [] { return nnc::gemm_blocking().direct_b_rows; });
    m.def("get_blocking", [] {
        return py::make_tuple(nnc::gemm_blocking().mc, nnc::gemm_blocking().kc, nnc::gemm_blocking().nc);
    });
    m.def("has_avx512", [] { return static_cast<bool>(__builtin_cpu_supports("avx512f")); });
    m.def("set_avx512", [](bool on) { nnc::gemm_use_avx512() = on && __builtin_cpu_supports("avx512f"); });
    m.def("get_avx512", [] { return nnc::gemm_use_avx512(); });
    m.def("sgemm", &sgemm_py);
    m.def("sgemm_batched", &sgemm_batched_py);
    m.def("sgemm_from_parallel", &sgemm_from_parallel_py);
    m.def("time_sgemm", &time_sgemm);
    m.def("conv2d", &conv2d_py);
    m.def("conv2d_backward", &conv2d_backward_py);
    m.def("conv2d_workspace_floats", [](py::tuple xs, py::tuple ws, py::tuple s, py::tuple p, py::tuple d, int g) {
        return nnc::conv2d_workspace_floats(conv_params(xs, ws, s, p, d, g));
    });
    m.def("max_pool2d", &max_pool2d_py);
    m.def("avg_pool2d", &avg_pool2d_py);
    m.def("max_pool2d_backward", &max_pool2d_backward_py);
    m.def("avg_pool2d_backward", &avg_pool2d_backward_py);
    m.def("global_avg_pool", [](const Arr& x) {
        Arr y({x.shape(0), x.shape(1)});
        nnc::global_avg_pool(x.data(), y.mutable_data(), x.shape(0), x.shape(1), x.shape(2) * x.shape(3));
        return y;
    });
    m.def("unary", &unary_py, py::arg("x"), py::arg("fn"), py::arg("act") = 0);
    m.def("binary", &binary_py);
    m.def("rows", &rows_py);
    m.def("layer_norm", &layer_norm_py);
    m.def("batch_norm", &batch_norm_py);
    m.def("reduce", &reduce_py);
    m.def("attention", &attention_py);
    m.attr("ACT_NONE") = static_cast<int>(nnc::ACT_NONE);
    m.attr("ACT_RELU") = static_cast<int>(nnc::ACT_RELU);
    m.attr("ACT_GELU_ERF") = static_cast<int>(nnc::ACT_GELU_ERF);
    m.attr("ACT_GELU_TANH") = static_cast<int>(nnc::ACT_GELU_TANH);
    m.attr("ACT_TANH") = static_cast<int>(nnc::ACT_TANH);
    m.attr("ACT_SIGMOID") = static_cast<int>(nnc::ACT_SIGMOID);
    m.attr("ACT_SILU") = static_cast<int>(nnc::ACT_SILU);
}
