// src/train/adamw8bit.cu under the CPU emulation (cuda_emu.h), launched as
// src/train/adamw8bit_cuda.rs launches it (256 threads a block, one block per 256 values; here
// also fewer blocks than that, so the loop strides), with an f32 gradient and a bf16 one,
// against the CPU update of src/train/adamw8bit.rs written out again here in f32: the codes,
// absmax values and parameters must be equal bit for bit (every operation is rounded once on
// both sides). The tables are bitsandbytes' dynamic maps as src/dynamic_map.rs builds them.
#include "../../src/train/adamw8bit.cu"

#include "check.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

static std::vector<float> dynamic_map(bool is_signed) {
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int steps = (is_signed ? 1 << i : 2 << i) + 1;
    const float start = 0.1f, end = 1.0f, step = (end - start) / (float)(steps - 1);
    std::vector<float> pts(steps);
    for (int k = 0; k < steps; ++k)
      pts[k] = k < steps / 2 ? std::fma(step, (float)k, start)
                             : std::fma(-step, (float)(steps - k - 1), end);
    const float scale = (float)std::pow(10.0, i - 6);
    for (int k = 0; k + 1 < steps; ++k) {
      const float mean = (pts[k] + pts[k + 1]) / 2.0f;
      data.push_back(scale * mean);
      if (is_signed) data.push_back(-(scale * mean));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  return data;
}

struct Map {
  std::vector<float> values, bounds;
  explicit Map(std::vector<float> v) : values(std::move(v)) {
    for (size_t k = 0; k + 1 < values.size(); ++k) bounds.push_back((values[k] + values[k + 1]) / 2.0f);
  }
  unsigned char code(float x) const {
    return (unsigned char)(std::lower_bound(bounds.begin(), bounds.end(), x) - bounds.begin());
  }
};

// adamw8bit.rs: quantize_block.
static float quantize_block(const float *x, size_t len, const Map &map, unsigned char *codes) {
  float absmax = 0.0f;
  for (size_t k = 0; k < len; ++k) absmax = std::max(absmax, std::abs(x[k]));
  const float scale = std::max(absmax, 1e-38f);
  const bool full = len == Q8_BLOCK;
  const float r = 1.0f / scale;
  for (size_t k = 0; k < len; ++k)
    codes[k] = map.code(std::clamp(full ? x[k] * r : x[k] / scale, -1.0f, 1.0f));
  return full ? absmax : scale;
}

template <typename G, typename K>
static void run(const char *gtype, K kernel, size_t n, unsigned grid, int steps, bool zero_block) {
  const Map sm(dynamic_map(true)), um(dynamic_map(false));
  std::vector<float> tables(sm.values);
  tables.insert(tables.end(), um.values.begin(), um.values.end());
  tables.insert(tables.end(), sm.bounds.begin(), sm.bounds.end());
  tables.insert(tables.end(), um.bounds.begin(), um.bounds.end());
  const size_t blocks = (n + Q8_BLOCK - 1) / Q8_BLOCK;
  std::mt19937 rng(n + steps);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(n), am(blocks, 0.0f), av(blocks, 0.0f);
  std::vector<unsigned char> cm(n, 0), cv(n, 0);
  for (size_t i = 0; i < n; ++i) p[i] = normal(rng);
  std::vector<float> pr(p), amr(am), avr(av);
  std::vector<unsigned char> cmr(cm), cvr(cv);
  std::vector<G> g(n);
  const float b1 = 0.9f, b2 = 0.999f, c1 = (float)(1 - 0.9), c2 = (float)(1 - 0.999), eps = 1e-8f;
  for (int t = 1; t <= steps; ++t) {
    for (size_t i = 0; i < n; ++i) {
      const bool zero = zero_block && t == 1 && i < Q8_BLOCK;
      g[i] = store<G>(zero ? 0.0f : normal(rng) * 0.01f * (1 + (float)(i % 7)));
    }
    const float decay = 1 - 1e-2 * 0.1, step_size = 1e-2 / (1 - std::pow(0.9, t)),
                bc2_sqrt = std::sqrt(1 - std::pow(0.999, t)), grad_scale = 0.8f;
    emu::launch({grid}, {Q8_BLOCK}, kernel, p.data(), cm.data(), cv.data(), am.data(), av.data(),
                (const G *)g.data(), n, (const float *)tables.data(), b1, c1, b2, c2, grad_scale,
                decay, step_size, bc2_sqrt, eps);
    for (size_t b = 0; b < blocks; ++b) {
      const size_t s = b * Q8_BLOCK, len = std::min(n - s, (size_t)Q8_BLOCK);
      float m[Q8_BLOCK], v[Q8_BLOCK];
      for (size_t k = 0; k < len; ++k) {
        const size_t i = s + k;
        const float gi = load(g[i]) * grad_scale;
        m[k] = b1 * (sm.values[cmr[i]] * amr[b]) + c1 * gi;
        v[k] = b2 * (um.values[cvr[i]] * avr[b]) + c2 * gi * gi;
        const float denom = std::sqrt(v[k]) / bc2_sqrt + eps;
        pr[i] = pr[i] * decay - step_size * m[k] / denom;
      }
      amr[b] = quantize_block(m, len, sm, &cmr[s]);
      avr[b] = quantize_block(v, len, um, &cvr[s]);
    }
  }
  const bool ok = p == pr && cm == cmr && cv == cvr && am == amr && av == avr;
  size_t moved = 0;
  for (size_t i = 0; i < n; ++i) moved += cm[i] != 0;
  failures += !ok || moved == 0;
  std::printf("%s %-4s gradient n=%6zu grid=%u steps=%d%s: codes, absmax and parameters %s "
              "(%zu first-moment codes nonzero)\n",
              ok && moved ? "PASS" : "FAIL", gtype, n, grid, steps,
              zero_block ? " (a zero block)" : "", ok ? "equal" : "DIFFER", moved);
}

int main() {
  run<float>("f32", adamw8bit_step, 1, 1, 2, false);
  run<float>("f32", adamw8bit_step, 300, 2, 3, true);
  run<float>("f32", adamw8bit_step, 4096, 16, 3, false);
  run<float>("f32", adamw8bit_step, 9013, 7, 3, true);
  run<__nv_bfloat16>("bf16", adamw8bit_step_bf16_grad, 1000, 4, 3, false);
  run<__nv_bfloat16>("bf16", adamw8bit_step_bf16_grad, 5003, 9, 2, true);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
