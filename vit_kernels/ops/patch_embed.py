"""patch_embed: patchify + projection, class token and position embedding in one op."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, library, reference  # library imports this file: used at call time only
from ..backends import needs_grad, offer, resolve
from ..cuda.ops import gemm_unsupported as cuda_gemm_unsupported
from .linear import triton_gemm_unsupported


def check_patch_embed(images, weight, bias, patch_size, pos_embed, cls_token, image_mean=None, image_std=None):
    """Checks every argument; returns (tokens, dim, pixel_norm), pixel_norm = (mean, std) as tuples of C
    floats for uint8 images, else None."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        checks.tensor("weight", weight, ndim=4)  # uint8 images: the weight's dtype is the op's dtype
        if images.layout == torch.strided:
            checks.in_memory("images", images)
        if images.layout != torch.strided or images.dim() != 4:
            raise ValueError(
                f"images: expected a dense 4-D (batch, channels, H, W) uint8 tensor, got "
                f"{images.dim()}-D with shape {tuple(images.shape)} ({images.layout})"
            )
        dtype = weight.dtype
    else:
        checks.tensor("images", images, ndim=4)
        dtype = images.dtype
    B, C, H, W = images.shape
    checks.nonempty_dim("images", images, 1, "channel count")
    pixel_norm = check_pixel_norm(images, image_mean, image_std)
    p = checks.positive_int("patch_size", patch_size)
    checks.tensor("weight", weight, ndim=4, dtype=dtype, device=images.device)
    checks.nonempty_dim("weight", weight, 0, "embedding dim")
    dim = weight.shape[0]
    if tuple(weight.shape[1:]) != (C, p, p):
        raise ValueError(
            f"weight: expected Conv2d layout (dim, {C}, {p}, {p}) for {C}-channel images and "
            f"patch_size={p}, got {tuple(weight.shape)}"
        )
    if H == 0 or W == 0:
        raise ValueError(f"images: expected H and W of at least patch_size={p}, got H={H}, W={W}")
    if H % p or W % p:
        raise ValueError(
            f"images: expected H and W divisible by patch_size={p}, got H={H}, W={W} "
            f"(nothing is cropped silently: crop or pad the images first)"
        )
    checks.tensor("bias", bias, shape=(dim,), dtype=dtype, device=images.device, optional=True)
    checks.tensor("cls_token", cls_token, dtype=dtype, device=images.device, optional=True)
    if cls_token is not None and cls_token.numel() != dim:
        raise ValueError(
            f"cls_token: expected {dim} elements ((1, 1, {dim}) or ({dim},)), got shape {tuple(cls_token.shape)}"
        )
    tokens = (1 if cls_token is not None else 0) + (H // p) * (W // p)
    if pos_embed is not None:
        checks.tensor("pos_embed", pos_embed, dtype=dtype, device=images.device)
        shp = tuple(pos_embed.shape)
        if not (shp == (tokens, dim) or shp == (1, tokens, dim)):
            raise ValueError(
                f"pos_embed: expected shape (1, {tokens}, {dim}) or ({tokens}, {dim}) for "
                f"{H}x{W} images, patch_size={p}"
                f"{' and a class token' if cls_token is not None else ''}, got {shp} "
                f"(resample it for this image size first)"
            )
    return tokens, dim, pixel_norm


def check_pixel_norm(images, image_mean, image_std) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """uint8 images need both image_mean and image_std (C finite values each, std > 0): returns them as
    tuples of floats. Float images take neither (they arrive normalized): returns None."""
    C = images.shape[1]
    if images.dtype != torch.uint8:
        if image_mean is not None or image_std is not None:
            raise ValueError(
                f"image_mean, image_std: normalize uint8 images on load; got {images.dtype} images "
                f"(pass the uint8 images, or normalize float images before the op)"
            )
        return None
    if image_mean is None or image_std is None:
        raise ValueError(
            f"image_mean, image_std: uint8 images are normalized as (x / 255 - mean) / std per "
            f"channel: expected {C} values each (the model's data config; (0,)*C and (1,)*C for "
            f"x / 255 alone), got image_mean={image_mean!r}, image_std={image_std!r}"
        )
    out = []
    for name, v in (("image_mean", image_mean), ("image_std", image_std)):
        if isinstance(v, torch.Tensor):
            if v.dim() != 1:
                raise ValueError(
                    f"{name}: expected {C} values (one per channel), got a tensor of shape {tuple(v.shape)}"
                )
            v = v.tolist()
        try:
            vals = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a sequence of {C} numbers (one per channel), got {v!r}") from None
        if len(vals) != C:
            raise ValueError(f"{name}: expected {C} values for {C}-channel images, got {len(vals)}: {vals}")
        if not all(math.isfinite(x) for x in vals):
            raise ValueError(f"{name}: expected finite values, got {vals}")
        if name == "image_std" and not all(x > 0 for x in vals):
            raise ValueError(f"image_std: expected positive values (each channel is divided by it), got {vals}")
        out.append(vals)
    return out[0], out[1]


_PIXEL_NORM_TENSORS: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def pixel_norm_tensors(pixel_norm, device) -> Tuple[Tensor, Tensor]:
    """(mean, std) fp32 (C,) tensors on ``device``, made once per (values, device): no copy per call."""
    key = (pixel_norm, str(device))
    hit = _PIXEL_NORM_TENSORS.get(key)
    if hit is None:
        if len(_PIXEL_NORM_TENSORS) > 64:
            _PIXEL_NORM_TENSORS.clear()
        hit = _PIXEL_NORM_TENSORS[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in pixel_norm)
    return hit


def normalize_pixels(images: Tensor, image_mean: Tensor, image_std: Tensor, dtype: torch.dtype) -> Tensor:
    """Plain PyTorch: uint8 (B, C, H, W) -> ((x / 255 - mean) / std) in fp32 (float64 for a float64
    ``dtype``), rounded to ``dtype``. image_mean, image_std: (C,) tensors."""
    work = torch.promote_types(dtype, torch.float32)
    x = images.to(work) / 255
    x = (x - image_mean.to(work).view(1, -1, 1, 1)) / image_std.to(work).view(1, -1, 1, 1)
    return x.to(dtype)


def layouts_unsupported(weight) -> dict:
    """backend -> why its kernels cannot read the tensors as they are (None: they can). The Triton
    GEMM gathers images and weight through any strides; the CUDA GEMM reads any images but a
    contiguous weight."""
    why = None
    if not weight.is_contiguous():
        why = (
            f"weight: the CUDA kernels read a contiguous (dim, C, p, p) weight, got strides {weight.stride()} "
            f"(pass weight.contiguous())"
        )
    return {"triton": None, "cuda": why}


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    patch_size: int,
    pos_embed: Optional[Tensor] = None,
    cls_token: Optional[Tensor] = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    backend: str = "auto",
    tune: Optional[str] = None,
) -> Tensor:
    """Patch embedding as one implicit GEMM.

    images: (batch, channels, H, W), NCHW or channels_last (NHWC data, e.g. decoded images
    (B, H, W, C), passed as ``x.permute(0, 3, 1, 2)``: read in place, no copy); float, or uint8 with
    image_mean and image_std (channels values each, the model's data config): each pixel becomes
    (x / 255 - mean[c]) / std[c] as the kernel loads it (Triton and CUDA alike), and the result has
    the weight's dtype.
    weight: (dim, channels, p, p);
    bias: (dim,); cls_token: (1, 1, dim) or (dim,); pos_embed: (1, prefix + patches, dim).
    Returns (batch, prefix + (H/p)*(W/p), dim), prefix = 1 with cls_token else 0. batch 0: an
    empty result. bias, cls_token, pos_embed of other strides are copied for the fused kernels, and
    with backend="cuda" the weight too (a channels_last model's; the Triton kernel reads it in place)
    (``last_decision("patch_embed").copied``).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    The custom op ``torch.ops.vit_kernels.patch_embed`` (:mod:`vit_kernels.library`).
    """
    C = images.shape[1] if isinstance(images, torch.Tensor) and images.dim() == 4 else "C"

    return library.run(
        "patch_embed",
        (
            images,
            weight,
            bias,
            pos_embed,
            cls_token,
            patch_size,
            _values("image_mean", image_mean, C),
            _values("image_std", image_std, C),
            backend,
            tune,
        ),
    )


def _values(name: str, v, C) -> Optional[list]:
    """image_mean / image_std as the custom op's float[] (None stays None); check_pixel_norm judges them.
    C: the images' channel count (for the messages, the same as check_pixel_norm's)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.dim() != 1:
            raise ValueError(f"{name}: expected {C} values (one per channel), got a tensor of shape {tuple(v.shape)}")
        v = v.tolist()
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of {C} numbers (one per channel), got {v!r}") from None


def dispatch(images, weight, bias, pos_embed, cls_token, patch_size, image_mean, image_std, backend, tune) -> Tensor:
    """The body of the custom op: checks, the backend decision (recorded), the launch."""
    tokens, dim, pixel_norm = check_patch_embed(
        images, weight, bias, patch_size, pos_embed, cls_token, image_mean, image_std
    )
    patch_size = int(patch_size)  # a numpy integer, say, as the kernels' launch argument
    norm = None if pixel_norm is None else pixel_norm_tensors(pixel_norm, images.device)
    dtype = weight.dtype
    # backend "cuda" asked for: its kernels read a contiguous weight, so a weight of other strides (a model
    # moved to channels_last) is copied like the 1-D parameters (noted in Decision.copied)
    w = {"weight": weight} if backend == "cuda" else {}
    p, notes = checks.contiguous_params(backend, bias=bias, pos_embed=pos_embed, cls_token=cls_token, **w)
    weight = p.get("weight", weight)
    layouts = layouts_unsupported(weight)
    args = (images, weight, p["bias"], p["pos_embed"], p["cls_token"], patch_size, norm)
    empty = images.shape[0] == 0  # nothing to time: the untimed rules pick the backend
    d = resolve(
        "patch_embed",
        backend,
        (images, weight, bias, pos_embed, cls_token),
        unsupported={
            "triton": triton_gemm_unsupported(dtype) or layouts["triton"],
            "cuda": cuda_gemm_unsupported(dtype) or layouts["cuda"],
        },
        has_backward=("triton",),
        tune=tune,
        run=None if empty else _launch,
        args=args,
        key_extra=(patch_size,),
    )
    if d.backend == "torch":
        offer(_launch, (patch_size, norm))
        return _launch(d, images, weight, bias, pos_embed, cls_token, patch_size, norm)
    d = d.with_copied(notes)
    if empty:
        d.with_path("empty")
        if needs_grad(args[:5]):  # nothing to launch; under autograd the torch path gives the empty result its graph
            kw = {} if norm is None else dict(image_mean=norm[0], image_std=norm[1])
            return patch_embed_torch(
                images, weight, bias, patch_size=patch_size, pos_embed=pos_embed, cls_token=cls_token, **kw
            )
        return torch.empty((0, tokens, dim), dtype=dtype, device=images.device)
    offer(_launch, (patch_size, norm))
    return _launch(d, *args)


def _launch(d, images, weight, bias, pos_embed, cls_token, patch_size, norm=None):
    """Run patch_embed as Decision ``d`` says (backend, tile config). The fused
    backends get bias, pos_embed and cls_token contiguous (see :func:`patch_embed`). norm: None, or
    (image_mean, image_std) fp32 (C,) tensors for uint8 images."""
    kw = dict(patch_size=patch_size, pos_embed=pos_embed, cls_token=cls_token)
    if norm is not None:
        kw.update(image_mean=norm[0], image_std=norm[1])
    if d.backend == "triton":
        if needs_grad((images, weight, bias, pos_embed, cls_token)):  # forward and backward kernels
            from ..autograd import PatchEmbed

            if norm is not None:  # the backward kernels read float images: normalized once here
                images = normalize_pixels(images, norm[0], norm[1], weight.dtype)
            return PatchEmbed.apply(images, weight, bias, pos_embed, cls_token, patch_size, tuple(d.config))
        from ..triton import patch_embed as triton_pe

        return triton_pe.patch_embed_forward(images, weight, bias, **kw, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops

        return cuda_ops.patch_embed_forward(images, weight, bias, **kw)
    if d.backend == "reference":
        return reference.patch_embed(images, weight, bias, **kw)
    return patch_embed_torch(images, weight, bias, **kw)


def patch_embed_torch(images, weight, bias, *, patch_size, pos_embed, cls_token, image_mean=None, image_std=None):
    """Plain PyTorch path: (uint8: normalize,) conv2d, flatten, cat, add. Differentiable."""
    B = images.shape[0]
    if images.dtype == torch.uint8:
        images = normalize_pixels(images, image_mean, image_std, weight.dtype)
    x = F.conv2d(images, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if cls_token is not None:
        x = torch.cat([cls_token.reshape(1, 1, -1).expand(B, 1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], x.shape[2])
    return x
