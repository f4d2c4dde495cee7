// The gradient norm's sums of squares in one pass over each gradient (candle's ops square into
// a temporary, then sum it in two more launches). Each block sums the squares of its
// grid-stride share of x in double and writes one partial sum; the host adds the partials in
// order. The split depends on n only (sum_sq_cuda.rs), so the logged norm is the same from run
// to run. blockDim.x is SUM_SQ_THREADS.
#define SUM_SQ_THREADS 256

#include <cuda_bf16.h>

__device__ __forceinline__ double widen(float x) { return x; }
__device__ __forceinline__ double widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ void sum_sq(const T *x, const size_t n, double *out) {
  __shared__ double part[SUM_SQ_THREADS];
  double acc = 0.0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const double xi = widen(x[i]);
    acc += xi * xi;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = part[0];
}

// f32 gradients, and bf16 ones (a bf16 weight copy's gradient kept narrow).
extern "C" __global__ void sum_sq_f32(const float *x, const size_t n, double *out) {
  sum_sq<float>(x, n, out);
}
extern "C" __global__ void sum_sq_bf16(const __nv_bfloat16 *x, const size_t n, double *out) {
  sum_sq<__nv_bfloat16>(x, n, out);
}
