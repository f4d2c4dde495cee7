// AdamW's update on the GPU in three passes over flat f32 buffers (candle's ops take about
// fifteen, each a full pass). The arithmetic is the CPU update's (`optim.rs`, update_chunk),
// term by term; `1 - beta` comes from the host, rounded from f64 as torch's scalar is.

extern "C" __global__ void adamw_moment1(float *m, const float *g, const size_t n,
                                         const float beta1, const float one_minus_beta1,
                                         const float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * grad_scale;
    m[i] = beta1 * m[i] + one_minus_beta1 * gi;
  }
}

extern "C" __global__ void adamw_moment2(float *v, const float *g, const size_t n,
                                         const float beta2, const float one_minus_beta2,
                                         const float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * grad_scale;
    v[i] = beta2 * v[i] + one_minus_beta2 * gi * gi;
  }
}

extern "C" __global__ void adamw_param(float *p, const float *m, const float *v, const size_t n,
                                       const float decay, const float step_size,
                                       const float bc2_sqrt, const float eps) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float denom = sqrtf(v[i]) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step_size * m[i] / denom;
  }
}
