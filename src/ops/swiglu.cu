// SwiGLU's product silu(gate) * up in one pass each way, f32 inside, stored in the inputs'
// dtype. The arithmetic is the CPU kernel's in swiglu.rs (and candle's silu and its backward):
// silu(g) = g / (1 + exp(-g)), dsilu = sigmoid(g) * (1 - silu(g)) + silu(g).
#include "dtype.cuh"

template <typename T>
__device__ void fwd(const T *gate, const T *up, T *out, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float g = to_f(gate[i]);
    out[i] = from_f<T>(g / (1.0f + expf(-g)) * to_f(up[i]));
  }
}

// d: [dgate (n), dup (n)].
template <typename T>
__device__ void bwd(const T *gate, const T *up, const T *grad, T *d, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float g = to_f(gate[i]), u = to_f(up[i]), dy = to_f(grad[i]);
    const float silu = g / (1.0f + expf(-g));
    const float sig = 1.0f / (1.0f + expf(-g));
    d[i] = from_f<T>(dy * u * (sig * (1.0f - silu) + silu));
    d[n + i] = from_f<T>(dy * silu);
  }
}

#define ENTRIES(T, SUFFIX)                                                                    \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *gate, const T *up, T *out,          \
                                                 size_t n) {                                  \
    fwd<T>(gate, up, out, n);                                                                 \
  }                                                                                           \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *gate, const T *up, const T *grad,   \
                                                 T *d, size_t n) {                            \
    bwd<T>(gate, up, grad, d, n);                                                             \
  }

ENTRIES(float, f32)
ENTRIES(__nv_bfloat16, bf16)
