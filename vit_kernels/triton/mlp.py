"""layernorm_gelu_mlp in Triton: two launches of the GEMM (vit_kernels.triton.gemm) plus a row
statistics pass.

    stats = row_stats(x)                                   reads x
    h     = GELU(LN(x) @ fc1^T + b1)                       LayerNorm on x's loads, bias + GELU epilogue
    out   = residual + layer_scale * (h @ fc2^T + b2)      bias, layer scale, residual epilogue

The normalized x and the pre-GELU hidden never reach memory; the post-GELU hidden h does (one
write, one read), in x's dtype, as an eager fc1 -> GELU would leave it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from .. import checks
from .aot import AotSpec
from .gemm import ACTIVATIONS, DTYPES, NORM_AFFINE, NORM_NONE, NORM_WEIGHT_ONLY, aot_spec, dense_forward


def layernorm_gelu_mlp_forward(
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
    out: Optional[Tensor] = None,
    gemm_config: Optional[Tuple[int, ...]] = None,
    tma_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """[residual +] [layer_scale *] fc2(GELU(fc1(LayerNorm(x)))).

    x: (..., dim), any strides addressing it as (-1, tokens, dim); norm_weight, norm_bias: (dim,)
    (norm_weight None: no LayerNorm, as in the op's torch path); fc1_weight: (hidden, dim);
    fc1_bias: (hidden,); fc2_weight: (out, hidden); fc2_bias, layer_scale: (out,);
    residual: (..., out); approximate: "none" (erf GELU) or "tanh"; out: optional (..., out) to
    write into. gemm_config: the tiles of both GEMMs (None: gemm.block_config). tma_config: run both
    GEMMs on sm_90's TMA GEMM (vit_kernels.triton.gemm_tma, float16/bfloat16; LayerNorm folded into
    fc1) with this config (gemm_tma.TmaConfig or its fields; the tuner passes one). Returns (..., out)
    in x's dtype. Layouts as gemm.dense_forward: the 1-D parameters contiguous, x and residual
    addressable as (-1, tokens, dim); vit_kernels.ops guarantees both before the first launch.
    """
    if approximate not in ACTIVATIONS:
        raise ValueError(f"approximate: expected one of {tuple(ACTIVATIONS)}, got {approximate!r}")
    checks.unit_stride_params(
        norm_weight=norm_weight, norm_bias=norm_bias, fc1_bias=fc1_bias, fc2_bias=fc2_bias, layer_scale=layer_scale
    )
    if tma_config is not None:
        from . import gemm_tma

        h = gemm_tma.dense_forward(
            x,
            fc1_weight,
            fc1_bias,
            norm_weight=norm_weight,
            norm_bias=norm_bias if norm_weight is not None else None,
            eps=eps,
            act=ACTIVATIONS[approximate],
            config=tma_config,
        )
        return gemm_tma.dense_forward(
            h, fc2_weight, fc2_bias, residual=residual, layer_scale=layer_scale, out=out, config=tma_config
        )
    h = dense_forward(
        x,
        fc1_weight,
        fc1_bias,
        norm_weight=norm_weight,
        norm_bias=norm_bias if norm_weight is not None else None,
        eps=eps,
        act=ACTIVATIONS[approximate],
        gemm_config=gemm_config,
    )
    return dense_forward(
        h, fc2_weight, fc2_bias, residual=residual, layer_scale=layer_scale, out=out, gemm_config=gemm_config
    )


def aot_specs() -> List[AotSpec]:
    """fc1's configurations: LayerNorm (none | affine | weight only) x bias x GELU (erf | tanh),
    per dtype. fc2 launches the same kernel configurations as linear_forward (gemm.aot_specs)."""
    return [
        aot_spec("gemm_fc1", dtype, norm=norm, has_bias=has_bias, act=act)
        for dtype in DTYPES
        for norm in (NORM_NONE, NORM_AFFINE, NORM_WEIGHT_ONLY)
        for has_bias in (False, True)
        for act in ACTIVATIONS.values()
    ]
