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
#include "attention/flash_fwd.h"

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
// flash_attention_forward(q, k, v, out, lse, amax, scale): softmax(scale q k^T) v into `out`.
//   q: (B, H, Nq, hd), k, v: (B, H, Nk, hd), any strides (no copies);
//   out: (B, H, Nq, hd), any strides: a (B, Nq, H*hd) buffer viewed as (B, H, Nq, hd) gets the heads
//        concatenated directly; lse: None or (B, H, Nq) float32 contiguous, natural log;
//   amax: float32 inputs only, (3,) float32 = max|q|, max|k|, max|v| (the fp16-pair split's scales).
vk::attn::Dtype attention_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kHalf: return vk::attn::Dtype::kFloat16;
    case at::kBFloat16: return vk::attn::Dtype::kBFloat16;
    case at::kFloat: return vk::attn::Dtype::kFloat32;
    default: TORCH_CHECK(false, "q: expected dtype float16, bfloat16 or float32, got ", q.scalar_type());
  }
  return vk::attn::Dtype::kFloat16;
}

std::string attention_head_dims_text() {
  std::string s;
  for (int i = 0; i < vk::attn::num_head_dims(); ++i) s += (i ? ", " : "") + std::to_string(vk::attn::head_dim_at(i));
  return s;
}

void flash_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& amax,
                             double scale) {
  const auto dtype = attention_dtype(q);
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, q_tokens, head_dim), got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D, "k: expected shape (", B, ", ", H,
              ", kv_tokens, ", D, "), got ", k.sizes());
  const int64_t Nk = k.size(2);
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == H && v.size(2) == Nk && v.size(3) == D,
              "v: expected shape (", B, ", ", H, ", ", Nk, ", ", D, "), got ", v.sizes());
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B && out.size(1) == H && out.size(2) == N && out.size(3) == D,
              "out: expected shape (", B, ", ", H, ", ", N, ", ", D, "), got ", out.sizes());
  const std::pair<const at::Tensor*, const char*> tensors[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}};
  for (const auto& [t, name] : tensors) check(*t, name, q.scalar_type(), /*contiguous=*/false);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && out.device() == q.device(),
              "k, v, out: expected tensors on ", q.device(), " (the device of q)");
  TORCH_CHECK(vk::attn::head_dim_instance(D) > 0, "head_dim: expected a multiple of 8 no larger than the largest "
              "compiled head dim (compiled: ", attention_head_dims_text(), "), got ", D);
  TORCH_CHECK(N == 0 || Nk > 0, "k: kv_tokens must be at least 1 (softmax over no keys), got 0");
  if (lse.has_value()) {
    check(*lse, "lse", at::kFloat);
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == H && lse->size(2) == N,
                "lse: expected shape (", B, ", ", H, ", ", N, "), got ", lse->sizes());
    TORCH_CHECK(lse->device() == q.device(), "lse: expected a tensor on ", q.device());
  }
  if (dtype == vk::attn::Dtype::kFloat32) {
    TORCH_CHECK(amax.has_value(), "amax: required for float32 inputs: (3,) float32 tensor of max |q|, |k|, |v|");
    check(*amax, "amax", at::kFloat);
    TORCH_CHECK(amax->numel() == 3 && amax->device() == q.device(), "amax: expected 3 elements on ", q.device(),
                ", got shape ", amax->sizes(), " on ", amax->device());
  }
  vk::attn::FlashFwdArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.o = out.data_ptr();
  a.lse = lse.has_value() ? ptr<float>(*lse) : nullptr;
  a.amax = (dtype == vk::attn::Dtype::kFloat32) ? ptr<float>(*amax) : nullptr;
  a.batch = B;
  a.heads = H;
  a.q_tokens = N;
  a.kv_tokens = Nk;
  a.head_dim = D;
  for (int i = 0; i < 4; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
    a.o_stride[i] = out.stride(i);
  }
  a.scale = (float)scale;
  a.dtype = dtype;
  DeviceGuard g(q);
  vk::attn::flash_attention_forward(a, stream_of(q));
}

std::vector<int64_t> flash_attention_head_dims() {
  std::vector<int64_t> dims;
  for (int i = 0; i < vk::attn::num_head_dims(); ++i) dims.push_back(vk::attn::head_dim_at(i));
  return dims;
}

// (dtype: 0 float16, 1 bfloat16, 2 float32; head_dim: a compiled one) -> dynamic shared memory bytes
int64_t flash_attention_smem_bytes(int64_t dtype, int64_t head_dim) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype: expected 0 (float16), 1 (bfloat16) or 2 (float32), got ", dtype);
  return vk::attn::flash_attention_smem_bytes(static_cast<vk::attn::Dtype>(dtype), (int)head_dim);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("emulated") = kEmulated;
  m.def("selftest_mma", &selftest_mma, "one mma.m16n8k16 (a, b as 16-bit patterns)");
  m.def("selftest_ldmatrix", &selftest_ldmatrix, "ldmatrix x1/x2/x4 [.trans] of (8*count, 8) 16-bit values");
  m.def("selftest_block_sum", &selftest_block_sum, "shared-memory tree sum per block, with or without barriers");
  m.def("selftest_warp", &selftest_warp, "warp shuffles, votes and atomicAdd");
  // --- CUDA-core: LayerNorm statistics + GEMM
  // --- CUDA-attention: attention
  m.def("flash_attention_forward", &flash_attention_forward, "flash attention forward into out (and lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("amax"), py::arg("scale"));
  m.def("flash_attention_head_dims", &flash_attention_head_dims, "the head dims the attention kernel is compiled for");
  m.def("flash_attention_smem_bytes", &flash_attention_smem_bytes, "dynamic shared memory of one instantiation");
}
