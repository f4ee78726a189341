"""One model registry: the names every command accepts (bench, verify, profile-attention, the
analysis commands) and the one builder behind them. Nothing is downloaded.

Names (``family:name``; a bare name is a reference name):
- ``vit_base_patch16_224`` or ``vit_kernels:vit_base_patch16_224``: vit_kernels' reference ViT,
  vit_{tiny,small,base,large,huge}_patch<p>_<img>;
- ``timm:<name>``: ``timm.create_model(name, pretrained=False)``: timm's own config and
  pretrained cfg (input size, classes), random weights;
- ``torchvision:<name>``: vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, torchvision's
  VisionTransformer with those builders' hyper-parameters (weights=None);
- ``hf:<name>``: a transformers ViT (random weights) from a ViTConfig: a known hub name
  (google/vit-base-patch16-224, ...) or a reference-style name (hf:vit_tiny_patch16_224) mapped
  to its hyper-parameters here, a local folder holding config.json (or the file), or a name
  already in the local Hugging Face cache (read with local_files_only=True). Any other name
  needs the network and is refused in one line that says so;
- ``vit_pytorch:<preset>``: vit-pytorch's ViT, presets vit_{tiny,...,huge}_patch<p>_<img>.

Local weights: :func:`load_checkpoint` (.safetensors, or a torch.save state_dict read with
``weights_only=True``).

Errors are :class:`ModelNameError` (a ValueError) with one line naming the argument ("model",
"depth", "img_size", "checkpoint"), what was expected and what was received; the commands turn
it into their exit message.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Tuple

import torch
from torch import nn

FAMILIES = ("vit_kernels", "timm", "torchvision", "hf", "vit_pytorch")
EXAMPLES = (
    "vit_base_patch16_224, vit_kernels:vit_tiny_patch16_224, timm:vit_base_patch16_224, "
    "torchvision:vit_b_16, hf:google/vit-base-patch16-224, vit_pytorch:vit_base_patch16_224"
)
HELP = (
    "a reference name (vit_base_patch16_224) or family:name with family in "
    + ", ".join(FAMILIES)
    + "; e.g. "
    + EXAMPLES
    + ". Built from the library's own config, random weights unless "
    "--checkpoint; nothing is downloaded"
)

# size -> (dim, depth, heads, mlp) as in Table 1 of the ViT paper (reference, hf and vit_pytorch presets)
SIZES = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
# torchvision name -> (patch, layers, heads, hidden, mlp), as torchvision's builders set them
TORCHVISION = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}
# Hugging Face hub names mapped to ViTConfig hyper-parameters locally (never fetched).
HF_NAMES = {
    "google/vit-base-patch16-224": dict(size="base", patch=16, img=224, labels=1000),
    "google/vit-base-patch16-384": dict(size="base", patch=16, img=384, labels=1000),
    "google/vit-base-patch32-384": dict(size="base", patch=32, img=384, labels=1000),
    "google/vit-large-patch16-224": dict(size="large", patch=16, img=224, labels=1000),
    "google/vit-large-patch16-384": dict(size="large", patch=16, img=384, labels=1000),
    "google/vit-base-patch16-224-in21k": dict(size="base", patch=16, img=224, labels=0),
    "google/vit-base-patch32-224-in21k": dict(size="base", patch=32, img=224, labels=0),
    "google/vit-large-patch16-224-in21k": dict(size="large", patch=16, img=224, labels=0),
    "google/vit-huge-patch14-224-in21k": dict(size="huge", patch=14, img=224, labels=0),
}
# the keys a local config.json must hold (transformers would fill in ViT-Base for a missing one)
HF_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
)


class ModelNameError(ValueError):
    """A model name, or a build argument, that the registry refuses (one line)."""


def preset(name: str, argument: str = "model") -> Tuple[tuple, int, int]:
    """'vit_<size>_patch<p>_<img>' -> ((dim, depth, heads, mlp), patch, img): the one parser of
    reference-style names (the registry, vit_kernels.models.create_model). ``argument`` names the
    argument in the error."""
    parts = name.split("_")
    ok = (
        len(parts) == 4
        and parts[0] == "vit"
        and parts[1] in SIZES
        and parts[2].startswith("patch")
        and parts[2][5:].isdigit()
        and parts[3].isdigit()
    )
    if not ok:
        raise ModelNameError(
            f"{argument}: expected a preset 'vit_<size>_patch<p>_<img>' with size in {tuple(SIZES)}, "
            f"e.g. 'vit_base_patch16_224', got {name!r}"
        )
    return SIZES[parts[1]], int(parts[2][5:]), int(parts[3])


def parse(spec: str) -> Tuple[str, str]:
    """'timm:vit_base_patch16_224' -> ('timm', 'vit_base_patch16_224'); a bare name is a reference
    name. Checks what can be checked without building (reference and preset names)."""
    family, sep, name = spec.partition(":")
    if not sep:
        family, name = "vit_kernels", spec
    if family not in FAMILIES or not name:
        raise ModelNameError(
            f"model: expected a reference name (e.g. vit_base_patch16_224) or family:name with "
            f"family in {FAMILIES}, got {spec!r}"
        )
    if family in ("vit_kernels", "vit_pytorch"):
        preset(name)
    if family == "torchvision" and name not in TORCHVISION:
        raise ModelNameError(f"model: torchvision names are {tuple(TORCHVISION)}, got {name!r}")
    return family, name


def image_spec(model: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """(image size, channels) read from the attributes of the known ViT families (transformers, timm,
    torchvision, vit_kernels, vit-pytorch); (None, None) for a model this does not recognise. The one
    image-size sniffer: verify, analysis and the bench harness read a model's input through it."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "image_size"):  # transformers
        img = cfg.image_size
        return (img[0] if isinstance(img, (tuple, list)) else img), getattr(cfg, "num_channels", 3)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "img_size") and hasattr(pe, "proj"):  # timm
        img = pe.img_size
        return (img[0] if isinstance(img, (tuple, list)) else img), getattr(pe.proj, "in_channels", 3)
    if isinstance(getattr(model, "image_size", None), int) and hasattr(model, "conv_proj"):  # torchvision
        return model.image_size, getattr(model.conv_proj, "in_channels", 3)
    if isinstance(getattr(model, "img_size", None), int):  # vit_kernels
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        return model.img_size, getattr(proj, "in_channels", 3)
    tpe = getattr(model, "to_patch_embedding", None)
    pos = getattr(model, "pos_embedding", None)
    if isinstance(tpe, nn.Module) and isinstance(pos, torch.Tensor):  # vit-pytorch
        rearrange = tpe[0] if isinstance(tpe, nn.Sequential) else getattr(tpe, "_modules", {}).get("0")
        p = getattr(rearrange, "axes_lengths", {}).get("p1")
        lin = next((m for m in tpe.modules() if isinstance(m, nn.Linear)), None)
        cls = getattr(model, "cls_token", None)
        n_cls = 1 if cls is None else (cls.shape[-2] if cls.dim() == 3 else cls.shape[0])
        if p and lin is not None:
            grid = math.isqrt(pos.shape[-2] - n_cls)
            return grid * p, lin.in_features // (p * p)
    return None, None


def build(
    spec: str,
    *,
    img_size: Optional[int] = None,
    depth: Optional[int] = None,
    attention: str = "sdpa",
    backend: Optional[str] = None,
) -> nn.Module:
    """The named model, random weights, eval mode; nothing downloaded.

    attention: "sdpa" (each library's default) or "eager" (separate matmul/softmax/matmul ops:
    timm fused_attn=False, transformers attn_implementation="eager"; the reference ViT and
    torchvision call SDPA, see bench.models.attention_context). backend: the reference ViT's
    backend (None: its default).
    """
    if attention not in ("eager", "sdpa"):
        raise ModelNameError(f"attention: expected 'eager' or 'sdpa', got {attention!r}")
    family, name = parse(spec)
    if family == "vit_kernels":
        from .vit import create_model

        kw = {k: v for k, v in (("depth", depth), ("img_size", img_size), ("backend", backend)) if v is not None}
        return create_model(name, **kw).eval()
    if family == "timm":
        timm = _import("timm", "timm")
        if not timm.is_model(name):
            raise ModelNameError(f"model: expected a timm model name (timm.list_models('vit_*')), got {name!r}")
        kw = {k: v for k, v in (("depth", depth), ("img_size", img_size)) if v is not None}
        try:
            model = timm.create_model(name, pretrained=False, **kw)
        except TypeError as e:  # a model class that takes no depth / img_size
            raise ModelNameError(f"model: expected a timm model that takes {', '.join(kw)}, got {name!r} ({e})")
        if attention == "eager":
            for m in model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        return model.eval()
    if family == "torchvision":
        _import("torchvision", "torchvision")
        from torchvision.models.vision_transformer import VisionTransformer

        p, layers, heads, hidden, mlp = TORCHVISION[name]
        _check_img(img_size, p)
        m = VisionTransformer(
            image_size=img_size or 224,
            patch_size=p,
            num_layers=depth or layers,
            num_heads=heads,
            hidden_dim=hidden,
            mlp_dim=mlp,
        )
        # torchvision initialises the head to zeros: logits would be 0 whatever the encoder computes
        torch.nn.init.normal_(m.heads.head.weight, std=0.02)
        return m.eval()
    if family == "hf":
        transformers = _import("transformers", "transformers")
        cfg, classifier = hf_config(name)
        if depth is not None:
            cfg.num_hidden_layers = depth
        if img_size is not None:
            cfg.image_size = img_size
        cfg._attn_implementation = attention
        cls = transformers.ViTForImageClassification if classifier else transformers.ViTModel
        return cls(cfg).eval()
    _import("vit_pytorch", "vit-pytorch")
    from vit_pytorch import ViT

    (dim, layers, heads, mlp), p, size = preset(name)
    _check_img(img_size, p)
    return ViT(
        image_size=img_size or size,
        patch_size=p,
        num_classes=1000,
        dim=dim,
        depth=depth or layers,
        heads=heads,
        dim_head=dim // heads,
        mlp_dim=mlp,
    ).eval()


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelNameError(
            f"model: the {module} family needs {package}, which is not installed "
            f"(pip install {package}, or pip install 'vit_kernels[bench]')"
        ) from None


def _check_img(img, patch: int) -> None:
    if img is not None and img % patch:
        raise ModelNameError(f"img_size: expected a multiple of patch_size={patch}, got {img}")


def hf_config(name: str):
    """(ViTConfig, has a classifier) for an hf: name, without the network."""
    from transformers import ViTConfig

    known = HF_NAMES.get(name)
    if known is None and name.startswith("vit_") and not os.path.exists(name):
        try:
            (_, _, _, _), p, img = preset(name)
            known = dict(size=name.split("_")[1], patch=p, img=img, labels=1000)
        except ModelNameError:
            known = None
    if known is not None:
        dim, depth, heads, mlp = SIZES[known["size"]]
        cfg = ViTConfig(
            hidden_size=dim,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            patch_size=known["patch"],
            image_size=known["img"],
            qkv_bias=True,
        )
        if known["labels"]:
            cfg.num_labels = known["labels"]
        return cfg, bool(known["labels"])
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        if os.path.isdir(name):
            raise ModelNameError(
                f"model: expected hf:<known name or local config>, got hf:{name}: the folder "
                f"{name!r} holds no config.json (nothing is downloaded)"
            )
        if name.startswith(("/", ".", "~")) or name.endswith(".json"):  # a path, not a hub name
            raise ModelNameError(
                f"model: expected hf:<known name or local config>, got hf:{name}: no such file "
                f"or folder (nothing is downloaded)"
            )
        cached = _hf_cached_config(name)
        if cached is None:
            raise ModelNameError(
                f"model: hf:{name} needs the network (not one of the {len(HF_NAMES)} known names such as "
                f"{next(iter(HF_NAMES))}, not a local config.json or folder, not in the local Hugging Face cache); "
                f"nothing is downloaded: fetch it once (huggingface-cli download {name} config.json) or pass a "
                f"local folder"
            )
        path = cached
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelNameError(
            f"model: expected a JSON ViT config in {path}, got a file that does not parse: {str(e).splitlines()[0]}"
        )
    if not isinstance(d, dict):
        raise ModelNameError(f"model: expected a JSON object (a ViT config) in {path}, got a {type(d).__name__}")
    if d.get("model_type", "vit") != "vit":
        raise ModelNameError(f"model: {path} has model_type={d.get('model_type')!r}; only 'vit' is supported")
    absent = [k for k in HF_REQUIRED if k not in d]
    if absent:
        raise ModelNameError(
            f"model: expected a ViT config.json with {', '.join(HF_REQUIRED)} in {path}, got one "
            f"without {', '.join(absent)}"
        )
    try:
        cfg = ViTConfig.from_dict(d)
    except Exception as e:  # transformers raises its own validation errors
        raise ModelNameError(
            f"model: expected a ViT config in {path}, got one transformers refuses: {' '.join(str(e).split())}"
        )
    for key in HF_REQUIRED + ("num_channels",):
        v = getattr(cfg, key, None)
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModelNameError(f"model: expected {key} >= 1 (an integer) in {path}, got {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ModelNameError(
            f"model: expected hidden_size divisible by num_attention_heads in {path}, got "
            f"{cfg.hidden_size} and {cfg.num_attention_heads}"
        )
    return cfg, bool(d.get("id2label") or d.get("num_labels"))


def _hf_cached_config(name: str) -> Optional[str]:
    """The path of name's config.json in the local Hugging Face cache, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id: not in the cache
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load local weights without unpickling arbitrary objects. A missing, unreadable or mismatched
    file is refused in one line (ModelNameError) that says what was expected and what was found."""
    want = "a .safetensors file or a torch.save file of a state_dict"
    if not os.path.isfile(path):
        raise ModelNameError(
            f"checkpoint: expected {want}, got {path!r}: {'a folder' if os.path.isdir(path) else 'no such file'}"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        reader = "safetensors" if path.endswith(".safetensors") else "torch.load(weights_only=True)"
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ModelNameError(f"checkpoint: expected {want}, got {path!r}, which {reader} cannot read ({first})")
    for key in ("state_dict", "model", "module"):
        if (
            isinstance(sd, dict)
            and key in sd
            and isinstance(sd[key], dict)
            and not any(isinstance(v, torch.Tensor) for v in sd.values())
        ):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        what = type(sd).__name__ if not isinstance(sd, dict) else "a dict holding non-tensor values"
        raise ModelNameError(f"checkpoint: expected a state_dict (a dict of tensors) in {path!r}, got {what}")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]!r})"
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
            if keys
        ]
        raise ModelNameError(
            f"checkpoint: expected the {len(own)} tensors of {type(model).__name__}'s state_dict, "
            f"got {path!r} with {', '.join(parts)}"
        )
    model.load_state_dict(sd)
