// Flash-attention forward kernel (FlashAttention-2 style), sm_80 and later.
//
//   O = softmax(scale * Q K^T) V     per (batch, head), non-causal, any token counts
//   LSE = log(sum_j exp(scale * q.k_j))  per query row, fp32, natural log (for a backward pass)
//
// One thread block = 4 warps = 64 query rows (16 per warp); it walks the keys in tiles of
// kBlockN, keeping a running row max m and row sum l (online softmax in the log2 domain, exp2f).
//   - Q, K, V tiles go global -> shared with cp.async (16 bytes, zero-filled past the last token
//     and past head_dim) in FlashAttention-2's order: V_j loads while S_j = Q K_j^T computes,
//     K_{j+1} loads while P_j V_j computes. One K buffer; V reuses Q's buffer (Q stays in registers).
//     Inputs whose rows are not 16-byte aligned or whose channels are strided take a plain
//     element-wise load into the same shared tiles (no copy of the tensor is made).
//   - S = Q K^T and O += P V run on tensor cores: mma.sync m16n8k16, fp32 accumulation, operands
//     from shared memory through ldmatrix (.trans for V). Q's fragments stay in registers. P is
//     re-packed from the S accumulators straight into A fragments (no trip through shared).
//   - The output is written straight from the accumulators through (batch, head, token, channel)
//     strides, so (B, H, N, hd) and (B, N, H*hd) are the same code.
//   - head_dim: the kernel is compiled for kHeadDim (see VK_ATTN_HEAD_DIMS) and masks columns
//     past the runtime head_dim; kHeadDim not a multiple of 16 (72) pads the Q K^T reduction to
//     the next 16 with zeros in shared memory.
//
// fp32 inputs (the stated method): every fp32 operand x is split into two fp16 values,
// hi = fp16(x * 2^e), lo = fp16(x * 2^e - hi), and each product uses three fp16 MMAs
// (lo*hi + hi*lo + hi*hi, fp32 accumulation; lo*lo is dropped). The power of two 2^e is chosen
// per (batch, head) slice of each tensor from the max of its finite |x| (args.amax, a device
// pointer, so there is no host sync) so that the largest finite |x * 2^e| lies in [2^13, 2^14):
// nothing finite overflows fp16 and nothing normal underflows. Per slice, not per tensor: a NaN
// or Inf (or a huge value) in one sample must not change the scale, and so the result, of the
// others (one per-tensor scale made every other sample's |v| ~ 1e5 overflow fp16 to NaN);
// P (in [0, 1]) is scaled by 2^12 the same way. The scales are undone exactly in fp32. Each
// operand keeps ~22 significant bits, so the result is within a few fp32 ulps of an fp32 FMA
// computation, at 3x the tensor-core work and twice the shared memory (hi and lo tiles).
#pragma once

#include <cstdint>
#include <type_traits>

#include "vk/port.h"
#include "flash_fwd.h"

namespace vk {
namespace attn {

// The 16-bit type of the MMAs: fp16 for fp16 (and for fp32, split into fp16 pairs), bf16 for bf16.
template <typename T>
struct MmaTypeOf {
  using type = vk::half;
};
template <>
struct MmaTypeOf<vk::bfloat16> {
  using type = vk::bfloat16;
};

// Every compile-time choice of one instantiation, in one place.
template <typename T, int kHeadDim_>
struct FlashFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim % 8 == 0 && kHeadDim >= 16 && kHeadDim <= 128, "head dim: multiple of 8, 16..128");
  static constexpr bool kSplit = std::is_same<T, float>::value;  // fp32 via fp16 hi/lo pairs
  using MmaT = typename MmaTypeOf<T>::type;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;                          // query rows per block
  static constexpr int kBlockN = (kSplit && kHeadDim > 64) ? 32 : 64;  // keys per tile
  static constexpr int kHeadDimPad = (kHeadDim + 15) / 16 * 16;        // reduction dim of Q K^T
  static constexpr int kKSteps = kHeadDimPad / 16;                     // k16 steps of Q K^T
  static constexpr int kNTilesS = kBlockN / 8;                         // n8 tiles of S
  static constexpr int kNTilesO = kHeadDim / 8;                        // n8 tiles of O
  // shared row pitch in elements: +16 bytes makes the 8 rows of every ldmatrix hit distinct banks
  static constexpr int kPitch = kHeadDimPad + 8;
  static constexpr int kParts = kSplit ? 2 : 1;  // hi (and lo) copy of each shared tile
  static constexpr int kQElems = kParts * kBlockM * kPitch;
  static constexpr int kKVElems = kParts * kBlockN * kPitch;  // one K or V buffer
  // V's buffer reuses Q's: Q lives in registers once the first K tile has landed.
  static_assert(kKVElems <= kQElems, "V's tile must fit in Q's");
  static constexpr int kSmemBytes = (int)sizeof(MmaT) * (kQElems + kKVElems);
  static constexpr int kPExp = 12;  // split path: P is multiplied by 2^kPExp
};

// log2(e) and ln(2): scores go to the log2 domain for exp2f, the LSE comes back to natural log.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;

// What the kernel receives: the launcher's arguments plus what the launcher derived from them.
struct FlashFwdParams {
  FlashFwdArgs args;
  float score_mul;  // scale * log2(e): scores go to the log2 domain for exp2f
  bool in_vec;      // q, k, v rows are 16-byte aligned with unit channel stride: cp.async path
  bool out_vec;     // o pairs are 2-element aligned with unit channel stride: paired stores
};

// The power of two e with max|x| * 2^e in [2^13, 2^14); 0 for 0, inf or nan.
__device__ __forceinline__ int split_exponent(float amax) {
  if (!(amax > 0.f && amax < INFINITY)) return 0;
  int e = 0;
  frexpf(amax, &e);  // amax = f * 2^e, f in [0.5, 1)
  e = 14 - e;
  return e < -60 ? -60 : (e > 60 ? 60 : e);
}

// x0, x1 -> fp16 pairs hi (rounded x) and lo (rounded remainder), lo element in bits 0-15.
// A NaN or +-Inf x goes to lo whole, with hi 0: the only product it then enters is a cross term with
// the other operand's hi (which has that operand's sign), so an Inf stays an Inf of eager's sign;
// split as (Inf, Inf - Inf = NaN) it would turn every product it enters into NaN.
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  float h0 = vk::to_float(vk::from_float<vk::half>(x0));
  float h1 = vk::to_float(vk::from_float<vk::half>(x1));
  if (!(fabsf(h0) < INFINITY)) h0 = 0.f;
  if (!(fabsf(h1) < INFINITY)) h1 = 0.f;
  hi = vk::pack2<vk::half>(h0, h1);
  lo = vk::pack2<vk::half>(x0 - h0, x1 - h1);
}

// Rows [row0, row0 + kRows) of one (batch, head) slice -> shared tile(s) of kPitch-element rows.
// Rows >= n_rows and columns >= head_dim (up to kHeadDimPad) are zero-filled.
// src: the slice's first element; row_stride/col_stride in elements. pow2: split path scale.
template <typename Tr, int kRows, typename T>
__device__ __forceinline__ void load_tile(typename Tr::MmaT* dst, const T* src, int64_t row_stride, int64_t col_stride,
                                          int row0, int n_rows, int head_dim, bool vec, float pow2) {
  using M = typename Tr::MmaT;
  constexpr int kChunksPerRow = Tr::kHeadDimPad / 8;  // 8 elements = 16 bytes of MmaT
  constexpr int kChunks = kRows * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += Tr::kThreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const bool pred = row0 + r < n_rows && col < head_dim;
    const T* g = src + (pred ? (int64_t)(row0 + r) * row_stride + (int64_t)col * col_stride : 0);
    M* s = dst + r * Tr::kPitch + col;
    if constexpr (!Tr::kSplit) {
      if (vec) {
        vk::cp_async_16(s, g, pred);
      } else {
        const M zero = vk::from_float<M>(0.f);
#pragma unroll
        for (int i = 0; i < 8; ++i) vk::st_shared(s + i, pred ? g[i * col_stride] : zero);
      }
    } else {
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = 0.f;
      if (pred) {
        if (vec) {
          const float* ga = static_cast<const float*>(__builtin_assume_aligned(g, 16));
#pragma unroll
          for (int i = 0; i < 8; ++i) x[i] = ga[i];
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) x[i] = g[i * col_stride];
        }
      }
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) split_pack(x[2 * i] * pow2, x[2 * i + 1] * pow2, hi[i], lo[i]);
      uint32_t* s_hi = reinterpret_cast<uint32_t*>(s);
      uint32_t* s_lo = reinterpret_cast<uint32_t*>(s + kRows * Tr::kPitch);  // the lo copy follows
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        vk::st_shared(s_hi + i, hi[i]);
        vk::st_shared(s_lo + i, lo[i]);
      }
    }
  }
}

// One ldmatrix.x4 of B (per part) holds two n8 B fragments: registers 0-1 are the first n8 tile's
// (b0), registers 2-3 the second's (b1).
template <int kParts>
__device__ __forceinline__ void unpack_b_fragments(const uint32_t (&x4)[kParts][4], uint32_t (&b0)[kParts][2],
                                                   uint32_t (&b1)[kParts][2]) {
#pragma unroll
  for (int part = 0; part < kParts; ++part) {
    b0[part][0] = x4[part][0];
    b0[part][1] = x4[part][1];
    b1[part][0] = x4[part][2];
    b1[part][1] = x4[part][3];
  }
}

// d += a * b on tensor cores; the split path adds the cross terms first.
template <typename Tr>
__device__ __forceinline__ void mma_parts(float (&d)[4], const uint32_t (&a)[Tr::kParts][4],
                                          const uint32_t (&b)[Tr::kParts][2]) {
  using M = typename Tr::MmaT;
  if constexpr (Tr::kSplit) {
    vk::mma_m16n8k16<M>(d, a[1], b[0], d);
    vk::mma_m16n8k16<M>(d, a[0], b[1], d);
  }
  vk::mma_m16n8k16<M>(d, a[0], b[0], d);
}

// grid: (batch * heads, ceil(q_tokens / kBlockM)); block: kThreads; dynamic shared: kSmemBytes.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FlashFwdTraits<T, kHeadDim>::kThreads) flash_fwd_kernel(const FlashFwdParams p) {
  using Tr = FlashFwdTraits<T, kHeadDim>;
  using M = typename Tr::MmaT;
  constexpr int kParts = Tr::kParts, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kPitch;

  VK_DYNAMIC_SHARED(M, sQ);  // [kParts][kBlockM][kPitch]
  M* sK = sQ + Tr::kQElems;  // [kParts][kBlockN][kPitch]
  // V: [kParts][kBlockN][kPitch] in Q's tile, free once Q's fragments are in registers
  M* sV = sQ;

  const FlashFwdArgs& a = p.args;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates: row group, thread in group
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int m0 = blockIdx.y * kBlockM;
  const int q_n = (int)a.q_tokens, kv_n = (int)a.kv_tokens, hd = (int)a.head_dim;

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1];
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1];
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride[0] + h * a.v_stride[1];
  T* o = static_cast<T*>(a.o) + b * a.o_stride[0] + h * a.o_stride[1];

  float q_pow2 = 1.f, k_pow2 = 1.f, v_pow2 = 1.f, score_mul = p.score_mul, out_mul = 1.f;
  if constexpr (Tr::kSplit) {
    const int64_t slices = a.batch * a.heads;  // amax: (3, batch, heads)
    const int eq = split_exponent(a.amax[bh]), ek = split_exponent(a.amax[slices + bh]);
    const int ev = split_exponent(a.amax[2 * slices + bh]);
    q_pow2 = ldexpf(1.f, eq);
    k_pow2 = ldexpf(1.f, ek);
    v_pow2 = ldexpf(1.f, ev);
    score_mul = p.score_mul * ldexpf(1.f, -(eq + ek));
    out_mul = ldexpf(1.f, -(ev + Tr::kPExp));
  }

  auto load_k = [&](int tile) {
    load_tile<Tr, kBlockN>(sK, k, a.k_stride[2], a.k_stride[3], tile * kBlockN, kv_n, hd, p.in_vec, k_pow2);
  };
  auto load_v = [&](int tile) {
    load_tile<Tr, kBlockN>(sV, v, a.v_stride[2], a.v_stride[3], tile * kBlockN, kv_n, hd, p.in_vec, v_pow2);
  };

  // Prologue: Q and the first K tile, then Q's A fragments into registers; from then on Q's shared
  // tile holds V (its first load is issued after the next barrier, which every warp reaches after
  // its ldmatrix of Q).
  load_tile<Tr, kBlockM>(sQ, q, a.q_stride[2], a.q_stride[3], m0, q_n, hd, p.in_vec, q_pow2);
  load_k(0);
  vk::cp_async_commit();
  vk::cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[Tr::kKSteps][kParts][4];
#pragma unroll
  for (int kk = 0; kk < Tr::kKSteps; ++kk)
#pragma unroll
    for (int part = 0; part < kParts; ++part)
      vk::ldmatrix_x4(qf[kk][part],
                      sQ + part * kBlockM * kPitch + (warp * 16 + (lane & 15)) * kPitch + kk * 16 + (lane >> 4) * 8);

  float acc_o[Tr::kNTilesO][4];
#pragma unroll
  for (int nt = 0; nt < Tr::kNTilesO; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_o[nt][i] = 0.f;
  float m_row[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of rows g and g + 8
  float l_row[2] = {0.f, 0.f};              // running sum of exp2(s - m) over this thread's columns

  // One K and one V buffer, FlashAttention-2's order: V_j loads while S_j computes, K_{j+1} loads
  // while P_j V_j computes. (Synchronous loads, fp32 or unaligned inputs, take the same steps.)
  const int n_tiles = (kv_n + kBlockN - 1) / kBlockN;
  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * kBlockN;
    vk::cp_async_wait<0>();
    __syncthreads();  // K_j landed for every thread; every warp is done reading V_{j-1}
    load_v(j);
    vk::cp_async_commit();
    const M* k_s = sK;
    const M* v_s = sV;

    // S = Q K^T: 16 rows x kBlockN keys per warp, fp32.
    float s[Tr::kNTilesS][4];
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesS; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Tr::kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < Tr::kNTilesS / 2; ++np) {
        // ldmatrix x4: keys [16np, +8) then [16np + 8, +8), each at columns [16kk, +8), [16kk + 8, +8)
        uint32_t kb[kParts][4];
#pragma unroll
        for (int part = 0; part < kParts; ++part)
          vk::ldmatrix_x4(kb[part], k_s + part * kBlockN * kPitch + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * kPitch +
                                        kk * 16 + ((lane >> 3) & 1) * 8);
        uint32_t b0[kParts][2], b1[kParts][2];
        unpack_b_fragments<kParts>(kb, b0, b1);
        mma_parts<Tr>(s[2 * np], qf[kk], b0);
        mma_parts<Tr>(s[2 * np + 1], qf[kk], b1);
      }
    }

    // Online softmax. Thread holds columns n0 + 8nt + 2t + {0, 1} of rows g (i = 0, 1) and g + 8 (i = 2, 3).
    const bool partial = n0 + kBlockN > kv_n;
    float mx[2] = {m_row[0], m_row[1]};
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesS; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[nt][i] * score_mul;
        if (partial && n0 + nt * 8 + 2 * t + (i & 1) >= kv_n) x = -INFINITY;  // keys past the end
        s[nt][i] = x;
        mx[i >> 1] = fmaxf(mx[i >> 1], x);
      }
    float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      alpha[r] = exp2f(m_row[r] - mx[r]);  // 0 on the first tile (m_row = -inf; mx is finite)
      m_row[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesS; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - m_row[i >> 1]);
        rs[i >> 1] += s[nt][i];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_row[r] = l_row[r] * alpha[r] + rs[r];
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesO; ++nt) {
      acc_o[nt][0] *= alpha[0];
      acc_o[nt][1] *= alpha[0];
      acc_o[nt][2] *= alpha[1];
      acc_o[nt][3] *= alpha[1];
    }

    vk::cp_async_wait<0>();
    __syncthreads();  // V_j landed for every thread; every warp is done reading K_j
    if (j + 1 < n_tiles) load_k(j + 1);
    vk::cp_async_commit();

    // O += P V. The S accumulators of n-tiles 2kk, 2kk + 1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[kParts][4];
      if constexpr (Tr::kSplit) {
        constexpr float kP = (float)(1 << Tr::kPExp);
        split_pack(s[2 * kk][0] * kP, s[2 * kk][1] * kP, pa[0][0], pa[1][0]);
        split_pack(s[2 * kk][2] * kP, s[2 * kk][3] * kP, pa[0][1], pa[1][1]);
        split_pack(s[2 * kk + 1][0] * kP, s[2 * kk + 1][1] * kP, pa[0][2], pa[1][2]);
        split_pack(s[2 * kk + 1][2] * kP, s[2 * kk + 1][3] * kP, pa[0][3], pa[1][3]);
      } else {
        pa[0][0] = vk::pack2<M>(s[2 * kk][0], s[2 * kk][1]);
        pa[0][1] = vk::pack2<M>(s[2 * kk][2], s[2 * kk][3]);
        pa[0][2] = vk::pack2<M>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[0][3] = vk::pack2<M>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      // ldmatrix .trans rows: keys 16kk + [0, 8) for lanes 0-7 (and 16-23), 16kk + [8, 16) for 8-15 (24-31)
      const M* v_row = v_s + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kPitch;
#pragma unroll
      for (int np = 0; np < Tr::kNTilesO / 2; ++np) {
        uint32_t vb[kParts][4];
#pragma unroll
        for (int part = 0; part < kParts; ++part)
          vk::ldmatrix_x4_trans(vb[part], v_row + part * kBlockN * kPitch + np * 16 + (lane >> 4) * 8);
        uint32_t b0[kParts][2], b1[kParts][2];
        unpack_b_fragments<kParts>(vb, b0, b1);
        mma_parts<Tr>(acc_o[2 * np], pa, b0);
        mma_parts<Tr>(acc_o[2 * np + 1], pa, b1);
      }
      if constexpr (Tr::kNTilesO % 2 == 1) {  // head dim 72, ...: the last n8 tile alone
        constexpr int nt = Tr::kNTilesO - 1;
        uint32_t b0[kParts][2];
#pragma unroll
        for (int part = 0; part < kParts; ++part)
          vk::ldmatrix_x2_trans(b0[part], v_row + part * kBlockN * kPitch + nt * 8);
        mma_parts<Tr>(acc_o[nt], pa, b0);
      }
    }
  }

  // Epilogue: finish the row sums across the 4 threads of a row, normalize, store, keep the LSE.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 1);
    l_row[r] += __shfl_xor_sync(0xffffffffu, l_row[r], 2);
    inv[r] = out_mul / l_row[r];
  }
  const int64_t os_n = a.o_stride[2], os_d = a.o_stride[3];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= q_n) continue;
    T* o_row = o + (int64_t)row * os_n;
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesO; ++nt) {
      const int col = nt * 8 + 2 * t;
      if (col >= hd) continue;
      const float x0 = acc_o[nt][2 * r] * inv[r], x1 = acc_o[nt][2 * r + 1] * inv[r];
      T* dst = o_row + (int64_t)col * os_d;
      if constexpr (Tr::kSplit) {
        dst[0] = x0;
        dst[os_d] = x1;
      } else if (p.out_vec) {
        *reinterpret_cast<uint32_t*>(dst) = vk::pack2<T>(x0, x1);
      } else {
        dst[0] = vk::from_float<T>(x0);
        dst[os_d] = vk::from_float<T>(x1);
      }
    }
    if (a.lse != nullptr && t == 0) a.lse[bh * q_n + row] = (m_row[r] + log2f(l_row[r])) * kLn2;
  }
}

}  // namespace attn
}  // namespace vk
