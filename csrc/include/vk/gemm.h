// Parameters of the one GEMM template (csrc/gemm/gemm.cuh) and of the LayerNorm statistics kernel.
//
//   out = epilogue(A @ W^T),  A: (M, K) produced by an operand loader, W: (N, K) row-major (a
//   torch Linear / flattened Conv2d weight), fp32 accumulation.
//
// Loaders (how A's tiles reach shared memory):
//   dense      A[m, k] = a[m * lda + k]
//   layernorm  A[m, k] = (a[m * lda + k] - mean[m]) * rstd[m] * norm_weight[k] + norm_bias[k], rounded to T
//              (mean/rstd from row_stats; norm_weight/norm_bias may be null)
//   patch      A[b * P + py * grid_w + px, c * p * p + i * p + j] =
//              image[b, c, py * p + i, px * p + j] read through img_stride (any layout: NCHW, NHWC, ...)
//   patch_u8   the patch gather from a uint8 image, each pixel normalized in fp32 as it loads and rounded to T:
//              A[., k] = image[...] * pixel_scale[c] + pixel_shift[c]  (c = k / (p * p);
//              pixel_scale = 1 / (255 std), pixel_shift = -mean / std: (x / 255 - mean) / std)
// Epilogues (v = acc + bias[n], bias may be null):
//   rows       v = gelu(v) when act != none; v *= layer_scale[n]; v += residual[m * ldr + n];
//              out[m * ldo + n] = v        (layer_scale, residual may be null)
//   qkv        m = b * tokens + t, n = which * inner + h * head_dim + d (inner = heads * head_dim):
//              out[which, b, h, t, d] = v * (which == 0 ? q_scale : 1)   -- a contiguous (3, B, H, tokens, hd)
//   patch      m = b * P + i: out[b, prefix + i, n] = v + pos_embed[prefix + i, n]; and the class token
//              rows out[b, 0, n] = cls_token[n] + pos_embed[0, n] when cls_token is given (prefix = 1)
//              -- a contiguous (B, prefix + P, N); pos_embed may be null
// Types: T = float, vk::half or vk::bfloat16 for every tensor operand but the patch_u8 image (uint8);
// mean/rstd and pixel_scale/pixel_shift are float.
// 16-bit T: tensor cores (mma.sync m16n8k16 via ldmatrix). T = float: an fp32 FMA path on CUDA cores
// with the same tiling, smem layout and epilogues (exact fp32 products, fp32 accumulation; no TF32).
#pragma once
#include <cstdint>

#include "vk/dtype.h"
#include "vk/port.h"

namespace vk {

enum class ALoad : int { dense = 0, layernorm = 1, patch = 2, patch_u8 = 3 };
enum class Epi : int { rows = 0, qkv = 1, patch = 2 };
enum class Act : int { none = 0, gelu_erf = 1, gelu_tanh = 2 };

struct GemmParams {
  int M = 0, N = 0, K = 0;
  // A operand
  const void* a = nullptr;  // dense / layernorm: (M, K) rows, row stride lda elements, unit column stride
  int64_t lda = 0;
  const float* mean = nullptr;            // (M,) row statistics (row_stats)
  const float* rstd = nullptr;            // (M,)
  const void* norm_weight = nullptr;      // (K,) or null
  const void* norm_bias = nullptr;        // (K,) or null
  int64_t img_stride[4] = {0, 0, 0, 0};   // patch: element strides of the (B, C, H, W) image tensor
  int patch = 0, grid_h = 0, grid_w = 0;  // patch: p, H / p, W / p; K = C * p * p; M = B * grid_h * grid_w
  const float* pixel_scale = nullptr;     // patch_u8: (C,) 1 / (255 std[c])
  const float* pixel_shift = nullptr;     // patch_u8: (C,) -mean[c] / std[c]
  // W operand: (N, K) rows, row stride ldw elements
  const void* w = nullptr;
  int64_t ldw = 0;
  // epilogue
  const void* bias = nullptr;  // (N,) or null
  Act act = Act::none;
  const void* layer_scale = nullptr;  // rows: (N,) or null
  const void* residual = nullptr;     // rows: (M, N) with row stride ldr, or null
  int64_t ldr = 0;
  void* out = nullptr;
  int64_t ldo = 0;                          // rows: row stride of out
  int tokens = 0, heads = 0, head_dim = 0;  // qkv
  float q_scale = 1.0f;                     // qkv
  const void* pos_embed = nullptr;          // patch: (prefix + P, N) or null
  const void* cls_token = nullptr;          // patch: (N,) or null
};

// Tile configuration: 0 = small (64x64x32, 4 warps), 1 = large (128x128x32, 8 warps), -1 = choose by size.
void gemm(const GemmParams& p, DType dtype, ALoad loader, Epi epilogue, int config, stream_t stream);

// Row statistics: per-row mean and 1/sqrt(var + eps) (biased variance, two passes) of x: (rows, dim),
// row stride ld (csrc/layernorm/row_stats.cu).
void row_stats(DType dtype, const void* x, int64_t rows, int dim, int64_t ld, float eps, float* mean, float* rstd,
               stream_t stream);

}  // namespace vk
