// Flash-attention forward: the launcher's declaration and its arguments.
//
// Included by csrc/bindings.cpp (torch side) and by flash_fwd.cu (kernel side); no torch types. The kernel itself is in flash_fwd.cuh, the instantiations
// and the launcher in flash_fwd.cu.
#pragma once

#include <cstdint>

#include "vk/port.h"  // vk::stream_t: cudaStream_t on the GPU, ignored by the host emulator

namespace vk {
namespace attn {

// The head dims the kernel is compiled for: the ONE list of instantiations. A runtime head_dim
// (a multiple of 8, at most the last entry) runs in the smallest listed one that holds it, the
// columns past head_dim masked (zero-filled on load, not stored).
#define VK_ATTN_HEAD_DIMS(X) X(32) X(64) X(72) X(80) X(96) X(128)

enum class Dtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Strides are in elements, in the order (batch, head, token, channel), int64.
struct FlashFwdArgs {
  const void* q = nullptr;     // (batch, heads, q_tokens, head_dim)
  const void* k = nullptr;     // (batch, heads, kv_tokens, head_dim)
  const void* v = nullptr;     // (batch, heads, kv_tokens, head_dim)
  void* o = nullptr;           // (batch, heads, q_tokens, head_dim) as given by o_stride, e.g.
                               //   (batch, q_tokens, heads*head_dim) with o_stride = (N*H*hd, hd, H*hd, 1)
  float* lse = nullptr;        // (batch, heads, q_tokens) fp32 contiguous, natural log; may be null
  const float* amax = nullptr; // Float32 only: device pointer to (3, batch, heads) floats, the max finite
                               //   |q|, |k|, |v| of each (batch, head) slice (the power-of-two
                               //   pre-scaling of the fp16 split, see flash_fwd.cuh)
  int64_t batch = 0, heads = 0, q_tokens = 0, kv_tokens = 0, head_dim = 0;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t o_stride[4] = {0, 0, 0, 0};
  float scale = 1.0f;          // softmax(scale * q k^T)
  Dtype dtype = Dtype::kFloat16;  // of q, k, v and o
};

// The instantiated head dims, ascending (for messages and for Python: flash_attention_head_dims).
int num_head_dims();
int head_dim_at(int i);

// Which instantiation runs a runtime head_dim: the smallest listed >= head_dim, or -1 if none.
int head_dim_instance(int64_t head_dim);

// Launch on `stream`. Throws std::invalid_argument (naming the argument) for a head_dim no
// instantiation holds, sizes past the kernel's limits, or a missing pointer. Sizes of zero
// launch nothing (kv_tokens == 0 with q_tokens > 0 is rejected: softmax over no keys).
void flash_attention_forward(const FlashFwdArgs& args, vk::stream_t stream);

// Dynamic shared memory and threads per block of one instantiation (for reports and tests).
int64_t flash_attention_smem_bytes(Dtype dtype, int head_dim_instance);

}  // namespace attn
}  // namespace vk
