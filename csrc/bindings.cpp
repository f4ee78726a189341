// The one file with torch headers: argument checks and pybind11 bindings of the csrc launchers.
// Built twice: for the GPU (with the .cu sources, nvcc) and for the host emulator (-DVK_EMULATE,
// with csrc/emulation/*.cpp). Kernels and launchers never see torch types.
//
// Sections: helpers | selftests of vk/port.h | LayerNorm statistics + GEMM (CUDA-core)
//           | attention (CUDA-attention) | module definition.
#include <torch/extension.h>

#ifndef VK_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "vk/kernels.h"

namespace {

// ---------------------------------------------------------------------------------------- helpers
#ifdef VK_EMULATE
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

// Checks that `t` lives where this build runs kernels (CPU for the emulator, CUDA for the GPU build).
void check_device(const at::Tensor& t, const char* name) {
  if (kEmulated) {
    TORCH_CHECK(t.device().is_cpu(), name, ": the host-emulation build runs on CPU tensors, got one on ", t.device());
  } else {
    TORCH_CHECK(t.is_cuda(), name, ": the GPU build runs on CUDA tensors, got one on ", t.device());
  }
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, bool contiguous = true) {
  check_device(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  if (contiguous) TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

vk::stream_t stream_of(const at::Tensor& t) {
#ifdef VK_EMULATE
  (void)t;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}

// Makes t's device current for the launch (GPU build); nothing on the host.
struct DeviceGuard {
#ifndef VK_EMULATE
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
#else
  explicit DeviceGuard(const at::Tensor&) {}
#endif
};

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <class T>
const T* cptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

// ------------------------------------------------------------------------ selftests of vk/port.h
// a: (16, 16) int16 bits, b: (8, 16) int16 bits (n, k), c: (16, 8) float32 -> d: (16, 8) float32
at::Tensor selftest_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  check(a, "a", at::kShort);
  check(b, "b", at::kShort);
  check(c, "c", at::kFloat);
  TORCH_CHECK(a.numel() == 256 && b.numel() == 128 && c.numel() == 128, "selftest_mma: expected 16x16, 8x16, 16x8");
  DeviceGuard g(a);
  auto d = at::full({16, 8}, std::nan(""), c.options());
  vk::selftest_mma(bf16, ptr<uint16_t>(a), ptr<uint16_t>(b), ptr<float>(c), ptr<float>(d), stream_of(a));
  return d;
}

// src: (8 * count, 8) int16 -> (32, 4) int32 registers per lane
at::Tensor selftest_ldmatrix(const at::Tensor& src, int64_t count, bool trans) {
  check(src, "src", at::kShort);
  TORCH_CHECK(count == 1 || count == 2 || count == 4, "count: expected 1, 2 or 4, got ", count);
  TORCH_CHECK(src.numel() == 64 * count, "src: expected ", 64 * count, " elements");
  DeviceGuard g(src);
  auto out = at::zeros({32, 4}, src.options().dtype(at::kInt));
  vk::selftest_ldmatrix(ptr<uint16_t>(src), (int)count, trans, ptr<uint32_t>(out), stream_of(src));
  return out;
}

// x: (blocks, threads) float32 -> (blocks,) sums by a shared-memory tree
at::Tensor selftest_block_sum(const at::Tensor& x, bool barrier) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "x: expected (blocks, threads)");
  const int threads = (int)x.size(1);
  TORCH_CHECK(threads >= 1 && threads <= 1024 && (threads & (threads - 1)) == 0, "x: threads must be a power of two <= 1024");
  DeviceGuard g(x);
  auto out = at::full({x.size(0)}, std::nan(""), x.options());
  vk::selftest_block_sum(ptr<float>(x), ptr<float>(out), (int)x.size(0), threads, barrier, stream_of(x));
  return out;
}

// x: (warps * 32,) float32 -> (sums, ballots, anys, alls, total)
std::vector<at::Tensor> selftest_warp(const at::Tensor& x) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 1 && x.numel() % 32 == 0, "x: expected (warps * 32,)");
  const int warps = (int)(x.numel() / 32);
  DeviceGuard g(x);
  auto sums = at::full({warps}, std::nan(""), x.options());
  auto ballots = at::zeros({warps}, x.options().dtype(at::kInt));
  auto anys = at::full({warps}, -1, x.options().dtype(at::kInt));
  auto alls = at::full({warps}, -1, x.options().dtype(at::kInt));
  auto total = at::zeros({1}, x.options());
  vk::selftest_warp(ptr<float>(x), warps, ptr<float>(sums), ptr<uint32_t>(ballots), ptr<int>(anys), ptr<int>(alls),
                    ptr<float>(total), stream_of(x));
  return {sums, ballots, anys, alls, total};
}

// ------------------------------------------------------- LayerNorm statistics + GEMM (CUDA-core)

// ----------------------------------------------------------------- attention (CUDA-attention)
// (CUDA-attention: add the attention checks + wrappers here, and their m.def lines below.)

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("emulated") = kEmulated;
  m.def("selftest_mma", &selftest_mma, "one mma.m16n8k16 (a, b as 16-bit patterns)");
  m.def("selftest_ldmatrix", &selftest_ldmatrix, "ldmatrix x1/x2/x4 [.trans] of (8*count, 8) 16-bit values");
  m.def("selftest_block_sum", &selftest_block_sum, "shared-memory tree sum per block, with or without barriers");
  m.def("selftest_warp", &selftest_warp, "warp shuffles, votes and atomicAdd");
  // --- CUDA-core: LayerNorm statistics + GEMM
  // --- CUDA-attention: attention
}
