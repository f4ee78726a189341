"""``python -m vit_kernels attention-map IMAGE --model MODEL``: the class token's attention over the
image, per layer (head mean, or every head with --heads all), or attention rollout (--rollout, one
map from the head means; refused with --heads all), read out of the fused kernels and saved as a
PNG of overlays beside the original. Each overlay's colours ('jet') span that map's own range,
printed in its label.

MODEL takes the forms ``verify`` takes (vit_kernels:, timm:, torchvision:, hf:, vit_pytorch:); the
model is built locally with random weights unless --checkpoint gives local ones (verify's safe
loader), fused with vit_kernels.fuse, and run once on IMAGE (read with Pillow, resized to the
model's image size, normalised with ImageNet's mean and std).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from .arguments import image_file, image_out_file, positive_int, refuse_combination
from ..models import registry

DISPLAY = 224  # the longer side of each panel in the PNG, pixels


def add_model_arguments(p) -> None:
    """The model options shared with attention-distance (the forms and defaults of verify)."""
    p.add_argument("--model", required=True, help="the model, as for verify: " + registry.HELP)
    p.add_argument(
        "--backend",
        default="triton",
        choices=["auto", "triton", "cuda", "torch"],
        help="backend of the fused ops (as for verify)",
    )
    p.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks")
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--checkpoint", default=None, help="local weights: .safetensors or a torch.save state_dict")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def build_fused(args):
    """The model named by args.model, built as verify builds it, fused, eval mode; and its Geometry."""
    from .. import analysis, fuse
    from ..swap import check_model
    from .verify import build, load_checkpoint

    torch.manual_seed(args.seed)
    model = build(args.model, args).eval()
    check_model(model, f"model {args.model}")
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    fused = fuse(copy.deepcopy(model), backend=args.backend)
    return fused, analysis.geometry(fused, args.img_size)


def _range(m) -> str:
    """The map's value range: each panel's colours span its own min..max."""
    return f"[{m.min().item():.3f}, {m.max().item():.3f}]"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention-map",
        help="class-token attention (or rollout) over an image, as a PNG of overlays",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", type=image_file, help="an image file Pillow reads (PNG, JPEG, ...)")
    add_model_arguments(p)
    p.add_argument(
        "--heads",
        choices=["mean", "all"],
        default="mean",
        help="one map per layer averaged over heads (mean) or one per head (all)",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help="attention rollout across the layers instead: one map of the head means (so not with --heads all)",
    )
    p.add_argument(
        "--out",
        type=image_out_file,
        default=None,
        help="PNG to write, its folders created when missing (default: IMAGE's folder, <name>_attention.png)",
    )
    refuse_combination(p, _rollout_with_heads)


def _rollout_with_heads(args):
    """--rollout draws one map from the head means of every layer: --heads all would be ignored."""
    if args.rollout and args.heads == "all":
        return (
            "argument --heads: expected mean with --rollout (rollout is one map per image, from the head "
            "means of every layer), got --heads all"
        )
    return None


def run(args) -> int:
    from PIL import Image

    from .. import analysis

    model, geo = build_fused(args)
    _, x = analysis.load_image(args.image, geo.img_size)
    with Image.open(args.image) as im:
        h, w = geo.grid  # panels of DISPLAY pixels on the longer side, the input's aspect
        shown = im.convert("RGB").resize((DISPLAY * w // max(h, w), DISPLAY * h // max(h, w)), Image.BICUBIC)
    if args.rollout:
        roll = analysis.attention_rollout(model, x, geo)[0]
        pictures = [shown, analysis.overlay(shown, roll)]
        labels = ["original", f"rollout, {geo.depth} layers {_range(roll)}"]
        columns = 2
    else:
        maps = analysis.cls_attention(model, x, geo)[:, 0]  # (layers, heads, gh, gw)
        pictures, labels = [], []
        for layer, m in enumerate(maps):
            if args.heads == "mean":
                pictures.append(analysis.overlay(shown, m.mean(0)))
                labels.append(f"layer {layer + 1} head mean {_range(m.mean(0))}")
            else:
                for h, mh in enumerate(m):
                    pictures.append(analysis.overlay(shown, mh))
                    labels.append(f"layer {layer + 1} head {h} {_range(mh)}")
        columns = maps.shape[1] if args.heads == "all" else min(len(pictures) + 1, 4)
        pictures, labels = [shown] + pictures, ["original"] + labels
        if args.heads == "all":  # the original alone on the first row
            pictures[1:1] = [Image.new("RGB", shown.size, "white")] * (columns - 1)
            labels[1:1] = [""] * (columns - 1)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(args.image)),
        os.path.splitext(os.path.basename(args.image))[0] + "_attention.png",
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    analysis.panels(pictures, labels, columns).save(out)
    what = "rollout" if args.rollout else f"class-token attention, {geo.depth} layers, heads={args.heads}"
    print(
        f"{args.model} backend={args.backend} image={geo.img_size}px patch={geo.patch_size} "
        f"grid={geo.grid[0]}x{geo.grid[1]}: {what} -> {out}"
    )
    return 0
