// src/train/odds.cu under the CPU emulation (cuda_emu.h), launched as src/train/odds_coefs.rs
// launches it (one thread a pair, a grid-stride loop; here fewer threads than pairs so the loop
// strides), against the odds term's derivatives written out directly in long double:
// z = (w - l) - (log(1 - e^w) - log(1 - e^l)), d/dw = -beta/B * sigmoid(-z) / (1 - e^w),
// d/dl = beta/B * sigmoid(-z) / (1 - e^l).
#include "../../src/train/odds.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

static void run(const char *what, const std::vector<float> &lp, unsigned blocks, unsigned threads,
                double beta) {
  const size_t pairs = lp.size() / 2;
  std::vector<float> d(lp.size(), NAN);
  emu::launch({blocks}, {threads}, odds_coefficients, lp.data(), d.data(), pairs, beta);
  double worst = 0;
  for (size_t i = 0; i < pairs; ++i) {
    const long double w = lp[i], l = lp[pairs + i];
    const long double ow = 1 - std::exp(w), ol = 1 - std::exp(l);
    const long double z = (w - l) - (std::log(ow) - std::log(ol));
    const long double s = 1 / (1 + std::exp(z));  // sigmoid(-z)
    const long double c = beta / pairs * s;
    const long double want[2] = {-c / ow, c / ol};
    const float got[2] = {d[i], d[pairs + i]};
    for (int k = 0; k < 2; ++k) {
      const double err = std::abs(got[k] - want[k]) / std::abs(want[k]);
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);  // an unwritten NaN counts
    }
  }
  // f32 results: half an ulp (6e-8) plus the long-double reference's own rounding near w = 0.
  const bool ok = worst <= 2e-7;
  failures += !ok;
  std::printf("%s %-28s pairs=%4zu blocks=%u threads=%3u: rel err %.2e\n", ok ? "PASS" : "FAIL",
              what, pairs, blocks, threads, worst);
}

int main() {
  // Chosen better, worse, equal; near-certain answers (lp near 0); the log1p branch (lp below
  // -ln 2); very unlikely answers.
  run("golden cases", {-1.0f, -0.01f, -0.5f, -30.0f, -2.0f, -0.02f, -0.5f, -1e-6f}, 1, 32, 0.1);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-12.0f, -1e-4f);
  std::vector<float> lp(2 * 300);
  for (auto &x : lp) x = u(rng);
  run("random, strided", lp, 2, 64, 0.25);
  run("one pair", {-0.7f, -0.69f}, 1, 1, 1.0);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
