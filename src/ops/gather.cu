// Row gathers (ops/gather.rs): out row j = src row idx[j], and the backward's sum over each
// source row's readers. candle's index_select computes three 64-bit divisions per element and
// copies an element at a time, and its backward as candle ops copied the whole gradient once
// more (a zero row appended) before K gathers and K - 1 additions: here one launch each way.
#include "dtype.cuh"

#include <cstdint>

// Copies whole rows in units of U (16, 8, 4 or 2 bytes: the largest that divides the row and
// the source's offset), one unit a thread: `units` a row, `rows` output rows, at most 2^32
// units in all (the caller checks).
template <typename U>
__device__ void gather(const U *src, const uint32_t *idx, U *out, uint32_t rows, uint32_t units) {
  const uint32_t n = rows * units;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const uint32_t j = i / units;
    out[i] = src[(size_t)idx[j] * units + (i - j * units)];
  }
}

// out[r, c] = sum over k < readers of grad[inv[k * src_rows + r], c], where an entry equal to
// grad_rows (no k-th reader) adds nothing. f32 inside, rounded once: for two readers that is
// the rounding of candle's own addition, and for f32 any count adds in the same order.
template <typename T>
__device__ void gather_sum(const T *grad, const uint32_t *inv, T *out, uint32_t readers,
                           uint32_t src_rows, uint32_t width, uint32_t grad_rows) {
  const uint32_t n = src_rows * width;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const uint32_t r = i / width, c = i - r * width;
    float acc = 0.0f;
    for (uint32_t k = 0; k < readers; ++k) {
      const uint32_t j = inv[(size_t)k * src_rows + r];
      if (j < grad_rows) acc += to_f(grad[(size_t)j * width + c]);
    }
    out[i] = from_f<T>(acc);
  }
}

#define GATHER(U, SUFFIX)                                                                     \
  extern "C" __global__ void gather_rows_##SUFFIX(const U *src, const uint32_t *idx, U *out,  \
                                                  uint32_t rows, uint32_t units) {            \
    gather<U>(src, idx, out, rows, units);                                                    \
  }

GATHER(uint4, u128)
GATHER(uint2, u64)
GATHER(uint32_t, u32)
GATHER(uint16_t, u16)

#define GATHER_SUM(T, SUFFIX)                                                                 \
  extern "C" __global__ void gather_sum_##SUFFIX(const T *grad, const uint32_t *inv, T *out,  \
                                                 uint32_t readers, uint32_t src_rows,         \
                                                 uint32_t width, uint32_t grad_rows) {        \
    gather_sum<T>(grad, inv, out, readers, src_rows, width, grad_rows);                       \
  }

GATHER_SUM(float, f32)
GATHER_SUM(__nv_bfloat16, bf16)

// dst[rows[u], c] += the sum over k in [offsets[u], offsets[u + 1]) of grad[positions[k], c]:
// an embedding table's gradient, each distinct id's readers summed in order from zero and
// added once (as torch's embedding backward and autograd's accumulation order them), in place.
// The rows are distinct, so no two threads write one element, and the order is fixed.
extern "C" __global__ void rows_add_f32(const float *grad, const uint32_t *rows,
                                        const uint32_t *offsets, const uint32_t *positions,
                                        float *dst, uint32_t unique, uint32_t width) {
  const uint32_t n = unique * width;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    const uint32_t u = i / width, c = i - u * width;
    float acc = 0.0f;
    for (uint32_t k = offsets[u]; k < offsets[u + 1]; ++k)
      acc += grad[(size_t)positions[k] * width + c];
    dst[(size_t)rows[u] * width + c] += acc;
  }
}
