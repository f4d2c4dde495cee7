// src/ops/gather.cu under the CPU emulation (cuda_emu.h), launched as src/ops/gather.rs
// launches it (256-thread blocks, a grid-stride loop; here fewer blocks than elements so the
// loop strides): each copy unit against a plain row copy, and the readers' sum against a sum
// in double of the rows each source row's readers name.
#include "../../src/ops/gather.cu"

#include "check.h"

#include <cstdio>
#include <random>

static int failures = 0;

static void report(bool ok, const char *what) {
  failures += !ok;
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
}

// Rows of `width` bf16 values gathered by `idx`, in units of U.
template <typename U, typename K>
void gather_case(const char *name, K kernel, uint32_t src_rows, uint32_t width, unsigned blocks) {
  std::mt19937 rng(width * 31 + src_rows);
  std::vector<uint16_t> src(src_rows * width);
  for (auto &v : src) v = (uint16_t)rng();
  const uint32_t rows = 2 * src_rows + 3;
  std::vector<uint32_t> idx(rows);
  for (auto &j : idx) j = rng() % src_rows;
  idx[0] = src_rows - 1;  // the last row's last unit
  const uint32_t units = width * 2 / sizeof(U);
  std::vector<uint16_t> out(rows * width + sizeof(U), 0xdead);  // a guard past the end
  emu::launch({blocks}, {256}, kernel, (const U *)src.data(), idx.data(), (U *)out.data(), rows,
              units);
  bool ok = out[rows * width] == 0xdead;
  for (uint32_t j = 0; j < rows; ++j)
    for (uint32_t c = 0; c < width; ++c) ok &= out[j * width + c] == src[idx[j] * width + c];
  char what[96];
  std::snprintf(what, sizeof what, "%-16s src %4u x %3u bf16, %u rows, blocks=%u", name, src_rows,
                width, rows, blocks);
  report(ok, what);
}

template <typename T, typename K>
void sum_case(const char *dtype, K kernel, uint32_t src_rows, uint32_t width, uint32_t readers,
              unsigned blocks, double tol) {
  std::mt19937 rng(src_rows * 7 + readers);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint32_t grad_rows = src_rows * readers / 2 + 1;
  std::vector<T> grad(grad_rows * width);
  for (auto &v : grad) v = store<T>(normal(rng));
  // Each gradient row read once at most, by a random source row; `grad_rows` marks "none".
  std::vector<uint32_t> inv(readers * src_rows, grad_rows);
  for (uint32_t j = 0; j < grad_rows; ++j) {
    const uint32_t r = rng() % src_rows;
    for (uint32_t k = 0; k < readers; ++k)
      if (inv[k * src_rows + r] == grad_rows) {
        inv[k * src_rows + r] = j;
        break;
      }
  }
  std::vector<T> out(src_rows * width);
  emu::launch({blocks}, {256}, kernel, grad.data(), inv.data(), out.data(), readers, src_rows,
              width, grad_rows);
  double worst = 0;
  for (uint32_t r = 0; r < src_rows; ++r)
    for (uint32_t c = 0; c < width; ++c) {
      double want = 0, scale = 0;
      for (uint32_t k = 0; k < readers; ++k) {
        const uint32_t j = inv[k * src_rows + r];
        if (j < grad_rows) {
          want += load(grad[j * width + c]);
          scale += std::abs(load(grad[j * width + c]));
        }
      }
      worst = std::max(worst, std::abs(load(out[r * width + c]) - want) / std::max(scale, 1e-30));
    }
  char what[96];
  std::snprintf(what, sizeof what, "gather_sum_%-5s src %4u x %3u, %u readers, blocks=%u: rel err %.2e",
                dtype, src_rows, width, readers, blocks, worst);
  report(worst <= tol, what);
}

// An embedding table's gradient: ids grouped by value (as ops/lookup.rs groups them), each
// group's rows summed and added into a table that already holds a gradient, against double;
// the rows no group names must stay as they were.
void rows_add_case(uint32_t table_rows, uint32_t width, uint32_t looked_up, unsigned blocks) {
  std::mt19937 rng(table_rows * 13 + width);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint32_t> ids(looked_up);
  for (auto &id : ids) id = rng() % (table_rows / 2);  // repeats, and rows never read
  std::vector<uint32_t> rows, offsets, positions;
  for (uint32_t id = 0; id < table_rows; ++id) {
    const size_t start = positions.size();
    for (uint32_t j = 0; j < looked_up; ++j)
      if (ids[j] == id && j % 7 != 3) positions.push_back(j);  // every 7th a dead row
    if (positions.size() > start) {
      rows.push_back(id);
      offsets.push_back((uint32_t)start);
    }
  }
  offsets.push_back((uint32_t)positions.size());
  std::vector<float> grad(looked_up * width), dst(table_rows * width);
  for (auto &v : grad) v = normal(rng);
  for (auto &v : dst) v = normal(rng);
  std::vector<float> before = dst;
  const uint32_t unique = (uint32_t)rows.size();
  emu::launch({blocks}, {256}, rows_add_f32, (const float *)grad.data(),
              (const uint32_t *)rows.data(), (const uint32_t *)offsets.data(),
              (const uint32_t *)positions.data(), dst.data(), unique, width);
  double worst = 0;
  for (uint32_t r = 0; r < table_rows; ++r)
    for (uint32_t c = 0; c < width; ++c) {
      double want = before[r * width + c], scale = std::abs(want);
      for (uint32_t j = 0; j < looked_up; ++j)
        if (ids[j] == r && j % 7 != 3) {
          want += grad[j * width + c];
          scale += std::abs(grad[j * width + c]);
        }
      worst = std::max(worst, std::abs(dst[r * width + c] - want) / std::max(scale, 1e-30));
    }
  char what[96];
  std::snprintf(what, sizeof what, "rows_add_f32 table %4u x %3u, %u rows read, blocks=%u: rel err %.2e",
                table_rows, width, looked_up, blocks, worst);
  report(worst <= 1e-6, what);
}

int main() {
  // Widths (bf16 elements) whose rows take 16-, 8-, 4- and 2-byte units.
  gather_case<uint4>("gather_rows_u128", gather_rows_u128, 37, 64, 1);
  gather_case<uint2>("gather_rows_u64", gather_rows_u64, 137, 12, 1);
  gather_case<uint32_t>("gather_rows_u32", gather_rows_u32, 300, 6, 5);
  gather_case<uint16_t>("gather_rows_u16", gather_rows_u16, 5, 3, 1);
  for (uint32_t readers : {1u, 2u, 3u}) {
    sum_case<float>("f32", gather_sum_f32, 50, 64, readers, 3, 1e-6);
    sum_case<__nv_bfloat16>("bf16", gather_sum_bf16, 301, 3, readers, 2, 4e-3);
  }
  rows_add_case(40, 64, 90, 3);
  rows_add_case(301, 5, 700, 2);
  std::printf("%d failed\n", failures);
  return failures != 0;
}
