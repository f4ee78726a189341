"""The backward of vit_kernels' Triton GEMM (gemm.py): input, weight, bias and layer-scale
gradients, and GELU's derivative in an epilogue. Plain host launchers; no autograd here.

For one projection  y = [residual +] [ls *] (a @ W^T [+ b]),  a: (M, K), W: (N, K), y: (M, N):

    g  = ls * dy                 \
    db = colsum(g)                > _column_sums_kernel, one pass over dy (dls needs the branch
    dls = colsum(dy * branch)    /  a @ W^T + b, given by the caller)
    da = g @ W                   gemm._gemm_kernel, W read transposed through its strides
    dW = g^T @ a                 gemm._gemm_kernel, g and a read transposed through their strides
    dresidual = dy               (nothing to compute)

fc1's GELU: da of fc2 is multiplied by GELU'(pre) in the same GEMM's epilogue (gemm.ACT_DGELU_*,
pre = fc1's output before GELU), which gives dL/dpre without another pass.

Column sums run in two launches of one kernel: (splits, N) fp32 partial sums over row chunks
(enough programs to fill a GPU), then the partials summed into the parameter's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv
from .. import checks
from ..dtypes import FLOAT_DTYPES
from .aot import REPRESENTATIVE, AotSpec, recorded_specs, unique_specs
from .gemm import ACT_DGELU_ERF, ACT_DGELU_TANH, ACT_NONE, _gemm_kernel, launch_gemm

DTYPES = FLOAT_DTYPES  # vit_kernels.dtypes (float64: the gradcheck tests)
DGELU = {"none": ACT_DGELU_ERF, "tanh": ACT_DGELU_TANH}  # GELU's `approximate` -> the derivative's ACT
# float64 (gradcheck only): the GEMM's fp64 tiles; other dtypes use gemm.block_config.
FP64_GEMM_CONFIG = (32, 32, 16, 4, 1)
SUM_BLOCK_R, SUM_BLOCK_N, SUM_ROWS_PER_SPLIT = 32, 64, 512


@triton.jit
def _column_sums_kernel(
    g_ptr,  # (M, N) as (b, t, n) with strides (stride_gb, stride_gt, stride_gn): the incoming gradient
    z_ptr,  # (M, N) contiguous: the branch (layer-scale gradient)            [HAS_Z]
    ls_ptr,  # (N,) layer scale                                                [HAS_LS]
    dg_ptr,  # (M, N) contiguous out: ls * g                                   [WRITE_DG]
    sum_g_ptr,  # (splits, N) out: partial column sums of ls * g
    sum_gz_ptr,  # (splits, N) out: partial column sums of g * z                   [HAS_Z]
    M,
    N,
    T,
    stride_gb,
    stride_gt,
    stride_gn,
    rows_per_split,  # a multiple of BLOCK_R
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LS: tl.constexpr,
    HAS_Z: tl.constexpr,
    WRITE_DG: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    cols64 = cols.to(tl.int64)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    if HAS_LS:
        ls = tl.load(ls_ptr + cols, mask=n_mask, other=0.0).to(acc_dtype)
    acc_g = tl.zeros((BLOCK_R, BLOCK_N), dtype=acc_dtype)
    acc_gz = tl.zeros((BLOCK_R, BLOCK_N), dtype=acc_dtype)
    row0 = split * rows_per_split
    for r in range(0, rows_per_split, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        mask = (rows < M)[:, None] & n_mask[None, :]
        g_off = ((rows // T).to(tl.int64) * stride_gb + (rows % T).to(tl.int64) * stride_gt)[:, None] + cols64[
            None, :
        ] * stride_gn
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(acc_dtype)
        flat = rows.to(tl.int64)[:, None] * N + cols64[None, :]
        if HAS_Z:
            acc_gz += g * tl.load(z_ptr + flat, mask=mask, other=0.0).to(acc_dtype)
        if HAS_LS:
            g = g * ls[None, :]
        if WRITE_DG:
            tl.store(dg_ptr + flat, g.to(dg_ptr.dtype.element_ty), mask=mask)
        acc_g += g
    out = split.to(tl.int64) * N + cols64
    tl.store(sum_g_ptr + out, tl.sum(acc_g, axis=0).to(sum_g_ptr.dtype.element_ty), mask=n_mask)
    if HAS_Z:
        tl.store(sum_gz_ptr + out, tl.sum(acc_gz, axis=0).to(sum_gz_ptr.dtype.element_ty), mask=n_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_sums(
    g: Tensor,
    T: int,
    g_strides: Tuple[int, int, int],
    out_dtype: torch.dtype,
    *,
    layer_scale: Optional[Tensor] = None,
    branch: Optional[Tensor] = None,
    write_scaled: bool = False,
) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """Column sums of a gradient g: (M, N) rows addressed as (b, t) = (m // T, m % T) through
    g_strides = (stride_b, stride_t, stride_n) (no copy of a strided view).

    layer_scale: (N,) multiplies g first; branch: (M, N) contiguous, also returns colsum(g * branch);
    write_scaled: also returns layer_scale * g as a contiguous (M, N) tensor.
    Returns (scaled g or None, colsum(ls * g) (N,), colsum(g * branch) (N,) or None), the sums in
    out_dtype (accumulated in fp32, fp64 for float64).
    """
    checks.unit_stride_params(layer_scale=layer_scale)
    M = g.numel() // g.shape[-1] if g.shape[-1] else 0
    N = g.shape[-1]
    acc = _acc_dtype(g.dtype)
    splits = max(1, cdiv(M, SUM_ROWS_PER_SPLIT))
    rows_per_split = cdiv(cdiv(M, splits), SUM_BLOCK_R) * SUM_BLOCK_R if M else SUM_BLOCK_R
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device) if write_scaled else None
    sum_dtype = out_dtype if splits == 1 else acc
    sum_g = torch.empty((splits, N), dtype=sum_dtype, device=g.device)
    sum_gz = torch.empty((splits, N), dtype=sum_dtype, device=g.device) if branch is not None else None
    if N == 0:
        return dg, sum_g[0], (sum_gz[0] if sum_gz is not None else None)
    _column_sums_kernel[(cdiv(N, SUM_BLOCK_N), splits)](
        g,
        branch if branch is not None else g,
        layer_scale if layer_scale is not None else g,
        dg if dg is not None else g,
        sum_g,
        sum_gz if sum_gz is not None else sum_g,
        M,
        N,
        T,
        *g_strides,
        rows_per_split,
        BLOCK_R=SUM_BLOCK_R,
        BLOCK_N=SUM_BLOCK_N,
        HAS_LS=layer_scale is not None,
        HAS_Z=branch is not None,
        WRITE_DG=write_scaled,
        ACC_F64=acc == torch.float64,
        num_warps=4,
    )
    if splits > 1:  # the partials, summed by the same kernel into out_dtype
        sum_g = column_sums(sum_g, splits, (0, N, 1), out_dtype)[1][None]
        if sum_gz is not None:
            sum_gz = column_sums(sum_gz, splits, (0, N, 1), out_dtype)[1][None]
    return dg, sum_g[0], (sum_gz[0] if sum_gz is not None else None)


def _config(dtype: torch.dtype):
    return FP64_GEMM_CONFIG if dtype == torch.float64 else None


def input_grad(g: Tensor, weight: Tensor, *, gelu_input: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """da = g @ weight, (M, K), in g's dtype.

    g: (M, N) contiguous; weight: (N, K) any strides (read transposed in place).
    gelu_input: (M, K) contiguous, GELU's input in the forward: returns (g @ weight) * GELU'(it)
    (approximate "none" | "tanh"), the gradient of fc1's output before its GELU.
    """
    M, N = g.shape
    K = weight.shape[1]
    out = torch.empty((M, K), dtype=g.dtype, device=g.device)
    act = DGELU[approximate] if gelu_input is not None else ACT_NONE
    return launch_gemm(
        g,
        weight,
        out,
        M=M,
        N=K,
        K=N,
        T=max(M, 1),
        a_strides=(0, g.stride(0), g.stride(1)),
        w_strides=(weight.stride(1), weight.stride(0)),
        out_strides=(0, K, 1),
        residual=gelu_input,
        res_strides=(0, K, 1) if gelu_input is not None else (0, 0, 0),
        act=act,
        gemm_config=_config(g.dtype),
    )


def weight_grad(g: Tensor, a: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dW = g^T @ a, (N, K) in out_dtype (fp32 accumulation, one rounding).

    g: (M, N) contiguous; a: (M, K) any strides (both read transposed in place).
    """
    M, N = g.shape
    K = a.shape[1]
    out = torch.empty((N, K), dtype=out_dtype, device=g.device)
    return launch_gemm(
        g,
        a,
        out,
        M=N,
        N=K,
        K=M,
        T=max(N, 1),
        a_strides=(0, g.stride(1), g.stride(0)),
        w_strides=(a.stride(1), a.stride(0)),
        out_strides=(0, K, 1),
        gemm_config=_config(g.dtype),
    )


def linear_backward(
    grad: Tensor,
    a: Tensor,
    weight: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    layer_scale: Optional[Tensor] = None,
    branch: Optional[Tensor] = None,
    gelu_input: Optional[Tensor] = None,
    approximate: str = "none",
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of y = [residual +] [layer_scale *] (a @ weight^T [+ bias]) for dy = grad.

    grad: (M, N) contiguous; a: (M, K) (any strides); weight: (N, K); layer_scale: (N,) or None;
    branch: (M, N) contiguous a @ weight^T + bias, needed for the layer-scale gradient (None: not
    computed); gelu_input: (M, K), makes da the gradient before a GELU whose output was a (fc1's
    pre-activation, see :func:`input_grad`).
    Returns (da (M, K) or None, dweight (N, K) or None, dbias (N,) or None, dlayer_scale (N,) or None).
    The residual's gradient is grad itself.
    """
    if grad.dtype not in DTYPES:
        raise TypeError(f"grad: expected float32, float16, bfloat16 or float64, got {grad.dtype}")
    if grad.dim() != 2 or not grad.is_contiguous():
        raise ValueError(
            f"grad: expected a contiguous 2-D (rows, out_features) tensor, got shape "
            f"{tuple(grad.shape)} strides {grad.stride()}"
        )
    g, db, dls = grad, None, None
    if need_bias or layer_scale is not None:
        N = grad.shape[1]
        dg, db, dls = column_sums(
            grad,
            max(grad.shape[0], 1),
            (0, N, 1),
            weight.dtype,
            layer_scale=layer_scale,
            branch=branch,
            write_scaled=layer_scale is not None,
        )
        g = dg if dg is not None else grad
    da = input_grad(g, weight, gelu_input=gelu_input, approximate=approximate) if need_input else None
    dw = weight_grad(g, a, weight.dtype) if need_weight else None
    return da, dw, (db if need_bias else None), dls


def aot_specs() -> List[AotSpec]:
    """The launches of this module at aot.REPRESENTATIVE's rows (batch x tokens) and dim, per dtype,
    recorded from the launchers as vit_kernels.autograd calls them: linear_backward with a bias, with
    a layer scale (with and without its gradient), fc2's with GELU's derivative (erf and tanh), the
    QKV projection's (3 x dim outputs); the patch embedding's weight gradient and its bias, position
    embedding and class-token column sums (strided views of the (batch, tokens, dim) gradient).
    Reported as gemm_bwd_input (da = g @ W, plain or with GELU'), gemm_bwd_weight (dW = g^T @ a),
    column_sums (both stages: fp32 partials, then their sum), and gemm_bwd_recompute: the forward
    GEMM on (rows, K) matrices as vit_kernels.autograd runs it under autograd (fc1 with LayerNorm
    affine or weight-only, with and without its GELU; fc2 with a residual and layer scale; a
    layer-scaled branch): the divisibility of rows = batch x tokens differs from the forward's
    (batch, tokens, dim) launches (tokens = 197)."""
    from .gemm import ACTIVATIONS, dense_forward

    B, T, dim = (REPRESENTATIVE[k] for k in ("batch", "tokens", "dim"))
    M, K = B * T, 3 * 16 * 16  # rows; the patch embedding's reduction (3 channels, 16 x 16 patches)
    shape = f"B={B},T={T},dim={dim}"
    specs: List[AotSpec] = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):

        def e(*shape):
            return torch.empty(*shape, dtype=dtype)

        g, a, w, vec = e(M, dim), e(M, dim), e(dim, dim), e(dim)
        hidden, w2, w1, b1 = e(M, 4 * dim), e(dim, 4 * dim), e(4 * dim, dim), e(4 * dim)
        g_tokens, w_patch = e(B, T, dim), e(dim, K)
        stats = tuple(torch.empty(2, M, dtype=torch.float32))  # (mean, rstd) as row_stats returns them

        def gradients():
            linear_backward(g, a, w, need_bias=True)
            linear_backward(g, a, w, need_bias=True, layer_scale=vec, branch=e(M, dim))
            linear_backward(g, a, w, need_bias=True, layer_scale=vec)
            for approximate in DGELU:
                linear_backward(g, hidden, w2, need_bias=True, gelu_input=hidden, approximate=approximate)
            linear_backward(e(M, 3 * dim), a, e(3 * dim, dim), need_bias=True)
            weight_grad(g_tokens.view(M, dim), e(M, K), dtype)
            column_sums(g_tokens[:, 1:], T - 1, (T * dim, dim, 1), dtype)
            column_sums(g_tokens.view(B, T * dim), 1, (T * dim, 0, 1), dtype)
            column_sums(g_tokens[:, 0], 1, (T * dim, 0, 1), dtype)
            input_grad(e(B * (T - 1), dim), w_patch)

        def recompute():
            for act in (ACT_NONE, *ACTIVATIONS.values()):
                dense_forward(a, w1, b1, norm_weight=vec, norm_bias=vec, stats=stats, act=act)
                dense_forward(a, w1, b1, norm_weight=vec, stats=stats, act=act)
            dense_forward(a, w, vec)
            dense_forward(hidden, w2, vec)
            dense_forward(hidden, w2, vec, residual=g)
            dense_forward(hidden, w2, vec, residual=g, layer_scale=vec)

        for spec in recorded_specs(
            gradients, {_gemm_kernel: ("gemm_bwd", True), _column_sums_kernel: ("column_sums", False)}, shape=shape
        ):
            if spec.kernel == "gemm_bwd":  # which product: dW reads g transposed (stride_ak not 1), da does not
                spec = dataclasses.replace(
                    spec, kernel="gemm_bwd_weight" if spec.constexprs.get("stride_ak") != 1 else "gemm_bwd_input"
                )
            specs.append(spec)
        specs += recorded_specs(recompute, {_gemm_kernel: ("gemm_bwd_recompute", True)}, shape=shape)
    return unique_specs(specs)
