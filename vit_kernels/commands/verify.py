"""``python -m vit_kernels verify MODEL``: build a model, fuse a copy, check it against the float64
oracle under the tolerance rule.

MODEL is ``family:name``:
- ``vit_kernels:<name>``   vit_kernels' reference ViT, e.g. vit_kernels:vit_tiny_patch16_224
- ``timm:<name>``          timm.create_model(name, pretrained=False), e.g. timm:vit_base_patch16_224
- ``torchvision:<name>``   vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14 (weights=None)
- ``hf:<name or path>``    transformers ViT from a ViTConfig: a known name (google/vit-base-patch16-224,
                           ...) mapped to its hyper-parameters here, or a local config.json (or a
                           folder holding one). Nothing is downloaded.
- ``vit_pytorch:<preset>`` vit-pytorch ViT: vit_{tiny,small,base,large,huge}_patch{14,16,32}_224

Weights are random unless ``--checkpoint FILE`` gives local ones: a .safetensors file, or a
torch.save file read with ``torch.load(weights_only=True)`` (tensors only; no arbitrary objects are
unpickled). No download is ever attempted.
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
FAMILIES = ("vit_kernels", "timm", "torchvision", "hf", "vit_pytorch")

# torchvision name -> (patch, layers, heads, hidden, mlp)
TORCHVISION = {
    "vit_b_16": (16, 12, 12, 768, 3072), "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096), "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}
# size -> (dim, depth, heads, mlp) as in the ViT paper (also used for vit_pytorch presets)
SIZES = {"tiny": (192, 12, 3, 768), "small": (384, 12, 6, 1536), "base": (768, 12, 12, 3072),
         "large": (1024, 24, 16, 4096), "huge": (1280, 32, 16, 5120)}
# Hugging Face names mapped to ViTConfig hyper-parameters locally (never fetched).
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


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a fused model against its eager original (float64 oracle)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", help="family:name, e.g. vit_kernels:vit_tiny_patch16_224, timm:vit_base_patch16_224, "
                                 "torchvision:vit_b_16, hf:google/vit-base-patch16-224, vit_pytorch:vit_base_patch16_224")
    p.add_argument("--backend", default="triton", choices=["auto", "triton", "cuda", "torch"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks (faster checks)")
    p.add_argument("--checkpoint", default=None, help="local weights: .safetensors or a torch.save state_dict")
    p.add_argument("--seed", type=int, default=0)


def _size(name: str):
    """vit_<size>_patch<p>_<img> -> (dims, patch, img)."""
    parts = name.split("_")
    ok = (len(parts) == 4 and parts[0] == "vit" and parts[1] in SIZES and parts[2].startswith("patch")
          and parts[2][5:].isdigit() and parts[3].isdigit())
    if not ok:
        raise SystemExit(f"model: expected a preset 'vit_<size>_patch<p>_<img>' with size in {tuple(SIZES)}, got {name!r}")
    return SIZES[parts[1]], int(parts[2][5:]), int(parts[3])


def _hf_config(name: str, args):
    from transformers import ViTConfig
    if name in HF_NAMES:
        h = HF_NAMES[name]
        dim, depth, heads, mlp = SIZES[h["size"]]
        cfg = ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                        patch_size=h["patch"], image_size=h["img"], qkv_bias=True)
        if h["labels"]:
            cfg.num_labels = h["labels"]
        return cfg, bool(h["labels"])
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise SystemExit(f"model: hf:{name} is neither a known name ({', '.join(HF_NAMES)}) nor a local "
                         f"config.json or a folder holding one (nothing is downloaded)")
    with open(path) as f:
        d = json.load(f)
    if d.get("model_type", "vit") != "vit":
        raise SystemExit(f"model: {path} has model_type={d.get('model_type')!r}; only 'vit' is supported")
    cfg = ViTConfig.from_dict(d)
    return cfg, bool(d.get("id2label") or d.get("num_labels"))


def build(spec: str, args):
    """The eager model named by ``spec`` (random init, eval mode, nothing downloaded)."""
    family, _, name = spec.partition(":")
    if family not in FAMILIES or not name:
        raise SystemExit(f"model: expected 'family:name' with family in {FAMILIES}, got {spec!r}")
    depth, img = args.depth, args.img_size
    if family == "vit_kernels":
        from ..models import create_model
        kw = {k: v for k, v in (("depth", depth), ("img_size", img)) if v is not None}
        return create_model(name, **kw)
    if family == "timm":
        import timm
        kw = {k: v for k, v in (("depth", depth), ("img_size", img)) if v is not None}
        return timm.create_model(name, pretrained=False, **kw)
    if family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer
        if name not in TORCHVISION:
            raise SystemExit(f"model: torchvision names are {tuple(TORCHVISION)}, got {name!r}")
        p, layers, heads, hidden, mlp = TORCHVISION[name]
        m = VisionTransformer(image_size=img or 224, patch_size=p, num_layers=depth or layers, num_heads=heads,
                              hidden_dim=hidden, mlp_dim=mlp)
        # torchvision initialises the head to zeros: logits would be 0 whatever the encoder computes
        torch.nn.init.normal_(m.heads.head.weight, std=0.02)
        return m
    if family == "hf":
        from transformers import ViTForImageClassification, ViTModel
        cfg, classifier = _hf_config(name, args)
        if depth is not None:
            cfg.num_hidden_layers = depth
        if img is not None:
            cfg.image_size = img
        return ViTForImageClassification(cfg) if classifier else ViTModel(cfg)
    from vit_pytorch import ViT
    (dim, layers, heads, mlp), p, size = _size(name)
    return ViT(image_size=img or size, patch_size=p, num_classes=1000, dim=dim, depth=depth or layers, heads=heads,
               dim_head=dim // heads, mlp_dim=mlp)


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load local weights without unpickling arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and \
                not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise SystemExit(f"checkpoint: expected a state_dict (a dict of tensors) in {path}, got {type(sd).__name__}")
    model.load_state_dict(sd)


def run(args) -> int:
    from .. import fuse, verify
    from ..verify import default_inputs
    torch.manual_seed(args.seed)
    model = build(args.model, args).eval()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    images = default_inputs(model, args.batch_size, args.img_size)
    fused = fuse(copy.deepcopy(model), backend=args.backend)
    t0 = time.perf_counter()
    report = verify(model, fused, images, dtype=DTYPES[args.dtype])
    print(f"{args.model} backend={args.backend} batch={args.batch_size} images={tuple(images.shape)} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(report.fuse_report)
    print(report)
    return 0 if report.ok else 1
