// The one element-type enum of csrc: every launcher takes it, csrc/bindings/common.h maps torch dtypes to it
// (dtype_of), no other code numbers the dtypes.
#pragma once

namespace vk {

// Same order as vit_kernels.dtypes.KERNEL_DTYPES (float32, float16, bfloat16).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace vk
