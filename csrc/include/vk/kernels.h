// Host launchers of the CUDA-core kernels (selftests, LayerNorm statistics, GEMM): plain C++ functions
// taking raw pointers, sizes, strides and a stream (ignored by the emulator). csrc/bindings includes
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

// --- purpose-written races for the emulator's race checker (csrc/selftest/race_selftest.cu) ------
enum class RaceCase : int {
  clean = 0,            // the exchanges below with their barriers and cp.async waits: no hazard
  read_after_write,     // warp 0 writes, warp 1 reads, no barrier
  write_after_read,     // warp 0 reads, warp 1 overwrites, no barrier
  write_after_write,    // both warps write the same words, no barrier
  async_no_wait,        // cp.async, commit, __syncthreads, read: no cp.async.wait_group
  async_wait_too_weak,  // two commit groups, wait_group 1, the second group read
  warp_no_syncwarp,     // lanes of one warp exchange through shared memory without __syncwarp
  warp_syncwarp,        // the same with __syncwarp: no hazard
};
// One block of 64 threads; x: 512 floats; out: 64 floats (what each thread read, see the kernel).
void selftest_race(const float* x, float* out, int which, stream_t stream);

}  // namespace vk
