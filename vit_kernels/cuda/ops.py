"""The csrc (CUDA C++) kernels as Python functions: what the ``cuda`` branches of
:mod:`vit_kernels.ops` call.

Each function allocates its outputs, takes the build for the tensors' device (the GPU build for CUDA
tensors, the host emulator for CPU tensors; see :mod:`vit_kernels.cuda`) and calls one binding of
``csrc/bindings/bind_ops.cpp``. The public ops have already checked the arguments; the bindings check again
(naming the argument) before any launch. Forward only.

Layouts the GEMM launchers assume (and raise on otherwise): x, residual and weights as rows with
unit stride along the last dim whose leading dims merge without a copy (checks.unit_rows_layout);
1-D parameters, pos_embed, cls_token and the patch weight contiguous. The attention launcher reads
any strides and alignment. vit_kernels.ops guarantees these before the first launch of a call
(refusing, or copying the small parameters: checks.contiguous_params).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import module_for
from ..checks import head_dim_unsupported
from ..dtypes import KERNEL_DTYPES

# ----------------------------------------------------------------------------------- attention
# The kernel is compiled for the head dims of VK_ATTN_HEAD_DIMS in csrc/attention/flash_fwd.h (32, 64,
# 72, 80, 96, 128); any head_dim the rule (checks.HEAD_DIM_RANGE["cuda"]) takes runs in the next
# compiled one, the extra columns masked.


def attention_unsupported(head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA attention kernel runs this head dim and dtype, else why not."""
    why = head_dim_unsupported(head_dim, "cuda")
    if why:
        return why
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the CUDA attention kernel (float16, bfloat16, float32)"
    return None


def attention_amax(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """For float32 inputs: (3, batch, heads) float32 on the inputs' device, the largest finite |q|,
    |k|, |v| of each (batch, head) slice; else None.

    The kernel computes float32 attention with fp16 hi/lo pairs on tensor cores and scales each
    (batch, head) slice by a power of two chosen from these maxima first (see
    csrc/attention/flash_fwd.cuh). Per slice and over finite values only, so that a NaN, an Inf or
    a huge value in one sample leaves the others' scales, and results, alone. Costs one extra read
    of q, k and v (no host synchronisation).
    """
    if q.dtype != torch.float32:
        return None
    B, H = q.shape[:2]
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros(3, B, H, dtype=torch.float32, device=q.device)
    return torch.stack([t.abs().nan_to_num(0.0, posinf=0.0).amax(dim=(2, 3)) for t in (q, k, v)])


def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, *, out: Optional[Tensor] = None, return_lse: bool = False
):
    """softmax(scale * q k^T) v, non-causal, forward only, with the CUDA kernel (the contract of the Triton
    launcher vit_kernels.triton.attention.flash_attention_forward, less its tile config).

    q: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim); any strides,
    read in place (no copies); float16, bfloat16 or float32 (all the same); head_dim as
    checks.HEAD_DIM_RANGE["cuda"] says.
    out: None (a new (batch, heads, q_tokens, head_dim) tensor) or a tensor of that shape with any
    strides, written in place: pass ``o.view(B, N, H, hd).transpose(1, 2)`` of an o of shape
    (batch, q_tokens, heads * head_dim) to get the heads concatenated directly.
    Returns out (and, with return_lse, each row's log-sum-exp of the scaled scores, (batch, heads,
    q_tokens) fp32, natural log).
    """
    B, H, N, D = q.shape
    if out is None:
        out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if return_lse else None
    module_for(q.device).flash_attention_forward(q, k, v, out, lse, attention_amax(q, k, v), float(scale))
    return (out, lse) if return_lse else out


def qkv_attention_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tensor:
    """[LayerNorm ->] QKV projection -> attention, the split path: two kernels.

    x: (batch, tokens, dim); qkv_weight: (3*inner, dim); qkv_bias: (3*inner,); norm_weight,
    norm_bias: (dim,). Returns (batch, tokens, inner).
    1. :func:`qkv_projection_forward` (the GEMM with LayerNorm applied as x loads and a head-split
       epilogue) writes (3, batch, heads, tokens, head_dim) with Q already multiplied by scale;
    2. the attention kernel reads Q, K, V straight from that buffer (scale 1) and writes the heads
       concatenated, (batch, tokens, heads * head_dim), with no transpose or copy in between.
    """
    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    qkv = qkv_projection_forward(
        x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
    )
    out = torch.empty((B, N, inner), dtype=x.dtype, device=x.device)
    flash_attention_forward(qkv[0], qkv[1], qkv[2], 1.0, out=out.view(B, N, num_heads, hd).transpose(1, 2))
    return out


# ------------------------------------------------------------------ GEMMs and LayerNorm statistics
# One GEMM template (csrc/gemm/gemm.cuh) with an A-operand loader (dense | LayerNorm applied on load |
# patch gather) and an epilogue (bias, GELU, layer scale + residual | QKV head split | position
# embedding + class token). float16/bfloat16 run on tensor cores (mma.sync), float32 on an fp32 FMA
# path with the same tiling (exact fp32, no TF32). `config`: -1 picks the tile by size, 0 forces the
# 64x64 tile, 1 the 128x128 tile (for tests).

GEMM_DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes
_ACT = {"none": 1, "tanh": 2}  # GELU variants for the fc1 epilogue (0 = no activation)


def gemm_unsupported(dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA GEMM runs this dtype, else why not."""
    if dtype not in GEMM_DTYPES:
        return f"dtype {dtype} is not supported by the CUDA GEMM (float32, float16, bfloat16)"
    return None


def _check_dtype(name: str, t: Tensor) -> None:
    why = gemm_unsupported(t.dtype)
    if why:
        raise TypeError(f"{name}: {why}")


def _rows(name: str, t: Tensor) -> Tensor:
    """t: (..., n) as a (rows, n) view with unit column stride; never copies (raises instead)."""
    if t.shape[-1] != 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name}: the CUDA backend reads rows in place and needs unit stride along the last "
            f"dim, got strides {tuple(t.stride())} (call .contiguous() first)"
        )
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name}: the CUDA backend needs the leading dims of shape {tuple(t.shape)} to "
            f"flatten without a copy, got strides {tuple(t.stride())} (call .contiguous() first)"
        )


def _vec(name: str, t: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter vector (bias, layer scale, LayerNorm weight, class token ...) read as contiguous."""
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError(f"{name}: the CUDA backend expects a contiguous tensor, got strides {tuple(t.stride())}")
    return t.view(-1)


def row_stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Per-row LayerNorm statistics. x: (..., dim) -> (mean, rstd), each (rows,) float32,
    rstd = 1 / sqrt(biased var + eps)."""
    _check_dtype("x", x)
    mean, rstd = module_for(x.device).row_stats(_rows("x", x), float(eps))
    return mean, rstd


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    config: int = -1,
) -> Tensor:
    """x: (..., in); weight: (out, in); bias, layer_scale: (out,); residual: (..., out).
    Returns (..., out) = [residual +] [layer_scale *] (x @ weight^T [+ bias]), one kernel."""
    _check_dtype("x", x)
    x2 = _rows("x", x)
    w = _rows("weight", weight)
    out = torch.empty(tuple(x.shape[:-1]) + (weight.shape[0],), dtype=x.dtype, device=x.device)
    res2 = _rows("residual", residual) if residual is not None else None
    module_for(x.device).gemm_rows(
        x2,
        w,
        _vec("bias", bias),
        None,
        None,
        None,
        None,
        0,
        _vec("layer_scale", layer_scale),
        res2,
        out.view(-1, weight.shape[0]),
        config,
    )
    return out


def layernorm_gelu_mlp_forward(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    eps: float,
    approximate: str,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    config: int = -1,
) -> Tensor:
    """x: (..., dim) -> (..., out) = [residual +] [layer_scale *] fc2(gelu(fc1(LN(x)))).

    Three kernels: row statistics of x (when norm_weight is given; None skips the LayerNorm, as the
    op's torch path does); fc1 with LayerNorm applied as x loads and bias + GELU in the epilogue,
    writing h: (rows, hidden) in x's dtype; fc2 with bias, layer scale and residual in the epilogue.
    """
    _check_dtype("x", x)
    if approximate not in _ACT:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    ext = module_for(x.device)
    x2 = _rows("x", x)
    mean = rstd = None
    if norm_weight is not None:
        mean, rstd = ext.row_stats(x2, float(eps))
    hidden, out_dim = fc1_weight.shape[0], fc2_weight.shape[0]
    h = torch.empty((x2.shape[0], hidden), dtype=x.dtype, device=x.device)
    ext.gemm_rows(
        x2,
        _rows("fc1_weight", fc1_weight),
        _vec("fc1_bias", fc1_bias),
        mean,
        rstd,
        _vec("norm_weight", norm_weight) if mean is not None else None,
        _vec("norm_bias", norm_bias) if mean is not None else None,
        _ACT[approximate],
        None,
        None,
        h,
        config,
    )
    out = torch.empty(tuple(x.shape[:-1]) + (out_dim,), dtype=x.dtype, device=x.device)
    res2 = _rows("residual", residual) if residual is not None else None
    ext.gemm_rows(
        h,
        _rows("fc2_weight", fc2_weight),
        _vec("fc2_bias", fc2_bias),
        None,
        None,
        None,
        None,
        0,
        _vec("layer_scale", layer_scale),
        res2,
        out.view(-1, out_dim),
        config,
    )
    return out


def qkv_projection_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    config: int = -1,
) -> Tensor:
    """[LayerNorm ->] QKV projection with a head-split epilogue.

    x: (batch, tokens, dim); qkv_weight: (3*inner, dim), rows [q; k; v], head-major; qkv_bias:
    (3*inner,); norm_weight, norm_bias: (dim,) apply LayerNorm(x, eps) as x loads.
    Returns a contiguous (3, batch, heads, tokens, head_dim) buffer; Q (index 0) is multiplied by
    ``scale`` in the epilogue, K and V are not.
    """
    _check_dtype("x", x)
    B, N, dim = x.shape
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    ext = module_for(x.device)
    x2 = _rows("x", x)
    mean = rstd = None
    if norm_weight is not None:
        mean, rstd = ext.row_stats(x2, float(eps))
    elif norm_bias is not None:
        raise ValueError("norm_bias: given without norm_weight; pass norm_weight to apply LayerNorm")
    out = torch.empty((3, B, num_heads, N, hd), dtype=x.dtype, device=x.device)
    ext.gemm_qkv(
        x2,
        _rows("qkv_weight", qkv_weight),
        _vec("qkv_bias", qkv_bias),
        mean,
        rstd,
        _vec("norm_weight", norm_weight) if mean is not None else None,
        _vec("norm_bias", norm_bias) if mean is not None else None,
        N,
        num_heads,
        hd,
        float(scale),
        out,
        config,
    )
    return out


def patch_embed_forward(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    patch_size: int,
    pos_embed: Optional[Tensor] = None,
    cls_token: Optional[Tensor] = None,
    image_mean: Optional[Tensor] = None,
    image_std: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    config: int = -1,
) -> Tensor:
    """Patch embedding as one implicit GEMM.

    images: (batch, channels, H, W) read in place through its strides: NCHW (16-byte gathers when
    the patch width allows) or channels_last (element gathers; no copy is made); float at the
    weight's dtype, or uint8 with image_mean and image_std, float32 (channels,) tensors on the
    images' device: each pixel loads as (x / 255 - mean[c]) / std[c] in fp32 (computed as
    x * (1 / (255 std[c])) - mean[c] / std[c], as the Triton kernel does) and is rounded to the weight's
    dtype (vit_kernels.ops.patch_embed checks the values); weight: (dim, channels, p, p) contiguous;
    bias: (dim,); cls_token: (dim,) elements; pos_embed: (prefix + patches, dim) elements.
    out: None (a new tensor) or a contiguous (batch, prefix + patches, dim) tensor to write into.
    Returns out: a contiguous (batch, prefix + patches, dim) at the weight's dtype.
    """
    scale = shift = None
    if images.dtype == torch.uint8:
        _check_dtype("weight", weight)
        scale, shift = pixel_scale_shift(image_mean, image_std, images.shape[1], images.device)
    else:
        _check_dtype("images", images)
        if image_mean is not None or image_std is not None:
            raise ValueError(f"image_mean, image_std: normalize uint8 images on load; got {images.dtype} images")
    B, C, H, W = images.shape
    dim = weight.shape[0]
    if not weight.is_contiguous():
        raise ValueError(
            f"weight: the CUDA backend expects a contiguous (dim, C, p, p) Conv2d weight, got strides "
            f"{tuple(weight.stride())}"
        )
    prefix = 1 if cls_token is not None else 0
    P = (H // patch_size) * (W // patch_size)
    if out is None:
        out = torch.empty((B, prefix + P, dim), dtype=weight.dtype, device=images.device)
    module_for(images.device).gemm_patch(
        images,
        weight.view(dim, -1),
        _vec("bias", bias),
        patch_size,
        _vec("pos_embed", pos_embed),
        _vec("cls_token", cls_token),
        out,
        config,
        scale,
        shift,
    )
    return out


def pixel_scale_shift(
    image_mean: Optional[Tensor], image_std: Optional[Tensor], C: int, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """(scale, shift), float32 (C,) each: 1 / (255 std) and -mean / std, so the kernel computes
    x * scale + shift = (x / 255 - mean) / std per channel."""
    for name, v in (("image_mean", image_mean), ("image_std", image_std)):
        if not isinstance(v, Tensor) or v.shape != (C,) or v.dtype != torch.float32 or v.device != device:
            got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, Tensor) else repr(v)
            raise ValueError(f"{name}: expected a float32 ({C},) tensor on {device} for uint8 images, got {got}")
    return 1.0 / (255.0 * image_std), -image_mean / image_std
