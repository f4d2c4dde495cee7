// src/train/adamw.cu under the CPU emulation (cuda_emu.h), launched as src/train/adamw_cuda.rs
// launches it (one pass, a grid-stride loop; here fewer threads than elements so the loop
// strides), with an f32 gradient and a bf16 one (widened in the kernel), against torch's AdamW
// step in double on the gradient's values: m, v, then
// p = p * (1 - lr * wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), the gradient scaled first.
#include "../../src/train/adamw.cu"

#include "check.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

template <typename G, typename K>
static void run(const char *gtype, K kernel, size_t n, unsigned blocks, int steps,
                double grad_scale) {
  // The betas and 1 - beta as the kernel gets them (f32, each rounded from double, as torch's
  // scalars); the reference then works in double.
  const double lr = 1e-3, wd = 0.01, b1 = (float)0.9, b2 = (float)0.999, eps = 1e-8;
  const double c1 = (float)(1 - 0.9), c2 = (float)(1 - 0.999);
  std::mt19937 rng(n);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(n), m(n, 0.0f), v(n, 0.0f);
  std::vector<G> g(n);
  std::vector<double> pr(n), mr(n, 0.0), vr(n, 0.0);
  for (size_t i = 0; i < n; ++i) pr[i] = p[i] = normal(rng);
  for (int t = 1; t <= steps; ++t) {
    for (size_t i = 0; i < n; ++i) g[i] = store<G>(normal(rng) * 0.1f);
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    // The Rust side's per-step constants (optim.rs: Coefs), rounded to f32 as it passes them.
    const float decay = 1 - lr * wd, step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    emu::launch({blocks}, {64}, kernel, p.data(), m.data(), v.data(), (const G *)g.data(),
                n, (float)b1, (float)c1, (float)b2, (float)c2, (float)grad_scale, decay,
                step_size, bc2_sqrt, (float)eps);
    for (size_t i = 0; i < n; ++i) {
      const double gi = load(g[i]) * grad_scale;
      mr[i] = b1 * mr[i] + c1 * gi;
      vr[i] = b2 * vr[i] + c2 * gi * gi;
      pr[i] = pr[i] * (1 - lr * wd) - lr / bc1 * mr[i] / (std::sqrt(vr[i]) / std::sqrt(bc2) + eps);
    }
  }
  // Relative to their size, with floors at the gradients' scale (m, v) and 1 (p: its f32
  // rounding, ~6e-8 a step, is what steps of size lr accumulate besides their own error).
  double worst[3] = {0, 0, 0};
  for (size_t i = 0; i < n; ++i) {
    const double err[3] = {std::abs(m[i] - mr[i]) / std::max(std::abs(mr[i]), 1e-2),
                           std::abs(v[i] - vr[i]) / std::max(std::abs(vr[i]), 1e-6),
                           std::abs(p[i] - pr[i]) / std::max(std::abs(pr[i]), 1.0)};
    for (int k = 0; k < 3; ++k) worst[k] = std::isnan(err[k]) ? INFINITY : std::max(worst[k], err[k]);
  }
  const bool ok = worst[0] <= 1e-6 && worst[1] <= 1e-6 && worst[2] <= 5e-7;
  failures += !ok;
  std::printf("%s %-4s gradient n=%6zu blocks=%u steps=%d grad_scale=%.2f: rel err m %.2e, v %.2e, "
              "p %.2e\n",
              ok ? "PASS" : "FAIL", gtype, n, blocks, steps, grad_scale, worst[0], worst[1], worst[2]);
}

int main() {
  run<float>("f32", adamw_step, 1, 1, 3, 1.0);
  run<float>("f32", adamw_step, 1000, 3, 5, 0.37);
  run<float>("f32", adamw_step, 70000, 7, 4, 1.0);
  run<__nv_bfloat16>("bf16", adamw_step_bf16_grad, 1000, 3, 5, 0.37);
  run<__nv_bfloat16>("bf16", adamw_step_bf16_grad, 70000, 7, 4, 1.0);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
