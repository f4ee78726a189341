"""Input checks shared by the ops: each names the argument, what was expected and what came.

They run before any allocation or launch. Nothing is copied or truncated silently.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, ndim: Optional[int] = None, shape: Optional[Sequence] = None,
           dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
           optional: bool = False) -> None:
    """Check one tensor argument. ``shape`` entries may be None (any size)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16, float64), "
                        f"got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the op's input), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the op's input), "
                         f"got one on {t.device}")


def same(name_ref: str, ref: torch.Tensor, **others) -> None:
    """Check that every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        tensor(name, t, dtype=ref.dtype, device=ref.device)


def positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def choice(name: str, v, options: Sequence) -> None:
    if v not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {v!r}")
