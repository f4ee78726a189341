"""``python -m vit_kernels verify MODEL``: build a model, fuse a copy, check it against the float64
oracle under the tolerance rule.

MODEL is any name of the model registry (vit_kernels.models.registry, the same names as bench):
a reference name (vit_tiny_patch16_224 or vit_kernels:vit_tiny_patch16_224), timm:NAME,
torchvision:vit_b_16, hf:google/vit-base-patch16-224 (or a local folder holding config.json),
vit_pytorch:vit_base_patch16_224.

Weights are random unless ``--checkpoint FILE`` gives local ones: a .safetensors file, or a
torch.save file read with ``torch.load(weights_only=True)`` (tensors only; no arbitrary objects are
unpickled). No download is ever attempted.
"""
from __future__ import annotations

import copy
import time

import torch

from ..models import registry
from ..dtypes import SHORT_NAMES
from .arguments import positive_int

DTYPES = {**SHORT_NAMES, "fp64": torch.float64}  # vit_kernels.dtypes + the oracle's float64
# the names and the builder are the registry's (one for every command); re-exported here
FAMILIES, TORCHVISION, SIZES, HF_NAMES, HF_REQUIRED = (registry.FAMILIES, registry.TORCHVISION, registry.SIZES,
                                                       registry.HF_NAMES, registry.HF_REQUIRED)


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a fused model against its eager original (float64 oracle)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", help=registry.HELP)
    p.add_argument("--backend", default="triton", choices=["auto", "triton", "cuda", "torch"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks (faster checks)")
    p.add_argument("--checkpoint", default=None, help="local weights: .safetensors or a torch.save state_dict")
    p.add_argument("--seed", type=int, default=0)


def build(spec: str, args):
    """The eager model named by ``spec`` (random init, eval mode, nothing downloaded), through the
    model registry; ``args.depth`` / ``args.img_size`` override. A refused name exits in one line."""
    try:
        return registry.build(spec, depth=getattr(args, "depth", None), img_size=getattr(args, "img_size", None))
    except registry.ModelNameError as e:
        raise SystemExit(str(e)) from None


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """registry.load_checkpoint; a refused file exits in one line."""
    try:
        registry.load_checkpoint(model, path)
    except registry.ModelNameError as e:
        raise SystemExit(str(e)) from None


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
