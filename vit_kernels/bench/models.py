"""Models for the benchmarks: the names and the builder are the model registry's
(:mod:`vit_kernels.models.registry`, re-exported here as ``parse`` and ``build``); this module
adds what the benchmarks need from a built model (input size, logits, the cost model's shape).

Attention implementation: ``attention="eager"`` makes attention separate matmul, softmax and
matmul ops (timm ``fused_attn=False``, transformers ``attn_implementation="eager"``; for the
reference ViT and torchvision, whose code always calls SDPA, :func:`attention_context` holds
SDPA to its math backend, which is those separate ops); ``attention="sdpa"`` is each library's
default, F.scaled_dot_product_attention.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import nn

from .cost import ViTShape

from ..models.registry import FAMILIES, ModelNameError, build, parse  # noqa: F401  (re-exported)


def attention_context(attention: str):
    """The context a forward runs in: SDPA held to its math backend for "eager"."""
    if attention == "eager":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def logits(out) -> torch.Tensor:
    """The logits of a model output (a tensor, or transformers' output object)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"model output: expected a tensor or an object with .logits, got {type(out).__name__}")


def input_size(model: nn.Module) -> Tuple[int, int]:
    """(in_chans, img_size) the model expects, read by vit_kernels.models.registry.image_spec
    (3 channels at 224 px for a model it does not recognise)."""
    from ..models.registry import image_spec

    img, chans = image_spec(model)
    return chans or 3, img or 224


def _vp_patch(model) -> int:
    p = model.patch_size
    return p[0] if isinstance(p, (tuple, list)) else int(p)


def depth_of(model: nn.Module) -> Optional[int]:
    """The number of transformer blocks (None for a model this does not recognise)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):  # transformers
        return cfg.num_hidden_layers
    for path in ("blocks", "encoder.layers", "vit.encoder.layer", "encoder.layer", "transformer.layers"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            return len(m)
    return None


def shape_of(model: nn.Module, batch: int, dtype: torch.dtype) -> Optional[ViTShape]:
    """The cost model's view of a ViT (None for a model this does not recognise)."""
    from ..models.vit import VisionTransformer
    from .cost import dtype_bytes

    elem = dtype_bytes(dtype)
    chans, img = input_size(model)
    try:
        if isinstance(model, VisionTransformer):
            b = model.blocks[0]
            p = model.patch_size
            head = model.head
            return ViTShape(
                batch,
                model.num_prefix_tokens + (img // p) ** 2,
                b.attn.qkv.in_features,
                b.attn.num_heads,
                b.mlp.fc1.out_features,
                len(model.blocks),
                elem,
                p,
                chans,
                (img, img),
                head.out_features if isinstance(head, nn.Linear) else 0,
                model.cls_token is not None,
                b.attn.qkv.bias is not None,
                b.attn.ls is not None,
            )
        if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # timm
            b = model.blocks[0]
            p = model.patch_embed.patch_size[0]
            head = model.head
            return ViTShape(
                batch,
                model.num_prefix_tokens + model.patch_embed.num_patches,
                model.embed_dim,
                b.attn.num_heads,
                b.mlp.fc1.out_features,
                len(model.blocks),
                elem,
                p,
                chans,
                (img, img),
                head.out_features if isinstance(head, nn.Linear) else 0,
                model.cls_token is not None,
                b.attn.qkv.bias is not None,
                not isinstance(b.ls1, nn.Identity),
            )
        if hasattr(model, "conv_proj") and hasattr(model, "encoder"):  # torchvision
            layer = model.encoder.layers[0]
            head = model.heads[-1]
            return ViTShape(
                batch,
                model.seq_length,
                model.hidden_dim,
                layer.num_heads,
                model.mlp_dim,
                len(model.encoder.layers),
                elem,
                model.patch_size,
                chans,
                (img, img),
                head.out_features,
                True,
                True,
                False,
            )
        if hasattr(model, "to_patch_embedding") and hasattr(model, "transformer"):  # vit_pytorch
            attn, ff = model.transformer.layers[0]
            return ViTShape(
                batch,
                model.pos_embedding.shape[-2],
                model.pos_embedding.shape[-1],
                attn.heads,
                ff.net[1].out_features,
                len(model.transformer.layers),
                elem,
                _vp_patch(model),
                chans,
                (img, img),
                model.mlp_head.out_features,
                True,
                attn.to_qkv.bias is not None,
                False,
            )
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "model_type", "") == "vit":  # transformers
            return ViTShape(
                batch,
                (img // cfg.patch_size) ** 2 + 1,
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                elem,
                cfg.patch_size,
                chans,
                (img, img),
                getattr(cfg, "num_labels", 0),
                True,
                cfg.qkv_bias,
                False,
            )
    except (AttributeError, IndexError, TypeError):
        return None
    return None
