// src/train/sum_sq.cu under the CPU emulation (cuda_emu.h), launched as
// src/train/sum_sq_cuda.rs launches it (SUM_SQ_THREADS threads, `blocks` partial sums; sizes
// below, at and above one block's share, and a ragged tail), against the sum of squares in
// long double.
#include "../../src/train/sum_sq.cu"

#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

static void run(size_t n, unsigned blocks) {
  std::mt19937 rng(n * 7 + blocks);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> x(n);
  long double want = 0;
  for (auto &v : x) {
    v = normal(rng);
    want += (long double)v * v;
  }
  std::vector<double> out(blocks, -1.0);
  emu::launch({blocks}, {SUM_SQ_THREADS}, sum_sq_f32, (const float *)x.data(), n, out.data());
  long double got = 0;
  for (double p : out) got += p;
  const double rel = want > 0 ? (double)std::abs((got - want) / want) : (double)std::abs(got);
  const bool ok = rel <= 1e-13;
  failures += !ok;
  std::printf("%s n=%7zu blocks=%u: sum %.17g, want %.17Lg, rel err %.2e\n", ok ? "PASS" : "FAIL",
              n, blocks, (double)got, want, rel);
}

int main() {
  run(1, 1);
  run(255, 1);
  run(256, 1);
  run(1000, 3);
  run(100003, 5);
  run(300000, 2);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
