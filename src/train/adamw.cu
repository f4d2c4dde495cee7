// AdamW's update on the GPU in one pass over flat f32 buffers: each element's parameter,
// gradient and moments are read once and written once (candle's ops take about fifteen
// passes). The arithmetic is the CPU update's (`optim.rs`, update_chunk): the same
// expressions in the same order, except that nvcc fuses each moment's multiply-add into one
// rounding (within float rounding of the CPU's; parity's tolerance covers it). `1 - beta` comes
// from the host, rounded from f64 as torch's scalar is.

extern "C" __global__ void adamw_step(float *p, float *m, float *v, const float *g,
                                      const size_t n, const float beta1,
                                      const float one_minus_beta1, const float beta2,
                                      const float one_minus_beta2, const float grad_scale,
                                      const float decay, const float step_size,
                                      const float bc2_sqrt, const float eps) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i] * grad_scale;
    const float mi = beta1 * m[i] + one_minus_beta1 * gi;
    const float vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step_size * mi / denom;
  }
}
