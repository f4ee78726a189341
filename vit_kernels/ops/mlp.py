"""layernorm_gelu_mlp: fc2(gelu(fc1(LayerNorm(x)))) [+ residual, layer scale]."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, library, reference  # library imports this file: used at call time only
from ..backends import needs_grad, offer, resolve
from ..cuda.ops import gemm_unsupported as cuda_gemm_unsupported
from .linear import triton_gemm_unsupported


def check_mlp(
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, eps
) -> float:
    """Validate the arguments of :func:`layernorm_gelu_mlp` on every backend; returns eps."""
    checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of at least 2 dims (..., dim), got shape {tuple(x.shape)}")
    checks.nonempty_dim("x", x, -1, "dim")
    dim = x.shape[-1]
    kw = dict(dtype=x.dtype, device=x.device)
    checks.tensor("norm_weight", norm_weight, shape=(dim,), optional=True, **kw)
    checks.tensor("norm_bias", norm_bias, shape=(dim,), optional=True, **kw)
    if norm_bias is not None and norm_weight is None:
        raise ValueError(
            "norm_bias: given without norm_weight (norm_weight None skips the LayerNorm); pass "
            "norm_weight to apply LayerNorm"
        )
    checks.tensor("fc1_weight", fc1_weight, ndim=2, **kw)
    if fc1_weight.shape[1] != dim:
        raise ValueError(
            f"fc1_weight: expected shape (hidden, {dim}) for x of dim {dim}, got {tuple(fc1_weight.shape)}"
        )
    checks.nonempty_dim("fc1_weight", fc1_weight, 0, "hidden")
    hidden = fc1_weight.shape[0]
    checks.tensor("fc1_bias", fc1_bias, shape=(hidden,), optional=True, **kw)
    checks.tensor("fc2_weight", fc2_weight, ndim=2, **kw)
    if fc2_weight.shape[1] != hidden:
        raise ValueError(
            f"fc2_weight: expected shape (out, {hidden}) for fc1 of {hidden} outputs, got {tuple(fc2_weight.shape)}"
        )
    out = fc2_weight.shape[0]
    checks.tensor("fc2_bias", fc2_bias, shape=(out,), optional=True, **kw)
    checks.choice("approximate", approximate, ("none", "tanh"))
    checks.tensor("residual", residual, shape=tuple(x.shape[:-1]) + (out,), optional=True, **kw)
    checks.tensor("layer_scale", layer_scale, shape=(out,), optional=True, **kw)
    if layer_scale is not None and residual is None:
        raise ValueError(
            "layer_scale: given without residual; layer scale is applied to the branch that is added to the residual"
        )
    return checks.eps(eps)


def layouts_unsupported(x, fc1_weight, fc2_weight, residual) -> dict:
    """backend -> why its kernels cannot read x, the weights, residual as they are (None: they can).
    The Triton GEMM reads any strides (weights included); the CUDA GEMM needs unit-stride rows."""
    return {
        "triton": checks.first(checks.rows_layout("x", x), checks.rows_layout("residual", residual)),
        "cuda": checks.first(
            *(
                checks.unit_rows_layout(n, t)
                for n, t in (("x", x), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight), ("residual", residual))
            )
        ),
    }


def layernorm_gelu_mlp(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    backend: str = "auto",
    tune: Optional[str] = None,
) -> Tensor:
    """Fused LayerNorm + GELU MLP.

    x: (..., dim); norm_weight, norm_bias: (dim,) or None (None weight skips the LayerNorm);
    fc1_weight: (hidden, dim); fc1_bias: (hidden,); fc2_weight: (out, hidden); fc2_bias: (out,);
    residual: (..., out); layer_scale: (out,). GELU is exact (erf) unless approximate="tanh".
    Returns (..., out) = [residual +] [layer_scale *] fc2(gelu(fc1(LN(x)))). eps: a finite number
    >= 0. Zero rows: an empty result. 1-D parameters of other strides are copied for the fused
    kernels (``last_decision("layernorm_gelu_mlp").copied``).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    The custom op ``torch.ops.vit_kernels.layernorm_gelu_mlp`` (:mod:`vit_kernels.library`).
    """
    return library.run(
        "layernorm_gelu_mlp",
        (
            x,
            norm_weight,
            norm_bias,
            fc1_weight,
            fc1_bias,
            fc2_weight,
            fc2_bias,
            residual,
            layer_scale,
            eps,
            approximate,
            backend,
            tune,
        ),
    )


def dispatch(
    x,
    norm_weight,
    norm_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    residual,
    layer_scale,
    eps,
    approximate,
    backend,
    tune,
) -> Tensor:
    """The body of the custom op: checks, the backend decision (recorded), the launch."""
    eps = check_mlp(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, eps
    )
    tensors = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale)
    layouts = layouts_unsupported(x, fc1_weight, fc2_weight, residual)
    p, notes = checks.contiguous_params(
        backend,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        fc1_bias=fc1_bias,
        fc2_bias=fc2_bias,
        layer_scale=layer_scale,
    )
    args = (
        x,
        p["norm_weight"],
        p["norm_bias"],
        fc1_weight,
        p["fc1_bias"],
        fc2_weight,
        p["fc2_bias"],
        residual,
        p["layer_scale"],
        eps,
        approximate,
    )
    out_shape = tuple(x.shape[:-1]) + (fc2_weight.shape[0],)
    empty = math.prod(out_shape) == 0  # nothing to time: the untimed rules pick the backend
    d = resolve(
        "layernorm_gelu_mlp",
        backend,
        tensors,
        unsupported={
            "triton": triton_gemm_unsupported(x.dtype) or layouts["triton"],
            "cuda": cuda_gemm_unsupported(x.dtype) or layouts["cuda"],
        },
        has_backward=("triton",),
        tune=tune,
        run=None if empty else _launch,
        args=args,
        key_extra=(approximate,),
    )
    if d.backend == "torch":
        offer(_launch, (eps, approximate))
        return _launch(d, *tensors, eps, approximate)
    d = d.with_copied(notes)
    if empty:
        d.with_path("empty")
        if needs_grad(tensors):  # nothing to launch; under autograd the torch path gives the empty result its graph
            return layernorm_gelu_mlp_torch(
                *tensors[:7], eps=eps, approximate=approximate, residual=residual, layer_scale=layer_scale
            )
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    offer(_launch, (eps, approximate))
    return _launch(d, *args)


def _launch(
    d, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, eps, approximate
):
    """Run layernorm_gelu_mlp as Decision ``d`` says (backend, tile config). The fused backends get
    the 1-D parameters contiguous (see :func:`layernorm_gelu_mlp`)."""
    args = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    kw = dict(eps=eps, approximate=approximate, residual=residual, layer_scale=layer_scale)
    if d.backend == "triton":
        if needs_grad(args + (residual, layer_scale)):  # forward and backward kernels
            from ..autograd import LayerNormGeluMlp

            return LayerNormGeluMlp.apply(*args, residual, layer_scale, eps, approximate, tuple(d.config))
        from ..triton import mlp as triton_mlp

        return triton_mlp.layernorm_gelu_mlp_forward(*args, **kw, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops

        return cuda_ops.layernorm_gelu_mlp_forward(*args, **kw)
    if d.backend == "reference":
        return reference.layernorm_gelu_mlp(*args, **kw)
    return layernorm_gelu_mlp_torch(*args, **kw)


def layernorm_gelu_mlp_torch(
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, eps, approximate, residual, layer_scale
):
    """Plain PyTorch path. Differentiable."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps) if norm_weight is not None else x
    h = F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate)
    y = F.linear(h, fc2_weight, fc2_bias)
    if layer_scale is not None:
        y = y * layer_scale
    if residual is not None:
        y = residual + y
    return y
