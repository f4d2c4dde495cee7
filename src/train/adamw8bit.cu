// bitsandbytes' 8-bit AdamW on the GPU: one block of 256 threads per 256-value block of the
// moments (one absmax each). Each thread dequantizes its element's two moments, steps them and
// the parameter as the CPU update does (`adamw8bit.rs`, update_block: the same expressions in
// the same order, each operation rounded once, so the results are the CPU's bit for bit), then
// the block takes the new absmax values and requantizes: a full block scaled by the
// reciprocal, a short last block divided, the nearest code found by binary search over the
// midpoints (a value on a midpoint takes the lower code), as bitsandbytes' torch kernel.
//
// `tables` holds the signed map (256), the unsigned map (256), then their midpoints (255
// each, at offsets 512 and 767).

#include <cuda_bf16.h>

#include "../ops/block_reduce.cuh"

#define Q8_BLOCK 256

__device__ __forceinline__ float grad8_f(float g) { return g; }
__device__ __forceinline__ float grad8_f(__nv_bfloat16 g) { return __bfloat162float(g); }

// The number of midpoints below x: its code.
__device__ __forceinline__ unsigned char code_of(const float *bounds, const float x) {
  int lo = 0, hi = 255;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (bounds[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return (unsigned char)lo;
}

// x over the block's scale, clamped to [-1, 1], as quantize_block divides or multiplies.
__device__ __forceinline__ float scaled(const float x, const float scale, const float recip,
                                        const bool full) {
  const float s = full ? __fmul_rn(x, recip) : __fdiv_rn(x, scale);
  return fminf(fmaxf(s, -1.0f), 1.0f);
}

template <typename G>
__device__ void step8(float *p, unsigned char *cm, unsigned char *cv, float *am, float *av,
                      const G *g, const size_t n, const float *tables, const float beta1,
                      const float one_minus_beta1, const float beta2,
                      const float one_minus_beta2, const float grad_scale, const float decay,
                      const float step_size, const float bc2_sqrt, const float eps) {
  __shared__ float t[1022];
  __shared__ float scratch[32];
  for (int k = threadIdx.x; k < 1022; k += blockDim.x) t[k] = tables[k];
  __syncthreads();
  const float *map_m = t, *map_v = t + 256, *bounds_m = t + 512, *bounds_v = t + 767;
  const size_t blocks = (n + Q8_BLOCK - 1) / Q8_BLOCK;
  for (size_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const size_t i = b * Q8_BLOCK + threadIdx.x;
    const bool live = i < n;
    const float a1 = am[b], a2 = av[b];
    float mi = 0.0f, vi = 0.0f;
    if (live) {
      const float gi = __fmul_rn(grad8_f(g[i]), grad_scale);
      mi = __fadd_rn(__fmul_rn(beta1, __fmul_rn(map_m[cm[i]], a1)),
                     __fmul_rn(one_minus_beta1, gi));
      vi = __fadd_rn(__fmul_rn(beta2, __fmul_rn(map_v[cv[i]], a2)),
                     __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
      p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step_size, mi), denom));
    }
    // Every thread has read a1 and a2 before the reductions' barriers; thread 0 writes after.
    const float max_m = block_max(fabsf(mi), scratch);
    const float max_v = block_max(fabsf(vi), scratch);
    const bool full = n - b * Q8_BLOCK >= Q8_BLOCK;
    const float scale_m = fmaxf(max_m, 1e-38f), scale_v = fmaxf(max_v, 1e-38f);
    if (live) {
      const float r_m = __fdiv_rn(1.0f, scale_m), r_v = __fdiv_rn(1.0f, scale_v);
      cm[i] = code_of(bounds_m, scaled(mi, scale_m, r_m, full));
      cv[i] = code_of(bounds_v, scaled(vi, scale_v, r_v, full));
    }
    if (threadIdx.x == 0) {
      am[b] = full ? max_m : scale_m;
      av[b] = full ? max_v : scale_v;
    }
    // The next block's reads of am/av and the scratch are ordered after these writes.
    __syncthreads();
  }
}

#define ADAMW8(G, NAME)                                                                       \
  extern "C" __global__ void NAME(float *p, unsigned char *cm, unsigned char *cv, float *am,  \
                                  float *av, const G *g, const size_t n, const float *tables, \
                                  const float beta1, const float one_minus_beta1,             \
                                  const float beta2, const float one_minus_beta2,             \
                                  const float grad_scale, const float decay,                  \
                                  const float step_size, const float bc2_sqrt,                \
                                  const float eps) {                                          \
    step8<G>(p, cm, cv, am, av, g, n, tables, beta1, one_minus_beta1, beta2, one_minus_beta2,  \
             grad_scale, decay, step_size, bc2_sqrt, eps);                                    \
  }

ADAMW8(float, adamw8bit_step)
ADAMW8(__nv_bfloat16, adamw8bit_step_bf16_grad)
