// Flash-attention forward: the instantiations (VK_ATTN_HEAD_DIMS x {fp16, bf16, fp32}) and the
// launcher. Compiled by nvcc for the GPU and, through csrc/emulation/attention.cpp, by the host
// compiler for the emulator.
#include "flash_fwd.cuh"

#include <stdexcept>
#include <string>

namespace vk {
namespace attn {

namespace {

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// True when dims of size > 1 have strides that are multiples of `multiple` (size-1 dims are
// never stepped along, so their strides do not matter).
bool strides_multiple_of(const int64_t (&stride)[4], const int64_t (&size)[4], int64_t multiple) {
  for (int i = 0; i < 3; ++i)
    if (size[i] > 1 && stride[i] % multiple != 0) return false;
  return true;
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int kHeadDim>
void launch(const FlashFwdParams& p, vk::stream_t stream) {
  using Tr = FlashFwdTraits<T, kHeadDim>;
  const FlashFwdArgs& a = p.args;
  const int64_t m_blocks = (a.q_tokens + Tr::kBlockM - 1) / Tr::kBlockM;
  if (m_blocks > 65535)
    throw std::invalid_argument("q: q_tokens=" + std::to_string(a.q_tokens) + " is past the kernel's limit of " +
                                std::to_string(65535LL * Tr::kBlockM) + " tokens");
  dim3 grid((unsigned)(a.batch * a.heads), (unsigned)m_blocks, 1);
  dim3 block(Tr::kThreads, 1, 1);
  // (a macro argument cannot hold the template's comma); VK_LAUNCH opts in above 48 KiB of shared memory
  auto flash_fwd = flash_fwd_kernel<T, kHeadDim>;
  VK_LAUNCH(flash_fwd, grid, block, Tr::kSmemBytes, stream, p);
  vk::check_launch("flash_attention_forward");
}

template <typename T>
void launch_head_dim(int instance, const FlashFwdParams& p, vk::stream_t stream) {
  switch (instance) {
#define VK_ATTN_CASE(HD) \
  case HD: return launch<T, HD>(p, stream);
    VK_ATTN_HEAD_DIMS(VK_ATTN_CASE)
#undef VK_ATTN_CASE
    default: throw std::invalid_argument("head_dim: no instantiation " + std::to_string(instance));
  }
}

template <typename T>
int64_t smem_bytes_of(int instance) {
  switch (instance) {
#define VK_ATTN_CASE(HD) \
  case HD: return FlashFwdTraits<T, HD>::kSmemBytes;
    VK_ATTN_HEAD_DIMS(VK_ATTN_CASE)
#undef VK_ATTN_CASE
    default: return -1;
  }
}

}  // namespace

int64_t flash_attention_smem_bytes(DType dtype, int instance) {
  switch (dtype) {
    case DType::kFloat16: return smem_bytes_of<vk::half>(instance);
    case DType::kBFloat16: return smem_bytes_of<vk::bfloat16>(instance);
    case DType::kFloat32: return smem_bytes_of<float>(instance);
  }
  return -1;
}

void flash_attention_forward(const FlashFwdArgs& a, vk::stream_t stream) {
  const int instance = head_dim_instance(a.head_dim);
  if (instance < 0) throw std::invalid_argument(head_dim_error(a.head_dim));
  if (a.batch < 0 || a.heads < 0 || a.q_tokens < 0 || a.kv_tokens < 0)
    throw std::invalid_argument("flash_attention_forward: negative size");
  if (a.batch == 0 || a.heads == 0 || a.q_tokens == 0) return;
  if (a.kv_tokens == 0) throw std::invalid_argument("k: kv_tokens must be at least 1 (softmax over no keys), got 0");
  if (a.batch * a.heads > 0x7fffffffLL)
    throw std::invalid_argument("q: batch*heads=" + std::to_string(a.batch * a.heads) + " is past 2^31 - 1");
  if (a.q_tokens > 0x7fffffffLL || a.kv_tokens > 0x7fffffffLL)
    throw std::invalid_argument("q/k: token counts must be below 2^31");
  if (!a.q || !a.k || !a.v || !a.o) throw std::invalid_argument("flash_attention_forward: null q, k, v or o");
  if (a.dtype == DType::kFloat32 && !a.amax)
    throw std::invalid_argument(
        "amax: required for float32 inputs ((3, batch, heads) max finite |q|, |k|, |v| on the device)");

  FlashFwdParams p;
  p.args = a;
  p.score_mul = a.scale * kLog2e;
  const int64_t es = element_size(a.dtype);
  const int64_t chunk = 16 / es;  // elements per 16-byte load
  const int64_t q_size[4] = {a.batch, a.heads, a.q_tokens, a.head_dim};
  const int64_t kv_size[4] = {a.batch, a.heads, a.kv_tokens, a.head_dim};
  p.in_vec = a.q_stride[3] == 1 && a.k_stride[3] == 1 && a.v_stride[3] == 1 && aligned(a.q, 16) && aligned(a.k, 16) &&
             aligned(a.v, 16) && strides_multiple_of(a.q_stride, q_size, chunk) &&
             strides_multiple_of(a.k_stride, kv_size, chunk) && strides_multiple_of(a.v_stride, kv_size, chunk);
  p.out_vec = a.o_stride[3] == 1 && aligned(a.o, 2 * es) && strides_multiple_of(a.o_stride, q_size, 2);

  switch (a.dtype) {
    case DType::kFloat16: return launch_head_dim<vk::half>(instance, p, stream);
    case DType::kBFloat16: return launch_head_dim<vk::bfloat16>(instance, p, stream);
    case DType::kFloat32: return launch_head_dim<float>(instance, p, stream);
  }
  throw std::invalid_argument("dtype: expected float16, bfloat16 or float32");
}

}  // namespace attn
}  // namespace vk
