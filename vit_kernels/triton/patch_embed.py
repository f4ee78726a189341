"""patch_embed in Triton: the GEMM (vit_kernels.triton.gemm) with the patch-gather loader.

Row m of the GEMM is token t = m % T of image b = m // T in the (B, T, dim) token buffer,
T = prefix + (H/p) * (W/p). A patch row's K = C*p*p values are gathered from the image through its
strides as they load (NCHW and channels_last alike; no unfold/im2col tensor, no copy), in the
Conv2d weight's (channel, row, col) order. The class-token row (t == 0 with a class token) loads
nothing and its epilogue writes cls + pos_embed[0]; patch rows get bias + pos_embed[t]. One launch
writes the whole token buffer.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec
from .gemm import A_PATCHES, DTYPES, _check_dtype, _gemm_kernel, check_out, block_config, launch_gemm
from .layernorm import as_rows


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
    gemm_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """Patchify + projection + class token + position embedding, one launch.

    images: (B, C, H, W), any strides (NCHW, channels_last); weight: (dim, C, p, p) (Conv2d
    layout, any strides); bias: (dim,); cls_token: (1, 1, dim) or (dim,); pos_embed:
    (1, prefix + patches, dim) or (prefix + patches, dim), already resampled for H x W.
    patch_size p divides H and W (checked by the op). out: optional (B, T, dim) to write into.
    gemm_config: tiles (None: gemm.block_config's patch tiles).
    Returns (B, T, dim), T = prefix + (H/p)*(W/p), prefix = 1 with cls_token else 0.
    bias: contiguous (read with unit stride; vit_kernels.ops copies other layouts); B >= 1.
    uint8 images (any strides: NHWC data as channels_last) need image_mean and image_std, fp32 (C,)
    tensors on the images' device: each pixel is loaded as (x / 255 - mean[c]) / std[c] in fp32 and
    rounded to the weight's dtype (vit_kernels.ops.patch_embed checks the values); the result has the
    weight's dtype.
    """
    pixel_norm = None
    if images.dtype == torch.uint8:
        _check_dtype("weight", weight)
        pixel_norm = pixel_columns(image_mean, image_std, images.shape[1], patch_size, images.device)
    else:
        _check_dtype("images", images)
        if image_mean is not None or image_std is not None:
            raise ValueError(f"image_mean, image_std: normalize uint8 images; got {images.dtype} images")
    B, C, H, W = images.shape
    p = patch_size
    dim = weight.shape[0]
    gh, gw = H // p, W // p
    prefix = 1 if cls_token is not None else 0
    T = prefix + gh * gw
    out = check_out(out, (B, T, dim), weight)
    pos_strides = (0, 0)
    if pos_embed is not None:
        pos_strides = (pos_embed.stride(-2), pos_embed.stride(-1))
    cls = None
    if cls_token is not None:
        # (1, 1, dim) or (dim,): dim elements; a view, or a copy of dim elements for odd layouts.
        cls = cls_token.reshape(dim)
    return launch_gemm(
        images,
        weight,
        out,
        M=B * T,
        N=dim,
        K=C * p * p,
        T=T,
        a_strides=images.stride(),
        w_strides=weight.stride(),
        out_strides=as_rows("out", out, T),
        bias=bias,
        pos=pos_embed,
        pos_strides=pos_strides,
        cls=cls,
        patch=(p, gw),
        pixel_norm=pixel_norm,
        gemm_config=gemm_config,
    )


def pixel_columns(
    image_mean: Optional[Tensor], image_std: Optional[Tensor], C: int, p: int, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """(scale, shift): fp32 (C*p*p,) per patch column k (channel k // (p*p)), scale = 1 / (255 std),
    shift = -mean / std, so the loader computes x * scale + shift = (x / 255 - mean) / std."""
    for name, v in (("image_mean", image_mean), ("image_std", image_std)):
        if not isinstance(v, Tensor) or v.shape != (C,) or v.dtype != torch.float32 or v.device != device:
            got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, Tensor) else repr(v)
            raise ValueError(f"{name}: expected a float32 ({C},) tensor on {device} for uint8 images, got {got}")
    scale = (1.0 / (255.0 * image_std)).repeat_interleave(p * p)
    shift = (-image_mean / image_std).repeat_interleave(p * p)
    return scale, shift


def aot_spec(
    dtype: torch.dtype,
    layout: str = "nchw",
    has_bias: bool = True,
    has_pos: bool = True,
    prefix: int = 1,
    gemm_config=None,
    archs=(80, 90),
    uint8: bool = False,
) -> AotSpec:
    """The launch patch_embed_forward makes for ``dtype`` with ``layout`` ("nchw" or
    "channels_last") images (``uint8``: uint8 images normalized on load, weight at ``dtype``), recorded at 224 px, patch 16, aot.REPRESENTATIVE's batch and dim (a
    contiguous Conv2d weight, pos_embed (1, T, dim), cls_token (1, 1, dim)), so its specialization is
    the launch's. gemm_config: a tuning alternative's tiles, launched on ``archs``."""
    B, dim, p = REPRESENTATIVE["batch"], REPRESENTATIVE["dim"], 16
    images = torch.empty(B, 3, 224, 224, dtype=torch.uint8 if uint8 else dtype)
    norm = dict(image_mean=torch.zeros(3), image_std=torch.ones(3)) if uint8 else {}
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    T = prefix + (224 // p) ** 2
    weight = torch.empty(dim, 3, p, p, dtype=dtype)
    vec = torch.empty(dim, dtype=dtype)
    pos = torch.empty(1, T, dim, dtype=dtype) if has_pos else None
    cls = torch.empty(1, 1, dim, dtype=dtype) if prefix else None
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = gemm_config or block_config(dtype, A_PATCHES)
    on = ",".join(f"{k}={int(v)}" for k, v in (("HAS_BIAS", has_bias), ("HAS_POS", has_pos), ("PREFIX", prefix)) if v)
    label = f"BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},BLOCK_K={BLOCK_K},{dtype_name(dtype)},A_MODE=1" + (
        f",{on}" if on else ""
    )
    label += ",uint8 images,NORM=3" if uint8 else ""
    if gemm_config is not None:
        label += f",num_warps={num_warps},num_stages={num_stages},tuning"
    call = lambda: patch_embed_forward(
        images,
        weight,
        vec if has_bias else None,
        patch_size=p,  # noqa: E731
        pos_embed=pos,
        cls_token=cls,
        gemm_config=gemm_config,
        **norm,
    )
    return recorded_spec(
        f"gemm_patch_embed_{layout}" + ("_uint8" if uint8 else ""),
        _gemm_kernel,
        call,
        label,
        True,
        tuple(archs),
        shape=f"B={B},224px,patch={p},dim={dim},{layout}",
    )


def aot_specs() -> List[AotSpec]:
    """bias x position embedding x class token, per dtype, for NCHW images; channels_last images
    with the full epilogue (bias, pos, cls); uint8 channels_last (decoded NHWC) images with the full
    epilogue. Tiles: gemm.PATCH_CONFIGS."""
    return [
        aot_spec(dtype, layout, has_bias, has_pos, prefix)
        for dtype in DTYPES
        for has_bias in (False, True)
        for has_pos in (False, True)
        for prefix in (0, 1)
        for layout in ["nchw"] + (["channels_last"] if has_bias and has_pos and prefix else [])
    ] + [aot_spec(dtype, "channels_last", uint8=True) for dtype in DTYPES]
