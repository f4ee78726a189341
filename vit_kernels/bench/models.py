"""Models by name for the benchmarks, and the shapes the cost model needs from them.

Names: a reference config (``vit_base_patch16_224``, or ``vit_kernels:vit_base_patch16_224``),
``timm:<name>`` (timm.create_model, random weights), ``torchvision:<name>``
(torchvision.models.get_model, weights=None), ``hf:<name>`` (transformers' ViT with random
weights: ``hf:vit_base_patch16_224``-style names build a ViTConfig from the reference table; any
other name is read with AutoConfig.from_pretrained, which needs the hub or its local cache).

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

FAMILIES = ("vit_kernels", "timm", "torchvision", "hf")


def parse(spec: str) -> Tuple[str, str]:
    """'timm:vit_base_patch16_224' -> ('timm', 'vit_base_patch16_224'); a bare name is a
    reference config."""
    family, sep, name = spec.partition(":")
    if not sep:
        family, name = "vit_kernels", spec
    if family not in FAMILIES or not name:
        raise ValueError(f"model: expected a reference name (e.g. vit_base_patch16_224) or "
                         f"<family>:<name> with family in {FAMILIES}, got {spec!r}")
    if family == "vit_kernels":
        try:  # validate the name without building the model
            _reference_cfg(name)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
    return family, name


def _reference_cfg(name: str) -> dict:
    from ..models.vit import SIZES
    parts = name.split("_")
    ok = (len(parts) == 4 and parts[0] == "vit" and parts[1] in SIZES and parts[2].startswith("patch")
          and parts[2][5:].isdigit() and parts[3].isdigit())
    if not ok:
        raise ValueError(f"expected 'vit_<size>_patch<p>_<img>' with size in {tuple(SIZES)}, got {name!r}")
    dim, depth, heads, hidden = SIZES[parts[1]]
    return dict(embed_dim=dim, depth=depth, num_heads=heads, hidden=hidden, patch_size=int(parts[2][5:]),
                img_size=int(parts[3]))


def build(spec: str, *, img_size: Optional[int] = None, depth: Optional[int] = None,
          attention: str = "sdpa") -> nn.Module:
    """Build the named model (random weights, eval mode) with the given attention implementation."""
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention: expected 'eager' or 'sdpa', got {attention!r}")
    family, name = parse(spec)
    if family == "vit_kernels":
        from ..models import create_model
        kw = {}
        if img_size is not None:
            kw["img_size"] = img_size
        if depth is not None:
            kw["depth"] = depth
        return create_model(name, backend="torch", **kw).eval()
    if family == "timm":
        try:
            import timm
        except ImportError:
            raise RuntimeError("model: timm is not installed (pip install timm)") from None
        kw = {}
        if img_size is not None:
            kw["img_size"] = img_size
        if depth is not None:
            kw["depth"] = depth
        model = timm.create_model(name, pretrained=False, **kw)
        if attention == "eager":
            for m in model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        return model.eval()
    if family == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise RuntimeError("model: torchvision is not installed (pip install torchvision)") from None
        if depth is not None:
            raise ValueError("depth: torchvision's model builders fix the depth; --depth works with "
                             "reference, timm: and hf: models")
        kw = {"image_size": img_size} if img_size is not None else {}
        return torchvision.models.get_model(name, weights=None, **kw).eval()
    try:
        import transformers
    except ImportError:
        raise RuntimeError("model: transformers is not installed (pip install transformers)") from None
    try:
        cfg = _reference_cfg(name)
    except ValueError:
        config = transformers.AutoConfig.from_pretrained(name)
    else:
        config = transformers.ViTConfig(hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"],
                                        num_attention_heads=cfg["num_heads"], intermediate_size=cfg["hidden"],
                                        patch_size=cfg["patch_size"], image_size=cfg["img_size"],
                                        num_labels=1000)
    if img_size is not None:
        config.image_size = img_size
    if depth is not None:
        config.num_hidden_layers = depth
    return transformers.AutoModelForImageClassification.from_config(config, attn_implementation=attention).eval()


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
    """(in_chans, img_size) the model expects."""
    from ..models.vit import VisionTransformer
    if isinstance(model, VisionTransformer):
        return model.patch_embed.proj.in_channels, model.img_size
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "image_size"):
        img = cfg.image_size
        return getattr(cfg, "num_channels", 3), img if isinstance(img, int) else img[0]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "img_size"):
        return pe.proj.in_channels, pe.img_size[0]
    if hasattr(model, "image_size") and hasattr(model, "conv_proj"):
        return model.conv_proj.in_channels, model.image_size
    return 3, 224


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
            return ViTShape(batch, model.num_prefix_tokens + (img // p) ** 2, b.attn.qkv.in_features,
                            b.attn.num_heads, b.mlp.fc1.out_features, len(model.blocks), elem, p, chans,
                            (img, img), head.out_features if isinstance(head, nn.Linear) else 0,
                            model.cls_token is not None, b.attn.qkv.bias is not None, b.attn.ls is not None)
        if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # timm
            b = model.blocks[0]
            p = model.patch_embed.patch_size[0]
            head = model.head
            return ViTShape(batch, model.num_prefix_tokens + model.patch_embed.num_patches, model.embed_dim,
                            b.attn.num_heads, b.mlp.fc1.out_features, len(model.blocks), elem, p, chans,
                            (img, img), head.out_features if isinstance(head, nn.Linear) else 0,
                            model.cls_token is not None, b.attn.qkv.bias is not None,
                            not isinstance(b.ls1, nn.Identity))
        if hasattr(model, "conv_proj") and hasattr(model, "encoder"):  # torchvision
            layer = model.encoder.layers[0]
            head = model.heads[-1]
            return ViTShape(batch, model.seq_length, model.hidden_dim, layer.num_heads, model.mlp_dim,
                            len(model.encoder.layers), elem, model.patch_size, chans, (img, img),
                            head.out_features, True, True, False)
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "model_type", "") == "vit":  # transformers
            return ViTShape(batch, (img // cfg.patch_size) ** 2 + 1, cfg.hidden_size, cfg.num_attention_heads,
                            cfg.intermediate_size, cfg.num_hidden_layers, elem, cfg.patch_size, chans,
                            (img, img), getattr(cfg, "num_labels", 0), True, cfg.qkv_bias, False)
    except (AttributeError, IndexError, TypeError):
        return None
    return None
