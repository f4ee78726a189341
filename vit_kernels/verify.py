"""verify: run an original model and its fused counterpart on the same inputs and apply the
tolerance rule (:mod:`vit_kernels.testing`) against the original computed in float64.

The rule: the fused output's max abs error against the float64 run of the original may be at most
2x the error of the original run at the same dtype (plain PyTorch), plus a small floor.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .testing import Comparison, compare


@dataclasses.dataclass
class VerifyReport:
    """Per-output comparisons; ``ok`` when all pass. fuse_report: what was fused in the model
    that was checked; decisions: which backend each op took in its last call (and why)."""

    dtype: torch.dtype
    comparisons: List[Comparison]
    fuse_report: object = None
    decisions: Dict[str, object] = dataclasses.field(default_factory=dict)
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons) and not self.problems

    def __str__(self) -> str:
        lines = [f"verify at {str(self.dtype).replace('torch.', '')}: {'PASS' if self.ok else 'FAIL'}"]
        lines += ["  " + str(c) for c in self.comparisons]
        lines += ["  problem: " + p for p in self.problems]
        if self.decisions:
            lines.append("  backends (last call of each op):")
            lines += ["    " + str(d) for d in self.decisions.values()]
        return "\n".join(lines)


def _outputs(y, name: str = "output") -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating tensor in a model's output (tensors, tuples, dicts,
    transformers ModelOutput objects)."""
    if isinstance(y, torch.Tensor):
        return [(name, y)]
    if isinstance(y, dict):  # also transformers' ModelOutput (an OrderedDict)
        return [t for k, v in y.items() if v is not None for t in _outputs(v, k)]
    if isinstance(y, (list, tuple)):
        if len(y) == 1:
            return _outputs(y[0], name)
        return [t for i, v in enumerate(y) for t in _outputs(v, f"{name}[{i}]")]
    return []


def _image_spec(model: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """(image size, channels) read from the attributes of the known ViT families."""
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


def default_inputs(model: nn.Module, batch: int = 2, img_size: Optional[int] = None) -> torch.Tensor:
    """Random images (batch, channels, img, img) for ``model``, image size and channels read from
    its attributes (timm, torchvision, transformers, vit-pytorch, vit_kernels)."""
    img, chans = _image_spec(model)
    img = img_size or img
    if img is None:
        raise ValueError(f"model: cannot tell the input image size of {type(model).__name__}; pass inputs")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.randn(batch, chans or 3, img, img, device=device)


def _has_swaps(model: nn.Module) -> bool:
    from .swap import SwapWrapper
    return any(isinstance(m, SwapWrapper) for m in model.modules())


def _param_dtype(model: nn.Module) -> Optional[torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else None


@torch.no_grad()
def verify(original: nn.Module, fused: Optional[nn.Module] = None, inputs=None, *,
           dtype: Optional[torch.dtype] = None, backend: str = "auto",
           oracle: Optional[nn.Module] = None) -> VerifyReport:
    """Compare ``fused`` with ``original`` under the tolerance rule; nothing passed in is changed.

    original: the eager model (if it was fused in place, a copy is unfused for the comparison);
    fused: the fused model (None: a copy of original fused with ``vit_kernels.fuse(backend=)``);
    inputs: a tensor, a tuple of positional inputs, or None for random images (:func:`default_inputs`);
    dtype: the dtype both run at (None: the original's); oracle: the float64 reference (None: a
    float64 copy of the eager original; vit_kernels models run their eager oracle backend there).
    Both models run in eval mode. Returns a :class:`VerifyReport` with the max abs/rel error of
    every output, pass/fail per output, the fuse report and the backend decisions.
    """
    from . import fuse, fuse_report, unfuse
    from .backends import last_decision
    from .models.vit import VisionTransformer
    from .nn import set_backend

    eager = unfuse(copy.deepcopy(original)) if _has_swaps(original) else original
    if fused is None:
        fused = fuse(copy.deepcopy(eager), backend=backend)
    dtype = dtype or _param_dtype(original) or torch.float32
    device = next(original.parameters()).device
    if inputs is None:
        inputs = default_inputs(eager)
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def at(model: nn.Module, dt: torch.dtype) -> nn.Module:
        """model at dtype dt in eval mode: itself when it is already so, else a copy."""
        if _param_dtype(model) == dt and not model.training:
            return model
        return copy.deepcopy(model).to(dt).eval()

    def run(model, dt):
        a = tuple(t.to(device=device, dtype=dt) if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for t in args)
        return _outputs(model(*a))

    if oracle is None:
        oracle = copy.deepcopy(eager).to(torch.float64).eval()
        if isinstance(oracle, VisionTransformer):
            set_backend(oracle, "reference")
    want = run(oracle, torch.float64)
    base_model = at(eager, dtype)
    if isinstance(base_model, VisionTransformer):  # the baseline: the oracle's code at dtype, not a path under test
        base_model = set_backend(copy.deepcopy(base_model) if base_model is eager else base_model, "reference")
    base = run(base_model, dtype)
    before = last_decision()
    got = run(at(fused, dtype), dtype)
    decisions = {op: d for op, d in last_decision().items() if before.get(op) is not d}
    if len(got) != len(want) or [n for n, _ in got] != [n for n, _ in want]:
        raise RuntimeError(f"verify: the fused model returned outputs {[n for n, _ in got]}, the original "
                           f"{[n for n, _ in want]}")
    comps = [compare(g, w, b, name=n) for (n, g), (_, w), (_, b) in zip(got, want, base)]
    problems = [f"{n}: the float64 original's output is identically zero (a zero-initialised head?): "
                f"comparing it checks nothing" for n, w in want if w.numel() and not w.abs().max().item()]
    if not want:
        problems.append("the model returned no floating-point tensor to compare")
    return VerifyReport(dtype, comps, fuse_report(fused), decisions, problems)
