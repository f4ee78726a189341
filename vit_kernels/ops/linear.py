"""linear: x @ W^T + b, then residual + layer_scale * that; the output projection of a block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, reference
from ..backends import resolve
from ..cuda.ops import gemm_unsupported as cuda_gemm_unsupported


TRITON_GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_gemm_unsupported(dtype: torch.dtype) -> Optional[str]:
    """None when the Triton GEMM (linear, layernorm_gelu_mlp, patch_embed) runs this dtype, else why not."""
    if dtype not in TRITON_GEMM_DTYPES:
        return f"dtype {dtype} is not supported by the Triton GEMM (float32, float16, bfloat16)"
    return None


def check_linear(x, weight, bias, residual, layer_scale):
    checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of at least 2 dims (..., in_features), got shape {tuple(x.shape)}")
    checks.tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (out_features, {x.shape[-1]}) for x with "
                         f"in_features {x.shape[-1]}, got {tuple(weight.shape)}")
    out = weight.shape[0]
    checks.tensor("bias", bias, shape=(out,), dtype=x.dtype, device=x.device, optional=True)
    checks.tensor("residual", residual, shape=tuple(x.shape[:-1]) + (out,), dtype=x.dtype,
                  device=x.device, optional=True)
    checks.tensor("layer_scale", layer_scale, shape=(out,), dtype=x.dtype, device=x.device, optional=True)
    if layer_scale is not None and residual is None:
        raise ValueError("layer_scale: given without residual; layer scale is applied to the branch "
                         "that is added to the residual")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           residual: Optional[Tensor] = None, layer_scale: Optional[Tensor] = None,
           backend: str = "auto", tune: Optional[str] = None) -> Tensor:
    """A GEMM whose epilogue adds bias, layer scale and residual.

    x: (..., in); weight: (out, in); bias, layer_scale: (out,); residual: (..., out).
    Returns (..., out) = [residual +] [layer_scale *] (x @ weight^T [+ bias]).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    """
    check_linear(x, weight, bias, residual, layer_scale)
    d = resolve("linear", backend, (x, weight, bias, residual, layer_scale),
                unsupported={"triton": triton_gemm_unsupported(x.dtype), "cuda": cuda_gemm_unsupported(x.dtype)},
                tune=tune, run=_launch, args=(x, weight, bias, residual, layer_scale))
    return _launch(d, x, weight, bias, residual, layer_scale)


def _launch(d, x, weight, bias, residual, layer_scale):
    """Run linear as Decision ``d`` says (backend, tile config)."""
    if d.backend == "triton":
        from ..triton import gemm as triton_gemm
        return triton_gemm.linear_forward(x, weight, bias, residual=residual, layer_scale=layer_scale,
                                          **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops
        return cuda_ops.linear(x, weight, bias, residual=residual, layer_scale=layer_scale)
    if d.backend == "reference":
        return reference.linear(x, weight, bias, residual=residual, layer_scale=layer_scale)
    return linear_torch(x, weight, bias, residual, layer_scale)


def linear_torch(x, weight, bias, residual, layer_scale):
    y = F.linear(x, weight, bias)
    if layer_scale is not None:
        y = y * layer_scale
    if residual is not None:
        y = residual + y
    return y
