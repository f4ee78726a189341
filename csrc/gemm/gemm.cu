// The GEMM entry point: picks the element type and the tile configuration.
#include "gemm.cuh"

namespace vk {

void gemm(const GemmParams& p, DType dtype, ALoad loader, Epi epi, int config, stream_t stream) {
  if (p.M <= 0 || p.N <= 0) return;
  if (config < 0) {
    // the large tile once it still gives about one block per SM of an H100 (132); below that the
    // small tile spreads the work over more blocks
    const long long large_tiles = (long long)((p.M + 127) / 128) * ((p.N + 127) / 128);
    config = large_tiles >= 132 ? 1 : 0;
  }
  switch (dtype) {
    case DType::kFloat32: return gemm_detail::gemm_typed<float>(p, loader, epi, config, stream);
    case DType::kFloat16: return gemm_detail::gemm_typed<half>(p, loader, epi, config, stream);
    case DType::kBFloat16: return gemm_detail::gemm_typed<bfloat16>(p, loader, epi, config, stream);
  }
  throw std::runtime_error("vk::gemm: unknown dtype");
}

}  // namespace vk
