// host_check.cu - runs the CUDA target's __host__ __device__ pieces on the CPU, for
// tests/cuda/test_cuda_host.py (no GPU needed): the tiled fp32 GEMM (its load / multiply / store
// phases run thread after thread, as gemm_tiled_host does) with the implicit-GEMM loaders and stores of
// the three convolutions and the strided SGEMM with its epilogue, the dropout hash and the optimizer
// updates.
#include "nnc_conv.cuh"
#include "nnc_optim.cuh"

using namespace nnc::cuda;

#define EXPORT extern "C" __attribute__((visibility("default")))

struct HostGemm {      // the GPU kernel's tiling and arithmetic, thread after thread (nnc_gemm.cuh)
    template <class LA, class LB, class ST>
    void operator()(int M, int N, int K, int batches, const LA& la, const LB& lb, const ST& st) const {
        gemm_host(M, N, K, batches, la, lb, st);
    }
};

static ConvGeom geom(const int* a) {
    return ConvGeom{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14],
                    a[15], a[16], a[17]};
}

EXPORT void check_conv_forward(const float* x, const float* w, const float* bias, const float* residual, float* y,
                               const int* g, int act) {
    Epilogue e;
    e.row_bias = bias;
    e.residual = residual;
    e.act = act;
    conv2d_forward_gemm(x, w, y, geom(g), e, HostGemm{});
}

EXPORT void check_conv_grad_input(const float* dy, const float* w, float* dx, const int* g) {
    conv2d_grad_input_gemm(dy, w, dx, geom(g), HostGemm{});
}

EXPORT void check_conv_grad_weight(const float* x, const float* dy, float* dw, const int* g) {
    conv2d_grad_weight_gemm(x, dy, dw, geom(g), HostGemm{});
}

EXPORT void check_sgemm(int ta, int tb, int M, int N, int K, const float* A, long long lda, const float* B, long long ldb,
                        float* C, long long ldc, int batches, long long sa, long long sb, long long sc,
                        const float* col_bias, const float* residual, int act, float alpha, float beta) {
    Epilogue e;
    e.col_bias = col_bias;
    e.residual = residual;
    e.act = act;
    e.alpha = alpha;
    e.beta = beta;
    HostGemm{}(M, N, K, batches, Strided{A, lda, sa, ta != 0}, Strided{B, ldb, sb, tb != 0}, StoreC{C, ldc, sc, e});
}

EXPORT unsigned check_dropout_hash(unsigned seed, unsigned i) { return dropout_hash(seed, i); }

EXPORT void check_sgd(float* p, const float* g, float* buf, long long n, float lr, float momentum, float dampening,
                      float weight_decay, int nesterov, int first) {
    for (long long i = 0; i < n; ++i)
        sgd_element(p[i], g[i], momentum != 0.0f ? buf + i : nullptr, lr, momentum, dampening, weight_decay, nesterov != 0,
                    first != 0);
}

EXPORT void check_adam(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1, float beta2,
                       float eps, float weight_decay, int decoupled, long long step) {
    const AdamScalars a = adam_scalars(lr, beta1, beta2, weight_decay, decoupled != 0, step);   // as nnc_adam_step
    for (long long i = 0; i < n; ++i)
        adam_element(p[i], g[i], m[i], v[i], a.step_size, a.bc2_sqrt, beta1, beta2, eps, weight_decay, a.decay, decoupled != 0);
}
