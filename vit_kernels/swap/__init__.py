"""fuse / unfuse / fuse_report: swap fused modules into existing ViTs, one adapter per family."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..nn import set_backend


def fuse(model: nn.Module, *, backend: str = "auto",
         ops: Iterable[str] = ("patch_embed", "attention", "mlp")) -> nn.Module:
    """Fuse ``model`` in place and return it. For vit_kernels models this sets the backend;
    adapters for timm, torchvision, transformers and vit-pytorch live beside this file."""
    from ..models.vit import VisionTransformer
    if isinstance(model, VisionTransformer):
        return set_backend(model, backend)
    raise NotImplementedError(f"model: no fuse adapter for {type(model).__module__}.{type(model).__name__} yet")
