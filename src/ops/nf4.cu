// NF4 dequantization (bitsandbytes' dequantize_4bit): element e of a row-major weight is
// NF4[index] * scale[e / 64], the index in the high nibble of byte e / 2 for even e and the low
// nibble for odd e; the f32 product stored in the output's type. `first` is the first element
// of the rows wanted (a fused projection's part).
#include "dtype.cuh"
#include <stdint.h>

__constant__ float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Double quantization (DQ): each 64-block's scale is map[code] * range + mean, its 8-bit code
// at packed[codes_at + block], and scales = [the dynamic map (256), the mean, each 256-block's
// range]; the product, then the sum, each rounded to f32 (as the host's dequantization).
template <typename T, bool DQ>
__device__ void dequantize(const uint8_t *packed, const float *scales, T *out, size_t first,
                           size_t n, size_t codes_at) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const size_t e = first + i;
    const uint8_t byte = packed[e >> 1];
    const int nib = (e & 1) ? (byte & 0x0f) : (byte >> 4);
    const size_t b = e / 64;
    float scale;
    if (DQ) {
      scale = __fadd_rn(__fmul_rn(scales[packed[codes_at + b]], scales[257 + b / 256]),
                        scales[256]);
    } else {
      scale = scales[b];
    }
    out[i] = from_f<T>(__fmul_rn(NF4[nib], scale));
  }
}

#define ENTRIES(T, SUFFIX)                                                                    \
  extern "C" __global__ void nf4_dequantize_##SUFFIX(const uint8_t *packed,                   \
                                                     const float *scales, T *out,             \
                                                     size_t first, size_t n) {                \
    dequantize<T, false>(packed, scales, out, first, n, 0);                                   \
  }                                                                                           \
  extern "C" __global__ void nf4_dequantize_dq_##SUFFIX(const uint8_t *packed,                \
                                                        const float *scales, T *out,          \
                                                        size_t first, size_t n,               \
                                                        size_t codes_at) {                    \
    dequantize<T, true>(packed, scales, out, first, n, codes_at);                             \
  }

ENTRIES(float, f32)
ENTRIES(__nv_bfloat16, bf16)
