"""LayerNorm backward in Triton (and the normalized rows the weight gradients need), with plain
host launchers. The forward's row statistics come from vit_kernels.triton.layernorm.row_stats.

For rows x of width D, xhat = (x - mean) * rstd, y = xhat * w + b, and dy:

    dxhat = dy * w
    dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     _ln_bwd_dx_kernel, per row block
    dw    = colsum(dy * xhat),  db = colsum(dy)                         _ln_bwd_dwdb_kernel, per column
                                                                          block and row chunk, then
                                                                          gemm_bwd.column_sums
Everything in fp32 (fp64 for float64 inputs, gradcheck), rounded once on the store.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv
from .. import checks
from .aot import REPRESENTATIVE, AotSpec, recorded_specs, unique_specs
from .gemm_bwd import SUM_ROWS_PER_SPLIT, column_sums
from .layernorm import _row_stats_kernel, row_stats

BLOCK_R, BLOCK_D = 8, 256
DW_BLOCK_R, DW_BLOCK_N = 32, 64


@triton.jit
def _ln_apply_kernel(
    x_ptr,
    mean_ptr,
    rstd_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    y_ptr,  # x_ptr, y_ptr: (M, D) contiguous; mean_ptr, rstd_ptr: (M,) fp32/fp64; norm_weight_ptr, norm_bias_ptr: (D,)
    M,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        y = (tl.load(x_ptr + off, mask=mask, other=0.0).to(mean.dtype) - mean[:, None]) * rstd[:, None]
        if HAS_NORM_WEIGHT:
            y = y * tl.load(norm_weight_ptr + cols, mask=cmask, other=0.0).to(mean.dtype)[None, :]
        if HAS_NORM_BIAS:
            y = y + tl.load(norm_bias_ptr + cols, mask=cmask, other=0.0).to(mean.dtype)[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    norm_weight_ptr,
    dx_ptr,  # x_ptr, dy_ptr, dx_ptr: (M, D) contiguous; mean_ptr, rstd_ptr: (M,); norm_weight_ptr: (D,)
    M,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    row_off = rows.to(tl.int64)[:, None] * D
    c1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=mean.dtype)  # sum of dxhat * xhat
    c2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=mean.dtype)  # sum of dxhat
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        xhat = (tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(mean.dtype) - mean[:, None]) * rstd[
            :, None
        ]
        dxhat = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(mean.dtype)
        if HAS_NORM_WEIGHT:
            dxhat = dxhat * tl.load(norm_weight_ptr + cols, mask=cmask, other=0.0).to(mean.dtype)[None, :]
        c1 += tl.where(mask, dxhat * xhat, 0.0)
        c2 += dxhat
    c1s = tl.sum(c1, axis=1) / D
    c2s = tl.sum(c2, axis=1) / D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        xhat = (tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(mean.dtype) - mean[:, None]) * rstd[
            :, None
        ]
        dxhat = tl.load(dy_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(mean.dtype)
        if HAS_NORM_WEIGHT:
            dxhat = dxhat * tl.load(norm_weight_ptr + cols, mask=cmask, other=0.0).to(mean.dtype)[None, :]
        dx = (dxhat - c2s[:, None] - xhat * c1s[:, None]) * rstd[:, None]
        tl.store(dx_ptr + row_off + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_dwdb_kernel(
    x_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    dw_ptr,
    db_ptr,  # x_ptr, dy_ptr: (M, D) contiguous; dw_ptr, db_ptr: (splits, D) partial sums
    M,
    D,
    rows_per_split,  # rows_per_split: a multiple of BLOCK_R
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    cmask = cols < D
    acc_dtype = mean_ptr.dtype.element_ty
    dw = tl.zeros((BLOCK_R, BLOCK_N), dtype=acc_dtype)
    db = tl.zeros((BLOCK_R, BLOCK_N), dtype=acc_dtype)
    for r in range(0, rows_per_split, BLOCK_R):
        rows = split * rows_per_split + r + tl.arange(0, BLOCK_R)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = (tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_dtype) - mean[:, None]) * rstd[:, None]
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(acc_dtype)
        dw += tl.where(mask, dy * xhat, 0.0)
        db += dy
    out = split.to(tl.int64) * D + cols
    tl.store(dw_ptr + out, tl.sum(dw, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(db_ptr + out, tl.sum(db, axis=0).to(db_ptr.dtype.element_ty), mask=cmask)


def _check_rows(name: str, t: Tensor) -> None:
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous 2-D (rows, dim) tensor, got shape {tuple(t.shape)} strides {t.stride()}"
        )


def _check_stats(x: Tensor, mean: Tensor, rstd: Tensor) -> None:
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != (x.shape[0],) or t.dtype != want or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous {want} tensor of shape ({x.shape[0]},), got {t.dtype} {tuple(t.shape)}"
            )


def layernorm_apply(
    x: Tensor, mean: Tensor, rstd: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor]
) -> Tensor:
    """LayerNorm's output (x - mean) * rstd [* norm_weight] [+ norm_bias] in x's dtype, from the row statistics.

    x: (M, D) contiguous; mean, rstd: (M,) fp32 (fp64 for float64 x, see layernorm.row_stats);
    norm_weight, norm_bias: (D,) contiguous or None. Returns (M, D): the operand the weight gradient of the
    GEMM after a LayerNorm reads (the forward applied it on load and never stored it).
    """
    _check_rows("x", x)
    _check_stats(x, mean, rstd)
    checks.unit_stride_params(norm_weight=norm_weight, norm_bias=norm_bias)
    M, D = x.shape
    y = torch.empty_like(x)
    if M and D:
        _ln_apply_kernel[(cdiv(M, BLOCK_R),)](
            x,
            mean,
            rstd,
            norm_weight if norm_weight is not None else x,
            norm_bias if norm_bias is not None else x,
            y,
            M,
            D,
            BLOCK_R=BLOCK_R,
            BLOCK_D=BLOCK_D,
            HAS_NORM_WEIGHT=norm_weight is not None,
            HAS_NORM_BIAS=norm_bias is not None,
            num_warps=4,
        )
    return y


def layernorm_backward(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    norm_weight: Optional[Tensor],
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of y = LayerNorm(x) [* norm_weight] [+ norm_bias] for dy = grad.

    grad, x: (M, D) contiguous; mean, rstd: (M,) the forward's statistics (fp32; fp64 for float64);
    norm_weight: (D,) or None. Returns (dx (M, D) in x's dtype, d norm_weight (D,), d norm_bias (D,)) in
    the parameters' dtype (x's without norm_weight), None where not needed.
    """
    _check_rows("grad", grad)
    _check_rows("x", x)
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad: expected {x.dtype} {tuple(x.shape)} (as x), got {grad.dtype} {tuple(grad.shape)}")
    _check_stats(x, mean, rstd)
    checks.unit_stride_params(norm_weight=norm_weight)
    M, D = x.shape
    dx = dw = db = None
    if need_input:
        dx = torch.empty_like(x)
        if M and D:
            _ln_bwd_dx_kernel[(cdiv(M, BLOCK_R),)](
                x,
                grad,
                mean,
                rstd,
                norm_weight if norm_weight is not None else x,
                dx,
                M,
                D,
                BLOCK_R=BLOCK_R,
                BLOCK_D=BLOCK_D,
                HAS_NORM_WEIGHT=norm_weight is not None,
                num_warps=4,
            )
    if need_weight or need_bias:
        pdt = norm_weight.dtype if norm_weight is not None else x.dtype
        splits = max(1, cdiv(M, SUM_ROWS_PER_SPLIT))
        rows_per_split = cdiv(cdiv(M, splits), DW_BLOCK_R) * DW_BLOCK_R if M else DW_BLOCK_R
        pw = torch.empty((splits, D), dtype=mean.dtype, device=x.device)
        pb = torch.empty((splits, D), dtype=mean.dtype, device=x.device)
        if D:
            _ln_bwd_dwdb_kernel[(cdiv(D, DW_BLOCK_N), splits)](
                x, grad, mean, rstd, pw, pb, M, D, rows_per_split, BLOCK_R=DW_BLOCK_R, BLOCK_N=DW_BLOCK_N, num_warps=4
            )
        if need_weight:
            dw = column_sums(pw, splits, (0, D, 1), pdt)[1]
        if need_bias:
            db = column_sums(pb, splits, (0, D, 1), pdt)[1]
    return dx, dw, db


def aot_specs() -> List[AotSpec]:
    """The launches of layernorm_apply (weight and bias, weight only) and layernorm_backward (dx with
    and without a weight; the dweight/dbias partial sums, which gemm_bwd's column sums then reduce)
    per dtype, recorded at aot.REPRESENTATIVE's rows (batch x tokens) and dim; and layernorm.row_stats
    as the backward recomputes it, on the (rows, dim) matrix (the forward's launch reads (batch,
    tokens, dim), another divisibility of its row count T: layernorm.aot_specs)."""
    B, T, dim = (REPRESENTATIVE[k] for k in ("batch", "tokens", "dim"))
    M = B * T
    specs: List[AotSpec] = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x, w = torch.empty(M, dim, dtype=dtype), torch.empty(dim, dtype=dtype)
        stats = tuple(torch.empty(2, M, dtype=torch.float32))  # (mean, rstd) as row_stats returns them

        def call():
            layernorm_apply(x, *stats, w, w)
            layernorm_apply(x, *stats, w, None)
            layernorm_backward(x, x, *stats, w)
            layernorm_backward(x, x, *stats, None, need_weight=False, need_bias=False)
            row_stats(x, 1e-6)

        kernels = {
            _row_stats_kernel: ("row_stats", False),
            _ln_apply_kernel: ("layernorm_apply", False),
            _ln_bwd_dx_kernel: ("layernorm_bwd_dx", False),
            _ln_bwd_dwdb_kernel: ("layernorm_bwd_dwdb", False),
        }
        specs += recorded_specs(call, kernels, shape=f"rows={M},dim={dim}")
    return unique_specs(specs)
