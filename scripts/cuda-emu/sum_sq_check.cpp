// src/train/sum_sq.cu under the CPU emulation (cuda_emu.h), launched as
// src/train/sum_sq_cuda.rs launches it (SUM_SQ_THREADS threads, `blocks` partial sums; sizes
// below, at and above one block's share, and a ragged tail; f32 and bf16 gradients), against
// the sum of squares in long double.
#include "../../src/train/sum_sq.cu"

#include "check.h"

#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

template <typename T, typename K>
static void run(const char *dtype, K kernel, size_t n, unsigned blocks) {
  std::mt19937 rng(n * 7 + blocks);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<T> x(n);
  long double want = 0;
  for (auto &v : x) {
    v = store<T>(normal(rng));
    want += (long double)load(v) * load(v);
  }
  std::vector<double> out(blocks, -1.0);
  emu::launch({blocks}, {SUM_SQ_THREADS}, kernel, (const T *)x.data(), n, out.data());
  long double got = 0;
  for (double p : out) got += p;
  const double rel = want > 0 ? (double)std::abs((got - want) / want) : (double)std::abs(got);
  const bool ok = rel <= 1e-13;
  failures += !ok;
  std::printf("%s %-4s n=%7zu blocks=%u: sum %.17g, want %.17Lg, rel err %.2e\n",
              ok ? "PASS" : "FAIL", dtype, n, blocks, (double)got, want, rel);
}

int main() {
  for (auto [n, blocks] : {std::pair<size_t, unsigned>{1, 1}, {255, 1}, {256, 1}, {1000, 3},
                           {100003, 5}, {300000, 2}}) {
    run<float>("f32", sum_sq_f32, n, blocks);
    run<__nv_bfloat16>("bf16", sum_sq_bf16, n, blocks);
  }
  std::printf("%d failed\n", failures);
  return failures != 0;
}
