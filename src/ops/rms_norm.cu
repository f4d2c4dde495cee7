// RMS norm's backward in one pass per row (the forward is candle's `rmsnorm` kernel):
// rstd = rsqrt(mean(x^2) + eps) as that kernel computes it, xhat = x * rstd, gy = g * w,
// dx = rstd * (gy - xhat * mean(gy * xhat)), and, when asked, g * xhat for the weight's
// gradient (its column sums, a matrix product with ones, follow). f32; one block per row.

#include "block_reduce.cuh"

extern "C" __global__ void rms_norm_bwd_f32(const float *x, const float *w, const float *g,
                                            float *dx, float *gxhat, const int cols,
                                            const float eps) {
  __shared__ float scratch[WARP];
  const size_t row = blockIdx.x;
  const float *xr = x + row * cols, *gr = g + row * cols;
  float sq = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) sq += xr[c] * xr[c];
  const float rstd = rsqrtf(block_sum(sq, scratch) / cols + eps);
  float dot = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += gr[c] * w[c] * (xr[c] * rstd);
  const float mean_dot = block_sum(dot, scratch) / cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = xr[c] * rstd;
    dx[row * cols + c] = rstd * (gr[c] * w[c] - xhat * mean_dot);
    if (gxhat) gxhat[row * cols + c] = gr[c] * xhat;
  }
}
