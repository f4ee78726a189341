"""qkv_attention: [LayerNorm ->] QKV projection -> multi-head attention, heads concatenated."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, library, reference  # library imports this file: used at call time only
from ..backends import needs_grad, offer, resolve
from ..cuda.ops import attention_unsupported as cuda_attention_unsupported
from . import attention_stats
from .flash_attention import sdpa


def check_qkv_attention(x, qkv_weight, qkv_bias, num_heads, norm_weight, norm_bias, scale, eps):
    """Validate the arguments of :func:`qkv_attention` on every backend; returns
    (num_heads, inner, head_dim, scale, eps) as Python numbers, scale's default filled in."""
    checks.tensor("x", x, ndim=3)
    checks.nonempty_dim("x", x, 2, "dim")
    dim = x.shape[-1]
    num_heads = checks.positive_int("num_heads", num_heads)
    checks.tensor("qkv_weight", qkv_weight, ndim=2, dtype=x.dtype, device=x.device)
    if qkv_weight.shape[1] != dim or qkv_weight.shape[0] % 3 != 0:
        raise ValueError(
            f"qkv_weight: expected shape (3*inner, {dim}) for x of dim {dim}, got {tuple(qkv_weight.shape)}"
        )
    inner = qkv_weight.shape[0] // 3
    if inner == 0:
        raise ValueError(f"qkv_weight: expected a non-zero number of rows (3*inner), got {tuple(qkv_weight.shape)}")
    if inner % num_heads != 0:
        raise ValueError(
            f"num_heads: inner dim {inner} (qkv_weight.shape[0] // 3) is not divisible by num_heads={num_heads}"
        )
    checks.tensor("qkv_bias", qkv_bias, shape=(3 * inner,), dtype=x.dtype, device=x.device, optional=True)
    checks.tensor("norm_weight", norm_weight, shape=(dim,), dtype=x.dtype, device=x.device, optional=True)
    checks.tensor("norm_bias", norm_bias, shape=(dim,), dtype=x.dtype, device=x.device, optional=True)
    if norm_bias is not None and norm_weight is None:
        raise ValueError("norm_bias: given without norm_weight; pass norm_weight to apply LayerNorm")
    head_dim = inner // num_heads
    return num_heads, inner, head_dim, checks.softmax_scale(scale, head_dim), checks.eps(eps)


def layouts_unsupported(x, qkv_weight) -> dict:
    """backend -> why its kernels cannot read x and qkv_weight as they are (None: they can). Triton's
    split path reads any strides (its single kernel needs :func:`single_kernel_layout`); the CUDA
    GEMM needs unit-stride rows."""
    return {
        "triton": None,
        "cuda": checks.first(checks.unit_rows_layout("x", x), checks.unit_rows_layout("qkv_weight", qkv_weight)),
    }


def single_kernel_layout(x, qkv_weight) -> Optional[str]:
    """None when Triton's single kernel reads x and qkv_weight as they are (16-byte row vectors)."""
    return checks.first(checks.vector_rows_layout("x", x), checks.vector_rows_layout("qkv_weight", qkv_weight))


def qkv_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: Optional[float] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    backend: str = "auto",
    path: Optional[str] = None,
    tune: Optional[str] = None,
    stats: Optional[attention_stats.StatsRequest] = None,
):
    """Fused [LayerNorm ->] QKV projection -> attention.

    x: (batch, tokens, dim); qkv_weight: (3*inner, dim), rows [q; k; v], each head-major (timm's
    ``qkv.weight``, ``nn.MultiheadAttention.in_proj_weight``); qkv_bias: (3*inner,);
    norm_weight, norm_bias: (dim,) applies LayerNorm(x, eps) first.
    Returns (batch, tokens, inner): attention output before the output projection.
    ``vit_kernels.last_decision("qkv_attention").path`` says which kernel path ran.
    path: None (with backend="auto" on a CUDA device the tuner times both; untimed: "split"),
    "single_kernel" or "split" forces the fused path of the triton backend (the cuda backend has
    "split" only; torch ignores it). With path=None, an x or qkv_weight the single kernel cannot
    read in place (see :func:`single_kernel_layout`) takes the split path (the single kernel is
    then neither timed nor chosen). scale: None (head_dim ** -0.5) or a finite number > 0; eps: a
    finite number >= 0. batch or tokens 0: an empty result. 1-D parameters of other strides are
    copied for the fused kernels (``.copied`` of the decision).
    tune: "on" | "off" | "cache-only" for backend="auto" on CUDA tensors (vit_kernels.tuning).
    stats: a :class:`~vit_kernels.ops.attention_stats.StatsRequest` makes it return
    ``(out, AttentionStats)`` (triton, cuda: the split path keeping the row log-sum-exp, path
    "split+stats"; torch: the full softmax). Inside ``attention_stats.recording(...)`` the
    statistics are recorded instead. Without statistics this is the custom op
    ``torch.ops.vit_kernels.qkv_attention`` (:mod:`vit_kernels.library`).
    """
    request = stats if stats is not None else attention_stats.active_request()
    if request is None:
        return library.run(
            "qkv_attention",
            (x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune),
        )
    device_type = library.autocast_device(x, backend)
    if device_type is not None:  # the kernel backends under autocast, as library.run calls them
        x, qkv_weight, qkv_bias, norm_weight, norm_bias = library.autocast_tensors(
            (x, qkv_weight, qkv_bias, norm_weight, norm_bias), device_type
        )
        with torch.autocast(device_type, enabled=False):
            kw = dict(num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
            return qkv_attention(x, qkv_weight, qkv_bias, **kw, backend=backend, path=path, tune=tune, stats=stats)
    num_heads, inner, head_dim, scale, eps = check_qkv_attention(
        x, qkv_weight, qkv_bias, num_heads, norm_weight, norm_bias, scale, eps
    )
    checks.choice("path", path, (None, "single_kernel", "split"))
    if path is None and single_kernel_layout(x, qkv_weight):
        path = "split"
    tensors = (x, qkv_weight, qkv_bias, norm_weight, norm_bias)
    return _with_stats(tensors, num_heads, head_dim, scale, eps, backend, path, request, record=stats is None)


def dispatch(x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune) -> Tensor:
    """The body of the custom op: checks, the backend and path decision (recorded), the launch."""
    num_heads, inner, head_dim, scale, eps = check_qkv_attention(
        x, qkv_weight, qkv_bias, num_heads, norm_weight, norm_bias, scale, eps
    )
    checks.choice("path", path, (None, "single_kernel", "split"))
    if path is None and single_kernel_layout(x, qkv_weight):
        path = "split"
    tensors = (x, qkv_weight, qkv_bias, norm_weight, norm_bias)
    unsupported, fused, notes = _fused_inputs(tensors, head_dim, backend)
    args = (*fused, num_heads, scale, eps, path)
    empty = x.shape[0] == 0 or x.shape[1] == 0  # nothing to time: the untimed rules pick the backend
    d = resolve(
        "qkv_attention",
        backend,
        tensors,
        unsupported=unsupported,
        has_backward=("triton",),
        tune=tune,
        run=None if empty else _launch,
        args=args,
        key_extra=(num_heads, path),
    )
    if d.backend == "torch":
        offer(_launch, (num_heads, scale, eps, path))
        return _launch(d, *tensors, num_heads, scale, eps, path)
    if d.backend == "cuda" and path == "single_kernel":
        raise ValueError("path: 'single_kernel' is not available on the cuda backend (it has 'split')")
    d = d.with_copied(notes)
    if empty:
        d.with_path("empty")
        if needs_grad(tensors):  # nothing to launch; under autograd the torch path gives the empty result its graph
            return qkv_attention_torch(
                *tensors[:3], num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
            )
        return torch.empty((x.shape[0], x.shape[1], inner), dtype=x.dtype, device=x.device)
    offer(_launch, (num_heads, scale, eps, path))
    return _launch(d, *args)


def _fused_inputs(tensors, head_dim, backend):
    """What :func:`dispatch` and :func:`_with_stats` both need before resolving the backend:
    (unsupported, fused, notes). unsupported: backend -> why it cannot run this call (head_dim, dtype,
    :func:`layouts_unsupported`); fused: tensors (x, qkv_weight, qkv_bias, norm_weight, norm_bias) as
    the fused kernels read them, 1-D parameters of other strides copied to contiguous; notes: the
    copies, for ``Decision.copied`` (:func:`vit_kernels.checks.contiguous_params`)."""
    x, qkv_weight, qkv_bias, norm_weight, norm_bias = tensors
    layouts = layouts_unsupported(x, qkv_weight)
    unsupported = {
        "triton": checks.head_dim_unsupported(head_dim, "triton") or layouts["triton"],
        "cuda": cuda_attention_unsupported(head_dim, x.dtype) or layouts["cuda"],
    }
    p, notes = checks.contiguous_params(backend, qkv_bias=qkv_bias, norm_weight=norm_weight, norm_bias=norm_bias)
    return unsupported, (x, qkv_weight, p["qkv_bias"], p["norm_weight"], p["norm_bias"]), notes


def _launch(d, x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path):
    """Run qkv_attention as Decision ``d`` says: backend, path (the tuner's, else the caller's,
    else the untimed rule), tile configs. Records the path taken on the decision. The fused
    backends get qkv_bias, norm_weight, norm_bias contiguous (see :func:`qkv_attention`)."""
    kw = dict(num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
    if d.backend == "triton":
        from ..triton import qkv_attention as triton_qkv

        if needs_grad((x, qkv_weight, qkv_bias, norm_weight, norm_bias)):  # forward and backward kernels
            if path == "single_kernel":
                raise ValueError(
                    "path: 'single_kernel' keeps neither Q, K, V nor the softmax statistics a "
                    "backward needs; under autograd use path='split' or None"
                )
            from ..autograd import QkvAttention

            if d.path != "split":
                d.with_path("split")
            return QkvAttention.apply(
                x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, tuple(d.config)
            )
        path = d.path or path or triton_qkv.choose_path(x, num_heads, qkv_weight.shape[0] // 3 // num_heads)
        unreadable = single_kernel_layout(x, qkv_weight) if path == "single_kernel" else None
        if unreadable:
            raise ValueError(f"path: 'single_kernel' cannot run this call: {unreadable}; use path='split' or None")
        if d.path != path:
            d.with_path(path)
        return triton_qkv.qkv_attention_forward(x, qkv_weight, qkv_bias, path=path, **kw, **dict(d.config))
    if d.backend == "cuda":
        from ..cuda import ops as cuda_ops

        if d.path != "split":
            d.with_path("split")
        return cuda_ops.qkv_attention_forward(x, qkv_weight, qkv_bias, **kw)
    if d.backend == "reference":
        return reference.qkv_attention(x, qkv_weight, qkv_bias, **kw)
    if not d.path:
        d.with_path("torch")
    return qkv_attention_torch(x, qkv_weight, qkv_bias, **kw, sdpa_path="" if d.path == "torch" else d.path)


def qkv_attention_torch(x, qkv_weight, qkv_bias, *, num_heads, scale, norm_weight, norm_bias, eps, sdpa_path=""):
    """Plain PyTorch path: F.layer_norm, F.linear, SDPA (sdpa_path: one SDPA backend, see
    flash_attention.sdpa). Differentiable."""
    B, N, dim = x.shape
    inner = qkv_weight.shape[0] // 3
    if norm_weight is not None:
        x = F.layer_norm(x, (dim,), norm_weight, norm_bias, eps)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, inner // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = sdpa(q, k, v, scale, sdpa_path)
    return o.transpose(1, 2).reshape(B, N, inner)


def _with_stats(tensors, num_heads, head_dim, scale, eps, backend, path, request, record):
    """qkv_attention plus the statistics of ``request``: (out, AttentionStats), or out with the
    statistics appended to the active recording when ``record``."""
    x, qkv_weight, qkv_bias, norm_weight, norm_bias = tensors
    rows = attention_stats.check_request(request, x.shape[1], x.shape[1])
    unsupported, fused, notes = _fused_inputs(tensors, head_dim, backend)
    d = resolve("qkv_attention", backend, tensors, unsupported=unsupported)
    if d.backend in ("triton", "cuda"):
        if path == "single_kernel":
            raise ValueError("path: 'single_kernel' keeps no softmax statistics; with stats use path=None or 'split'")
        if d.backend == "triton":
            from ..triton import attention_stats as kernels
        else:
            from ..cuda import attention_stats as kernels
        d.with_copied(notes).with_path("split+stats")
        x, qkv_weight, qkv_bias, norm_weight, norm_bias = fused  # 1-D parameters as the kernels read them
        out, st = kernels.qkv_attention_with_stats(
            x,
            qkv_weight,
            qkv_bias,
            num_heads=num_heads,
            scale=scale,
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            eps=eps,
            request=request,
            rows=rows,
        )
    else:
        d.with_path("torch+stats")
        B, N, dim = x.shape
        h = F.layer_norm(x, (dim,), norm_weight, norm_bias, eps) if norm_weight is not None else x
        q, k, v = F.linear(h, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, num_heads * head_dim)
        st = attention_stats.attention_stats_torch(q, k, scale, request)
    if record:
        attention_stats.record(st)
        return out
    return out, st
