// Helpers of the *_check.cpp programs: values in a kernel's element type and back.
#pragma once
#include "cuda_emu.h"

template <typename T> T store(float x);
template <> inline float store<float>(float x) { return x; }
template <> inline __nv_bfloat16 store<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
inline float load(float x) { return x; }
inline float load(__nv_bfloat16 x) { return __bfloat162float(x); }
