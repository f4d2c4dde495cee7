// src/ops/swiglu.cu under the CPU emulation (cuda_emu.h), launched as src/ops/swiglu.rs
// launches it (256-thread blocks, a grid-stride loop; here fewer blocks than elements so the
// loop strides), against candle's formulas in double.
#include "../../src/ops/swiglu.cu"

#include "check.h"

#include <algorithm>
#include <cstdio>
#include <random>

static int failures = 0;


template <typename T, typename F, typename B>
void run(const char *dtype, size_t n, unsigned blocks, F fwd, B bwd, double tol) {
  std::mt19937 rng(n);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> gate(n), up(n), grad(n), out(n), d(2 * n);
  for (size_t i = 0; i < n; ++i) {
    gate[i] = store<T>(normal(rng));
    up[i] = store<T>(normal(rng) / 3);
    grad[i] = store<T>(normal(rng) / 3);
  }
  gate[0] = store<T>(-100.0f);  // exp overflow side: silu -> -0, derivative -> 0
  emu::launch({blocks}, {256}, fwd, gate.data(), up.data(), out.data(), n);
  emu::launch({blocks}, {256}, bwd, gate.data(), up.data(), grad.data(), d.data(), n);
  double worst[3] = {0, 0, 0};
  for (size_t i = 0; i < n; ++i) {
    const double g = load(gate[i]), u = load(up[i]), dy = load(grad[i]);
    const double sig = 1 / (1 + std::exp(-g)), silu = g * sig;
    const double want[3] = {silu * u, dy * u * (sig * (1 - silu) + silu), dy * silu};
    const double got[3] = {load(out[i]), load(d[i]), load(d[n + i])};
    // dgate sums terms of size |dy u (1 + |g|)|: its f32 rounding is relative to those (the
    // derivative crosses 0 near g = -1.28), as in candle's chain.
    const double scale[3] = {std::abs(want[0]), std::abs(dy * u) * (1 + std::abs(g)),
                             std::abs(want[2])};
    for (int k = 0; k < 3; ++k)
      worst[k] = std::max(worst[k], std::abs(got[k] - want[k]) / std::max(scale[k], 1e-3));
  }
  const bool ok = std::isfinite(load(d[0])) && worst[0] <= tol && worst[1] <= tol && worst[2] <= tol;
  failures += !ok;
  std::printf("%s %-5s n=%6zu blocks=%u: rel err y %.2e, dgate %.2e, dup %.2e\n", ok ? "PASS" : "FAIL",
              dtype, n, blocks, worst[0], worst[1], worst[2]);
}

int main() {
  for (auto [n, blocks] : {std::pair<size_t, unsigned>{1, 1}, {257, 1}, {5000, 3}, {70000, 7}}) {
    run<float>("f32", n, blocks, swiglu_fwd_f32, swiglu_bwd_f32, 1e-5);
    run<__nv_bfloat16>("bf16", n, blocks, swiglu_fwd_bf16, swiglu_bwd_bf16, 8e-3);
  }
  std::printf("%d failed\n", failures);
  return failures != 0;
}
