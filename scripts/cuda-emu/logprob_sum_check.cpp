// src/ops/logprob_sum.cu under the CPU emulation (cuda_emu.h), launched as
// src/ops/logprob_sum.rs launches it (one block per row: 32 threads below 1024 columns, else
// 1024), against the scores and their gradient in double.
#include "../../src/ops/logprob_sum.cu"

#include "check.h"

#include <algorithm>
#include <cstdio>
#include <random>

static int failures = 0;

template <typename T, typename F, typename B>
void run(const char *dtype, int rows, int cols, F fwd, B bwd, double tol) {
  std::mt19937 rng(rows * 7 + cols);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> x(rows * cols), dx(rows * cols);
  for (auto &v : x) v = store<T>(normal(rng));
  std::vector<unsigned> t(rows);
  for (int r = 0; r < rows; ++r) t[r] = (unsigned)((r * 7919) % cols);
  t[rows - 1] = cols - 1;
  std::vector<float> out(2 * rows), g(2 * rows);
  for (auto &v : g) v = normal(rng) / 3;
  const unsigned block = cols < 1024 ? 32 : 1024;
  emu::launch({(unsigned)rows}, {block}, fwd, (const T *)x.data(), (const unsigned *)t.data(),
              out.data(), cols);
  emu::launch({(unsigned)rows}, {block}, bwd, (const T *)x.data(), (const unsigned *)t.data(),
              (const float *)g.data(), dx.data(), cols);
  double worst_lp = 0, worst_sum = 0, worst_dx = 0;
  for (int r = 0; r < rows; ++r) {
    double m = -1e300, s = 0, total = 0, mag = 0;
    for (int c = 0; c < cols; ++c) m = std::max(m, (double)load(x[r * cols + c]));
    for (int c = 0; c < cols; ++c) {
      const double v = load(x[r * cols + c]);
      s += std::exp(v - m);
      total += v;
      mag += std::abs(v);
    }
    const double lse = m + std::log(s);
    worst_lp = std::max(worst_lp, std::abs(out[2 * r] - (load(x[r * cols + t[r]]) - lse)));
    worst_sum = std::max(worst_sum, std::abs(out[2 * r + 1] - total) / mag);
    for (int c = 0; c < cols; ++c) {
      const double want =
          g[2 * r] * ((c == (int)t[r] ? 1.0 : 0.0) - std::exp(load(x[r * cols + c]) - lse));
      worst_dx = std::max(worst_dx, std::abs(load(dx[r * cols + c]) - want) / (std::abs(g[2 * r]) + 1e-12));
    }
  }
  const bool ok = worst_lp <= 1e-4 && worst_sum <= 1e-6 && worst_dx <= tol;
  failures += !ok;
  std::printf("%s %-5s rows=%d cols=%6d: |dlogp| %.2e, sum rel %.2e, |ddx|/|g| %.2e\n",
              ok ? "PASS" : "FAIL", dtype, rows, cols, worst_lp, worst_sum, worst_dx);
}

int main() {
  for (auto [rows, cols] : {std::pair<int, int>{3, 5}, {4, 300}, {2, 1024}, {3, 50272}}) {
    run<float>("f32", rows, cols, logprob_sum_fwd_f32, logprob_sum_bwd_f32, 1e-6);
    run<__nv_bfloat16>("bf16", rows, cols, logprob_sum_fwd_bf16, logprob_sum_bwd_bf16, 4e-3);
  }
  std::printf("%d failed\n", failures);
  return failures != 0;
}
