// Attention's probabilities from raw scores in one pass per row: p = softmax(v), where
// v = cap(s * scale) + bias (cap(x) = c * tanh(x / c), Gemma 2's soft cap, when c > 0), in f32
// inside, stored in the scores' dtype. The backward recomputes p from the scores (flash
// attention's way), so only the scores and the output are kept between the passes. The
// arithmetic is the CPU kernel's in attn_softmax.rs, term by term. One warp per row.
#include "dtype.cuh"

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o, 32));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o, 32);
  return v;
}

// The bias row of score row `row` ([n, heads, lq] rows; the bias has 1 or `heads` heads).
__device__ __forceinline__ size_t bias_row(size_t row, int heads, int lq, int per_head) {
  if (per_head) return row;
  const size_t per_seq = (size_t)heads * lq;
  return (row / per_seq) * lq + row % lq;
}

__device__ __forceinline__ float value(float s, float b, float scale, float cap) {
  float v = s * scale;
  if (cap > 0.0f) v = cap * tanhf(v / cap);
  return v + b;
}

// The row's max value and 1 / its sum of exponentials (as `row_stats` in attn_softmax.rs).
template <typename T>
__device__ void row_stats(const T *x, const float *b, int cols, float scale, float cap, float &m,
                          float &inv) {
  m = -INFINITY;
  for (int c = threadIdx.x; c < cols; c += 32) m = fmaxf(m, value(to_f(x[c]), b[c], scale, cap));
  m = warp_max(m);
  float sum = 0.0f;
  for (int c = threadIdx.x; c < cols; c += 32) sum += expf(value(to_f(x[c]), b[c], scale, cap) - m);
  inv = 1.0f / warp_sum(sum);
}

template <typename T>
__device__ void fwd(const T *s, const float *bias, T *out, int cols, int heads, int lq,
                    int per_head, float scale, float cap) {
  const size_t row = blockIdx.x;
  const T *x = s + row * cols;
  const float *b = bias + bias_row(row, heads, lq, per_head) * cols;
  T *y = out + row * cols;
  float m, inv;
  row_stats(x, b, cols, scale, cap, m, inv);
  for (int c = threadIdx.x; c < cols; c += 32)
    y[c] = from_f<T>(expf(value(to_f(x[c]), b[c], scale, cap) - m) * inv);
}

// dx = p * (g - sum(p * g)) * dv/ds, dv/ds = scale (times 1 - tanh^2 under the cap).
template <typename T>
__device__ void bwd(const T *s, const float *bias, const T *g, T *dx, int cols, int heads,
                    int lq, int per_head, float scale, float cap) {
  const size_t row = blockIdx.x;
  const T *x = s + row * cols;
  const float *b = bias + bias_row(row, heads, lq, per_head) * cols;
  const T *gr = g + row * cols;
  T *d = dx + row * cols;
  float m, inv;
  row_stats(x, b, cols, scale, cap, m, inv);
  float dot = 0.0f;
  for (int c = threadIdx.x; c < cols; c += 32)
    dot += expf(value(to_f(x[c]), b[c], scale, cap) - m) * inv * to_f(gr[c]);
  dot = warp_sum(dot);
  for (int c = threadIdx.x; c < cols; c += 32) {
    const float sc = to_f(x[c]);
    const float p = expf(value(sc, b[c], scale, cap) - m) * inv;
    float dv = scale;
    if (cap > 0.0f) {
      const float t = tanhf(sc * scale / cap);
      dv = scale * (1.0f - t * t);
    }
    d[c] = from_f<T>(p * (to_f(gr[c]) - dot) * dv);
  }
}

#define ENTRIES(T, SUFFIX)                                                                   \
  extern "C" __global__ void attn_softmax_fwd_##SUFFIX(const T *s, const float *bias, T *out, \
                                                        int cols, int heads, int lq,         \
                                                        int per_head, float scale, float cap) { \
    fwd<T>(s, bias, out, cols, heads, lq, per_head, scale, cap);                             \
  }                                                                                          \
  extern "C" __global__ void attn_softmax_bwd_##SUFFIX(const T *s, const float *bias,        \
                                                        const T *g, T *dx, int cols,         \
                                                        int heads, int lq, int per_head,     \
                                                        float scale, float cap) {            \
    bwd<T>(s, bias, g, dx, cols, heads, lq, per_head, scale, cap);                           \
  }

ENTRIES(float, f32)
ENTRIES(__nv_bfloat16, bf16)
