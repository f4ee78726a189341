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

from .arguments import positive_int

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
# the keys a local config.json must hold (transformers would fill in ViT-Base for a missing one)
HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
               "patch_size")


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a fused model against its eager original (float64 oracle)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", help="family:name, e.g. vit_kernels:vit_tiny_patch16_224, timm:vit_base_patch16_224, "
                                 "torchvision:vit_b_16, hf:google/vit-base-patch16-224, vit_pytorch:vit_base_patch16_224")
    p.add_argument("--backend", default="triton", choices=["auto", "triton", "cuda", "torch"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks (faster checks)")
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
        where = f"the folder {name!r} holds no config.json" if os.path.isdir(name) else \
            f"{name!r} is neither a known name ({', '.join(HF_NAMES)}) nor a local config.json or a folder holding one"
        raise SystemExit(f"model: expected hf:<known name or local config>, got hf:{name}: {where} "
                         f"(nothing is downloaded)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"model: expected a JSON ViT config in {path}, got a file that does not parse: "
                         f"{str(e).splitlines()[0]}")
    if not isinstance(d, dict):
        raise SystemExit(f"model: expected a JSON object (a ViT config) in {path}, got a {type(d).__name__}")
    if d.get("model_type", "vit") != "vit":
        raise SystemExit(f"model: {path} has model_type={d.get('model_type')!r}; only 'vit' is supported")
    absent = [k for k in HF_REQUIRED if k not in d]
    if absent:
        raise SystemExit(f"model: expected a ViT config.json with {', '.join(HF_REQUIRED)} in {path}, got one "
                         f"without {', '.join(absent)}")
    try:
        cfg = ViTConfig.from_dict(d)
    except Exception as e:  # transformers raises its own validation errors
        raise SystemExit(f"model: expected a ViT config in {path}, got one transformers refuses: "
                         f"{' '.join(str(e).split())}")
    for key in HF_REQUIRED + ("num_channels",):
        v = getattr(cfg, key, None)
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SystemExit(f"model: expected {key} >= 1 (an integer) in {path}, got {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise SystemExit(f"model: expected hidden_size divisible by num_attention_heads in {path}, got "
                         f"{cfg.hidden_size} and {cfg.num_attention_heads}")
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
        if not timm.is_model(name):
            raise SystemExit(f"model: expected a timm model name (timm.list_models('vit_*')), got {name!r}")
        try:
            return timm.create_model(name, pretrained=False, **kw)
        except TypeError as e:  # a model class that takes no depth / img_size
            raise SystemExit(f"model: expected a timm model that takes {', '.join(kw)}, got {name!r} ({e})")
    if family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer
        if name not in TORCHVISION:
            raise SystemExit(f"model: torchvision names are {tuple(TORCHVISION)}, got {name!r}")
        p, layers, heads, hidden, mlp = TORCHVISION[name]
        _check_img(img, p)
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
    _check_img(img, p)
    return ViT(image_size=img or size, patch_size=p, num_classes=1000, dim=dim, depth=depth or layers, heads=heads,
               dim_head=dim // heads, mlp_dim=mlp)


def _check_img(img, patch: int) -> None:
    if img is not None and img % patch:
        raise SystemExit(f"img_size: expected a multiple of patch_size={patch}, got {img}")


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load local weights without unpickling arbitrary objects. A missing, unreadable or mismatched
    file is refused in one line (SystemExit) that says what was expected and what was found."""
    want = "a .safetensors file or a torch.save file of a state_dict"
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint: expected {want}, got {path!r}: "
                         f"{'a folder' if os.path.isdir(path) else 'no such file'}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        reader = "safetensors" if path.endswith(".safetensors") else "torch.load(weights_only=True)"
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"checkpoint: expected {want}, got {path!r}, which {reader} cannot read ({first})")
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and \
                not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        what = type(sd).__name__ if not isinstance(sd, dict) else "a dict holding non-tensor values"
        raise SystemExit(f"checkpoint: expected a state_dict (a dict of tensors) in {path!r}, got {what}")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]!r})" for keys, what in
                 ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
        raise SystemExit(f"checkpoint: expected the {len(own)} tensors of {type(model).__name__}'s state_dict, "
                         f"got {path!r} with {', '.join(parts)}")
    model.load_state_dict(sd)


def run(args) -> int:
    from .. import fuse, verify
    from ..swap import check_model
    from ..verify import default_inputs
    torch.manual_seed(args.seed)
    model = build(args.model, args).eval()
    check_model(model, f"model {args.model}")
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
