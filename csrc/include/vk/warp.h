// Warp-level helpers shared by the kernels (both builds: nvcc and the host emulator).
#pragma once

#include "vk/port.h"

namespace vk {

// The sum of v over the 32 lanes of a warp; every lane gets it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace vk
