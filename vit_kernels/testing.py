"""The tolerance rule, as one function (used by the tests and by ``verify``).

FlashAttention's rule: a fused result's max abs error against the float64 oracle may be at most
``factor`` (2 for outputs, 3 for gradients) times the error of plain PyTorch at the same dtype
against the same oracle, plus a small absolute floor scaled by the oracle's magnitude.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

# Absolute floor per dtype, multiplied by max(1, max |oracle|).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass
class Comparison:
    """The outcome of one comparison; ``ok`` says whether it passed."""

    name: str
    ok: bool
    max_abs_err: float
    max_rel_err: float
    baseline_err: float
    bound: float
    where: tuple
    got: float
    expected: float

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.name}: {status}: max abs err {self.max_abs_err:.3e} (rel {self.max_rel_err:.3e}) "
            f"at index {self.where} (got {self.got:.6g}, expected {self.expected:.6g}); "
            f"plain PyTorch err {self.baseline_err:.3e}; bound {self.bound:.3e}"
        )


def compare(
    out: Tensor,
    oracle: Tensor,
    baseline: Optional[Tensor] = None,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    name: str = "output",
) -> Comparison:
    """Compare ``out`` with the float64 ``oracle`` under the tolerance rule.

    out: the fused result, any dtype; oracle: the eager oracle in float64, same shape;
    baseline: plain PyTorch at out's dtype (None: bound = floor only).
    """
    if out.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != oracle shape {tuple(oracle.shape)}")
    if baseline is not None and baseline.shape != oracle.shape:
        raise AssertionError(f"{name}: baseline: shape {tuple(baseline.shape)} != oracle shape {tuple(oracle.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = oracle.detach().to(torch.float64).cpu()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    if floor is None:
        floor = FLOOR.get(out.dtype, 1e-5)
    base_err = 0.0
    if baseline is not None:
        base_err = (baseline.detach().to(torch.float64).cpu() - r).abs().max().item() if r.numel() else 0.0
    bound = factor * base_err + floor * scale
    diff = (o - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return Comparison(name, True, 0.0, 0.0, base_err, bound, (), 0.0, 0.0)
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    err = diff.reshape(-1)[flat].item()
    rel = (diff / r.abs().clamp_min(1e-6 * scale)).max().item()
    got, exp = o.reshape(-1)[flat].item(), r.reshape(-1)[flat].item()
    return Comparison(name, bool(err <= bound), err, rel, base_err, bound, where, got, exp)


def assert_close(
    out: Tensor,
    oracle: Tensor,
    baseline: Optional[Tensor] = None,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    name: str = "output",
) -> Comparison:
    """:func:`compare`, raising AssertionError with where and by how much it missed."""
    c = compare(out, oracle, baseline, factor=factor, floor=floor, name=name)
    if not c.ok:
        raise AssertionError(str(c))
    return c
