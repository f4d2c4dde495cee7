// AdamW's update on the GPU in one pass over flat f32 buffers (the gradient f32 or bf16): each
// element's parameter, gradient and moments are read once and written once (candle's ops take
// about fifteen passes). The arithmetic is the CPU update's (`optim.rs`, update_chunk): the same
// expressions in the same order, except that nvcc fuses each moment's multiply-add into one
// rounding (within float rounding of the CPU's; parity's tolerance covers it). `1 - beta` comes
// from the host, rounded from f64 as torch's scalar is.

#include <cuda_bf16.h>

__device__ __forceinline__ float grad_f(float g) { return g; }
__device__ __forceinline__ float grad_f(__nv_bfloat16 g) { return __bfloat162float(g); }

// G: the gradient's type, f32 or bf16 (a bf16 weight copy's gradient kept narrow: widened here,
// exactly, instead of in a pass of its own).
template <typename G>
__device__ void step(float *p, float *m, float *v, const G *g, const size_t n, const float beta1,
                     const float one_minus_beta1, const float beta2, const float one_minus_beta2,
                     const float grad_scale, const float decay, const float step_size,
                     const float bc2_sqrt, const float eps) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = grad_f(g[i]) * grad_scale;
    const float mi = beta1 * m[i] + one_minus_beta1 * gi;
    const float vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step_size * mi / denom;
  }
}

#define ADAMW(G, NAME)                                                                        \
  extern "C" __global__ void NAME(float *p, float *m, float *v, const G *g, const size_t n,   \
                                  const float beta1, const float one_minus_beta1,             \
                                  const float beta2, const float one_minus_beta2,             \
                                  const float grad_scale, const float decay,                  \
                                  const float step_size, const float bc2_sqrt,                \
                                  const float eps) {                                          \
    step<G>(p, m, v, g, n, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale, decay, \
            step_size, bc2_sqrt, eps);                                                        \
  }

ADAMW(float, adamw_step)
ADAMW(__nv_bfloat16, adamw_step_bf16_grad)
