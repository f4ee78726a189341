"""``python -m vit_kernels attention-distance --model MODEL``: the mean attention distance (pixels)
of every head of every layer, computed in the fused kernels from the softmax statistics, averaged
over a batch of images; written as CSV, JSON and a PNG plotted like the ViT paper's figure (layer on
x, distance on y, one dot per head).

Images: the files given with --images (read with Pillow), else --batch-size random normal images
(--batch-size with --images is refused: the files are the batch).
MODEL and the model options are those of ``attention-map`` and ``verify``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from .arguments import image_file, out_folder, positive_int, refuse_combination
from .attention_map import add_model_arguments, build_fused

RANDOM_IMAGES = 4  # --batch-size's default: the number of random images without --images


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention-distance",
        help="mean attention distance per head and layer (CSV, JSON, PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--images", type=image_file, nargs="+", default=None, help="image files (default: random images)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"the number of random images, without --images (default: {RANDOM_IMAGES})",
    )
    p.add_argument("--out-dir", type=out_folder, default=".", help="folder for attention_distance.{csv,json,png}")
    refuse_combination(p, _batch_size_with_images)


def _batch_size_with_images(args):
    """--batch-size is the number of random images: with --images it would be ignored."""
    if args.images and args.batch_size is not None:
        return (
            f"argument --batch-size: expected no --batch-size with --images (it sets the number of random images; "
            f"the files given are the batch), got --batch-size {args.batch_size} with {len(args.images)} image(s)"
        )
    return None


def run(args) -> int:
    from .. import analysis

    model, geo = build_fused(args)
    if args.images:
        x = torch.cat([analysis.load_image(f, geo.img_size)[1] for f in args.images])
        source = f"{len(args.images)} image(s)"
    else:
        g = torch.Generator().manual_seed(args.seed)
        n = RANDOM_IMAGES if args.batch_size is None else args.batch_size
        x = torch.randn(n, 3, *(side * geo.patch_size for side in geo.grid), generator=g)
        source = f"{n} random normal image(s)"
    dist = analysis.mean_attention_distance(model, x, geo)  # (layers, heads)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, "attention_distance")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "mean_attention_distance_px"])
        for layer, row in enumerate(dist.tolist()):
            for h, d in enumerate(row):
                w.writerow([layer + 1, h, f"{d:.6g}"])
    meta = {
        "model": args.model,
        "backend": args.backend,
        "img_size": geo.img_size,
        "patch_size": geo.patch_size,
        "grid": list(geo.grid),
        "prefix_tokens": geo.prefix_tokens,
        "images": source,
        "distance_px": dist.tolist(),
    }
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    analysis.plot_distances(
        dist, base + ".png", f"{args.model}\n{source}, {geo.img_size} px, patch {geo.patch_size}", geo.img_size
    )
    print(
        f"{args.model} backend={args.backend}: {dist.shape[0]} layers x {dist.shape[1]} heads, "
        f"distance {dist.min().item():.1f}-{dist.max().item():.1f} px -> {base}.csv/.json/.png"
    )
    return 0
