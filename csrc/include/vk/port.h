// vk/port.h: one kernel source, two builds.
//
// Kernels are written once in CUDA syntax and compile either
//   * with nvcc for sm_80 / sm_90 (the GPU build), or
//   * with the host C++ compiler (g++ -std=c++20 -DVK_EMULATE) against the emulator below,
//     which runs each thread block's threads cooperatively on one CPU thread.
//
// PTX-level features are reached only through namespace vk, with the same names on both sides:
//   vk::half, vk::bfloat16                      16-bit float types (device: __half, __nv_bfloat16)
//   vk::to_float(x), vk::from_float<T>(f)       conversions, round-to-nearest-even
//   vk::pack2<T>(lo, hi)                        two 16-bit values in one 32-bit register, lo in bits 0-15
//   vk::mma_m16n8k16<T>(d, a, b, c)             mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32
//   vk::ldmatrix_x{1,2,4}[_trans](r, ptr)       ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
//   vk::cp_async_16(smem, gmem, pred)           cp.async.cg 16 bytes, zero-fill when !pred
//   vk::cp_async_commit(), vk::cp_async_wait<N>()  cp.async.commit_group, cp.async.wait_group N
//   vk::ld_shared(p), vk::st_shared(p, v)       a plain shared-memory load / store (*p, *p = v) that
//                                               the emulator's race checker sees (use them for
//                                               shared memory that ldmatrix / cp.async do not touch)
//   VK_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
//   VK_DYNAMIC_SHARED(T, name)                  declares `T* name` = this block's dynamic shared memory
//   vk::stream_t                                cudaStream_t on the GPU, an ignored pointer on the host
//   vk::check_launch(what)                      throws std::runtime_error when the last launch failed
//
// Host emulation (VK_EMULATE) -- what it does and what it does not:
//   * Every CUDA thread of a block is a fiber (its own stack; a ~12 ns hand-written context switch on
//     x86-64, ucontext elsewhere). Threads run one at a time, each until it reaches a
//     synchronisation point (__syncthreads, __syncwarp, a shuffle/vote, mma, ldmatrix) or exits, in
//     the order of the schedule (vk::emu::settings(), env VK_EMU_SCHEDULE): round_robin (default;
//     threads in order, warps in lock-step), reverse, warp_major / warp_major_reverse (one warp runs
//     as far as it can -- to a __syncthreads or its end -- before the next: warps run whole barrier
//     intervals out of step) or random (warp-major in a seeded random warp and lane order). A missing
//     barrier makes a deterministic wrong answer under some schedule (dynamic shared memory is filled
//     with 0xFF bytes -- NaN for floats and halves -- at the start of every block).
//   * Race checker (on by default; env VK_EMU_RACECHECK=0 turns it off): a shadow of every 2 bytes of
//     dynamic shared memory records the last write and the reads of the current barrier interval,
//     with thread and source line. ldmatrix (reads), cp.async (writes) and vk::ld_shared /
//     vk::st_shared are recorded; plain pointer accesses are not. Two accesses by different threads
//     to the same bytes, one a write, in the same __syncthreads interval (and for two lanes of one
//     warp, the same __syncwarp interval) are a hazard: read-after-write, write-after-read or
//     write-after-write, named by the order they ran in; reading or overwriting a cp.async
//     destination before a cp.async.wait_group of its thread landed it is one too (any thread). A
//     block with hazards makes the launch throw std::runtime_error listing each distinct one with both
//     source lines. Static __shared__ arrays are not shadowed.
//   * __syncthreads releases when every thread of the block that has not exited arrived (as on sm_70+).
//   * Warp collectives are resolved at once when the last lane of the warp arrives, from the inputs
//     every lane deposited, so their results never depend on the order lanes run in. Lanes must take
//     part in the same collective (a mismatch, or a lane that exited while the others need its value,
//     is reported as an error, not hidden). The `mask` argument must contain the calling lane.
//   * mma_m16n8k16 and ldmatrix follow the fragment layouts of the PTX ISA ("Matrix fragments for
//     mma.m16n8k16 with floating point type", "ldmatrix"). Products of 16-bit inputs are exact in
//     fp32; the emulated mma adds them to the accumulator in fp32, k = 0..15 in order.
//   * cp.async lands asynchronously: the copy is recorded at issue, its 16 destination bytes are
//     poisoned with 0xFF, and it is done when cp.async.wait_group N of the issuing thread covers its
//     commit group (all but the newest N committed groups; uncommitted copies are not waited for), or
//     when the thread exits.
//   * Blocks run one after another on the calling CPU thread. Emulator state and static __shared__
//     variables are thread_local, so launches from different CPU threads do not interfere.
//   * Static shared memory: `__shared__ T x[N];` becomes a thread_local (static storage) variable,
//     shared by the fibers of a block and NOT re-poisoned between blocks.
//   * Dynamic shared memory: use VK_DYNAMIC_SHARED(T, name). A plain `extern __shared__ T name[];`
//     does not compile on the host (C++ has no storage for an unsized extern array that the
//     emulator could place per block).
//   * Errors found by the emulator (deadlock, mismatched collectives, too many threads or too much
//     shared memory) make the launch throw std::runtime_error naming the kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(VK_EMULATE) && defined(__CUDACC__)
#error "VK_EMULATE is for the host compiler; nvcc builds the GPU kernels"
#endif

#if defined(__CUDACC__)
#define VK_GPU 1
#else
#define VK_GPU 0
#endif

// ---------------------------------------------------------------------------------------------
// Host code of the GPU build that is not compiled by nvcc (csrc/bindings/*.cpp): only the stream type.
// ---------------------------------------------------------------------------------------------
#if !VK_GPU && !defined(VK_EMULATE)
#include <cuda_runtime_api.h>
namespace vk {
using stream_t = cudaStream_t;
}  // namespace vk

// ---------------------------------------------------------------------------------------------
// The GPU build (nvcc).
// ---------------------------------------------------------------------------------------------
#elif VK_GPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vk {
using stream_t = cudaStream_t;
using half = __half;
using bfloat16 = __nv_bfloat16;

__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ half from_float<half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ bfloat16 from_float<bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]);
template <>
__device__ __forceinline__ void mma_m16n8k16<half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                   const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                       const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, asynchronously; src-size 0 zero-fills the destination when !pred.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Plain shared-memory accesses, written through these so that the emulator's race checker sees them.
template <class T>
__device__ __forceinline__ T ld_shared(const T* p) {
  return *p;
}
template <class T>
__device__ __forceinline__ void st_shared(T* p, const T& v) {
  *p = v;
}

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(e));
}
}  // namespace vk

#define VK_DYNAMIC_SHARED(T, name)                                      \
  extern __shared__ __align__(16) unsigned char vk_dynamic_smem_raw_[]; \
  T* name = reinterpret_cast<T*>(vk_dynamic_smem_raw_)

// Launch with <<<>>>; above 48 KiB of dynamic shared memory the kernel is opted in first.
#define VK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                       \
  do {                                                                                                \
    if ((smem_bytes) > 48 * 1024)                                                                     \
      cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(smem_bytes)); \
    (kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__);                               \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The host emulation build (g++ -DVK_EMULATE).
// ---------------------------------------------------------------------------------------------
#else
#include "emulator.h"
#endif
