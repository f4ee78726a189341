// Bindings of the csrc launchers (row statistics, GEMM, attention, attention statistics) and the
// module definition; the self-test bindings are in bind_selftests.cpp, the shared torch-side helpers in
// common.h. Built twice: for the GPU (with the .cu sources, nvcc) and for the host emulator
// (-DVK_EMULATE, with csrc/emulation/*.cpp). Kernels and launchers never see torch types.
//
// vit_kernels/cuda/ops.py checks shapes and allocates outputs; these are the second line of checks, and
// each refuses bad input before anything launches, in both builds.
// torch's headers first (common.h): the emulator's vk/port.h defines CUDA keywords as macros.
#include "common.h"

#include "../attention/flash_fwd.h"
#include "../attention/stats.h"
#include "vk/gemm.h"

namespace vk_torch {
namespace {

// --------------------------------------------------------------- row statistics + GEMM (CUDA-core)
// vit_kernels/cuda/ops.py checks shapes and allocates outputs; these are the second line of checks.

// A (rows, cols) matrix whose rows have unit column stride (any row stride).
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check(t, name, like.scalar_type(), false);
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D (rows, cols) tensor, got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, name, ": expected unit stride along the last dim, got strides ",
              t.strides());
  TORCH_CHECK(t.size(0) < (int64_t(1) << 31) && t.size(1) < (int64_t(1) << 31), name, ": too large");
}

void check_vec(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& like, int64_t n) {
  if (!t.has_value()) return;
  check(*t, name, like.scalar_type());
  TORCH_CHECK(t->numel() == n, name, ": expected ", n, " elements, got ", t->numel());
}

// Row statistics (mean, rstd) of x: (rows, dim), float32, for the GEMM's layernorm loader.
std::vector<at::Tensor> row_stats(const at::Tensor& x, double eps) {
  check_rows(x, "x", x);
  DeviceGuard g(x);
  auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({x.size(0)}, opts), rstd = at::empty({x.size(0)}, opts);
  vk::row_stats(dtype_of(x, "x"), x.data_ptr(), x.size(0), (int)x.size(1), x.stride(0), (float)eps, ptr<float>(mean),
                ptr<float>(rstd), stream_of(x));
  return {mean, rstd};
}

// The A-operand part shared by gemm_rows and gemm_qkv: dense x, or LayerNorm(x) when mean/rstd given.
vk::ALoad set_a(vk::GemmParams& p, const at::Tensor& x, const c10::optional<at::Tensor>& mean,
                const c10::optional<at::Tensor>& rstd, const c10::optional<at::Tensor>& norm_weight,
                const c10::optional<at::Tensor>& norm_bias) {
  p.a = x.data_ptr();
  p.lda = x.stride(0);
  if (!mean.has_value()) {
    TORCH_CHECK(!norm_weight.has_value() && !norm_bias.has_value(), "norm_weight/norm_bias: given without statistics");
    return vk::ALoad::dense;
  }
  TORCH_CHECK(rstd.has_value(), "rstd: expected with mean");
  check(*mean, "mean", at::kFloat);
  check(*rstd, "rstd", at::kFloat);
  TORCH_CHECK(mean->numel() == x.size(0) && rstd->numel() == x.size(0), "mean/rstd: expected ", x.size(0), " rows");
  check_vec(norm_weight, "norm_weight", x, x.size(1));
  check_vec(norm_bias, "norm_bias", x, x.size(1));
  p.mean = ptr<float>(*mean);
  p.rstd = ptr<float>(*rstd);
  p.norm_weight = cptr<void>(norm_weight);
  p.norm_bias = cptr<void>(norm_bias);
  return vk::ALoad::layernorm;
}

void set_w(vk::GemmParams& p, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_rows(w, "weight", x);
  TORCH_CHECK(w.size(1) == p.K, "weight: expected (N, ", p.K, "), got ", w.sizes());
  p.N = (int)w.size(0);
  p.w = w.data_ptr();
  p.ldw = w.stride(0);
  check_vec(bias, "bias", x, p.N);
  p.bias = cptr<void>(bias);
}

// The operands of gemm_rows and gemm_qkv: x (M, K) rows (LayerNorm on load when mean/rstd are
// given) and w (N, K) with its bias; returns the loader.
vk::ALoad set_operands(vk::GemmParams& p, const at::Tensor& x, const at::Tensor& w,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mean,
                       const c10::optional<at::Tensor>& rstd, const c10::optional<at::Tensor>& norm_weight,
                       const c10::optional<at::Tensor>& norm_bias) {
  check_rows(x, "x", x);
  p.M = (int)x.size(0);
  p.K = (int)x.size(1);
  const vk::ALoad loader = set_a(p, x, mean, rstd, norm_weight, norm_bias);
  set_w(p, x, w, bias);
  return loader;
}

// out (M, N) = [residual +] [layer_scale *] act(LN?(x) @ w^T + bias); act: 0 none, 1 gelu erf, 2 gelu tanh.
void gemm_rows(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
               const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
               const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias, int64_t act,
               const c10::optional<at::Tensor>& layer_scale, const c10::optional<at::Tensor>& residual, at::Tensor& out,
               int64_t config) {
  vk::GemmParams p;
  const vk::ALoad loader = set_operands(p, x, w, bias, mean, rstd, norm_weight, norm_bias);
  TORCH_CHECK(act >= 0 && act <= 2, "act: expected 0, 1 or 2");
  p.act = static_cast<vk::Act>(act);
  check_vec(layer_scale, "layer_scale", x, p.N);
  p.layer_scale = cptr<void>(layer_scale);
  if (residual.has_value()) {
    check_rows(*residual, "residual", x);
    TORCH_CHECK(residual->size(0) == p.M && residual->size(1) == p.N, "residual: expected (", p.M, ", ", p.N, ")");
    p.residual = residual->data_ptr();
    p.ldr = residual->stride(0);
  }
  check_rows(out, "out", x);
  TORCH_CHECK(out.size(0) == p.M && out.size(1) == p.N, "out: expected (", p.M, ", ", p.N, ")");
  p.out = out.data_ptr();
  p.ldo = out.stride(0);
  DeviceGuard g(x);
  vk::gemm(p, dtype_of(x, "x"), loader, vk::Epi::rows, (int)config, stream_of(x));
}

// out (3, B, H, tokens, head_dim) contiguous = head split of LN?(x) @ w^T + bias, q scaled.
void gemm_qkv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
              const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
              const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias, int64_t tokens,
              int64_t heads, int64_t head_dim, double q_scale, at::Tensor& out, int64_t config) {
  vk::GemmParams p;
  const vk::ALoad loader = set_operands(p, x, w, bias, mean, rstd, norm_weight, norm_bias);
  TORCH_CHECK(tokens > 0 && p.M % tokens == 0, "tokens: expected a divisor of the ", p.M, " rows of x");
  TORCH_CHECK(p.N == 3 * heads * head_dim, "weight: expected 3 * heads * head_dim = ", 3 * heads * head_dim, " rows");
  check(out, "out", x.scalar_type());
  TORCH_CHECK(out.dim() == 5 && out.size(0) == 3 && out.size(1) == p.M / tokens && out.size(2) == heads &&
                  out.size(3) == tokens && out.size(4) == head_dim,
              "out: expected (3, ", p.M / tokens, ", ", heads, ", ", tokens, ", ", head_dim, "), got ", out.sizes());
  p.tokens = (int)tokens;
  p.heads = (int)heads;
  p.head_dim = (int)head_dim;
  p.q_scale = (float)q_scale;
  p.out = out.data_ptr();
  DeviceGuard g(x);
  vk::gemm(p, dtype_of(x, "x"), loader, vk::Epi::qkv, (int)config, stream_of(x));
}

// images (B, C, H, W) with any strides, float (the op's dtype) or uint8; w (dim, C * p * p); out (B, prefix + P, dim)
// contiguous, w's dtype. uint8 images need pixel_scale = 1 / (255 std) and pixel_shift = -mean / std, float32 (C,)
// contiguous each (each pixel loads as x * scale[c] + shift[c]); float images take neither.
void gemm_patch(const at::Tensor& images, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t patch,
                const c10::optional<at::Tensor>& pos_embed, const c10::optional<at::Tensor>& cls_token, at::Tensor& out,
                int64_t config, const c10::optional<at::Tensor>& pixel_scale,
                const c10::optional<at::Tensor>& pixel_shift) {
  const bool u8 = images.scalar_type() == at::kByte;
  check(images, "images", u8 ? at::kByte : images.scalar_type(), false);
  TORCH_CHECK(images.dim() == 4, "images: expected (B, C, H, W), got ", images.dim(), "-D");
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(patch > 0 && H % patch == 0 && W % patch == 0, "patch: expected a divisor of H and W");
  const at::Tensor& like = u8 ? w : images;  // the op's dtype: the weight's for uint8 images
  if (u8) {
    dtype_of(w, "w");  // float32, float16 or bfloat16
    TORCH_CHECK(pixel_scale.has_value() && pixel_shift.has_value(),
                "pixel_scale, pixel_shift: uint8 images are normalized on load as x * pixel_scale[c] + "
                "pixel_shift[c]: expected both, float32 (",
                C, ",) each, got pixel_scale ", pixel_scale.has_value() ? "given" : "None", ", pixel_shift ",
                pixel_shift.has_value() ? "given" : "None");
    check(*pixel_scale, "pixel_scale", at::kFloat);
    check(*pixel_shift, "pixel_shift", at::kFloat);
    TORCH_CHECK(pixel_scale->numel() == C && pixel_shift->numel() == C, "pixel_scale, pixel_shift: expected ", C,
                " values each (one per channel), got ", pixel_scale->numel(), " and ", pixel_shift->numel());
  } else {
    TORCH_CHECK(!pixel_scale.has_value() && !pixel_shift.has_value(),
                "pixel_scale, pixel_shift: normalize uint8 images on load; got ", images.scalar_type(),
                " images (normalize float images before the op)");
  }
  vk::GemmParams p;
  p.patch = (int)patch;
  p.grid_h = (int)(H / patch);
  p.grid_w = (int)(W / patch);
  const int64_t P = int64_t(p.grid_h) * p.grid_w;
  TORCH_CHECK(B * P < (int64_t(1) << 31), "images: too many patches");
  p.M = (int)(B * P);
  p.K = (int)(C * patch * patch);
  p.a = images.data_ptr();
  for (int i = 0; i < 4; ++i) p.img_stride[i] = images.stride(i);
  p.pixel_scale = cptr<float>(pixel_scale);
  p.pixel_shift = cptr<float>(pixel_shift);
  set_w(p, like, w, bias);
  const int64_t prefix = cls_token.has_value() ? 1 : 0;
  check_vec(cls_token, "cls_token", like, p.N);
  check_vec(pos_embed, "pos_embed", like, (prefix + P) * p.N);
  p.cls_token = cptr<void>(cls_token);
  p.pos_embed = cptr<void>(pos_embed);
  check(out, "out", like.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == prefix + P && out.size(2) == p.N, "out: expected (",
              B, ", ", prefix + P, ", ", p.N, "), got ", out.sizes());
  p.out = out.data_ptr();
  DeviceGuard g(images);
  vk::gemm(p, dtype_of(like, u8 ? "w" : "images"), u8 ? vk::ALoad::patch_u8 : vk::ALoad::patch, vk::Epi::patch,
           (int)config, stream_of(images));
}

// ----------------------------------------------------------------- attention (CUDA-attention)
// flash_attention_forward(q, k, v, out, lse, amax, scale): softmax(scale q k^T) v into `out`.
//   q: (B, H, Nq, hd), k, v: (B, H, Nk, hd), any strides (no copies);
//   out: (B, H, Nq, hd), any strides: a (B, Nq, H*hd) buffer viewed as (B, H, Nq, hd) gets the heads
//        concatenated directly; lse: None or (B, H, Nq) float32 contiguous, natural log;
//   amax: float32 inputs only, (3, B, H) float32 contiguous = max finite |q|, |k|, |v| per (batch, head)
//         (the fp16-pair split's scales).
void flash_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& amax,
                             double scale) {
  const vk::DType dtype = dtype_of(q, "q");
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
  TORCH_CHECK(vk::attn::head_dim_instance(D) > 0, vk::attn::head_dim_error(D));
  TORCH_CHECK(N == 0 || Nk > 0, "k: kv_tokens must be at least 1 (softmax over no keys), got 0");
  if (lse.has_value()) {
    check(*lse, "lse", at::kFloat);
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == H && lse->size(2) == N, "lse: expected shape (",
                B, ", ", H, ", ", N, "), got ", lse->sizes());
    TORCH_CHECK(lse->device() == q.device(), "lse: expected a tensor on ", q.device());
  }
  if (dtype == vk::DType::kFloat32) {
    TORCH_CHECK(amax.has_value(),
                "amax: required for float32 inputs: (3, batch, heads) float32 tensor of max finite |q|, |k|, |v|");
    check(*amax, "amax", at::kFloat);
    TORCH_CHECK(amax->dim() == 3 && amax->size(0) == 3 && amax->size(1) == B && amax->size(2) == H &&
                    amax->device() == q.device(),
                "amax: expected shape (3, ", B, ", ", H, ") on ", q.device(), ", got shape ", amax->sizes(), " on ",
                amax->device());
  }
  vk::attn::FlashFwdArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.o = out.data_ptr();
  a.lse = lse.has_value() ? ptr<float>(*lse) : nullptr;
  a.amax = (dtype == vk::DType::kFloat32) ? ptr<float>(*amax) : nullptr;
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
  for (int hd : vk::attn::kHeadDims) dims.push_back(hd);
  return dims;
}

// (dtype: torch.float32 / float16 / bfloat16; head_dim: a compiled one) -> dynamic shared memory bytes
int64_t flash_attention_smem_bytes(at::ScalarType dtype, int64_t head_dim) {
  return vk::attn::flash_attention_smem_bytes(dtype_of(dtype, "dtype"), (int)head_dim);
}

// ---------------------------------------------------------- attention statistics (from the LSE)
// q: (B, H, Nq, hd), k: (B, H, Nk, hd), unit last stride (any other strides); lse: (B, H, Nq) float32
// contiguous, natural log (flash_attention_forward's). See csrc/attention/stats.h.
vk::attn::StatsArgs stats_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, double scale) {
  const vk::DType dtype = dtype_of(q, "q");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1,
              "q: expected (batch, heads, q_tokens, head_dim) with a unit last "
              "stride, got shape ",
              q.sizes(), " strides ", q.strides());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D && k.stride(3) == 1,
              "k: expected shape (", B, ", ", H, ", kv_tokens, ", D, ") with a unit last stride, got ", k.sizes());
  check(q, "q", q.scalar_type(), false);
  check(k, "k", q.scalar_type(), false);
  check(lse, "lse", at::kFloat);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N, "lse: expected shape (", B,
              ", ", H, ", ", N, "), got ", lse.sizes());
  vk::attn::StatsArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.lse = ptr<float>(lse);
  a.batch = B;
  a.heads = H;
  a.q_tokens = N;
  a.kv_tokens = k.size(2);
  a.head_dim = D;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
  }
  a.scale = (float)scale;
  a.dtype = dtype;
  return a;
}

// attention_probs(q, k, lse, rows, out, scale): out[b, h, r, j] = exp(scale q_rows[r] . k_j - lse_rows[r]);
//   rows: (R,) int32 query rows; out: (B, H, R, Nk) contiguous, q's dtype.
void attention_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& rows,
                     const at::Tensor& out, double scale) {
  auto a = stats_args(q, k, lse, scale);
  check(rows, "rows", at::kInt);
  TORCH_CHECK(rows.dim() == 1, "rows: expected a 1-D tensor of query rows, got shape ", rows.sizes());
  check(out, "out", q.scalar_type());
  TORCH_CHECK(out.dim() == 4 && out.size(0) == a.batch && out.size(1) == a.heads && out.size(2) == rows.size(0) &&
                  out.size(3) == a.kv_tokens,
              "out: expected shape (", a.batch, ", ", a.heads, ", ", rows.size(0), ", ", a.kv_tokens, "), got ",
              out.sizes());
  a.rows = ptr<int32_t>(rows);
  a.num_rows = rows.size(0);
  a.out = out.data_ptr();
  DeviceGuard g(q);
  vk::attn::attention_probs(a, stream_of(q));
}

// attention_distance(q, k, lse, out, prefix, grid_w, scale, patch_size): per query patch
//   sum_j p_ij |pos_i - pos_j| * patch_size over the key patches; out: (B, H, Nq - prefix) float32 contiguous.
void attention_distance(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& out,
                        int64_t prefix, int64_t grid_w, double scale, double patch_size) {
  auto a = stats_args(q, k, lse, scale);
  check(out, "out", at::kFloat);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == a.batch && out.size(1) == a.heads && out.size(2) == a.q_tokens - prefix,
              "out: expected shape (", a.batch, ", ", a.heads, ", ", a.q_tokens - prefix, "), got ", out.sizes());
  a.out = out.data_ptr();
  a.prefix = prefix;
  a.grid_w = grid_w;
  a.patch_size = (float)patch_size;
  DeviceGuard g(q);
  vk::attn::attention_distance(a, stream_of(q));
}

}  // namespace
}  // namespace vk_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("emulated") = vk_torch::kEmulated;
  vk_torch::bind_selftests(m);
  // --- CUDA-core: row statistics + GEMM
  m.def("row_stats", &vk_torch::row_stats, "per-row mean and rstd (float32) of x: (rows, dim)", py::arg("x"),
        py::arg("eps"));
  m.def("gemm_rows", &vk_torch::gemm_rows, "out = [residual +] [layer_scale *] act(LN?(x) @ w^T + bias)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("act"), py::arg("layer_scale"), py::arg("residual"), py::arg("out"), py::arg("config") = -1);
  m.def("gemm_qkv", &vk_torch::gemm_qkv, "QKV projection with head split into (3, B, H, tokens, head_dim), q scaled",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("q_scale"),
        py::arg("out"), py::arg("config") = -1);
  m.def("gemm_patch", &vk_torch::gemm_patch,
        "patch embedding: gather GEMM (uint8 images normalized on load) + bias + position embedding + class token",
        py::arg("images"), py::arg("w"), py::arg("bias"), py::arg("patch"), py::arg("pos_embed"), py::arg("cls_token"),
        py::arg("out"), py::arg("config") = -1, py::arg("pixel_scale") = py::none(),
        py::arg("pixel_shift") = py::none());
  // --- CUDA-attention: attention
  m.def("flash_attention_forward", &vk_torch::flash_attention_forward, "flash attention forward into out (and lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("amax"), py::arg("scale"));
  m.def("flash_attention_head_dims", &vk_torch::flash_attention_head_dims,
        "the head dims the attention kernel is compiled for");
  m.def("flash_attention_smem_bytes", &vk_torch::flash_attention_smem_bytes,
        "dynamic shared memory of one instantiation", py::arg("dtype"), py::arg("head_dim"));
  // --- attention statistics from the row log-sum-exp
  m.def("attention_probs", &vk_torch::attention_probs, "probabilities of chosen query rows from the LSE", py::arg("q"),
        py::arg("k"), py::arg("lse"), py::arg("rows"), py::arg("out"), py::arg("scale"));
  m.def("attention_distance", &vk_torch::attention_distance, "mean attention distance per query patch from the LSE",
        py::arg("q"), py::arg("k"), py::arg("lse"), py::arg("out"), py::arg("prefix"), py::arg("grid_w"),
        py::arg("scale"), py::arg("patch_size"));
}
