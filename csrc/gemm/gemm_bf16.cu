// GEMM instantiations for T = bfloat16 (every loader/epilogue pair, both tile configurations).
#include "gemm.cuh"

namespace vk {
namespace gemm_detail {
VK_GEMM_INSTANTIATE(bfloat16)
}  // namespace gemm_detail
}  // namespace vk
