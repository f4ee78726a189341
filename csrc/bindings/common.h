// Torch-side helpers of the two binding files (csrc/bindings/bind_ops.cpp, csrc/bindings/bind_selftests.cpp):
// argument checks, the device guard, the stream and raw pointers of a tensor. The only header with
// torch types; kernels and launchers never see them.
#pragma once

#include <torch/extension.h>

#ifndef VK_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "vk/dtype.h"
#include "vk/port.h"

namespace vk_torch {

#ifdef VK_EMULATE
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

// Checks that `t` lives where this build runs kernels (CPU for the emulator, CUDA for the GPU build).
inline void check_device(const at::Tensor& t, const char* name) {
  if (kEmulated) {
    TORCH_CHECK(t.device().is_cpu(), name, ": the host-emulation build runs on CPU tensors, got one on ", t.device());
  } else {
    TORCH_CHECK(t.is_cuda(), name, ": the GPU build runs on CUDA tensors, got one on ", t.device());
  }
}

inline void check(const at::Tensor& t, const char* name, at::ScalarType dtype, bool contiguous = true) {
  check_device(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  if (contiguous) TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// The one mapping of torch dtypes to vk::DType.
inline vk::DType dtype_of(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat: return vk::DType::kFloat32;
    case at::kHalf: return vk::DType::kFloat16;
    case at::kBFloat16: return vk::DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", dtype);
  }
  return vk::DType::kFloat32;
}
inline vk::DType dtype_of(const at::Tensor& t, const char* name) { return dtype_of(t.scalar_type(), name); }

inline vk::stream_t stream_of(const at::Tensor& t) {
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

// Defined in csrc/bindings/bind_selftests.cpp: the selftests of vk/port.h, the race cases and (emulator
// build) the emulator's settings, added to the module that csrc/bindings/bind_ops.cpp defines.
void bind_selftests(pybind11::module_& m);

}  // namespace vk_torch
