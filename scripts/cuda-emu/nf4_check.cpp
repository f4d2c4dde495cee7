// src/ops/nf4.cu under the CPU emulation (cuda_emu.h), launched as src/ops/nf4.rs launches it
// (256-thread blocks, a grid-stride loop), against bitsandbytes' dequantization written out
// here: element e is NF4[nibble e] * absmax[e / 64], the high nibble first; double-quantized,
// absmax is map[code] * range + mean.
#include "../../src/ops/nf4.cu"

#include "check.h"

#include <cstdio>
#include <random>
#include <vector>

static int failures = 0;

// bitsandbytes' NF4 table (functional.py's get_4bit_type("nf4")).
static const float TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <typename T, typename K>
void run(const char *dtype, size_t elems, size_t first, size_t n, unsigned blocks, K kernel) {
  std::mt19937 rng(elems + first);
  std::vector<uint8_t> packed((elems + 1) / 2);
  std::vector<float> absmax((elems + 63) / 64);
  for (auto &b : packed) b = rng() & 0xff;
  std::uniform_real_distribution<float> scale(0.01f, 3.0f);
  for (auto &a : absmax) a = scale(rng);
  std::vector<T> out(n);
  emu::launch({blocks}, {256}, kernel, packed.data(), absmax.data(), out.data(), first, n);
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t e = first + i;
    const int nib = e % 2 == 0 ? packed[e / 2] >> 4 : packed[e / 2] & 0x0f;
    const T want = store<T>(TABLE[nib] * absmax[e / 64]);
    wrong += load(out[i]) != load(want);
  }
  failures += wrong != 0;
  std::printf("%s %-5s elems=%6zu first=%5zu n=%6zu blocks=%u: %zu elements differ\n",
              wrong ? "FAIL" : "PASS", dtype, elems, first, n, blocks, wrong);
}

// Double quantization: scales = [map (256), mean, ranges], each block's code after the indices.
template <typename T, typename K>
void run_dq(const char *dtype, size_t elems, size_t first, size_t n, unsigned blocks, K kernel) {
  std::mt19937 rng(elems + first + 1);
  const size_t nblocks = (elems + 63) / 64, codes_at = (elems + 1) / 2;
  std::vector<uint8_t> packed(codes_at + nblocks);
  for (auto &b : packed) b = rng() & 0xff;
  std::vector<float> scales(257 + (nblocks + 255) / 256);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto &v : scales) v = u(rng);
  std::vector<T> out(n);
  emu::launch({blocks}, {256}, kernel, packed.data(), scales.data(), out.data(), first, n, codes_at);
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t e = first + i, b = e / 64;
    const int nib = e % 2 == 0 ? packed[e / 2] >> 4 : packed[e / 2] & 0x0f;
    const float prod = scales[packed[codes_at + b]] * scales[257 + b / 256];
    const float scale = prod + scales[256];
    wrong += load(out[i]) != load(store<T>(TABLE[nib] * scale));
  }
  failures += wrong != 0;
  std::printf("%s %-5s dq elems=%6zu first=%5zu n=%6zu blocks=%u: %zu elements differ\n",
              wrong ? "FAIL" : "PASS", dtype, elems, first, n, blocks, wrong);
}

int main() {
  struct Shape { size_t elems, first, n; unsigned blocks; };
  for (auto s : {Shape{1, 0, 1, 1}, Shape{7, 0, 7, 1}, Shape{5000, 0, 5000, 3},
                 Shape{5000, 1, 777, 2}, Shape{70000, 12345, 40001, 7}}) {
    run<float>("f32", s.elems, s.first, s.n, s.blocks, nf4_dequantize_f32);
    run<__nv_bfloat16>("bf16", s.elems, s.first, s.n, s.blocks, nf4_dequantize_bf16);
    run_dq<float>("f32", s.elems, s.first, s.n, s.blocks, nf4_dequantize_dq_f32);
    run_dq<__nv_bfloat16>("bf16", s.elems, s.first, s.n, s.blocks, nf4_dequantize_dq_bf16);
  }
  return failures ? 1 : 0;
}
