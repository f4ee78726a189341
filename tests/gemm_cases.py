"""Shared helpers of tests/test_gemm.py (a helper module, not a test file): inputs, the float64 oracles
and plain-PyTorch baselines, and one adapter per GEMM entry point that calls the Triton launcher or the
CUDA wrapper with the same arguments, so one test body checks both backends.

Backends: "triton" (vit_kernels.triton.gemm / layernorm, the interpreter on CPU tensors) and "cuda"
(vit_kernels.cuda.ops, the host emulator on CPU tensors, the GPU build on CUDA tensors).
"""

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import reference as R
from vit_kernels.dtypes import KERNEL_DTYPES

from conftest import DEVICE

DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes
BACKENDS = ["triton", "cuda"]


def rand(*shape, dtype, scale=1.0, shift=0.0):
    """Fresh normal values, scale * N(0, 1) + shift (drawn in float64, then rounded to dtype) on DEVICE."""
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype).to(DEVICE)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def d64(t):
    return None if t is None else t.double()


def require(backend: str) -> None:
    """Skip when Triton is missing; fail (not skip) when the CUDA extension cannot be built here."""
    if backend in ("triton", "triton_tma"):
        pytest.importorskip("triton")
        return
    from vit_kernels import cuda as vk_cuda

    try:
        vk_cuda.module_for(DEVICE)
    except vk_cuda.BuildError as e:
        pytest.fail(f"the CUDA extension for {DEVICE} failed to build: {e}")


# ------------------------------------------------------------------------------------ entry points
def linear(backend, x, w, b=None, *, residual=None, layer_scale=None, config=None):
    """residual + layer_scale * (x @ w^T + b); Triton writes into a NaN-filled `out` it must return."""
    if backend == "triton":
        from vit_kernels.triton import gemm

        out = nan_like(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype)
        got = gemm.linear_forward(x, w, b, residual=residual, layer_scale=layer_scale, out=out)
        assert got is out
        return got
    from vit_kernels.cuda import ops as cuda_ops

    kw = {} if config is None else {"config": config}
    return cuda_ops.linear_forward(x, w, b, residual=residual, layer_scale=layer_scale, **kw)


def qkv_projection(backend, x, w, b, *, num_heads, scale, norm_weight, norm_bias, eps):
    """[LayerNorm ->] x @ w^T + b -> (3, B, H, N, head_dim), q scaled."""
    if backend == "triton":
        from vit_kernels.triton import gemm

        B, N, _ = x.shape
        out = nan_like((3, B, num_heads, N, w.shape[0] // 3 // num_heads), x.dtype)
        got = gemm.qkv_projection_forward(
            x, w, b, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, out=out
        )
        assert got is out
        return got
    from vit_kernels.cuda import ops as cuda_ops

    return cuda_ops.qkv_projection_forward(
        x, w, b, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
    )


def row_stats(backend, x, eps):
    """(mean, rstd) of x's rows, float32."""
    if backend == "triton":
        from vit_kernels.triton.layernorm import row_stats as triton_row_stats

        return triton_row_stats(x, eps)
    from vit_kernels.cuda import ops as cuda_ops

    return cuda_ops.row_stats(x, eps)


# ------------------------------------------------------------------------- oracles and baselines
def linear_oracle(x, w, b, r, ls):
    return R.linear(d64(x), d64(w), d64(b), residual=d64(r), layer_scale=d64(ls))


def linear_baseline(x, w, b, r, ls):
    """Plain PyTorch at x's dtype: the oracle's code run at that dtype."""
    return R.linear(x, w, b, residual=r, layer_scale=ls)


def qkv_oracle(x, w, b, num_heads, scale, nw, nb, eps):
    B, N, _ = x.shape
    h = R.layer_norm(d64(x), d64(nw), d64(nb), eps) if nw is not None else d64(x)
    qkv = R.linear(h, d64(w), d64(b)).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return torch.cat([qkv[:1] * scale, qkv[1:]])


def qkv_baseline(x, w, b, num_heads, scale, nw, nb, eps):
    B, N, dim = x.shape
    h = F.layer_norm(x, (dim,), nw, nb, eps) if nw is not None else x
    qkv = F.linear(h, w, b).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return torch.cat([qkv[:1] * scale, qkv[1:]])
