// Attention statistics from the flash kernel's row log-sum-exp: declarations (no torch types).
//
// p_ij = exp(scale * q_i . k_j - lse_i), exact, with lse the row log-sum-exp the flash kernel keeps
// (flash_fwd.h, FlashFwdArgs::lse). Two launchers:
//   attention_probs:    the probabilities of chosen query rows, (batch, heads, rows, kv_tokens);
//                       every row gives the full weights.
//   attention_distance: sum_j p_ij * |pos_i - pos_j| (pixels) per query patch, prefix tokens left out
//                       as keys, (batch, heads, patches) fp32; the tokens x tokens matrix is never written.
// CUDA cores, fp32 arithmetic: one warp per query row, lanes over the keys (each lane a whole dot
// product), so the loops have no synchronisation. For analysis, not for the hot path.
#pragma once

#include <cstdint>

#include "vk/dtype.h"
#include "vk/port.h"

namespace vk {
namespace attn {

struct StatsArgs {
  const void* q = nullptr;        // (batch, heads, q_tokens, head_dim), strides q_stride, unit last stride
  const void* k = nullptr;        // (batch, heads, kv_tokens, head_dim), strides k_stride, unit last stride
  const float* lse = nullptr;     // (batch, heads, q_tokens) fp32 contiguous, natural log
  const int32_t* rows = nullptr;  // probs: (num_rows,) query row of each output row
  void* out = nullptr;            // probs: (batch, heads, num_rows, kv_tokens) contiguous, q's dtype;
                                  // distance: (batch, heads, q_tokens - prefix) fp32 contiguous
  int64_t batch = 0, heads = 0, q_tokens = 0, kv_tokens = 0, head_dim = 0, num_rows = 0;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t prefix = 0, grid_w = 1;  // distance: prefix tokens, patches per grid row
  float scale = 1.0f, patch_size = 1.0f;
  DType dtype = DType::kFloat16;
};

void attention_probs(const StatsArgs& a, vk::stream_t stream);
void attention_distance(const StatsArgs& a, vk::stream_t stream);

}  // namespace attn
}  // namespace vk
