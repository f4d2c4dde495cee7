// src/ops/rms_norm.cu under the CPU emulation (cuda_emu.h), launched as src/ops/norm.rs
// launches it (one block per row: 32 threads below 1024 columns, else 1024), against the
// backward's formulas in double.
#include "../../src/ops/rms_norm.cu"

#include <algorithm>
#include <cstdio>
#include <random>

static int failures = 0;

void run(int rows, int cols, bool want_w) {
  const float eps = 1e-5f;
  std::mt19937 rng(rows * 1000 + cols);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(rows * cols), w(cols), g(rows * cols), dx(rows * cols), gx(rows * cols);
  for (auto &v : x) v = 2.0f * normal(rng) + 0.3f;
  for (auto &v : w) v = 1.0f + 0.3f * normal(rng);
  for (auto &v : g) v = normal(rng);
  const unsigned block = cols < 1024 ? 32 : 1024;
  emu::launch({(unsigned)rows}, {block}, rms_norm_bwd_f32, (const float *)x.data(),
              (const float *)w.data(), (const float *)g.data(), dx.data(),
              want_w ? gx.data() : (float *)nullptr, cols, eps);
  double worst_dx = 0, worst_gx = 0;
  for (int r = 0; r < rows; ++r) {
    const float *xr = &x[r * cols], *gr = &g[r * cols];
    double sq = 0;
    for (int c = 0; c < cols; ++c) sq += (double)xr[c] * xr[c];
    const double rstd = 1 / std::sqrt(sq / cols + eps);
    double dot = 0;
    for (int c = 0; c < cols; ++c) dot += (double)gr[c] * w[c] * xr[c] * rstd;
    dot /= cols;
    double scale = 1e-30;
    std::vector<double> want(cols);
    for (int c = 0; c < cols; ++c) {
      want[c] = rstd * (gr[c] * w[c] - xr[c] * rstd * dot);
      scale = std::max(scale, std::abs(want[c]));
    }
    for (int c = 0; c < cols; ++c) {
      worst_dx = std::max(worst_dx, std::abs(dx[r * cols + c] - want[c]) / scale);
      if (want_w)
        worst_gx = std::max(worst_gx, std::abs(gx[r * cols + c] - gr[c] * xr[c] * rstd) /
                                          std::max(1e-3, std::abs(gr[c] * xr[c] * rstd)));
    }
  }
  const bool ok = worst_dx <= 1e-5 && worst_gx <= 1e-5 && (want_w || gx[0] == 0.0f);
  failures += !ok;
  std::printf("%s rows=%d cols=%4d block=%4u dw=%d: max |ddx|/row max %.2e, g*xhat rel %.2e\n",
              ok ? "PASS" : "FAIL", rows, cols, block, want_w, worst_dx, worst_gx);
}

int main() {
  run(3, 5, true);
  run(4, 64, false);
  run(2, 1000, true);
  run(2, 1536, true);
  run(3, 2048, false);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
