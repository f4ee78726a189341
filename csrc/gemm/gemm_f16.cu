// GEMM instantiations for T = half (every loader/epilogue pair, both tile configurations).
#include "gemm.cuh"

namespace vk {
namespace gemm_detail {
VK_GEMM_INSTANTIATE(half)
}  // namespace gemm_detail
}  // namespace vk
