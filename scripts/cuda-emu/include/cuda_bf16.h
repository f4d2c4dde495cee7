// Stand-in for CUDA's header under the CPU emulation (see cuda_emu.h).
#pragma once
#include "cuda_emu.h"
