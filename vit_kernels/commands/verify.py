"""``python -m vit_kernels verify MODEL``: build a model, fuse a copy, check it against the oracle."""
from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a fused model against its eager original (float64 oracle)")
    p.add_argument("model", help="vit_kernels:<name>, e.g. vit_kernels:vit_tiny_patch16_224")
    p.add_argument("--backend", default="triton", choices=["auto", "triton", "cuda", "torch"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks (faster checks)")
    p.add_argument("--seed", type=int, default=0)


def build(spec: str, args):
    family, _, name = spec.partition(":")
    if family != "vit_kernels" or not name:
        raise SystemExit(f"model: expected 'vit_kernels:<name>' (other families come with the swap "
                         f"adapters), got {spec!r}")
    from ..models import create_model
    overrides = {}
    if args.depth is not None:
        overrides["depth"] = args.depth
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    return create_model(name, **overrides)


def run(args) -> int:
    from .. import fuse, verify
    from ..verify import default_inputs
    torch.manual_seed(args.seed)
    model = build(args.model, args).eval()
    images = default_inputs(model, args.batch_size)
    import copy
    fused = fuse(copy.deepcopy(model), backend=args.backend)
    t0 = time.perf_counter()
    report = verify(model, fused, images, dtype=DTYPES[args.dtype])
    print(f"{args.model} backend={args.backend} batch={args.batch_size} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(report)
    from ..backends import last_decision
    for d in last_decision().values():
        print("  " + str(d))
    return 0 if report.ok else 1
