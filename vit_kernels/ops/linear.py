"""linear: x @ W^T + b, then residual + layer_scale * that; the output projection of a block."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, library, reference  # library imports this file: used at call time only
from ..backends import needs_grad, offer, resolve
from ..dtypes import KERNEL_DTYPES
from ..cuda.ops import gemm_unsupported as cuda_gemm_unsupported


TRITON_GEMM_DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes


def triton_gemm_unsupported(dtype: torch.dtype) -> Optional[str]:
    """None when the Triton GEMM (linear, layernorm_gelu_mlp, patch_embed) runs this dtype, else why not."""
    if dtype not in TRITON_GEMM_DTYPES:
        return f"dtype {dtype} is not supported by the Triton GEMM (float32, float16, bfloat16)"
    return None


def check_linear(x, weight, bias, residual, layer_scale):
    checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of at least 2 dims (..., in_features), got shape {tuple(x.shape)}")
    checks.nonempty_dim("x", x, -1, "in_features")
    checks.tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected shape (out_features, {x.shape[-1]}) for x with "
            f"in_features {x.shape[-1]}, got {tuple(weight.shape)}"
        )
    out = weight.shape[0]
    checks.tensor("bias", bias, shape=(out,), dtype=x.dtype, device=x.device, optional=True)
    checks.tensor(
        "residual", residual, shape=tuple(x.shape[:-1]) + (out,), dtype=x.dtype, device=x.device, optional=True
    )
    checks.tensor("layer_scale", layer_scale, shape=(out,), dtype=x.dtype, device=x.device, optional=True)
    if layer_scale is not None and residual is None:
        raise ValueError(
            "layer_scale: given without residual; layer scale is applied to the branch that is added to the residual"
        )


def layouts_unsupported(x, weight, residual) -> dict:
    """backend -> why its kernels cannot read x, weight, residual as they are (None: they can).
    The Triton GEMM reads any strides (weight included); the CUDA GEMM needs unit-stride rows."""
    return {
        "triton": checks.first(checks.rows_layout("x", x), checks.rows_layout("residual", residual)),
        "cuda": checks.first(
            checks.unit_rows_layout("x", x),
            checks.unit_rows_layout("weight", weight),
            checks.unit_rows_layout("residual", residual),
        ),
    }


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    backend: str = "auto",
    tune: Optional[str] = None,
) -> Tensor:
    """A GEMM whose epilogue adds bias, layer scale and residual.

    x: (..., in); weight: (out, in); bias, layer_scale: (out,); residual: (..., out).
    Returns (..., out) = [residual +] [layer_scale *] (x @ weight^T [+ bias]). Zero rows: an
    empty result. bias and layer_scale of other strides are copied for the fused kernels
    (``last_decision("linear").copied``).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    The custom op ``torch.ops.vit_kernels.linear`` (:mod:`vit_kernels.library`).
    """
    return library.run("linear", (x, weight, bias, residual, layer_scale, backend, tune))


def dispatch(x, weight, bias, residual, layer_scale, backend, tune) -> Tensor:
    """The body of the custom op: checks, the backend decision (recorded), the launch."""
    check_linear(x, weight, bias, residual, layer_scale)
    layouts = layouts_unsupported(x, weight, residual)
    params, notes = checks.contiguous_params(backend, bias=bias, layer_scale=layer_scale)
    args = (x, weight, params["bias"], residual, params["layer_scale"])
    out_shape = tuple(x.shape[:-1]) + (weight.shape[0],)
    empty = math.prod(out_shape) == 0  # nothing to time: the untimed rules pick the backend
    d = resolve(
        "linear",
        backend,
        (x, weight, bias, residual, layer_scale),
        unsupported={
            "triton": triton_gemm_unsupported(x.dtype) or layouts["triton"],
            "cuda": cuda_gemm_unsupported(x.dtype) or layouts["cuda"],
        },
        has_backward=("triton",),
        tune=tune,
        run=None if empty else _launch,
        args=args,
    )
    if d.backend == "torch":
        offer(_launch, ())
        return _launch(d, x, weight, bias, residual, layer_scale)
    d = d.with_copied(notes)
    if empty:
        d.with_path("empty")
        if needs_grad(args):  # nothing to launch; under autograd the torch path gives the empty result its graph
            return linear_torch(*args)
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    offer(_launch, ())
    return _launch(d, *args)


def _launch(d, x, weight, bias, residual, layer_scale):
    """Run linear as Decision ``d`` says (backend, path, tile config): path "tma" is sm_90's TMA GEMM
    (vit_kernels.triton.gemm_tma, chosen only by the tuner). The fused backends get bias and
    layer_scale contiguous (see :func:`linear`)."""
    if d.backend == "triton" and d.path == "tma":
        from ..triton import gemm_tma

        return gemm_tma.linear_forward(
            x, weight, bias, residual=residual, layer_scale=layer_scale, config=dict(d.config).get("tma_config")
        )
    if d.backend == "triton":
        if needs_grad((x, weight, bias, residual, layer_scale)):  # forward and backward kernels
            from ..autograd import Linear

            return Linear.apply(x, weight, bias, residual, layer_scale, tuple(d.config))
        from ..triton import gemm as triton_gemm

        return triton_gemm.linear_forward(x, weight, bias, residual=residual, layer_scale=layer_scale, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops

        return cuda_ops.linear_forward(x, weight, bias, residual=residual, layer_scale=layer_scale)
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
