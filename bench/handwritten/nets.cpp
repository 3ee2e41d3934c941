// Hand-written C++ baselines for the benchmark suite: the example networks (examples/mlp.nn,
// examples/lenet.nn) written directly, the way a competent engineer would without a compiler.
//
//   built twice by bench/handwritten/__init__.py with g++ -O3 -march=x86-64-v3 -fopenmp:
//     loops variant: straightforward loops, OpenMP over the outer loops, `omp simd` on the inner ones
//     blas variant (-DNNC_BASELINE_BLAS): every Linear / conv as a cblas_sgemm call (OpenBLAS from
//       the scipy-openblas32 wheel, symbols prefixed `scipy_`), the small element-wise loops as above
//
// Layouts match PyTorch: Linear weight [out, in], y = x W^T + b; conv weight [oc, ic, kh, kw], NCHW.
// Training step (MLP): softmax cross-entropy (mean over the batch), backward, SGD with momentum
// (PyTorch's rule: buf = momentum * buf + g, buf = g on the first step; p -= lr * buf).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <omp.h>

#ifdef NNC_BASELINE_BLAS
extern "C" {
enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void scipy_cblas_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int M, int N, int K, float alpha,
                       const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
void scipy_openblas_set_num_threads(int);
}
#endif

namespace {

int g_threads = 1;

// y[B, out] = x[B, in] W[out, in]^T + b   (relu if asked)
void linear_forward(const float* x, const float* W, const float* b, float* y, int B, int in, int out, bool relu) {
#ifdef NNC_BASELINE_BLAS
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
#pragma omp parallel for num_threads(g_threads) if (B * out > 4096)
    for (int r = 0; r < B; ++r) {
        float* row = y + (long)r * out;
#pragma omp simd
        for (int o = 0; o < out; ++o) {
            const float v = row[o] + b[o];
            row[o] = relu ? std::max(v, 0.0f) : v;
        }
    }
#else
#pragma omp parallel for collapse(2) num_threads(g_threads) schedule(static)
    for (int r = 0; r < B; ++r)
        for (int o = 0; o < out; ++o) {
            const float* xr = x + (long)r * in;
            const float* wr = W + (long)o * in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int k = 0; k < in; ++k) acc += xr[k] * wr[k];
            acc += b[o];
            y[(long)r * out + o] = relu ? std::max(acc, 0.0f) : acc;
        }
#endif
}

// Given dy[B, out]: dW = dy^T x, db = sum_r dy, and (if dx) dx = dy W.
void linear_backward(const float* x, const float* W, const float* dy, float* dW, float* db, float* dx,
                     int B, int in, int out) {
#ifdef NNC_BASELINE_BLAS
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, B, 1.0f, dy, out, x, in, 0.0f, dW, in);
    if (dx) scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, in, out, 1.0f, dy, out, W, in, 0.0f, dx, in);
#else
#pragma omp parallel for num_threads(g_threads) schedule(static)
    for (int o = 0; o < out; ++o) {
        float* dwr = dW + (long)o * in;
        std::memset(dwr, 0, sizeof(float) * in);
        for (int r = 0; r < B; ++r) {
            const float g = dy[(long)r * out + o];
            if (g == 0.0f) continue;
            const float* xr = x + (long)r * in;
#pragma omp simd
            for (int k = 0; k < in; ++k) dwr[k] += g * xr[k];
        }
    }
    if (dx) {
#pragma omp parallel for num_threads(g_threads) schedule(static)
        for (int r = 0; r < B; ++r) {
            float* dxr = dx + (long)r * in;
            std::memset(dxr, 0, sizeof(float) * in);
            for (int o = 0; o < out; ++o) {
                const float g = dy[(long)r * out + o];
                if (g == 0.0f) continue;
                const float* wr = W + (long)o * in;
#pragma omp simd
                for (int k = 0; k < in; ++k) dxr[k] += g * wr[k];
            }
        }
    }
#endif
    for (int o = 0; o < out; ++o) db[o] = 0.0f;
    for (int r = 0; r < B; ++r) {
        const float* g = dy + (long)r * out;
#pragma omp simd
        for (int o = 0; o < out; ++o) db[o] += g[o];
    }
}

// dy *= (y > 0), y the relu output
void relu_backward(const float* y, float* dy, long n) {
#pragma omp parallel for simd num_threads(g_threads) if (n > 65536)
    for (long i = 0; i < n; ++i) dy[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

void sgd_momentum(float* p, const float* g, float* buf, long n, float lr, float momentum, float weight_decay, bool first) {
#pragma omp parallel for simd num_threads(g_threads) if (n > 65536)
    for (long i = 0; i < n; ++i) {
        const float gi = g[i] + weight_decay * p[i];
        const float bi = first ? gi : momentum * buf[i] + gi;
        buf[i] = bi;
        p[i] -= lr * bi;
    }
}

// x[B, C, H, W] * w[OC, C, K, K] + b -> y[B, OC, OH, OW], relu fused
void conv2d_relu(const float* x, const float* w, const float* b, float* y, float* col, int B, int C, int H, int W,
                 int OC, int K, int pad) {
    const int OH = H + 2 * pad - K + 1, OW = W + 2 * pad - K + 1;
#ifdef NNC_BASELINE_BLAS
    // im2col per image, then y_img[OC, OH*OW] = w[OC, C*K*K] col[C*K*K, OH*OW]
    const int rows = C * K * K, cols = OH * OW;
    for (int n = 0; n < B; ++n) {
        const float* xi = x + (long)n * C * H * W;
#pragma omp parallel for num_threads(g_threads) if (rows * cols > 65536)
        for (int rr = 0; rr < rows; ++rr) {
            const int c = rr / (K * K), kh = (rr / K) % K, kw = rr % K;
            float* dst = col + (long)rr * cols;
            for (int oh = 0; oh < OH; ++oh) {
                const int ih = oh + kh - pad;
                for (int ow = 0; ow < OW; ++ow) {
                    const int iw = ow + kw - pad;
                    dst[oh * OW + ow] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? xi[((long)c * H + ih) * W + iw] : 0.0f;
                }
            }
        }
        float* yi = y + (long)n * OC * cols;
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, OC, cols, rows, 1.0f, w, rows, col, cols, 0.0f, yi, cols);
        for (int oc = 0; oc < OC; ++oc) {
            float* p = yi + (long)oc * cols;
#pragma omp simd
            for (int i = 0; i < cols; ++i) p[i] = std::max(p[i] + b[oc], 0.0f);
        }
    }
#else
    (void)col;
#pragma omp parallel for collapse(2) num_threads(g_threads) schedule(static)
    for (int n = 0; n < B; ++n)
        for (int oc = 0; oc < OC; ++oc) {
            float* yo = y + ((long)n * OC + oc) * OH * OW;
            for (int i = 0; i < OH * OW; ++i) yo[i] = b[oc];
            for (int c = 0; c < C; ++c) {
                const float* xc = x + ((long)n * C + c) * H * W;
                for (int kh = 0; kh < K; ++kh)
                    for (int kw = 0; kw < K; ++kw) {
                        const float wv = w[(((long)oc * C + c) * K + kh) * K + kw];
                        for (int oh = 0; oh < OH; ++oh) {
                            const int ih = oh + kh - pad;
                            if (ih < 0 || ih >= H) continue;
                            const int lo = std::max(0, pad - kw), hi = std::min(OW, W + pad - kw);
                            const float* xr = xc + (long)ih * W + kw - pad;
                            float* yr = yo + (long)oh * OW;
#pragma omp simd
                            for (int ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow];
                        }
                    }
            }
            for (int i = 0; i < OH * OW; ++i) yo[i] = std::max(yo[i], 0.0f);
        }
#endif
}

void maxpool2(const float* x, float* y, int planes, int H, int W) {
    const int OH = H / 2, OW = W / 2;
#pragma omp parallel for num_threads(g_threads) if (planes > 64)
    for (int p = 0; p < planes; ++p) {
        const float* xp = x + (long)p * H * W;
        float* yp = y + (long)p * OH * OW;
        for (int oh = 0; oh < OH; ++oh)
            for (int ow = 0; ow < OW; ++ow) {
                const float* q = xp + (2L * oh) * W + 2 * ow;
                yp[oh * OW + ow] = std::max(std::max(q[0], q[1]), std::max(q[W], q[W + 1]));
            }
    }
}

}  // namespace

extern "C" {

void hw_set_threads(int n) {
    g_threads = n < 1 ? 1 : n;
#ifdef NNC_BASELINE_BLAS
    scipy_openblas_set_num_threads(g_threads);
#endif
}

// p: fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias (784-1024-1024-10)
// work: at least mlp_work_floats(B) floats
long mlp_work_floats(int B) { return (long)B * (1024 * 4 + 10 * 2); }

void mlp_forward(const float* const* p, const float* x, float* logits, int B, float* work) {
    float* h1 = work;
    float* h2 = h1 + (long)B * 1024;
    linear_forward(x, p[0], p[1], h1, B, 784, 1024, true);
    linear_forward(h1, p[2], p[3], h2, B, 1024, 1024, true);
    linear_forward(h2, p[4], p[5], logits, B, 1024, 10, false);
}

// One SGD-momentum step in place; g and buf: same shapes as p. Returns the mean cross-entropy loss.
float mlp_train_step(float* const* p, float* const* g, float* const* buf, const float* x, const long long* labels,
                     int B, float lr, float momentum, int first) {
    static thread_local float* work = nullptr;
    static thread_local long work_size = 0;
    const long need = mlp_work_floats(B);
    if (work_size < need) {
        delete[] work;
        work = new float[need];
        work_size = need;
    }
    float* h1 = work;
    float* h2 = h1 + (long)B * 1024;
    float* d2 = h2 + (long)B * 1024;   // also reused for d1
    float* d1 = d2 + (long)B * 1024;
    float* logits = d1 + (long)B * 1024;
    float* dlogits = logits + (long)B * 10;
    linear_forward(x, p[0], p[1], h1, B, 784, 1024, true);
    linear_forward(h1, p[2], p[3], h2, B, 1024, 1024, true);
    linear_forward(h2, p[4], p[5], logits, B, 1024, 10, false);
    double loss = 0.0;
    for (int r = 0; r < B; ++r) {
        const float* z = logits + r * 10;
        float* dz = dlogits + r * 10;
        float m = z[0];
        for (int j = 1; j < 10; ++j) m = std::max(m, z[j]);
        float s = 0.0f;
        for (int j = 0; j < 10; ++j) s += std::exp(z[j] - m);
        loss += std::log(s) + m - z[labels[r]];
        for (int j = 0; j < 10; ++j) dz[j] = std::exp(z[j] - m) / s / B;
        dz[labels[r]] -= 1.0f / B;
    }
    linear_backward(h2, p[4], dlogits, g[4], g[5], d2, B, 1024, 10);
    relu_backward(h2, d2, (long)B * 1024);
    linear_backward(h1, p[2], d2, g[2], g[3], d1, B, 1024, 1024);
    relu_backward(h1, d1, (long)B * 1024);
    linear_backward(x, p[0], d1, g[0], g[1], nullptr, B, 784, 1024);
    const long sizes[6] = {1024L * 784, 1024, 1024L * 1024, 1024, 10L * 1024, 10};
    for (int i = 0; i < 6; ++i) sgd_momentum(p[i], g[i], buf[i], sizes[i], lr, momentum, 0.0f, first != 0);
    return (float)(loss / B);
}

// p: conv1.weight [6,1,5,5], conv1.bias, conv2.weight [16,6,5,5], conv2.bias, fc1 [120,400], fc1.bias,
//    fc2 [84,120], fc2.bias, fc3 [10,84], fc3.bias
long lenet_work_floats(int B) {
    return (long)B * (6 * 28 * 28 + 6 * 14 * 14 + 16 * 10 * 10 + 400 + 120 + 84) + 150L * 28 * 28;
}

void lenet_forward(const float* const* p, const float* x, float* logits, int B, float* work) {
    float* c1 = work;
    float* p1 = c1 + (long)B * 6 * 28 * 28;
    float* c2 = p1 + (long)B * 6 * 14 * 14;
    float* p2 = c2 + (long)B * 16 * 10 * 10;
    float* f1 = p2 + (long)B * 400;
    float* f2 = f1 + (long)B * 120;
    float* col = f2 + (long)B * 84;
    conv2d_relu(x, p[0], p[1], c1, col, B, 1, 28, 28, 6, 5, 2);
    maxpool2(c1, p1, B * 6, 28, 28);
    conv2d_relu(p1, p[2], p[3], c2, col, B, 6, 14, 14, 16, 5, 0);
    maxpool2(c2, p2, B * 16, 10, 10);
    linear_forward(p2, p[4], p[5], f1, B, 400, 120, true);
    linear_forward(f1, p[6], p[7], f2, B, 120, 84, true);
    linear_forward(f2, p[8], p[9], logits, B, 84, 10, false);
}

}  // extern "C"
