"""patch_embed in Triton: the GEMM (vit_kernels.triton.gemm) with the patch-gather loader.

Row m of the GEMM is token t = m % T of image b = m // T in the (B, T, dim) token buffer,
T = prefix + (H/p) * (W/p). A patch row's K = C*p*p values are gathered from the image through its
strides as they load (NCHW and channels_last alike; no unfold/im2col tensor, no copy), in the
Conv2d weight's (channel, row, col) order. The class-token row (t == 0 with a class token) loads
nothing and its epilogue writes cls + pos_embed[0]; patch rows get bias + pos_embed[t]. One launch
writes the whole token buffer.
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor

from .aot import AotSpec
from .gemm import DTYPES, _PTR_ARGS, _check_dtype, _check_out, aot_spec, launch_gemm
from .layernorm import as_rows


def patch_embed_forward(images: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, patch_size: int,
                        pos_embed: Optional[Tensor] = None, cls_token: Optional[Tensor] = None,
                        out: Optional[Tensor] = None) -> Tensor:
    """Patchify + projection + class token + position embedding, one launch.

    images: (B, C, H, W), any strides (NCHW, channels_last); weight: (dim, C, p, p) (Conv2d
    layout, any strides); bias: (dim,); cls_token: (1, 1, dim) or (dim,); pos_embed:
    (1, prefix + patches, dim) or (prefix + patches, dim), already resampled for H x W.
    patch_size p divides H and W (checked by the op). out: optional (B, T, dim) to write into.
    Returns (B, T, dim), T = prefix + (H/p)*(W/p), prefix = 1 with cls_token else 0.
    bias: contiguous (read with unit stride; vit_kernels.ops copies other layouts); B >= 1.
    """
    _check_dtype("images", images)
    B, C, H, W = images.shape
    p = patch_size
    dim = weight.shape[0]
    gh, gw = H // p, W // p
    prefix = 1 if cls_token is not None else 0
    T = prefix + gh * gw
    out = _check_out(out, (B, T, dim), images)
    pos_strides = (0, 0)
    if pos_embed is not None:
        pos_strides = (pos_embed.stride(-2), pos_embed.stride(-1))
    cls = None
    if cls_token is not None:
        # (1, 1, dim) or (dim,): dim elements; a view, or a copy of dim elements for odd layouts.
        cls = cls_token.reshape(dim)
    return launch_gemm(
        images, weight, out, M=B * T, N=dim, K=C * p * p, T=T, a_strides=images.stride(),
        w_strides=weight.stride(), out_strides=as_rows("out", out, T), bias=bias,
        pos=pos_embed, pos_strides=pos_strides, cls=cls, patch=(p, gw))


# What Triton's launcher specializes for the usual call (see gemm.UNIT_STRIDES_ROWS): NCHW images
# (unit stride along W) or channels_last (unit stride along C), a contiguous Conv2d weight, a
# contiguous out, pos_embed and cls token; 224-px images, dims multiple of 16.
_UNIT_COMMON = ("s_ws", "s_on", "s_pn", "s_cls")
_DIVISIBLE = _PTR_ARGS + ("N", "K", "s_ab", "s_ah", "s_wn", "s_wc", "s_wr", "s_ob", "s_ot", "s_pt", "P")
LAYOUTS = {"nchw": ("s_aw",) + _UNIT_COMMON, "channels_last": ("s_ac",) + _UNIT_COMMON}


def aot_specs() -> List[AotSpec]:
    """bias x position embedding x class token, per dtype, for NCHW images; channels_last images
    with the full epilogue (bias, pos, cls). Tiles: gemm.PATCH_CONFIGS."""
    specs = []
    for dtype in DTYPES:
        for has_bias in (False, True):
            for has_pos in (False, True):
                for prefix in (0, 1):
                    layouts = ["nchw"] + (["channels_last"] if has_bias and has_pos and prefix else [])
                    for layout in layouts:
                        unit = LAYOUTS[layout]
                        div = tuple(d for d in _DIVISIBLE if not (layout == "channels_last" and d == "s_ah"))
                        specs.append(aot_spec(f"gemm_patch_embed_{layout}", dtype, unit_strides=unit,
                                              divisible=div, a_mode=1, has_bias=has_bias, has_pos=has_pos,
                                              prefix=prefix))
    return specs
