// Attention statistics from the row log-sum-exp (see stats.h). Compiled by nvcc for the GPU and,
// through csrc/emulation/attention_stats.cpp, by the host compiler for the emulator.
#include "stats.h"
#include "vk/warp.h"

#include <stdexcept>
#include <string>

namespace vk {
namespace attn {

namespace {

constexpr int kWarps = 8;  // query rows per 256-thread block

// scale * q . k in fp32 over head_dim (the q row and one k row)
template <class T>
__device__ __forceinline__ float dot_row(const T* q, const T* k, int64_t head_dim) {
  float s = 0.f;
  for (int64_t d = 0; d < head_dim; ++d) s += to_float(q[d]) * to_float(k[d]);
  return s;
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32) attention_probs_kernel(StatsArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t r = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (r >= a.num_rows) return;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t i = a.rows[r];
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1];
  const float lse = a.lse[bh * a.q_tokens + i];
  T* out = static_cast<T*>(a.out) + (bh * a.num_rows + r) * a.kv_tokens;
  for (int64_t j = lane; j < a.kv_tokens; j += 32)
    out[j] = from_float<T>(expf(a.scale * dot_row(q, k + j * a.k_stride[2], a.head_dim) - lse));
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32) attention_distance_kernel(StatsArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t patches = a.q_tokens - a.prefix;
  const int64_t pi = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32;  // query patch
  if (pi >= patches) return;                                           // whole warps leave together
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t i = a.prefix + pi;
  const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1];
  const float lse = a.lse[bh * a.q_tokens + i];
  const float qr = float(pi / a.grid_w), qc = float(pi % a.grid_w);
  float acc = 0.f;
  for (int64_t pj = lane; pj < patches; pj += 32) {
    const float p = expf(a.scale * dot_row(q, k + (a.prefix + pj) * a.k_stride[2], a.head_dim) - lse);
    const float dr = qr - float(pj / a.grid_w), dc = qc - float(pj % a.grid_w);
    acc += p * sqrtf(dr * dr + dc * dc) * a.patch_size;
  }
  acc = warp_sum(acc);
  if (lane == 0) static_cast<float*>(a.out)[bh * patches + pi] = acc;
}

void check(const StatsArgs& a, int64_t rows, const char* what) {
  if (!a.q || !a.k || !a.lse || !a.out) throw std::invalid_argument(std::string(what) + ": null q, k, lse or out");
  if (a.batch * a.heads > 0x7fffffffLL)
    throw std::invalid_argument("q: batch*heads=" + std::to_string(a.batch * a.heads) + " is past 2^31 - 1");
  if ((rows + kWarps - 1) / kWarps > 65535)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(rows) + " rows are past the limit of " +
                                std::to_string(65535LL * kWarps));
}

template <class T>
void launch(const StatsArgs& a, bool distance, vk::stream_t stream) {
  const int64_t rows = distance ? a.q_tokens - a.prefix : a.num_rows;
  dim3 grid((unsigned)(a.batch * a.heads), (unsigned)((rows + kWarps - 1) / kWarps), 1);
  if (distance) {
    auto kernel = attention_distance_kernel<T>;
    VK_LAUNCH(kernel, grid, kWarps * 32, 0, stream, a);
    check_launch("vk::attn::attention_distance");
  } else {
    auto kernel = attention_probs_kernel<T>;
    VK_LAUNCH(kernel, grid, kWarps * 32, 0, stream, a);
    check_launch("vk::attn::attention_probs");
  }
}

void dispatch(const StatsArgs& a, bool distance, vk::stream_t stream) {
  switch (a.dtype) {
    case DType::kFloat16: return launch<vk::half>(a, distance, stream);
    case DType::kBFloat16: return launch<vk::bfloat16>(a, distance, stream);
    case DType::kFloat32: return launch<float>(a, distance, stream);
  }
  throw std::invalid_argument("dtype: expected float16, bfloat16 or float32");
}

}  // namespace

void attention_probs(const StatsArgs& a, vk::stream_t stream) {
  if (a.batch == 0 || a.heads == 0 || a.num_rows == 0 || a.kv_tokens == 0) return;
  check(a, a.num_rows, "attention_probs");
  if (!a.rows) throw std::invalid_argument("rows: null");
  dispatch(a, false, stream);
}

void attention_distance(const StatsArgs& a, vk::stream_t stream) {
  if (a.prefix < 0 || a.grid_w < 1 || a.q_tokens < a.prefix || a.kv_tokens != a.q_tokens)
    throw std::invalid_argument("grid: expected 0 <= prefix <= tokens, grid_w >= 1 and as many keys as queries");
  if (a.batch == 0 || a.heads == 0 || a.q_tokens == a.prefix) return;
  check(a, a.q_tokens - a.prefix, "attention_distance");
  dispatch(a, true, stream);
}

}  // namespace attn
}  // namespace vk
