// The LM head's per-row scores from its logits in one pass each way, f32 inside: forward
// (logits[t] - logsumexp(logits), sum(logits)) per row; backward
// dx = g * (onehot(t) - softmax(logits)) in the logits' dtype (the second score, a metric,
// takes no gradient). The arithmetic is logprob_sum.rs's CPU version. One block per row.
#include "block_reduce.cuh"
#include "dtype.cuh"

// The row's logsumexp (every thread gets it), and the sum of its logits when `total` is given.
template <typename T>
__device__ float row_lse(const T *x, int cols, float *scratch, float *total) {
  float m = -INFINITY;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, to_f(x[c]));
  m = block_max(m, scratch);
  float s = 0.0f, t = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f(x[c]);
    s += expf(v - m);
    t += v;
  }
  s = block_sum(s, scratch);
  if (total) *total = block_sum(t, scratch);
  return m + logf(s);
}

// out: [rows, 2] f32. A target outside the vocabulary gives NaN.
template <typename T>
__device__ void fwd(const T *x, const unsigned *targets, float *out, int cols) {
  __shared__ float scratch[WARP];
  const size_t row = blockIdx.x;
  const T *xr = x + row * cols;
  float total;
  const float lse = row_lse(xr, cols, scratch, &total);
  if (threadIdx.x == 0) {
    const unsigned t = targets[row];
    out[2 * row] = t < (unsigned)cols ? to_f(xr[t]) - lse : NAN;
    out[2 * row + 1] = total;
  }
}

// g: [rows, 2] f32 (the gradient of the scores; column 0 counts).
template <typename T>
__device__ void bwd(const T *x, const unsigned *targets, const float *g, T *dx, int cols) {
  __shared__ float scratch[WARP];
  const size_t row = blockIdx.x;
  const T *xr = x + row * cols;
  const float lse = row_lse(xr, cols, scratch, (float *)nullptr);
  const float gr = g[2 * row];
  const unsigned t = targets[row];
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float p = expf(to_f(xr[c]) - lse);
    dx[row * cols + c] = from_f<T>(gr * (((unsigned)c == t ? 1.0f : 0.0f) - p));
  }
}

#define ENTRIES(T, SUFFIX)                                                                    \
  extern "C" __global__ void logprob_sum_fwd_##SUFFIX(const T *x, const unsigned *targets,    \
                                                      float *out, int cols) {                 \
    fwd<T>(x, targets, out, cols);                                                            \
  }                                                                                           \
  extern "C" __global__ void logprob_sum_bwd_##SUFFIX(const T *x, const unsigned *targets,    \
                                                      const float *g, T *dx, int cols) {      \
    bwd<T>(x, targets, g, dx, cols);                                                          \
  }

ENTRIES(float, f32)
ENTRIES(__nv_bfloat16, bf16)
