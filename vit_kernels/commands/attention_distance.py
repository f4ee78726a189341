"""``python -m vit_kernels attention-distance --model MODEL``: the mean attention distance (pixels)
of every head of every layer, computed in the fused kernels from the softmax statistics, averaged
over a batch of images; written as CSV, JSON and a PNG plotted like the ViT paper's figure (layer on
x, distance on y, one dot per head).

Images: the files given with --images (read with Pillow), else --batch-size random normal images.
MODEL and the model options are those of ``attention-map`` and ``verify``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from .arguments import image_file, out_folder, positive_int
from .attention_map import add_model_arguments, build_fused


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention-distance",
        help="mean attention distance per head and layer (CSV, JSON, PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--images", type=image_file, nargs="+", default=None, help="image files (default: random images)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="random images when --images is not given")
    p.add_argument("--out-dir", type=out_folder, default=".", help="folder for attention_distance.{csv,json,png}")


def run(args) -> int:
    from .. import analysis

    model, geo = build_fused(args)
    if args.images:
        x = torch.cat([analysis.load_image(f, geo.img_size)[1] for f in args.images])
        source = f"{len(args.images)} image(s)"
    else:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, geo.img_size, geo.img_size, generator=g)
        source = f"{args.batch_size} random normal image(s)"
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
