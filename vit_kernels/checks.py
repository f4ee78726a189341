"""Input checks shared by the ops: each names the argument, what was expected and what came.

They run before any allocation or launch. Nothing is copied or truncated silently.

Three kinds of rule live here, all used by the ops' check functions (vit_kernels/ops/):
- argument checks (shape, dtype, device; scalars such as ``scale``, ``eps``, ``num_heads``): a
  failure raises, whatever the backend;
- layout rules of the kernels (:func:`rows_layout`, :func:`unit_rows_layout`,
  :func:`vector_rows_layout`): each returns None when a backend's kernels read the tensor as it is,
  else the reason, which the op passes to ``backends.resolve`` as that backend's "unsupported"
  reason (an explicit request raises it before anything launches; "auto" moves on and records it);
- :func:`contiguous_params`: 1-D parameters (bias, LayerNorm weight, layer scale, class token,
  position embedding) with other strides are copied to contiguous for the fused kernels, which
  read them with unit stride; each copy is listed in the op's ``last_decision(op).copied``.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .dtypes import FLOAT_DTYPES


def tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    optional: bool = False,
) -> None:
    """Check one tensor argument. ``shape`` entries may be None (any size)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    in_memory(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16, float64), got {t.dtype}")
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
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the op's input), got one on {t.device}")


def in_memory(name: str, t: torch.Tensor) -> None:
    """Check that ``t``'s memory holds its values as the kernels read them (data pointer and strides):
    a nested tensor, a negative view (the negative bit, ``torch._neg_view``: memory holds -t) or an
    efficient zero tensor (no memory) is refused, whatever the backend. Not while torch.compile traces
    (dynamo breaks the graph on these queries; the custom op's own call checks the real tensors)."""
    if torch.compiler.is_compiling():
        return
    if t.is_nested:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor")
    if t.is_neg():
        raise TypeError(
            f"{name}: expected a tensor whose memory holds its values, got a negative view (its negative bit is "
            f"set, as torch._neg_view makes: the memory holds -{name}); pass {name}.resolve_neg()"
        )
    if t._is_zerotensor():
        raise TypeError(
            f"{name}: expected a tensor with memory, got an efficient zero tensor (torch._efficientzerotensor: no "
            f"memory to read); pass torch.zeros(...) instead"
        )


def same(name_ref: str, ref: torch.Tensor, **others) -> None:
    """Check that every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        tensor(name, t, dtype=ref.dtype, device=ref.device)


def positive_int(name: str, v) -> int:
    """An int > 0 (bool is not an int here). TypeError for another type, ValueError for <= 0."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(v).__name__} {v!r}")
    if v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def real(name: str, v, *, minimum: Optional[float] = None, exclusive: bool = False) -> float:
    """A finite real number (int or float, not bool, not a tensor) >= minimum (> with exclusive).

    TypeError for another type (a string, a bool, a tensor), ValueError for NaN, inf or out of range.
    """
    if torch.compiler.is_compiling() and not isinstance(v, bool) and isinstance(v, (numbers.Real, torch.SymFloat)):
        # torch.compile(dynamic=True) traces a module's float as a symbol, which math.isfinite cannot
        # read: the same bounds as comparisons (False for NaN), which the compiler turns into guards
        ok = (v > minimum if exclusive else v >= minimum) if minimum is not None else v > -math.inf
        if not (ok and v < math.inf):
            raise ValueError(f"{name}: expected a finite real number{'' if minimum is None else f' >= {minimum:g}'}")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a finite real number (int or float), got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite real number, got {v!r}")
    if minimum is not None and (f < minimum or (exclusive and f == minimum)):
        raise ValueError(f"{name}: expected a number {'>' if exclusive else '>='} {minimum:g}, got {v!r}")
    return f


def softmax_scale(v, head_dim: int) -> float:
    """The attention ``scale``: None -> head_dim ** -0.5, else a finite number > 0."""
    if v is None:
        return head_dim**-0.5
    return real("scale", v, minimum=0.0, exclusive=True)


def eps(v) -> float:
    """LayerNorm's ``eps``: a finite number >= 0."""
    return real("eps", v, minimum=0.0)


def nonempty_dim(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    """Feature dims (in_features, head_dim, channels) must be non-zero on every backend; token and
    batch dims may be zero (the ops return an empty result)."""
    if t.shape[dim] == 0:
        raise ValueError(f"{name}: expected a non-zero {what} (dim {dim}), got shape {tuple(t.shape)}")


def choice(name: str, v, options: Sequence) -> None:
    if v not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {v!r}")


# ------------------------------------------------------------------------------------ layouts
# Each rule: None when the kernels read ``t`` in place as it is, else why not (naming ``name``).


def _flat_rows(t: torch.Tensor, lead: int) -> Optional[torch.Tensor]:
    """``t`` as a view of shape (-1,) + t.shape[lead:], or None when no view (only a copy) can."""
    shape = (-1,) + tuple(t.shape[lead:])
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def rows_layout(name: str, t: Optional[torch.Tensor]) -> Optional[str]:
    """Triton GEMM rows: t (..., T, C) addressed as (-1, T, C) through strides (any strides within
    the last two dims, including 0 and gaps; the leading dims must merge without a copy)."""
    if t is None or t.dim() <= 3 or t.numel() == 0:  # an empty result launches nothing
        return None
    if _flat_rows(t, t.dim() - 2) is None:
        return (
            f"{name}: the Triton kernels address (..., T, C) as (-1, T, C) without a copy; shape "
            f"{tuple(t.shape)} with strides {t.stride()} does not allow it (pass {name}.contiguous())"
        )
    return None


def unit_rows_layout(name: str, t: Optional[torch.Tensor]) -> Optional[str]:
    """CUDA GEMM rows: t (..., C) addressed as (rows, C) with unit stride along C (any row stride,
    including 0; the leading dims must merge without a copy)."""
    if t is None or t.numel() == 0:  # an empty result launches nothing
        return None
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return (
            f"{name}: the CUDA kernels read rows with unit stride along the last dim, got shape "
            f"{tuple(t.shape)} with strides {t.stride()} (pass {name}.contiguous())"
        )
    if t.dim() > 2 and _flat_rows(t, t.dim() - 1) is None:
        return (
            f"{name}: the CUDA kernels address (..., C) as (rows, C) without a copy; shape {tuple(t.shape)} "
            f"with strides {t.stride()} does not allow it (pass {name}.contiguous())"
        )
    return None


def vector_rows_layout(name: str, t: Optional[torch.Tensor]) -> Optional[str]:
    """Triton attention (and the single QKV + attention kernel): rows loaded as 16-byte vectors, so a
    unit last-dim stride, a 16-byte aligned data pointer and every other stride a multiple of 8
    elements (true of a contiguous tensor whose last dim is a multiple of 8, or a view of one that
    keeps whole rows). Stride 0 (expand) qualifies."""
    if t is None or t.numel() == 0:  # an empty result launches nothing
        return None
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return (
            f"{name}: the Triton attention kernels read rows with unit stride along the last dim, got shape "
            f"{tuple(t.shape)} with strides {t.stride()} (pass {name}.contiguous())"
        )
    bad = [s for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1 and s % 8 != 0]
    if bad or t.data_ptr() % 16 != 0:
        return (
            f"{name}: the Triton attention kernels load rows as 16-byte vectors: expected a 16-byte aligned "
            f"data pointer and strides that are multiples of 8 elements (except the last), got strides "
            f"{t.stride()} and data_ptr % 16 = {t.data_ptr() % 16} (pass {name}.contiguous())"
        )
    return None


def unit_stride_params(**params: Optional[torch.Tensor]) -> None:
    """Launchers' safety net for callers that bypass vit_kernels.ops: raise, naming the argument,
    when a 1-D parameter a kernel reads with unit stride has another stride."""
    for name, t in params.items():
        if t is not None and t.numel() > 1 and not t.is_contiguous():
            raise ValueError(
                f"{name}: the kernel reads it with unit stride, got strides {t.stride()} "
                f"(pass {name}.contiguous(); vit_kernels.ops does this itself)"
            )


# The head dims each backend's attention kernels take, (smallest, largest): a multiple of 8 in between.
# The one home of the rule: the ops, the swap layer and the launchers ask head_dim_unsupported; the
# launchers raise ValueError with its reason. "triton": vit_kernels/triton/attention.py (and its
# backward, qkv_attention, attention_stats), which pads head_dim to power-of-two chunks; "cuda": the
# C++ rule vk::attn::head_dim_instance of csrc/attention/flash_fwd.h (kMinHeadDim, the last of
# VK_ATTN_HEAD_DIMS), which tests/test_attention.py checks against this for head_dim 1..256 and each dtype.
HEAD_DIM_RANGE = {"triton": (16, 256), "cuda": (16, 128), "triton_tma": (16, 128)}
_KERNELS = {"triton": "Triton", "cuda": "CUDA", "triton_tma": "sm_90 tensor-descriptor Triton"}


def head_dim_unsupported(head_dim: int, backend: str) -> Optional[str]:
    """None when ``backend``'s ("triton" or "cuda"; "triton_tma": sm_90's tensor-descriptor kernel, a
    tuning candidate of backend triton) attention kernels take head_dim, else why not."""
    low, high = HEAD_DIM_RANGE[backend]
    if head_dim % 8 != 0 or not low <= head_dim <= high:
        return (
            f"head_dim={head_dim} is not supported by the {_KERNELS[backend]} attention kernels "
            f"(expected a multiple of 8 from {low} to {high})"
        )
    return None


def first(*reasons: Optional[str]) -> Optional[str]:
    """The first reason that is not None (None when all are)."""
    return next((r for r in reasons if r), None)


def contiguous_params(
    requested: str, **params: Optional[torch.Tensor]
) -> Tuple[Dict[str, Optional[torch.Tensor]], List[str]]:
    """The fused kernels read parameters (bias, LayerNorm weight and bias, layer scale, class token,
    position embedding) with unit strides. Any other layout (``bias[::2]``, ``gamma.expand(dim)``, a
    slice of a larger tensor) is copied to contiguous here, once per call, before the backend is
    resolved (the tuner's candidates all receive the copies): a few thousand elements, cheap beside
    the op. Returns (params, notes): notes name each copied argument and its strides, for
    ``Decision.copied`` (recorded when a fused backend runs). requested: the backend the caller
    asked for; "torch" copies nothing."""
    if requested == "torch":
        return dict(params), []
    out: Dict[str, Optional[torch.Tensor]] = {}
    notes: List[str] = []
    for name, t in params.items():
        if t is not None and not t.is_contiguous():
            notes.append(
                f"{name}: strides {t.stride()} copied to contiguous (the fused kernels read "
                f"parameters with unit stride)"
            )
            t = t.contiguous()
        out[name] = t
    return out, notes
