"""verify: run an original model and its fused counterpart on the same inputs and apply the
tolerance rule (:mod:`vit_kernels.testing`) against the original computed in float64."""
from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from .testing import Comparison, compare


@dataclasses.dataclass
class VerifyReport:
    """Per-output comparisons; ``ok`` when all pass."""

    dtype: torch.dtype
    comparisons: List[Comparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def __str__(self) -> str:
        lines = [f"verify at {str(self.dtype).replace('torch.', '')}: {'PASS' if self.ok else 'FAIL'}"]
        lines += ["  " + str(c) for c in self.comparisons]
        return "\n".join(lines)


def _outputs(y) -> List[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _outputs(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _outputs(v)]
    for attr in ("logits", "last_hidden_state"):  # model-output objects
        if hasattr(y, attr):
            return _outputs(getattr(y, attr))
    return []


def default_inputs(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """Random images for ``model``: (batch, in_chans, img_size, img_size) from its attributes."""
    img = getattr(model, "img_size", 224)
    img = img[0] if isinstance(img, (tuple, list)) else img
    chans = 3
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        chans = proj.in_channels
    return torch.randn(batch, chans, img, img)


@torch.no_grad()
def verify(original: nn.Module, fused: Optional[nn.Module] = None, inputs=None, *,
           dtype: Optional[torch.dtype] = None, oracle: Optional[nn.Module] = None) -> VerifyReport:
    """Compare ``fused`` with ``original`` under the tolerance rule.

    original: the eager model (its parameters are not changed); fused: the fused model (None:
    a deep copy of original, fused with :func:`vit_kernels.fuse`); inputs: a tensor, a tuple of
    positional inputs, or None for random images; dtype: the dtype both run at (None: the
    original's). The oracle is ``oracle`` or a copy of original in float64 (vit_kernels models
    run their eager oracle backend there).
    """
    from .nn import set_backend
    from .models.vit import VisionTransformer

    if fused is None:
        from . import fuse  # the swap layer; for vit_kernels models it sets the backend
        fused = fuse(copy.deepcopy(original))
    p = next(original.parameters())
    dtype = dtype or p.dtype
    device = p.device
    if inputs is None:
        inputs = default_inputs(original)
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def run(model, dt):
        a = tuple(t.to(device=device, dtype=dt) if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for t in args)
        return _outputs(model.eval()(*a))

    if oracle is None:
        oracle = copy.deepcopy(original).to(torch.float64)
        if isinstance(oracle, VisionTransformer):
            set_backend(oracle, "reference")
    want = run(oracle, torch.float64)
    base = run(copy.deepcopy(original).to(dtype), dtype)
    got = run(fused.to(dtype), dtype)
    comps = [compare(g, w, b, name=f"output[{i}]") for i, (g, w, b) in enumerate(zip(got, want, base))]
    if len(got) != len(want):
        raise RuntimeError(f"verify: the fused model returned {len(got)} outputs, the original {len(want)}")
    return VerifyReport(dtype, comps)
