"""The patch projection of timm, torchvision and Hugging Face ViTs: a Conv2d with kernel = stride =
patch size. It is replaced by a wrapper that computes the same thing with the fused
``patch_embed`` op (an implicit GEMM that gathers patches from the image) and hands back the
Conv2d's NCHW output shape as a view of the token buffer, so the library's own code around it
(flatten/transpose, NHWC output, padding, norm, class token, position embedding) runs unchanged.

The class token and position embedding stay in the library's code: fusing them into the GEMM's
epilogue would mean replacing the model's own forward, which these adapters do not do.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import library, ops
from ..ops.patch_embed import check_pixel_norm, normalize_pixels, pixel_norm_tensors
from .report import Candidate, ReportEntry
from .wrapper import SwapWrapper, at_autocast


def conv_reason(name: str, conv: nn.Module) -> Optional[str]:
    """None when ``conv`` is a patchifying Conv2d the fused op computes exactly."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is {type(conv).__name__}, not an nn.Conv2d"
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k[0] != k[1]:
        return f"{name} has a non-square kernel {k}; the fused op takes one patch_size"
    if s != k:
        return f"{name} has stride {s} != kernel {k} (overlapping patches)"
    if conv.padding not in ((0, 0), "valid") or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return f"{name} has padding/dilation/groups (padding={conv.padding}, dilation={conv.dilation}, groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"{name} has padding_mode={conv.padding_mode!r}"
    return None


class FusedPatchConv(SwapWrapper):
    """Replaces a patchifying Conv2d: images (batch, C, H, W) -> (batch, dim, H/p, W/p), computed by
    :func:`vit_kernels.ops.patch_embed`; the result is a (non-contiguous) NCHW view of the
    (batch, tokens, dim) buffer the op writes. Parameters: ``weight`` (dim, C, p, p), ``bias``.
    Images whose H or W is not a multiple of p (the Conv2d would drop the remainder) run the
    Conv2d itself (saying so, as every fall-back does).

    uint8 images (NCHW, or NHWC data as channels_last) are normalized as (x / 255 - mean) / std
    while the kernel loads them, with ``image_mean`` / ``image_std``: the model's data config, set
    by the adapter at fuse where the family has one (timm's pretrained_cfg, torchvision's weights
    transforms), else None (uint8 refused, naming them; assign them to serve uint8)."""

    image_mean: Optional[Tuple[float, ...]] = None
    image_std: Optional[Tuple[float, ...]] = None

    def forward(self, images: Tensor) -> Tensor:
        p = self.kernel_size[0]
        if library.symbolic(images):  # torch.fx records the fused op; it checks the sizes when the graph runs
            tokens = ops.patch_embed(images, self.weight, self.bias, patch_size=p, backend=self.backend)
            return tokens.transpose(1, 2).unflatten(2, (images.shape[-2] // p, images.shape[-1] // p))
        norm = {}
        if images.dtype == torch.uint8:
            pixel_norm = check_pixel_norm(images, self.image_mean, self.image_std)
            norm = dict(image_mean=pixel_norm[0], image_std=pixel_norm[1])
        why = None
        if images.dim() != 4:
            why = "images are not (batch, channels, H, W)"
        elif images.shape[-2] % p or images.shape[-1] % p:
            why = (
                f"the image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p} (the Conv2d "
                f"drops the remainder)"
            )
        why = why or self.original_reason(images)
        if why:
            if norm:  # the original Conv2d takes float images: normalize as the kernel would
                mean, std = pixel_norm_tensors(pixel_norm, images.device)
                images = normalize_pixels(images, mean, std, self.weight.dtype)
            return self.fall_back(why, images)
        B, _, H, W = images.shape
        # under autocast at the autocast dtype, as the Conv2d's output is
        tokens = at_autocast(
            ops.patch_embed, images, self.weight, self.bias, patch_size=p, backend=self.backend, **norm
        )
        return tokens.transpose(1, 2).unflatten(2, (H // p, W // p))


def patch_conv_candidate(
    path: str,
    conv: nn.Module,
    family: str,
    backend: str,
    enabled: bool,
    note: str = "",
    data_config: Optional[Tuple[Sequence[float], Sequence[float], str]] = None,
) -> Optional[Candidate]:
    """The candidate for the patch projection ``conv`` at ``path`` (None when it is fused already).
    data_config: (mean, std, where from) for uint8 images, or None (uint8 not served; ``note`` may say why)."""
    if isinstance(conv, SwapWrapper):
        return None
    why = "not requested (ops)" if not enabled else conv_reason(path, conv)
    notes = ("class token and position embedding stay in the model's code",) + ((note,) if note else ())
    if data_config is not None:
        mean, std, source = data_config
        notes += (f"uint8 images are normalized on load with mean={tuple(mean)}, std={tuple(std)} ({source})",)

    def build():
        w = FusedPatchConv(conv, backend, [entry])
        if data_config is not None:
            w.image_mean, w.image_std = tuple(map(float, data_config[0])), tuple(map(float, data_config[1]))
        return w

    entry = ReportEntry(path, "patch_embed", family, why is None, why or "", notes if why is None else ())
    return Candidate(path, conv, [entry], build if why is None else None)
