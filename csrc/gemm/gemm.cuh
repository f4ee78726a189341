// The one GEMM template: out = epilogue(A @ W^T) with pluggable A loaders and epilogues
// (see vk/gemm.h for what each loader and epilogue computes).
//
// Structure (per thread block of Cfg::kThreads threads, a kBlockM x kBlockN tile of out):
//   * a kStages-deep ring of shared-memory tiles A[kBlockM][kBlockK], W[kBlockN][kBlockK], rows padded by 16 bytes so
//   that
//     ldmatrix reads of 8 rows hit 8 distinct bank groups;
//   * dense tiles arrive with cp.async (16 bytes, zero-filled outside the matrix) when the rows are
//     16-byte aligned, otherwise -- and for the layernorm and patch loaders (uint8 images too), which
//     transform or gather -- through registers (load, convert to fp32, transform, round to T, 16-byte st.shared);
//     plain shared-memory accesses go through vk::ld_shared / vk::st_shared (the emulator's race checker);
//   * the warp tile kWarpM x kWarpN is kMTiles x kNTiles mma tiles of 16 x 8; per 16-wide k step each warp loads its A
//     fragments with ldmatrix.x4 and its W fragments with ldmatrix.x4 (two n8 tiles at once; W rows are
//     k-contiguous, which is the "col" layout mma wants, so no .trans), then kMTiles * kNTiles mma.m16n8k16;
//   * T = float takes the same tiles and accumulator layout but multiplies on CUDA cores in fp32;
//   * the epilogue sees each accumulator with its (row, col) and writes it where its mode says.
#pragma once
#include "vk/gemm.h"
#include "vk/port.h"

namespace vk {
namespace gemm_detail {

template <int kBlockM_, int kBlockN_, int kBlockK_, int kWarpM_, int kWarpN_, int kStages_>
struct TileCfg {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kBlockK = kBlockK_, kWarpM = kWarpM_, kWarpN = kWarpN_,
                       kStages = kStages_;
  static constexpr int kWarpsM = kBlockM / kWarpM, kWarpsN = kBlockN / kWarpN, kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
  static_assert(kBlockM % kWarpM == 0 && kBlockN % kWarpN == 0 && kWarpM % 16 == 0 && kWarpN % 16 == 0 &&
                    kBlockK % 16 == 0,
                "tile shape");
};
using SmallCfg = TileCfg<64, 64, 32, 32, 32, 3>;
using LargeCfg = TileCfg<128, 128, 32, 64, 32, 3>;

template <class T, class C>
struct Layout {
  static constexpr int kChunk = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kPitch = C::kBlockK + kChunk;  // smem row stride (elements), +16 bytes of padding
  static constexpr int kAElems = C::kBlockM * kPitch, kWElems = C::kBlockN * kPitch;
  static constexpr int kStageElems = kAElems + kWElems;
  static constexpr size_t kSmemBytes = size_t(kStageElems) * C::kStages * sizeof(T);
};

// Round kChunk fp32 values to T and store them as one 16-byte chunk.
template <class T>
__device__ __forceinline__ void store_chunk(T* dst, const float* v) {
  if constexpr (sizeof(T) == 4) {
    st_shared(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
  } else {
    uint4 u;
    u.x = pack2<T>(v[0], v[1]);
    u.y = pack2<T>(v[2], v[3]);
    u.z = pack2<T>(v[4], v[5]);
    u.w = pack2<T>(v[6], v[7]);
    st_shared(reinterpret_cast<uint4*>(dst), u);
  }
}

// kChunk values src[0..kChunk) as fp32; elements at or past `valid` are 0. vec: one 16-byte load (src aligned).
template <class T>
__device__ __forceinline__ void load_values(const T* src, int valid, bool vec, float* v) {
  constexpr int kChunk = 16 / int(sizeof(T));
  if (vec && valid >= kChunk) {
    const uint4 u = *reinterpret_cast<const uint4*>(src);
    T t[kChunk];
    memcpy(t, &u, 16);  // not a pointer cast: T and uint4 must not alias
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = to_float(t[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) v[e] = e < valid ? to_float(src[e]) : 0.f;
  }
}

// One kBlockM x kBlockK (A) or kBlockN x kBlockK (W) tile of a dense row-major (rows, K) matrix into shared memory.
template <class T, class C, int kRows>
__device__ __forceinline__ void load_dense_tile(T* s, const T* g, int64_t ld, int rows, int K, int r0, int k0,
                                                bool vec) {
  using L = Layout<T, C>;
  constexpr int kChunksPerRow = C::kBlockK / L::kChunk, kChunks = kRows * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += C::kThreads) {
    const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * L::kChunk;
    const int row = r0 + r, k = k0 + kc;
    T* dst = s + r * L::kPitch + kc;
    const bool in = row < rows && k < K;
    const T* src = in ? g + int64_t(row) * ld + k : g;
    if (vec) {
      cp_async_16(dst, src, in);  // K % kChunk == 0: a chunk is all in or all out
    } else {
      float v[L::kChunk];
      load_values<T>(src, in ? K - k : 0, false, v);
      store_chunk<T>(dst, v);
    }
  }
}

template <class T, class C>
__device__ __forceinline__ void load_layernorm_tile(T* s, const GemmParams& p, int m0, int k0, bool vec) {
  using L = Layout<T, C>;
  constexpr int kChunksPerRow = C::kBlockK / L::kChunk, kChunks = C::kBlockM * kChunksPerRow;
  const T* a = static_cast<const T*>(p.a);
  const T* lw = static_cast<const T*>(p.norm_weight);
  const T* lb = static_cast<const T*>(p.norm_bias);
  for (int c = threadIdx.x; c < kChunks; c += C::kThreads) {
    const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * L::kChunk;
    const int m = m0 + r, k = k0 + kc;
    float v[L::kChunk];
    if (m < p.M && k < p.K) {
      const int valid = p.K - k;
      load_values<T>(a + int64_t(m) * p.lda + k, valid, vec, v);
      const float mean = p.mean[m], rstd = p.rstd[m];
#pragma unroll
      for (int e = 0; e < L::kChunk; ++e) {
        if (e < valid) {
          float y = (v[e] - mean) * rstd;
          if (lw) y *= to_float(lw[k + e]);
          if (lb) y += to_float(lb[k + e]);
          v[e] = y;
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < L::kChunk; ++e) v[e] = 0.f;
    }
    store_chunk<T>(s + r * L::kPitch + kc, v);
  }
}

// vec: the image's W stride is 1, p and every other stride are multiples of kChunk and the base is 16-byte
// aligned, so kChunk consecutive k stay in one image row and form one aligned 16-byte chunk.
template <class T, class C>
__device__ __forceinline__ void load_patch_tile(T* s, const GemmParams& p, int m0, int k0, bool vec) {
  using L = Layout<T, C>;
  constexpr int kChunksPerRow = C::kBlockK / L::kChunk, kChunks = C::kBlockM * kChunksPerRow;
  const T* img = static_cast<const T*>(p.a);
  const int P = p.grid_h * p.grid_w, pp = p.patch * p.patch;
  for (int c = threadIdx.x; c < kChunks; c += C::kThreads) {
    const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * L::kChunk;
    const int m = m0 + r, k = k0 + kc;
    T* dst = s + r * L::kPitch + kc;
    const bool in = m < p.M && k < p.K;
    int64_t base = 0;
    if (in) {
      const int b = m / P, pi = m % P, py = pi / p.grid_w, px = pi % p.grid_w;
      base = int64_t(b) * p.img_stride[0] + int64_t(py) * p.patch * p.img_stride[2] +
             int64_t(px) * p.patch * p.img_stride[3];
    }
    if (vec) {
      int64_t off = 0;
      if (in) {
        const int ch = k / pp, rem = k % pp, i = rem / p.patch, j = rem % p.patch;
        off = base + int64_t(ch) * p.img_stride[1] + int64_t(i) * p.img_stride[2] + j;
      }
      cp_async_16(dst, img + off, in);
    } else {
      float v[L::kChunk];
#pragma unroll
      for (int e = 0; e < L::kChunk; ++e) {
        const int kk = k + e;
        if (in && kk < p.K) {
          const int ch = kk / pp, rem = kk % pp, i = rem / p.patch, j = rem % p.patch;
          v[e] = to_float(
              img[base + int64_t(ch) * p.img_stride[1] + int64_t(i) * p.img_stride[2] + int64_t(j) * p.img_stride[3]]);
        } else {
          v[e] = 0.f;
        }
      }
      store_chunk<T>(dst, v);
    }
  }
}

// uint8 images (ALoad::patch_u8): the same gather, each pixel normalized in fp32 as it loads,
// x * pixel_scale[c] + pixel_shift[c] = (x / 255 - mean[c]) / std[c], then rounded to T (as
// ((x / 255 - mean) / std).to(T) before a Conv2d). vec: the conditions of load_patch_tile in bytes, so the kChunk
// consecutive k of a chunk are kChunk aligned bytes of one image row of one channel: one 8-byte (16-bit T) or
// 4-byte (float) load.
template <class T, class C>
__device__ __forceinline__ void load_patch_u8_tile(T* s, const GemmParams& p, int m0, int k0, bool vec) {
  using L = Layout<T, C>;
  constexpr int kChunksPerRow = C::kBlockK / L::kChunk, kChunks = C::kBlockM * kChunksPerRow;
  const uint8_t* img = static_cast<const uint8_t*>(p.a);
  const int P = p.grid_h * p.grid_w, pp = p.patch * p.patch;
  for (int c = threadIdx.x; c < kChunks; c += C::kThreads) {
    const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * L::kChunk;
    const int m = m0 + r, k = k0 + kc;
    float v[L::kChunk];
#pragma unroll
    for (int e = 0; e < L::kChunk; ++e) v[e] = 0.f;
    if (m < p.M && k < p.K) {
      const int b = m / P, pi = m % P, py = pi / p.grid_w, px = pi % p.grid_w;
      const int64_t base = int64_t(b) * p.img_stride[0] + int64_t(py) * p.patch * p.img_stride[2] +
                           int64_t(px) * p.patch * p.img_stride[3];
      if (vec) {
        const int ch = k / pp, rem = k % pp, i = rem / p.patch, j = rem % p.patch;
        const uint8_t* src = img + base + int64_t(ch) * p.img_stride[1] + int64_t(i) * p.img_stride[2] + j;
        uint8_t px8[L::kChunk];
        if constexpr (L::kChunk == 8) {
          const uint2 u = *reinterpret_cast<const uint2*>(src);
          memcpy(px8, &u, 8);
        } else {
          const uint32_t u = *reinterpret_cast<const uint32_t*>(src);
          memcpy(px8, &u, 4);
        }
        const float scale = p.pixel_scale[ch], shift = p.pixel_shift[ch];
#pragma unroll
        for (int e = 0; e < L::kChunk; ++e) v[e] = float(px8[e]) * scale + shift;
      } else {
#pragma unroll
        for (int e = 0; e < L::kChunk; ++e) {
          const int kk = k + e;
          if (kk < p.K) {
            const int ch = kk / pp, rem = kk % pp, i = rem / p.patch, j = rem % p.patch;
            const uint8_t x =
                img[base + int64_t(ch) * p.img_stride[1] + int64_t(i) * p.img_stride[2] + int64_t(j) * p.img_stride[3]];
            v[e] = float(x) * p.pixel_scale[ch] + p.pixel_shift[ch];
          }
        }
      }
    }
    store_chunk<T>(s + r * L::kPitch + kc, v);
  }
}

__device__ __forceinline__ float gelu(float v, Act act) {
  if (act == Act::gelu_erf) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  if (act == Act::gelu_tanh) {
    const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(u));
  }
  return v;
}

// The epilogue for one accumulator element out(row, col), row < M, col < N.
template <class T, Epi kEpi>
__device__ __forceinline__ void epilogue(const GemmParams& p, int row, int col, float v) {
  if (p.bias) v += to_float(static_cast<const T*>(p.bias)[col]);
  T* out = static_cast<T*>(p.out);
  if constexpr (kEpi == Epi::rows) {
    v = gelu(v, p.act);
    if (p.layer_scale) v *= to_float(static_cast<const T*>(p.layer_scale)[col]);
    if (p.residual) v += to_float(static_cast<const T*>(p.residual)[int64_t(row) * p.ldr + col]);
    out[int64_t(row) * p.ldo + col] = from_float<T>(v);
  } else if constexpr (kEpi == Epi::qkv) {
    const int inner = p.heads * p.head_dim, batch = p.M / p.tokens;
    const int b = row / p.tokens, t = row % p.tokens;
    const int which = col / inner, rem = col % inner, h = rem / p.head_dim, d = rem % p.head_dim;
    if (which == 0) v *= p.q_scale;
    const int64_t idx = ((int64_t(which * batch + b) * p.heads + h) * p.tokens + t) * p.head_dim + d;
    out[idx] = from_float<T>(v);
  } else {  // patch tokens
    const int P = p.grid_h * p.grid_w, prefix = p.cls_token ? 1 : 0;
    const int b = row / P, i = row % P;
    if (p.pos_embed) v += to_float(static_cast<const T*>(p.pos_embed)[int64_t(prefix + i) * p.N + col]);
    out[(int64_t(b) * (prefix + P) + prefix + i) * p.N + col] = from_float<T>(v);
  }
}

template <class T, class C, ALoad kLoad, Epi kEpi>
__global__ void __launch_bounds__(C::kThreads, 1) gemm_kernel(GemmParams p, bool a_vec, bool w_vec) {
  using L = Layout<T, C>;
  VK_DYNAMIC_SHARED(T, smem);
  const int m0 = blockIdx.y * C::kBlockM, n0 = blockIdx.x * C::kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / C::kWarpsN) * C::kWarpM, wn0 = (warp % C::kWarpsN) * C::kWarpN;
  const int k_tiles = (p.K + C::kBlockK - 1) / C::kBlockK;

  auto load_stage = [&](int stage, int kt) {
    T* sA = smem + stage * L::kStageElems;
    T* sB = sA + L::kAElems;
    const int k0 = kt * C::kBlockK;
    if constexpr (kLoad == ALoad::dense)
      load_dense_tile<T, C, C::kBlockM>(sA, static_cast<const T*>(p.a), p.lda, p.M, p.K, m0, k0, a_vec);
    else if constexpr (kLoad == ALoad::layernorm)
      load_layernorm_tile<T, C>(sA, p, m0, k0, a_vec);
    else if constexpr (kLoad == ALoad::patch)
      load_patch_tile<T, C>(sA, p, m0, k0, a_vec);
    else
      load_patch_u8_tile<T, C>(sA, p, m0, k0, a_vec);
    load_dense_tile<T, C, C::kBlockN>(sB, static_cast<const T*>(p.w), p.ldw, p.N, p.K, n0, k0, w_vec);
  };

  float acc[C::kMTiles][C::kNTiles][4];
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < C::kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage kt is complete for everyone; stage kt-1 is free again
    const int next = kt + C::kStages - 1;
    if (next < k_tiles) load_stage(next % C::kStages, next);
    cp_async_commit();

    const T* sA = smem + (kt % C::kStages) * L::kStageElems;
    const T* sB = sA + L::kAElems;
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int kk = 0; kk < C::kBlockK; kk += 16) {
        uint32_t af[C::kMTiles][4], bf[C::kNTiles][2];
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i) {
          // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
          const int row = wm0 + i * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
          ldmatrix_x4(af[i], sA + row * L::kPitch + kk + 8 * (lane / 16));
        }
#pragma unroll
        for (int j = 0; j < C::kNTiles; j += 2) {
          // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
          const int n = wn0 + j * 8 + (lane % 8) + 8 * (lane / 16);
          uint32_t r[4];
          ldmatrix_x4(r, sB + n * L::kPitch + kk + 8 * ((lane / 8) % 2));
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i)
#pragma unroll
          for (int j = 0; j < C::kNTiles; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j], acc[i][j]);
      }
    } else {
      // fp32: the mma accumulator layout computed on CUDA cores (row g / g+8, cols 2t / 2t+1)
      const int g = lane / 4, t = lane % 4;
#pragma unroll 4
      for (int k = 0; k < C::kBlockK; ++k) {
        float a[C::kMTiles][2], b[C::kNTiles][2];
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i) {
          a[i][0] = to_float(ld_shared(&sA[(wm0 + i * 16 + g) * L::kPitch + k]));
          a[i][1] = to_float(ld_shared(&sA[(wm0 + i * 16 + g + 8) * L::kPitch + k]));
        }
#pragma unroll
        for (int j = 0; j < C::kNTiles; ++j) {
          b[j][0] = to_float(ld_shared(&sB[(wn0 + j * 8 + 2 * t) * L::kPitch + k]));
          b[j][1] = to_float(ld_shared(&sB[(wn0 + j * 8 + 2 * t + 1) * L::kPitch + k]));
        }
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i)
#pragma unroll
          for (int j = 0; j < C::kNTiles; ++j) {
            acc[i][j][0] += a[i][0] * b[j][0];
            acc[i][j][1] += a[i][0] * b[j][1];
            acc[i][j][2] += a[i][1] * b[j][0];
            acc[i][j][3] += a[i][1] * b[j][1];
          }
      }
    }
  }
  cp_async_wait<0>();

  // accumulator element e of tile (i, j): row g + 8 * (e / 2), col 2 * t + e % 2 (PTX C/D layout)
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < C::kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = m0 + wm0 + i * 16 + g + 8 * (e / 2), col = n0 + wn0 + j * 8 + 2 * t + e % 2;
        if (row < p.M && col < p.N) epilogue<T, kEpi>(p, row, col, acc[i][j][e]);
      }

  if constexpr (kEpi == Epi::patch) {
    // the class token rows, written by the first row of blocks: out[b, 0, n] = cls[n] + pos[0, n]
    if (p.cls_token && blockIdx.y == 0) {
      const int P = p.grid_h * p.grid_w, batch = p.M / P;
      const T* cls = static_cast<const T*>(p.cls_token);
      const T* pos = static_cast<const T*>(p.pos_embed);
      T* out = static_cast<T*>(p.out);
      for (int idx = threadIdx.x; idx < batch * C::kBlockN; idx += C::kThreads) {
        const int b = idx / C::kBlockN, n = n0 + idx % C::kBlockN;
        if (n < p.N) {
          float v = to_float(cls[n]);
          if (pos) v += to_float(pos[n]);
          out[int64_t(b) * (P + 1) * p.N + n] = from_float<T>(v);
        }
      }
    }
  }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

template <class T, class C, ALoad kLoad, Epi kEpi>
void launch(const GemmParams& p, stream_t stream) {
  using L = Layout<T, C>;
  constexpr int kChunk = L::kChunk;
  const bool w_vec = p.K % kChunk == 0 && p.ldw % kChunk == 0 && aligned16(p.w);
  bool a_vec;
  if constexpr (kLoad == ALoad::patch || kLoad == ALoad::patch_u8) {
    // patch_u8 reads kChunk bytes per chunk: a base aligned to kChunk bytes is enough
    const bool base_aligned = kLoad == ALoad::patch ? aligned16(p.a) : (reinterpret_cast<uintptr_t>(p.a) % kChunk) == 0;
    a_vec = p.img_stride[3] == 1 && p.patch % kChunk == 0 && p.img_stride[0] % kChunk == 0 &&
            p.img_stride[1] % kChunk == 0 && p.img_stride[2] % kChunk == 0 && base_aligned;
  } else {
    a_vec = p.K % kChunk == 0 && p.lda % kChunk == 0 && aligned16(p.a);
  }
  const dim3 grid((p.N + C::kBlockN - 1) / C::kBlockN, (p.M + C::kBlockM - 1) / C::kBlockM);
  auto kernel = gemm_kernel<T, C, kLoad, kEpi>;
  VK_LAUNCH(kernel, grid, C::kThreads, L::kSmemBytes, stream, p, a_vec, w_vec);
  check_launch("vk::gemm");
}

// Every (loader, epilogue) pair the ops use, for one T and one tile configuration.
template <class T, class C>
void dispatch(const GemmParams& p, ALoad loader, Epi epi, stream_t stream) {
  if (loader == ALoad::dense && epi == Epi::rows) return launch<T, C, ALoad::dense, Epi::rows>(p, stream);
  if (loader == ALoad::layernorm && epi == Epi::rows) return launch<T, C, ALoad::layernorm, Epi::rows>(p, stream);
  if (loader == ALoad::dense && epi == Epi::qkv) return launch<T, C, ALoad::dense, Epi::qkv>(p, stream);
  if (loader == ALoad::layernorm && epi == Epi::qkv) return launch<T, C, ALoad::layernorm, Epi::qkv>(p, stream);
  if (loader == ALoad::patch && epi == Epi::patch) return launch<T, C, ALoad::patch, Epi::patch>(p, stream);
  if (loader == ALoad::patch_u8 && epi == Epi::patch) return launch<T, C, ALoad::patch_u8, Epi::patch>(p, stream);
  throw std::runtime_error("vk::gemm: unsupported loader/epilogue pair (" + std::to_string(int(loader)) + ", " +
                           std::to_string(int(epi)) + ")");
}

// Defined (instantiated) in gemm_<dtype>.cu, one file per T so they compile in parallel.
template <class T>
void gemm_typed(const GemmParams& p, ALoad loader, Epi epi, int config, stream_t stream);

#define VK_GEMM_INSTANTIATE(T)                                                                  \
  template <>                                                                                   \
  void gemm_typed<T>(const GemmParams& p, ALoad loader, Epi epi, int config, stream_t stream) { \
    if (config == 1)                                                                            \
      dispatch<T, LargeCfg>(p, loader, epi, stream);                                            \
    else                                                                                        \
      dispatch<T, SmallCfg>(p, loader, epi, stream);                                            \
  }

}  // namespace gemm_detail
}  // namespace vk
