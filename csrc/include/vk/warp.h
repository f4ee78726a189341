// Warp-level helpers shared by the kernels (both builds: nvcc and the host emulator).
#pragma once

#include "vk/port.h"

namespace vk {

// The sum of v over the 32 lanes of a warp; every lane gets it.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace vk
