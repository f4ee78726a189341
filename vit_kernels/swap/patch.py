"""The patch projection of timm, torchvision and Hugging Face ViTs: a Conv2d with kernel = stride =
patch size. It is replaced by a wrapper that computes the same thing with the fused
``patch_embed`` op (an implicit GEMM that gathers patches from the image) and hands back the
Conv2d's NCHW output shape as a view of the token buffer, so the library's own code around it
(flatten/transpose, NHWC output, padding, norm, class token, position embedding) runs unchanged.

The class token and position embedding stay in the library's code: fusing them into the GEMM's
epilogue would mean replacing the model's own forward, which these adapters do not do.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import library, ops
from .base import Candidate, ReportEntry, SwapWrapper


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
    Conv2d itself."""

    def forward(self, images: Tensor) -> Tensor:
        p = self.kernel_size[0]
        # torch.fx (images an fx.Proxy): sizes unknown, the fused op is recorded; it checks them when the graph runs
        if not library.symbolic(images) and (images.dim() != 4 or images.shape[-2] % p or images.shape[-1] % p
                                             or self.run_original(images)):
            return self.original_forward(images)
        tokens = ops.patch_embed(images, self.weight, self.bias, patch_size=p, backend=self.backend)
        return tokens.transpose(1, 2).unflatten(2, (images.shape[-2] // p, images.shape[-1] // p))


def patch_conv_candidate(path: str, conv: nn.Module, family: str, backend: str,
                         enabled: bool, note: str = "") -> Optional[Candidate]:
    """The candidate for the patch projection ``conv`` at ``path`` (None when it is fused already)."""
    if isinstance(conv, SwapWrapper):
        return None
    why = "not requested (ops)" if not enabled else conv_reason(path, conv)
    notes = ("class token and position embedding stay in the model's code",) + ((note,) if note else ())
    entry = ReportEntry(path, "patch_embed", family, why is None, why or "", notes if why is None else ())
    build = (lambda: FusedPatchConv(conv, backend, [entry])) if why is None else None
    return Candidate(path, conv, [entry], build)
