// GEMM instantiations for T = float (every loader/epilogue pair, both tile configurations).
#include "gemm.cuh"

namespace vk {
namespace gemm_detail {
VK_GEMM_INSTANTIATE(float)
}  // namespace gemm_detail
}  // namespace vk
