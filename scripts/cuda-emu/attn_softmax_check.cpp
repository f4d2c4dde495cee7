// src/ops/attn_softmax.cu under the CPU emulation (cuda_emu.h), launched as
// src/ops/attn_softmax.rs launches it (one 32-thread block per row), against a reference that
// takes each value v = cap(s * scale) + bias in f32, as the kernels do, and the rest in double.
#include "../../src/ops/attn_softmax.cu"

#include "check.h"

#include <algorithm>
#include <cstdio>
#include <random>

static int failures = 0;


struct Case {
  int n, h, lq, lk;
  bool per_head;
  float cap;
};

template <typename T, typename F, typename B>
void run(const char *dtype, const Case &c, F fwd, B bwd, double tol) {
  const int rows = c.n * c.h * c.lq, cols = c.lk, bh = c.per_head ? c.h : 1;
  const float scale = 0.35f;
  std::mt19937 rng(rows * 131 + cols);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<T> s(rows * cols), g(rows * cols), out(rows * cols), dx(rows * cols);
  for (auto &v : s) v = store<T>(normal(rng));
  for (auto &v : g) v = store<T>(normal(rng));
  std::vector<float> bias(c.n * bh * c.lq * cols, 0.0f);
  for (size_t i = 0; i < bias.size(); ++i)
    if ((i * 7) % 5 == 0) bias[i] = -3.4028235e38f;  // f32::MIN, as layers::AttnBias masks
  std::fill(bias.begin(), bias.begin() + cols, -3.4028235e38f);  // a row without keys
  emu::launch({(unsigned)rows}, {32}, fwd, s.data(), bias.data(), out.data(), cols, c.h, c.lq,
              (int)c.per_head, scale, c.cap);
  emu::launch({(unsigned)rows}, {32}, bwd, s.data(), bias.data(), g.data(), dx.data(), cols, c.h,
              c.lq, (int)c.per_head, scale, c.cap);
  double worst_p = 0, worst_d = 0;
  for (int r = 0; r < rows; ++r) {
    const int br = c.per_head ? r : (r / (c.h * c.lq)) * c.lq + r % c.lq;
    std::vector<double> v(cols), p(cols);
    for (int j = 0; j < cols; ++j) {
      float x = load(s[r * cols + j]) * scale;
      if (c.cap > 0) x = c.cap * std::tanh(x / c.cap);
      v[j] = x + bias[br * cols + j];
    }
    const double m = *std::max_element(v.begin(), v.end());
    double sum = 0, dot = 0, dmax = 1e-30;
    for (int j = 0; j < cols; ++j) sum += p[j] = std::exp(v[j] - m);
    for (int j = 0; j < cols; ++j) dot += (p[j] /= sum) * load(g[r * cols + j]);
    std::vector<double> d(cols);
    for (int j = 0; j < cols; ++j) {
      double dv = scale;
      if (c.cap > 0) {
        const double t = std::tanh((double)load(s[r * cols + j]) * scale / c.cap);
        dv = scale * (1 - t * t);
      }
      d[j] = p[j] * (load(g[r * cols + j]) - dot) * dv;
      dmax = std::max(dmax, std::abs(d[j]));
    }
    for (int j = 0; j < cols; ++j) {
      worst_p = std::max(worst_p, std::abs(load(out[r * cols + j]) - p[j]));
      worst_d = std::max(worst_d, std::abs(load(dx[r * cols + j]) - d[j]) / dmax);
    }
  }
  const bool ok = worst_p <= tol && worst_d <= 4 * tol;
  failures += !ok;
  std::printf("%s %-5s n=%d h=%d lq=%d lk=%3d bias=%s cap=%.1f: max |dp| %.2e, max |ddx|/row max %.2e\n",
              ok ? "PASS" : "FAIL", dtype, c.n, c.h, c.lq, c.lk, c.per_head ? "per-head" : "shared",
              c.cap, worst_p, worst_d);
}

int main() {
  const Case cases[] = {{2, 3, 4, 5, false, 0}, {2, 3, 4, 5, true, 1.5f}, {1, 2, 7, 37, false, 0},
                        {1, 2, 7, 37, true, 0},  {2, 2, 3, 64, false, 2.0f}, {1, 4, 5, 100, true, 0},
                        {1, 1, 3, 1, false, 0}};
  for (const auto &c : cases) {
    run<float>("f32", c, attn_softmax_fwd_f32, attn_softmax_bwd_f32, 2e-6);
    run<__nv_bfloat16>("bf16", c, attn_softmax_fwd_bf16, attn_softmax_bwd_bf16, 4e-3);
  }
  std::printf("%d failed\n", failures);
  return failures != 0;
}
