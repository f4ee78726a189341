"""flash_attention: softmax(q k^T * scale) v, non-causal. Checks, dispatch, torch path."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, library, reference  # library imports this file: used at call time only
from ..backends import needs_grad, offer, resolve
from ..cuda.ops import attention_unsupported as cuda_attention_unsupported
from . import attention_stats


def check_flash_attention(q, k, v, scale) -> float:
    """Validate the arguments of :func:`flash_attention` on every backend; returns the scale."""
    checks.tensor("q", q, ndim=4)
    B, H, N, D = q.shape
    checks.nonempty_dim("q", q, 3, "head_dim")
    checks.tensor("k", k, shape=(B, H, None, D), dtype=q.dtype, device=q.device)
    checks.tensor("v", v, shape=(B, H, k.shape[2], D), dtype=q.dtype, device=q.device)
    return checks.softmax_scale(scale, D)


def layouts_unsupported(q, k, v) -> dict:
    """backend -> why its kernels cannot read q, k, v as they are (None: they can). The CUDA kernel
    reads any strides and alignment (a scalar path where rows are not 16-byte vectors)."""
    return {
        "triton": checks.first(*(checks.vector_rows_layout(n, t) for n, t in (("q", q), ("k", k), ("v", v)))),
        "cuda": None,
    }


def stats_layouts_unsupported(q, k, v) -> dict:
    """:func:`layouts_unsupported` for a call with statistics: the CUDA statistics kernels
    (csrc/attention/stats.cu) also read q and k with a unit stride along head_dim."""
    layouts = layouts_unsupported(q, k, v)
    for name, t in (("q", q), ("k", k)):
        if layouts["cuda"] is None and t.numel() and t.stride(-1) != 1:
            layouts["cuda"] = (
                f"{name}: the CUDA statistics kernels read rows with unit stride along head_dim, got shape "
                f"{tuple(t.shape)} with strides {t.stride()} (pass {name}.contiguous())"
            )
    return layouts


def _unsupported(q, layouts) -> dict:
    """backend -> why it cannot run this call (None: it can): q's head_dim and dtype, then ``layouts``
    (:func:`layouts_unsupported`, or :func:`stats_layouts_unsupported`)."""
    D = q.shape[-1]
    return {
        "triton": checks.head_dim_unsupported(D, "triton") or layouts["triton"],
        "cuda": cuda_attention_unsupported(D, q.dtype) or layouts["cuda"],
    }


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    tune: Optional[str] = None,
    stats: Optional[attention_stats.StatsRequest] = None,
):
    """Non-causal scaled dot-product attention.

    q: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim).
    Returns (batch, heads, q_tokens, head_dim). scale defaults to head_dim ** -0.5 (else a finite
    number > 0). batch, heads or q_tokens 0: an empty result. kv_tokens 0: zeros, as the oracle
    (an empty softmax times an empty v) and SDPA give, on every backend (with ``stats``: the torch
    path's empty rows and weights).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    stats: a :class:`~vit_kernels.ops.attention_stats.StatsRequest` makes it return
    ``(out, AttentionStats)`` (attention rows, mean attention distance, full weights). Inside
    ``attention_stats.recording(...)`` the statistics are recorded instead.
    Without statistics this is the custom op ``torch.ops.vit_kernels.flash_attention``
    (:mod:`vit_kernels.library`).
    """
    request = stats if stats is not None else attention_stats.active_request()
    if request is None:
        return library.run("flash_attention", (q, k, v, scale, backend, tune))
    device_type = library.autocast_device(q, backend)
    if device_type is not None:  # the kernel backends under autocast, as library.run calls them
        q, k, v = library.autocast_tensors((q, k, v), device_type)
        with torch.autocast(device_type, enabled=False):
            return flash_attention(q, k, v, scale=scale, backend=backend, tune=tune, stats=stats)
    scale = check_flash_attention(q, k, v, scale)
    return _with_stats(q, k, v, scale, backend, request, record=stats is None)


def dispatch(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], backend: str, tune: Optional[str]) -> Tensor:
    """The body of the custom op: checks, the backend decision (recorded), the launch."""
    scale = check_flash_attention(q, k, v, scale)
    empty = q.numel() == 0 or k.shape[2] == 0  # nothing to time: the untimed rules pick the backend
    d = resolve(
        "flash_attention",
        backend,
        (q, k, v),
        unsupported=_unsupported(q, layouts_unsupported(q, k, v)),
        has_backward=("triton",),
        tune=tune,
        run=None if empty else _launch,
        args=(q, k, v, scale),
    )
    if d.backend != "torch" and q.numel() == 0:
        d.with_path("empty")
        if needs_grad((q, k, v)):  # nothing to launch; under autograd the torch path gives the empty result its graph
            return sdpa(q, k, v, scale)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if d.backend != "torch" and k.shape[2] == 0:
        d.with_path("no_keys")
        if needs_grad((q, k, v)):  # nothing to launch; under autograd the torch path gives the empty result its graph
            return reference.flash_attention(q, k, v, scale=scale)
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    offer(_launch, (scale,))
    return _launch(d, q, k, v, scale)


def _launch(d, q, k, v, scale):
    """Run flash_attention as Decision ``d`` says (backend, path, tile config)."""
    if d.backend == "triton":
        if needs_grad((q, k, v)):  # forward and backward kernels (vit_kernels.autograd)
            from ..autograd import FlashAttention

            return FlashAttention.apply(q, k, v, scale, tuple(d.config))
        from ..triton import attention as triton_attention

        return triton_attention.flash_attention_forward(q, k, v, scale, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops

        return cuda_ops.flash_attention_forward(q, k, v, scale)
    if d.backend == "reference":
        return reference.flash_attention(q, k, v, scale=scale)
    return sdpa(q, k, v, scale, d.path)


def sdpa(q, k, v, scale, path=""):
    """F.scaled_dot_product_attention; path "sdpa_flash" | "sdpa_efficient" | "sdpa_cudnn" pins
    one SDPA backend (a tuning candidate), "" lets PyTorch choose. On CUDA tensors whose data does
    not start on a 16-byte boundary, PyTorch's choice runs its math backend: PyTorch 2.11's
    memory-efficient kernel reads such fp32 views with 16-byte loads ("misaligned address", seen
    on an H200; benchmarks/results/2026-11-25-h200/README.md)."""
    if not path and q.is_cuda and any(t.data_ptr() % 16 for t in (q, k, v)):
        path = "sdpa_math"
    if not path:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[path])):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}


def _with_stats(q, k, v, scale, backend, request, record):
    """flash_attention plus the statistics of ``request``: (out, AttentionStats), or out with the
    statistics appended to the active recording when ``record``."""
    rows = attention_stats.check_request(request, q.shape[2], k.shape[2])
    d = resolve("flash_attention", backend, (q, k, v), unsupported=_unsupported(q, stats_layouts_unsupported(q, k, v)))
    if d.backend in ("triton", "cuda") and k.shape[2] == 0:
        d.with_path("no_keys")  # nothing to launch: zeros, as dispatch gives, and the torch path's (empty) statistics
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        st = attention_stats.attention_stats_torch(q, k, scale, request)
    elif d.backend in ("triton", "cuda"):
        if d.backend == "triton":
            from ..triton import attention_stats as kernels
        else:
            from ..cuda import attention_stats as kernels
        d.with_path("stats")
        out, st = kernels.flash_attention_with_stats(q, k, v, scale, request, rows)
    else:
        d.with_path("torch+stats")
        out = sdpa(q, k, v, scale)
        st = attention_stats.attention_stats_torch(q, k, scale, request)
    if record:
        attention_stats.record(st)
        return out
    return out, st
