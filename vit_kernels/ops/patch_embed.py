"""patch_embed: patchify + projection, class token and position embedding in one op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, reference
from ..backends import needs_grad, resolve
from ..cuda.ops import gemm_unsupported as cuda_gemm_unsupported
from .linear import triton_gemm_unsupported


def check_patch_embed(images, weight, bias, patch_size, pos_embed, cls_token):
    checks.tensor("images", images, ndim=4)
    B, C, H, W = images.shape
    checks.nonempty_dim("images", images, 1, "channel count")
    p = checks.positive_int("patch_size", patch_size)
    checks.tensor("weight", weight, ndim=4, dtype=images.dtype, device=images.device)
    checks.nonempty_dim("weight", weight, 0, "embedding dim")
    dim = weight.shape[0]
    if tuple(weight.shape[1:]) != (C, p, p):
        raise ValueError(f"weight: expected Conv2d layout (dim, {C}, {p}, {p}) for {C}-channel images and "
                         f"patch_size={p}, got {tuple(weight.shape)}")
    if H == 0 or W == 0:
        raise ValueError(f"images: expected H and W of at least patch_size={p}, got H={H}, W={W}")
    if H % p or W % p:
        raise ValueError(f"images: expected H and W divisible by patch_size={p}, got H={H}, W={W} "
                         f"(nothing is cropped silently: crop or pad the images first)")
    checks.tensor("bias", bias, shape=(dim,), dtype=images.dtype, device=images.device, optional=True)
    checks.tensor("cls_token", cls_token, dtype=images.dtype, device=images.device, optional=True)
    if cls_token is not None and cls_token.numel() != dim:
        raise ValueError(f"cls_token: expected {dim} elements ((1, 1, {dim}) or ({dim},)), got shape "
                         f"{tuple(cls_token.shape)}")
    tokens = (1 if cls_token is not None else 0) + (H // p) * (W // p)
    if pos_embed is not None:
        checks.tensor("pos_embed", pos_embed, dtype=images.dtype, device=images.device)
        shp = tuple(pos_embed.shape)
        if not (shp == (tokens, dim) or shp == (1, tokens, dim)):
            raise ValueError(f"pos_embed: expected shape (1, {tokens}, {dim}) or ({tokens}, {dim}) for "
                             f"{H}x{W} images, patch_size={p}"
                             f"{' and a class token' if cls_token is not None else ''}, got {shp} "
                             f"(resample it for this image size first)")
    return tokens, dim


def layouts_unsupported(weight) -> dict:
    """backend -> why its kernels cannot read the tensors as they are (None: they can). The Triton
    GEMM gathers images and weight through any strides; the CUDA GEMM reads any images but a
    contiguous weight."""
    why = None
    if not weight.is_contiguous():
        why = (f"weight: the CUDA kernels read a contiguous (dim, C, p, p) weight, got strides {weight.stride()} "
               f"(pass weight.contiguous())")
    return {"triton": None, "cuda": why}


def patch_embed(images: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, patch_size: int,
                pos_embed: Optional[Tensor] = None, cls_token: Optional[Tensor] = None,
                backend: str = "auto", tune: Optional[str] = None) -> Tensor:
    """Patch embedding as one implicit GEMM.

    images: (batch, channels, H, W), NCHW or channels_last; weight: (dim, channels, p, p);
    bias: (dim,); cls_token: (1, 1, dim) or (dim,); pos_embed: (1, prefix + patches, dim).
    Returns (batch, prefix + (H/p)*(W/p), dim), prefix = 1 with cls_token else 0. batch 0: an
    empty result. bias, cls_token, pos_embed of other strides are copied for the fused kernels
    (``last_decision("patch_embed").copied``).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    """
    tokens, dim = check_patch_embed(images, weight, bias, patch_size, pos_embed, cls_token)
    patch_size = int(patch_size)   # a numpy integer, say, as the kernels' launch argument
    layouts = layouts_unsupported(weight)
    p, notes = checks.contiguous_params(backend, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    args = (images, weight, p["bias"], p["pos_embed"], p["cls_token"], patch_size)
    empty = images.shape[0] == 0   # nothing to time: the untimed rules pick the backend
    d = resolve("patch_embed", backend, (images, weight, bias, pos_embed, cls_token),
                unsupported={"triton": triton_gemm_unsupported(images.dtype) or layouts["triton"],
                             "cuda": cuda_gemm_unsupported(images.dtype) or layouts["cuda"]},
                has_backward=("triton",), tune=tune, run=None if empty else _launch, args=args,
                key_extra=(patch_size,))
    if d.backend == "torch":
        return _launch(d, images, weight, bias, pos_embed, cls_token, patch_size)
    d = d.with_copied(notes)
    if empty:
        d.with_path("empty")
        if needs_grad(args[:5]):   # nothing to launch; under autograd the torch path gives the empty result its graph
            return patch_embed_torch(images, weight, bias, patch_size=patch_size, pos_embed=pos_embed,
                                     cls_token=cls_token)
        return torch.empty((0, tokens, dim), dtype=images.dtype, device=images.device)
    return _launch(d, *args)


def _launch(d, images, weight, bias, pos_embed, cls_token, patch_size):
    """Run patch_embed as Decision ``d`` says (backend, tile config). The fused backends get bias,
    pos_embed and cls_token contiguous (see :func:`patch_embed`)."""
    kw = dict(patch_size=patch_size, pos_embed=pos_embed, cls_token=cls_token)
    if d.backend == "triton":
        if needs_grad((images, weight, bias, pos_embed, cls_token)):   # forward and backward kernels
            from ..autograd import PatchEmbed
            return PatchEmbed.apply(images, weight, bias, pos_embed, cls_token, patch_size, tuple(d.config))
        from ..triton import patch_embed as triton_pe
        return triton_pe.patch_embed_forward(images, weight, bias, **kw, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops
        return cuda_ops.patch_embed(images, weight, bias, **kw)
    if d.backend == "reference":
        return reference.patch_embed(images, weight, bias, **kw)
    return patch_embed_torch(images, weight, bias, **kw)


def patch_embed_torch(images, weight, bias, *, patch_size, pos_embed, cls_token):
    """Plain PyTorch path: conv2d, flatten, cat, add. Differentiable."""
    B = images.shape[0]
    x = F.conv2d(images, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if cls_token is not None:
        x = torch.cat([cls_token.reshape(1, 1, -1).expand(B, 1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return x
