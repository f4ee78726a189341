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

import contextlib
import copy
import time
from typing import Optional, Tuple

import torch

from ..models import registry
from ..dtypes import SHORT_NAMES
from .arguments import positive_int

DTYPES = {**SHORT_NAMES, "fp64": torch.float64}  # vit_kernels.dtypes + the oracle's float64
# the names and the builder are the registry's (one for every command); re-exported here
FAMILIES, TORCHVISION, SIZES, HF_NAMES, HF_REQUIRED = (
    registry.FAMILIES,
    registry.TORCHVISION,
    registry.SIZES,
    registry.HF_NAMES,
    registry.HF_REQUIRED,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="verify a fused model against its eager original (float64 oracle)", description=__doc__
    )
    p.add_argument("model", help=registry.HELP)
    p.add_argument(
        "--backend",
        default="triton",
        choices=["auto", "triton", "cuda", "torch"],
        help="backend the copy is fused with and checked on (auto: the one vit_kernels picks per op)",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="dtype the eager and the fused model run at (the oracle runs in float64)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="random images in the batch")
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks (faster checks)")
    p.add_argument("--checkpoint", default=None, help="local weights: .safetensors or a torch.save state_dict")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (there is none without a terminal)"
    )


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


# verify() runs the model three times: the float64 oracle, plain PyTorch at the dtype, the fused model
PASSES = 3


def block_list(model: torch.nn.Module) -> Optional[Tuple[type, int]]:
    """(class of a transformer block, number of blocks): the longest ModuleList / Sequential whose
    children are all of one class (timm's blocks, torchvision's encoder layers, HF's layers); for
    lists of lists (vit_pytorch's [attention, feed-forward] pairs) the class of their first
    element. None when the model has no such list."""
    best = None
    for m in model.modules():
        if (
            isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))
            and len(m) > 1
            and len({type(c) for c in m}) == 1
            and (best is None or len(m) > len(best))
        ):
            best = m
    if best is None:
        return None
    first = best[0]
    if isinstance(first, (torch.nn.ModuleList, torch.nn.Sequential)) and len(first):
        first = first[0]
    return type(first), len(best)


@contextlib.contextmanager
def block_progress(model: torch.nn.Module, fused: torch.nn.Module, enabled: bool = True):
    """A progress bar (stderr, on a terminal only) over verify()'s forward passes, advanced each time a
    transformer block (:func:`block_list` of the model or of its fused copy, whose blocks may be
    wrappers) finishes its forward, in any copy of either; a spinner with the elapsed time when the
    blocks cannot be told."""
    from ..bench.report import progress

    found = [b for b in (block_list(model), block_list(fused)) if b is not None]
    total = PASSES * found[0][1] if found else None
    with progress(total, "verify", enabled=enabled) as bar:
        if not found:
            yield
            return
        kinds, depth = {k for k, _ in found}, found[0][1]
        done = [0]

        def hook(module, inputs, output):
            if type(module) in kinds:
                done[0] += 1
                bar.advance(
                    f"verify: pass {min(PASSES, (done[0] - 1) // depth + 1)}/{PASSES}, "
                    f"block {(done[0] - 1) % depth + 1}/{depth}"
                )

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def print_fuse_report(fuse_report) -> None:
    """The fuse report: a table on a terminal (rich), its plain text otherwise."""
    from ..bench.report import print_table, rich_console

    if rich_console() is None:
        print(fuse_report)
        return
    fused = fuse_report.fused
    common = [n for n in (fused[0].notes if fused else ()) if all(n in e.notes for e in fused)]
    rows = [
        {
            "path": e.path or "<root>",
            "op": e.op,
            "family": e.family,
            "result": "fused" if e.fused else "left",
            "why": e.reason or "; ".join(n for n in e.notes if n not in common),
        }
        for e in fuse_report.entries
    ]
    columns = [
        ("path", "part", str),
        ("op", "op", str),
        ("family", "family", str),
        ("result", "result", str),
        ("why", "reason / notes", str),
    ]
    print_table(
        rows, columns, title=str(fuse_report).splitlines()[0], styles={"result": {"fused": "green", "left": "yellow"}}
    )
    for n in common:
        print(f"  note (all fused parts): {n}")


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
    with block_progress(model, fused, enabled=not args.no_progress):
        report = verify(model, fused, images, dtype=DTYPES[args.dtype])
    print(
        f"{args.model} backend={args.backend} batch={args.batch_size} images={tuple(images.shape)} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print_fuse_report(report.fuse_report)
    print(report)
    return 0 if report.ok else 1
