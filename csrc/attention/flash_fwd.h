// Flash-attention forward: the launcher's declaration and its arguments.
//
// Included by csrc/bindings/bind_ops.cpp (torch side) and by flash_fwd.cu (kernel side); no torch types. The kernel
// itself is in flash_fwd.cuh, the instantiations and the launcher in flash_fwd.cu.
#pragma once

#include <cstdint>
#include <string>

#include "vk/dtype.h"  // vk::DType
#include "vk/port.h"   // vk::stream_t: cudaStream_t on the GPU, ignored by the host emulator

namespace vk {
namespace attn {

// The head dims the kernel is compiled for: the ONE list of instantiations. A runtime head_dim
// (a multiple of 8 from kMinHeadDim to the last entry) runs in the smallest listed one that holds it,
// the columns past head_dim masked (zero-filled on load, not stored).
#define VK_ATTN_HEAD_DIMS(X) X(32) X(64) X(72) X(80) X(96) X(128)

// Strides are in elements, in the order (batch, head, token, channel), int64.
struct FlashFwdArgs {
  const void* q = nullptr;      // (batch, heads, q_tokens, head_dim)
  const void* k = nullptr;      // (batch, heads, kv_tokens, head_dim)
  const void* v = nullptr;      // (batch, heads, kv_tokens, head_dim)
  void* o = nullptr;            // (batch, heads, q_tokens, head_dim) as given by o_stride, e.g.
                                //   (batch, q_tokens, heads*head_dim) with o_stride = (N*H*hd, hd, H*hd, 1)
  float* lse = nullptr;         // (batch, heads, q_tokens) fp32 contiguous, natural log; may be null
  const float* amax = nullptr;  // Float32 only: device pointer to (3, batch, heads) floats, the max finite
                                //   |q|, |k|, |v| of each (batch, head) slice (the power-of-two
                                //   pre-scaling of the fp16 split, see flash_fwd.cuh)
  int64_t batch = 0, heads = 0, q_tokens = 0, kv_tokens = 0, head_dim = 0;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t o_stride[4] = {0, 0, 0, 0};
  float scale = 1.0f;             // softmax(scale * q k^T)
  DType dtype = DType::kFloat16;  // of q, k, v and o
};

// The instantiated head dims, ascending (for messages and for Python: flash_attention_head_dims).
#define VK_ATTN_LIST_ENTRY(HD) HD,
inline constexpr int kHeadDims[] = {VK_ATTN_HEAD_DIMS(VK_ATTN_LIST_ENTRY)};
#undef VK_ATTN_LIST_ENTRY
inline constexpr int kNumHeadDims = int(sizeof(kHeadDims) / sizeof(kHeadDims[0]));

// The smallest head_dim taken: the rule of every fused attention kernel of the package (Python's
// vit_kernels.checks.head_dim_unsupported, whose "cuda" bounds are kMinHeadDim and the last of kHeadDims;
// tests/test_attention.py checks that both agree for head_dim 1..256).
inline constexpr int kMinHeadDim = 16;

// Which instantiation runs a runtime head_dim: the smallest listed >= head_dim, or -1 if none (head_dim
// not a multiple of 8, below kMinHeadDim or past the largest). Header-only: the bindings of both builds
// and the launcher apply this one rule, compiled into each of them, before anything launches.
constexpr int head_dim_instance(int64_t head_dim) {
  if (head_dim < kMinHeadDim || head_dim % 8 != 0) return -1;
  for (int hd : kHeadDims)
    if (hd >= head_dim) return hd;
  return -1;
}

// "32, 64, ..." for messages.
inline std::string head_dims_text() {
  std::string s;
  for (int i = 0; i < kNumHeadDims; ++i) s += (i ? ", " : "") + std::to_string(kHeadDims[i]);
  return s;
}

// The one message for a head_dim no instantiation holds (the bindings' RuntimeError, the launcher's
// std::invalid_argument).
inline std::string head_dim_error(int64_t head_dim) {
  return "head_dim: expected a multiple of 8 from " + std::to_string(kMinHeadDim) + " to " +
         std::to_string(kHeadDims[kNumHeadDims - 1]) + " (compiled: " + head_dims_text() + "), got " +
         std::to_string(head_dim);
}

// Launch on `stream`. Throws std::invalid_argument (naming the argument) for a head_dim no
// instantiation holds, sizes past the kernel's limits, or a missing pointer. Sizes of zero
// launch nothing (kv_tokens == 0 with q_tokens > 0 is rejected: softmax over no keys).
void flash_attention_forward(const FlashFwdArgs& args, vk::stream_t stream);

// Dynamic shared memory and threads per block of one instantiation (for reports and tests).
int64_t flash_attention_smem_bytes(DType dtype, int head_dim_instance);

}  // namespace attn
}  // namespace vk
