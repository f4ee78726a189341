// Host launchers of the CUDA-core kernels (selftests, LayerNorm statistics, GEMM): plain C++ functions
// taking raw pointers, sizes, strides and a stream (ignored by the emulator). bindings.cpp includes
// this header; no torch types here.
#pragma once
#include <cstdint>

#include "vk/port.h"

namespace vk {

// --- selftests of port.h (csrc/selftest/port_selftest.cu) -------------------------------------
void selftest_mma(bool bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d, stream_t stream);
void selftest_ldmatrix(const uint16_t* src, int count, bool trans, uint32_t* out, stream_t stream);
void selftest_block_sum(const float* x, float* out, int blocks, int threads, bool barrier, stream_t stream);
void selftest_warp(const float* x, int warps, float* sums, uint32_t* ballots, int* anys, int* alls, float* total,
                   stream_t stream);

}  // namespace vk
