// Row statistics (for LayerNorm): mean[r] and rstd[r] = 1 / sqrt(var[r] + eps) of x: (rows, dim), row stride
// ld, biased variance. One warp per row, two passes over the row (mean shifted by the row's first
// element and summed in fp64, then the centred sum of squares in fp32: no cancellation); 8 rows per
// 256-thread block.
// The GEMM's layernorm loader applies them as the activations load.
#include "vk/gemm.h"
#include "vk/port.h"
#include "vk/warp.h"

namespace vk {
namespace {

constexpr int kRowsPerBlock = 8;

template <class T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    row_stats_kernel(const T* x, int64_t rows, int dim, int64_t ld, float eps, float* mean, float* rstd) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const T* r = x + row * ld;
  // mean = first + mean(x - first), summed in fp64: for a row of large mean and small spread the
  // differences are exact and small, so their sum keeps its bits (a plain fp32 sum loses the spread, and a
  // constant row gets a nonzero x - mean that 1/sqrt(eps) then magnifies); fp64 keeps the sum exact when
  // |first| is far above the mean (an fp32 sum of x - first errs by ~eps_fp32 * |first|, which LayerNorm's
  // z in a channel near the mean, times a large gamma and W, shows), so mu is the mean rounded once.
  const double first = dim > 0 ? double(to_float(r[0])) : 0.0;
  double s = 0.0;
  for (int k = lane; k < dim; k += 32) s += double(to_float(r[k])) - first;
  const float mu = float(first + warp_sum(s) / double(dim));
  float q = 0.f;
  for (int k = lane; k < dim; k += 32) {
    const float d = to_float(r[k]) - mu;
    q += d * d;
  }
  const float var = warp_sum(q) / float(dim);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rsqrtf(var + eps);
  }
}

template <class T>
void launch(const void* x, int64_t rows, int dim, int64_t ld, float eps, float* mean, float* rstd, stream_t stream) {
  const unsigned blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  auto kernel = row_stats_kernel<T>;
  VK_LAUNCH(kernel, blocks, kRowsPerBlock * 32, 0, stream, static_cast<const T*>(x), rows, dim, ld, eps, mean, rstd);
  check_launch("vk::row_stats");
}

}  // namespace

void row_stats(DType dtype, const void* x, int64_t rows, int dim, int64_t ld, float eps, float* mean, float* rstd,
               stream_t stream) {
  if (rows <= 0) return;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, rows, dim, ld, eps, mean, rstd, stream);
    case DType::kFloat16: return launch<half>(x, rows, dim, ld, eps, mean, rstd, stream);
    case DType::kBFloat16: return launch<bfloat16>(x, rows, dim, ld, eps, mean, rstd, stream);
  }
}

}  // namespace vk
