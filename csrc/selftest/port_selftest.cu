// Self-tests of vk/port.h: tiny kernels that exercise one feature each. They compile for the GPU too,
// so the same checks can compare the emulator with the hardware.
#include "vk/kernels.h"
#include "vk/port.h"

namespace vk {

// One warp, one mma.m16n8k16: a (16, 16) row-major, b (8, 16) row-major (n, k), c and d (16, 8),
// all 16-bit inputs given as raw bits. Fragments are built by hand from the PTX ISA layouts.
template <class T>
__global__ void selftest_mma_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    ra[r] = uint32_t(a[row * 16 + col]) | (uint32_t(a[row * 16 + col + 1]) << 16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    rb[r] = uint32_t(b[g * 16 + k]) | (uint32_t(b[g * 16 + k + 1]) << 16);
  }
  for (int i = 0; i < 4; ++i) rc[i] = c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = rd[i];
}

// One warp: copy src (rows of 8 16-bit values; 8 * count rows) to shared memory, ldmatrix it and
// write every lane's registers: out[lane * 4 + j] = register j.
__global__ void selftest_ldmatrix_kernel(const uint16_t* src, int count, int trans, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < count * 64; i += 32) tile[i] = src[i];
  __syncwarp();
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* row = tile + 8 * (lane % (8 * count));
  if (!trans) {
    if (count == 1) ldmatrix_x1(r, row);
    if (count == 2) ldmatrix_x2(r, row);
    if (count == 4) ldmatrix_x4(r, row);
  } else {
    if (count == 1) ldmatrix_x1_trans(r, row);
    if (count == 2) ldmatrix_x2_trans(r, row);
    if (count == 4) ldmatrix_x4_trans(r, row);
  }
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// Tree sum of x[0:blockDim.x] in shared memory; with barrier = 0 the __syncthreads are left out.
__global__ void selftest_block_sum_kernel(const float* x, float* out, int barrier) {
  VK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  st_shared(s + t, x[blockIdx.x * blockDim.x + t]);
  if (barrier) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) st_shared(s + t, ld_shared(s + t) + ld_shared(s + t + stride));
    if (barrier) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = ld_shared(s);
}

// Warp sums with __shfl_xor_sync, and votes: out[warp] = sum, ballots[warp] = ballot(x > 0),
// anys/alls[warp] = any/all(x > 0). Also atomicAdd of every x into *total.
__global__ void selftest_warp_kernel(const float* x, float* sums, uint32_t* ballots, int* anys, int* alls,
                                     float* total) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x, w = t >> 5;
  const float v = x[t];
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const uint32_t b = __ballot_sync(0xffffffffu, v > 0.f);
  const int any = __any_sync(0xffffffffu, v > 0.f), all = __all_sync(0xffffffffu, v > 0.f);
  atomicAdd(total, v);
  if ((threadIdx.x & 31) == 0) {
    sums[w] = s;
    ballots[w] = b;
    anys[w] = any;
    alls[w] = all;
  }
}

void selftest_mma(bool bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d, stream_t stream) {
  if (bf16) {
    auto k = selftest_mma_kernel<bfloat16>;
    VK_LAUNCH(k, 1, 32, 0, stream, a, b, c, d);
  } else {
    auto k = selftest_mma_kernel<half>;
    VK_LAUNCH(k, 1, 32, 0, stream, a, b, c, d);
  }
  check_launch("selftest_mma");
}

void selftest_ldmatrix(const uint16_t* src, int count, bool trans, uint32_t* out, stream_t stream) {
  VK_LAUNCH(selftest_ldmatrix_kernel, 1, 32, 0, stream, src, count, trans ? 1 : 0, out);
  check_launch("selftest_ldmatrix");
}

void selftest_block_sum(const float* x, float* out, int blocks, int threads, bool barrier, stream_t stream) {
  VK_LAUNCH(selftest_block_sum_kernel, blocks, threads, threads * sizeof(float), stream, x, out, barrier ? 1 : 0);
  check_launch("selftest_block_sum");
}

void selftest_warp(const float* x, int warps, float* sums, uint32_t* ballots, int* anys, int* alls, float* total,
                   stream_t stream) {
  VK_LAUNCH(selftest_warp_kernel, warps, 32, 0, stream, x, sums, ballots, anys, alls, total);
  check_launch("selftest_warp");
}

}  // namespace vk
