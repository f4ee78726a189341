"""The one GEMM of vit_kernels' Triton backend: out = epilogue(loader(A) @ W^T).

Every projection of a ViT is this kernel with different tl.constexpr flags:

| use | A loader | epilogue |
|---|---|---|
| QKV projection | dense, LayerNorm on load (``NORM``) | bias, Q * scale, head-split write (``OUT_MODE=OUT_QKV``) |
| out projection, fc2 | dense | bias, layer scale, residual |
| fc1 | dense, LayerNorm on load | bias, GELU erf or tanh (``ACT``) |
| patch embedding | patch gather from the image (``A_MODE=A_PATCHES``); uint8 pixels normalized (``NORM=NORM_PIXELS``) | bias, class token, position embedding |

Rows. A row m of A (and of the output, the residual, the LayerNorm statistics) is addressed as
(b, t) = (m // T, m % T) with strides (stride_b, stride_t): an x of shape (batch, tokens, dim) is read with
its own strides, no reshape copy. All row offsets are int64 (batch * tokens * dim may pass 2^31).

Precision. Operands are loaded at the input dtype, accumulated in fp32; the epilogue runs in
fp32 and rounds once on the store. fp32 inputs use ``input_precision="tf32x3"`` (three tf32
tensor-core products, close to fp32 accuracy; plain tf32 would be ~1e-3 relative; the
interpreter computes plain fp32, so only a GPU run shows the tf32x3 error). LayerNorm-on-load computes
(x - mean) * rstd * w + b in fp32 and rounds to the input dtype before the dot, as an eager
LayerNorm followed by a Linear does. uint8 images (``NORM_PIXELS``) are widened to fp32, normalized
as x * (1 / (255 std[c])) - mean[c] / std[c] and rounded to the weight's dtype before the dot, as
``((x / 255 - mean) / std).to(dtype)`` followed by a Conv2d does.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import checks
from ..replay import empty, launch, persistent
from ..dtypes import KERNEL_DTYPES
from . import FP32_DOT_PRECISION, cdiv
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec
from .layernorm import as_rows, row_stats, rows_per_batch, stats_pointer

DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes

# Block configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), one per (input dtype, A loader),
# no autotuning: what `inspect` compiles (aot_specs) is what runs. Chosen so every variant compiles
# for sm_80 and sm_90 without spills (checked ahead of time, not timed on a GPU).
CONFIGS: Dict[torch.dtype, Tuple[int, int, int, int, int]] = {
    torch.float16: (128, 128, 64, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float32: (128, 64, 32, 8, 3),  # tf32x3 needs registers for the hi/lo splits
}
# The patch-gather loader recomputes its (BLOCK_M, BLOCK_K) offsets every step: a shorter BLOCK_K
# keeps it within the registers of sm_80 (no spills).
PATCH_CONFIGS: Dict[torch.dtype, Tuple[int, int, int, int, int]] = {
    torch.float16: (128, 128, 32, 8, 3),
    torch.bfloat16: (128, 128, 32, 8, 3),
    torch.float32: (128, 64, 16, 8, 3),
}
# Alternative tiles that vit_kernels.tuning times beside the default (CONFIGS / PATCH_CONFIGS), per
# architecture and input dtype, same layout. aot_specs() lists each one, so `inspect` compiles
# (and checks for spills) every config the tuner can launch.
# Two per arch: inspect compiles each with three epilogues, which CI pays for (AOT-checked: 0 spills).
_HALF_TUNE = {80: ((64, 128, 64, 4, 3), (64, 64, 64, 4, 4)), 90: ((64, 128, 64, 4, 4), (64, 64, 64, 4, 4))}
TUNE_CONFIGS: Dict[int, Dict[torch.dtype, Tuple[Tuple[int, int, int, int, int], ...]]] = {
    arch: {torch.float16: half, torch.bfloat16: half, torch.float32: ((64, 64, 32, 4, 3),)}
    for arch, half in _HALF_TUNE.items()
}
TUNE_PATCH_CONFIGS: Dict[int, Dict[torch.dtype, Tuple[Tuple[int, int, int, int, int], ...]]] = {
    arch: {
        torch.float16: ((64, 128, 32, 4, 3),),
        torch.bfloat16: ((64, 128, 32, 4, 3),),
        torch.float32: ((64, 64, 16, 4, 3),),
    }
    for arch in (80, 90)
}
GROUP_M = 8

# The values of the mode flags (tl.constexpr, so the kernels compare with them by name; a launch passes
# their int, mode_value). Also used by gemm_tma.py.
# ACT values (fc1's activation; the backward's GELU derivative, see dgelu)
ACT_NONE, ACT_GELU_ERF, ACT_GELU_TANH, ACT_DGELU_ERF, ACT_DGELU_TANH = (tl.constexpr(v) for v in range(5))
ACTIVATIONS = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH}  # GELU's `approximate` -> ACT
# NORM values (LayerNorm on load; NORM_PIXELS: uint8 images normalized per channel on load)
NORM_NONE, NORM_AFFINE, NORM_WEIGHT_ONLY, NORM_PIXELS = (tl.constexpr(v) for v in range(4))
# OUT_MODE values
OUT_ROWS, OUT_QKV = tl.constexpr(0), tl.constexpr(1)
# A_MODE values
A_DENSE, A_PATCHES = tl.constexpr(0), tl.constexpr(1)


def mode_value(mode) -> int:
    """The int a kernel's mode flag (A_MODE, NORM, ACT, OUT_MODE) is launched with: ``mode`` is one of
    the constants above or already an int."""
    return tl.constexpr(mode).value


@triton.jit
def bias_gelu(acc, bias_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """The fc1 epilogue on an fp32 (rows, cols) accumulator: + bias (HAS_BIAS), then GELU by ACT
    (ACT_GELU_ERF, ACT_GELU_TANH). Shared by this kernel and gemm_tma's."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == ACT_GELU_ERF:  # GELU, exact: x * Phi(x)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:  # GELU, tanh approximation: 0.5x(1 + tanh(u)) = x / (1 + exp(-2u))
        # exp(-2u) overflows to inf for very negative x: x / inf is -0 as eager's 0.5 x (1 + tanh(u)) is, and
        # -inf / inf is NaN as eager's -inf * 0 is (a cap on exp left -inf for -inf, and -1.8e-5 for -1e30)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    return acc


@triton.jit
def dgelu(pre, ACT: tl.constexpr):
    """GELU'(pre) in fp32 (ACT_DGELU_ERF: exact, ACT_DGELU_TANH: of the tanh approximation): the
    backward of fc1's epilogue multiplies dL/dGELU by it."""
    if ACT == ACT_DGELU_ERF:  # Phi(x) + x * phi(x)
        d = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476)) + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre)
    else:  # t = tanh(u): 0.5 (1 + t) + 0.5 x (1 - t^2) u'
        u = 0.7978845608028654 * (pre + 0.044715 * pre * pre * pre)
        t = 2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0))) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * pre * pre)
    return d


@triton.jit
def _gemm_kernel(
    a_ptr,  # dense: A rows (M, K) as (b, t, k) with strides (stride_ab, stride_at, stride_ak);
    # patches: the image (B, C, H, W) with strides (stride_ab, stride_ac, stride_ah, stride_aw)
    w_ptr,  # weight (N, K); patches: (N, C, P, P) with strides (stride_wn, stride_wc, stride_wr, stride_ws)
    out_ptr,  # OUT_ROWS: (M, N) as (b, t, n) strides (stride_ob, stride_ot, stride_on);
    # OUT_QKV: (3, B, H, T, HEAD_DIM) strides (stride_o3, stride_ob, stride_oh, stride_ot, stride_on)
    bias_ptr,  # (N,)                       [HAS_BIAS]
    stats_ptr,  # (2, M) fp32: row means, then row 1/std  [NORM]
    norm_weight_ptr,  # (K,) LayerNorm weight      [NORM]; NORM_PIXELS: fp32 (K,) scale 1 / (255 std[c])
    norm_bias_ptr,  # (K,) LayerNorm bias        [NORM == NORM_AFFINE]; NORM_PIXELS: fp32 (K,) -mean[c] / std[c]
    res_ptr,  # (M, N) residual, strides (stride_rb, stride_rt, stride_rn)   [HAS_RES]; GELU's input [ACT >= ACT_DGELU_ERF]
    ls_ptr,  # (N,) layer scale           [HAS_LS]
    pos_ptr,  # (T, N) position embedding, strides (stride_pt, stride_pn)  [HAS_POS]
    cls_ptr,  # (N,) class token, stride stride_cls  [PREFIX == 1]
    M,
    N,
    K,
    T,  # rows, output features, reduction length, rows per batch
    stride_ab,
    stride_at,
    stride_ak,
    stride_ac,
    stride_ah,
    stride_aw,
    stride_wn,
    stride_wk,
    stride_wc,
    stride_wr,
    stride_ws,
    stride_o3,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_on,
    stride_rb,
    stride_rt,
    stride_rn,
    stride_pt,
    stride_pn,
    stride_cls,
    P,
    GW,
    INNER,
    HEAD_DIM,  # patch size, patch-grid width; QKV: heads * head_dim, head_dim
    q_scale,  # fp32: QKV scales the Q columns (n < INNER) by this
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    A_MODE: tl.constexpr,
    NORM: tl.constexpr,
    PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_POS: tl.constexpr,
    OUT_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_F64: tl.constexpr = False,  # fp64 accumulator (float64 inputs: the backward's gradcheck)
):
    # Grouped tile order: GROUP_M row tiles share the weight tiles while they are in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    b = (offs_m // T).to(tl.int64)
    t = offs_m % T

    # ---- A loader: per-row part of the offsets ----
    if A_MODE == A_DENSE:
        a_row = b * stride_ab + t.to(tl.int64) * stride_at
        a_rmask = m_mask
    else:
        patch = tl.maximum(t - PREFIX, 0)  # class-token rows (t < PREFIX) load nothing
        py = (patch // GW).to(tl.int64)
        px = (patch % GW).to(tl.int64)
        a_row = b * stride_ab + py * P * stride_ah + px * P * stride_aw
        a_rmask = m_mask & (t >= PREFIX)
    if NORM == NORM_AFFINE or NORM == NORM_WEIGHT_ONLY:
        mean = tl.load(stats_ptr + offs_m, mask=m_mask, other=0.0)
        rstd = tl.load(stats_ptr + M + offs_m, mask=m_mask, other=0.0)
    w_col = offs_n.to(tl.int64) * stride_wn
    if A_MODE == A_DENSE:  # dense: pointers advance by BLOCK_K columns per step
        a_ptrs = a_ptr + a_row[:, None] + offs_k0.to(tl.int64)[None, :] * stride_ak
        w_ptrs = w_ptr + w_col[None, :] + offs_k0.to(tl.int64)[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_F64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k0
        k_mask = ks < K
        if A_MODE == A_PATCHES:  # patches: column k of A is (channel, row, col) of a patch
            c = (ks // (P * P)).to(tl.int64)
            r = ((ks // P) % P).to(tl.int64)
            s = (ks % P).to(tl.int64)
            a_ptrs = a_ptr + a_row[:, None] + (c * stride_ac + r * stride_ah + s * stride_aw)[None, :]
            w_ptrs = w_ptr + w_col[None, :] + (c * stride_wc + r * stride_wr + s * stride_ws)[:, None]
        a = tl.load(a_ptrs, mask=a_rmask[:, None] & k_mask[None, :], other=0.0)
        if NORM != NORM_NONE:
            g = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            if NORM == NORM_PIXELS:  # uint8 pixels: x * g[k] + beta[k] = (x / 255 - mean[c]) / std[c], in fp32
                xn = a.to(tl.float32) * g[None, :] + tl.load(norm_bias_ptr + ks, mask=k_mask, other=0.0)[None, :]
            else:
                xn = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :]
                if NORM == NORM_AFFINE:
                    xn += tl.load(norm_bias_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            a = xn.to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if A_MODE == A_DENSE:
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, in fp32 ----
    acc = bias_gelu(acc, bias_ptr, offs_n, n_mask, HAS_BIAS, ACT)
    if PREFIX == 1:  # the class-token row of each image: cls (no bias), then position embedding
        cls = tl.load(cls_ptr + offs_n.to(tl.int64) * stride_cls, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.where((t < PREFIX)[:, None], cls[None, :], acc)
    if HAS_POS:
        pos = tl.load(
            pos_ptr + t.to(tl.int64)[:, None] * stride_pt + offs_n.to(tl.int64)[None, :] * stride_pn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += pos.to(tl.float32)
    if HAS_LS:
        acc *= tl.load(ls_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ACT >= ACT_DGELU_ERF:  # backward of fc1: acc = dL/dGELU(pre) times GELU'(pre), pre read like the residual
        pre = tl.load(
            res_ptr + (b * stride_rb + t.to(tl.int64) * stride_rt)[:, None] + offs_n.to(tl.int64)[None, :] * stride_rn,
            mask=mask,
            other=0.0,
        )
        acc *= dgelu(pre.to(acc.dtype), ACT)
    if HAS_RES:
        res = tl.load(
            res_ptr + (b * stride_rb + t.to(tl.int64) * stride_rt)[:, None] + offs_n.to(tl.int64)[None, :] * stride_rn,
            mask=mask,
            other=0.0,
        )
        acc += res.to(tl.float32)
    row_out = b * stride_ob + t.to(tl.int64) * stride_ot
    if OUT_MODE == OUT_ROWS:
        out_off = row_out[:, None] + offs_n.to(tl.int64)[None, :] * stride_on
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Head split: column n = which * INNER + head * HEAD_DIM + d goes to out[which, b, head, t, d].
        # HEAD_DIM % 8 == 0 and a contiguous out (both checked by the launcher) make the offsets
        # runs of 8 contiguous elements starting at multiples of 8: the hint lets the store vectorize.
        which = offs_n // INNER
        col = (
            which.to(tl.int64) * stride_o3
            + ((offs_n % INNER) // HEAD_DIM).to(tl.int64) * stride_oh
            + (offs_n % HEAD_DIM) * stride_on
        )
        col = tl.max_contiguous(tl.multiple_of(col, 8), 8)
        acc *= tl.where(which == 0, q_scale, 1.0)[None, :]
        tl.store(out_ptr + row_out[:, None] + col[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# The generic launcher
# ---------------------------------------------------------------------------------------------

_INT_ARGS = (
    "M",
    "N",
    "K",
    "T",
    "stride_ab",
    "stride_at",
    "stride_ak",
    "stride_ac",
    "stride_ah",
    "stride_aw",
    "stride_wn",
    "stride_wk",
    "stride_wc",
    "stride_wr",
    "stride_ws",
    "stride_o3",
    "stride_ob",
    "stride_oh",
    "stride_ot",
    "stride_on",
    "stride_rb",
    "stride_rt",
    "stride_rn",
    "stride_pt",
    "stride_pn",
    "stride_cls",
    "P",
    "GW",
    "INNER",
    "HEAD_DIM",
)


def block_config(dtype: torch.dtype, a_mode: int = A_DENSE) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for input ``dtype`` and A loader."""
    if dtype not in CONFIGS:
        raise TypeError(f"the Triton GEMM supports float32, float16 and bfloat16 inputs, got {dtype}")
    return (PATCH_CONFIGS if a_mode == A_PATCHES else CONFIGS)[dtype]


def tune_configs(dtype: torch.dtype, arch: int, patch: bool = False) -> Tuple[Tuple[int, int, int, int, int], ...]:
    """The alternative tiles the tuner times on sm_<arch> (none for an architecture not listed)."""
    return (TUNE_PATCH_CONFIGS if patch else TUNE_CONFIGS).get(arch, {}).get(dtype, ())


def _flags(
    *,
    a_mode=A_DENSE,
    norm=NORM_NONE,
    prefix=0,
    has_bias=False,
    act=ACT_NONE,
    has_ls=False,
    has_res=False,
    has_pos=False,
    out_mode=OUT_ROWS,
) -> Dict[str, object]:
    return dict(
        A_MODE=mode_value(a_mode),
        NORM=mode_value(norm),
        PREFIX=prefix,
        HAS_BIAS=bool(has_bias),
        ACT=mode_value(act),
        HAS_LS=bool(has_ls),
        HAS_RES=bool(has_res),
        HAS_POS=bool(has_pos),
        OUT_MODE=mode_value(out_mode),
    )


def launch_gemm(
    a: Tensor,
    weight: Tensor,
    out: Tensor,
    *,
    M: int,
    N: int,
    K: int,
    T: int,
    a_strides: Tuple[int, ...],
    w_strides: Tuple[int, ...],
    out_strides: Tuple[int, ...],
    bias: Optional[Tensor] = None,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    res_strides: Tuple[int, int, int] = (0, 0, 0),
    layer_scale: Optional[Tensor] = None,
    act: int = ACT_NONE,
    pos: Optional[Tensor] = None,
    pos_strides: Tuple[int, int] = (0, 0),
    cls: Optional[Tensor] = None,
    patch: Optional[Tuple[int, int]] = None,
    pixel_norm: Optional[Tuple[Tensor, Tensor]] = None,
    qkv: Optional[Tuple[int, int, float]] = None,
    gemm_config: Optional[Tuple[int, int, int, int, int]] = None,
) -> Tensor:
    """Launch :func:`_gemm_kernel` once; every argument already checked by the caller.

    a: A rows (a_strides = (stride_b, stride_t, stride_k)) or, with ``patch=(P, GW)``, the image (a_strides =
    (stride_b, stride_c, stride_h, stride_w)); weight: (N, K) (w_strides = (stride_n, stride_k)) or (N, C, P, P) with patch
    (4 strides); out: written through out_strides (3 for rows, 5 for qkv=(INNER, HEAD_DIM,
    q_scale) into (3, B, H, T, HEAD_DIM)); stats: (mean, rstd) fp32 (M,) for LayerNorm on load, as
    :func:`~vit_kernels.triton.layernorm.row_stats` returns them (rows of one buffer)
    with norm_weight (K,) and optional norm_bias; residual through res_strides; pos: (T, N)
    through pos_strides; cls: (N,) contiguous-or-strided 1-D, makes row t == 0 the class token.
    pixel_norm: (scale, shift), contiguous fp32 (K,) each, for uint8 images: A = uint8 * scale + shift
    on load. The compute dtype (tiles, dot precision) is the weight's.
    act ACT_DGELU_ERF / ACT_DGELU_TANH (the backward of fc1): ``residual`` is GELU's input (M, N),
    read through res_strides, and the result is multiplied by GELU'(it) instead of added.
    float64 inputs (the backward's gradcheck) accumulate in fp64; pass gemm_config for them.
    gemm_config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), None for :func:`block_config`
    (the tuner passes one of :func:`tune_configs`).
    """
    checks.unit_stride_params(bias=bias, norm_weight=norm_weight, norm_bias=norm_bias, layer_scale=layer_scale)
    if M == 0 or N == 0:
        return out
    gather = patch is not None
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = gemm_config or block_config(
        weight.dtype, A_PATCHES if gather else A_DENSE
    )
    norm = NORM_NONE if norm_weight is None else (NORM_AFFINE if norm_bias is not None else NORM_WEIGHT_ONLY)
    if pixel_norm is not None:
        norm, (norm_weight, norm_bias) = NORM_PIXELS, pixel_norm
    flags = _flags(
        a_mode=A_PATCHES if gather else A_DENSE,
        norm=norm,
        prefix=int(cls is not None),
        has_bias=bias is not None,
        act=act,
        has_ls=layer_scale is not None,
        has_res=residual is not None and act < ACT_DGELU_ERF,
        has_pos=pos is not None,
        out_mode=OUT_QKV if qkv is not None else OUT_ROWS,
    )
    s = dict.fromkeys(_INT_ARGS, 0)
    s.update(M=M, N=N, K=K, T=T)
    if gather:
        s.update(P=patch[0], GW=patch[1])
        s.update(zip(("stride_ab", "stride_ac", "stride_ah", "stride_aw"), a_strides))
        s.update(zip(("stride_wn", "stride_wc", "stride_wr", "stride_ws"), w_strides))
    else:
        s.update(zip(("stride_ab", "stride_at", "stride_ak"), a_strides))
        s.update(zip(("stride_wn", "stride_wk"), w_strides))
    if qkv is not None:
        s.update(zip(("stride_o3", "stride_ob", "stride_oh", "stride_ot", "stride_on"), out_strides))
        s.update(INNER=qkv[0], HEAD_DIM=qkv[1])
        q_scale = float(qkv[2])
    else:
        s.update(zip(("stride_ob", "stride_ot", "stride_on"), out_strides))
        q_scale = 1.0
    s.update(zip(("stride_rb", "stride_rt", "stride_rn"), res_strides))
    s.update(zip(("stride_pt", "stride_pn"), pos_strides))
    if cls is not None:
        s["stride_cls"] = cls.stride(0)
    # Absent optional operands get a placeholder pointer of the same type (never read: the
    # matching constexpr flag is off), so the kernel signature does not change with them.
    ptrs = [
        a,
        weight,
        out,
        _or(bias, weight),
        stats_pointer(*stats) if stats is not None else fp32_placeholder(a.device),
        _or(norm_weight, weight),
        _or(norm_bias, weight),
        _or(residual, weight),
        _or(layer_scale, weight),
        _or(pos, weight),
        _or(cls, weight),
    ]
    grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)
    launch(
        _gemm_kernel,
        grid,
        *ptrs,
        *map(s.__getitem__, _INT_ARGS),
        q_scale,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP_M=GROUP_M,
        INPUT_PRECISION=_precision(weight.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        **flags,
        **({"ACC_F64": True} if weight.dtype == torch.float64 else {}),
    )
    return out


_FP32_PLACEHOLDERS: Dict[torch.device, Tensor] = {}


def fp32_placeholder(device: torch.device) -> Tensor:
    """One fp32 element per device for the stats pointer without a LayerNorm (never read),
    made once: no allocation per launch."""
    t = _FP32_PLACEHOLDERS.get(device)
    if t is None:
        t = _FP32_PLACEHOLDERS[device] = persistent(torch.empty(1, device=device, dtype=torch.float32))
    return t


def _or(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    return placeholder if t is None else t


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee"
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def check_qkv_projection(x: Tensor, qkv_weight: Tensor, num_heads: int, out: Optional[Tensor]):
    """The shapes of a head-split QKV projection (this kernel's and gemm_tma's): x (B, N, dim),
    qkv_weight (3*inner, dim) with head_dim = inner // num_heads a multiple of 8, out None or a
    contiguous (3, B, H, N, head_dim). Returns (B, N, dim, inner, head_dim, out)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected (B, N, dim), got shape {tuple(x.shape)}")
    B, Ntok, dim = x.shape
    if qkv_weight.dim() != 2 or qkv_weight.shape[1] != dim or qkv_weight.shape[0] % (3 * num_heads):
        raise ValueError(
            f"qkv_weight: expected (3*inner, {dim}) with inner divisible by num_heads={num_heads}, "
            f"got {tuple(qkv_weight.shape)}"
        )
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    if head_dim % 8:
        raise ValueError(
            f"num_heads: head_dim = {inner} // {num_heads} = {head_dim} is not a multiple of 8, "
            f"which the head-split epilogue needs"
        )
    out = check_out(out, (3, B, num_heads, Ntok, head_dim), x)
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous (3, B, H, N, head_dim) tensor, got strides {out.stride()}")
    return B, Ntok, dim, inner, head_dim, out


def check_out(out: Optional[Tensor], shape, like: Tensor) -> Tensor:
    """The caller's ``out`` (checked: shape, dtype, device) or a new empty tensor."""
    shape = tuple(shape)
    if out is None:
        return empty(shape, like.dtype, like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out: expected a {like.dtype} tensor of shape {shape} on {like.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: the Triton GEMM supports float32, float16 and bfloat16, got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# Public launchers
# ---------------------------------------------------------------------------------------------


def dense_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    act: int = ACT_NONE,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    gemm_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """[LayerNorm ->] x @ weight^T [+ bias] [-> GELU] [* layer_scale] [+ residual], one launch.

    x: (..., K); weight: (N, K); bias, layer_scale: (N,); norm_weight, norm_bias: (K,) applies
    LayerNorm(x, eps) as x loads (row statistics from :func:`row_stats`, or ``stats`` given);
    act: ACT_NONE / ACT_GELU_ERF / ACT_GELU_TANH; residual: (..., N). Returns (..., N).
    Layouts: x, residual any strides that address them as (-1, T, C) (rows_per_batch); weight any
    strides; bias, layer_scale, norm_weight, norm_bias contiguous (the kernel reads them with unit
    stride: vit_kernels.ops copies other layouts, checks.contiguous_params); at least one row.
    """
    _check_dtype("x", x)
    checks.unit_stride_params(bias=bias, norm_weight=norm_weight, norm_bias=norm_bias, layer_scale=layer_scale)
    K = x.shape[-1]
    N = weight.shape[0]
    T = rows_per_batch(x)
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    out = check_out(out, tuple(x.shape[:-1]) + (N,), x)
    if norm_weight is not None and stats is None and M:
        stats = row_stats(x, eps)
    return launch_gemm(
        x,
        weight,
        out,
        M=M,
        N=N,
        K=K,
        T=T,
        a_strides=as_rows("x", x, T),
        w_strides=weight.stride(),
        out_strides=as_rows("out", out, T),
        bias=bias,
        stats=stats if norm_weight is not None else None,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        act=act,
        residual=residual,
        res_strides=as_rows("residual", residual, T) if residual is not None else (0, 0, 0),
        layer_scale=layer_scale,
        gemm_config=gemm_config,
    )


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    gemm_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """The output projection of a block: residual + layer_scale * (x @ weight^T + bias).

    x: (..., in); weight: (out_features, in); bias, layer_scale: (out_features,) or None;
    residual: (..., out_features) or None; out: optional (..., out_features) to write into.
    Returns (..., out_features) in x's dtype. One launch; the epilogue does bias, scale, residual.
    Layouts as :func:`dense_forward` (bias, layer_scale contiguous).
    """
    return dense_forward(x, weight, bias, residual=residual, layer_scale=layer_scale, out=out, gemm_config=gemm_config)


def qkv_projection_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    out: Optional[Tensor] = None,
    gemm_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """[LayerNorm ->] QKV projection written straight into the attention layout.

    x: (B, N, dim), any strides; qkv_weight: (3*inner, dim), rows [q; k; v], each head-major;
    qkv_bias: (3*inner,) or None; norm_weight, norm_bias: (dim,) apply LayerNorm(x, eps) as x
    loads (norm_weight None: no LayerNorm); scale multiplies Q (after the bias).
    Returns qkv: (3, B, H, N, head_dim), contiguous, H = num_heads, head_dim = inner // H;
    qkv[0] = scale * q, qkv[1] = k, qkv[2] = v. No reshape, permute or copy of the result.
    qkv_bias, norm_weight, norm_bias: contiguous (read with unit stride; the op layer guarantees it).
    """
    _check_dtype("x", x)
    B, Ntok, dim, inner, head_dim, out = check_qkv_projection(x, qkv_weight, num_heads, out)
    M = B * Ntok
    stats = row_stats(x, eps) if norm_weight is not None and M else None
    return launch_gemm(
        x,
        qkv_weight,
        out,
        M=M,
        N=3 * inner,
        K=dim,
        T=Ntok,
        a_strides=x.stride(),
        w_strides=qkv_weight.stride(),
        out_strides=out.stride(),
        bias=qkv_bias,
        stats=stats,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        qkv=(inner, head_dim, scale),
        gemm_config=gemm_config,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs
# ---------------------------------------------------------------------------------------------


def aot_spec(name: str, dtype: torch.dtype, *, gemm_config=None, archs=(80, 90), **flags) -> AotSpec:
    """The launch of one dense flag combination (keyword names as in :func:`_flags`; a_mode must be
    A_DENSE, patch_embed.aot_specs records the patch loader) for ``dtype``, recorded from the public
    launcher at aot.REPRESENTATIVE's shape: qkv_projection_forward for out_mode=OUT_QKV (N = 3*dim),
    else dense_forward (N = 4*dim with a GELU, as fc1; dim otherwise). Its specialization (unit
    strides made constant, 16-divisible sizes, strides and pointers) is therefore the launch's.
    gemm_config: a tuning alternative's tiles (not :func:`block_config`'s), launched on ``archs``."""
    if flags.get("a_mode", A_DENSE) != A_DENSE:
        raise ValueError("gemm.aot_spec: the patch loader is recorded by patch_embed.aot_specs()")
    f = _flags(**flags)
    B, T, dim, H = (REPRESENTATIVE[k] for k in ("batch", "tokens", "dim", "heads"))
    n_out = 3 * dim if f["OUT_MODE"] == OUT_QKV else 4 * dim if f["ACT"] != ACT_NONE else dim
    x = torch.empty(B, T, dim, dtype=dtype)
    w = torch.empty(n_out, dim, dtype=dtype)
    vec = torch.empty(n_out, dtype=dtype)
    ln = torch.empty(dim, dtype=dtype)
    norm_weight = ln if f["NORM"] != NORM_NONE else None
    norm_bias = ln if f["NORM"] == NORM_AFFINE else None
    bias = vec if f["HAS_BIAS"] else None
    if f["OUT_MODE"] == OUT_QKV:
        call = lambda: qkv_projection_forward(
            x,
            w,
            bias,
            num_heads=H,
            scale=0.125,  # noqa: E731
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            gemm_config=gemm_config,
        )
    else:
        res = torch.empty(B, T, n_out, dtype=dtype) if f["HAS_RES"] else None
        call = lambda: dense_forward(
            x,
            w,
            bias,
            norm_weight=norm_weight,
            norm_bias=norm_bias,  # noqa: E731
            act=f["ACT"],
            residual=res,
            layer_scale=vec if f["HAS_LS"] else None,
            gemm_config=gemm_config,
        )
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = gemm_config or block_config(dtype)
    on = ",".join(f"{k}={int(v)}" for k, v in f.items() if v)
    label = f"BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},BLOCK_K={BLOCK_K},{dtype_name(dtype)}" + (f",{on}" if on else "")
    if gemm_config is not None:
        label += f",num_warps={num_warps},num_stages={num_stages},tuning"
    return recorded_spec(name, _gemm_kernel, call, label, True, tuple(archs), shape=f"B={B},T={T},K={dim},N={n_out}")


def aot_specs() -> List[AotSpec]:
    """linear_forward: bias x (none | residual | residual + layer scale); qkv_projection_forward:
    LayerNorm (none | affine | weight only) x bias; per dtype."""
    specs = []
    for dtype in DTYPES:
        for has_bias in (False, True):
            for has_res, has_ls in ((False, False), (True, False), (True, True)):
                specs.append(aot_spec("gemm_linear", dtype, has_bias=has_bias, has_res=has_res, has_ls=has_ls))
            for norm in (NORM_NONE, NORM_AFFINE, NORM_WEIGHT_ONLY):
                specs.append(aot_spec("gemm_qkv", dtype, norm=norm, has_bias=has_bias, out_mode=OUT_QKV))
    return specs + tune_aot_specs()


def tune_aot_specs() -> List[AotSpec]:
    """Each tuning alternative (TUNE_CONFIGS, TUNE_PATCH_CONFIGS) on the archs that list it, with
    the heaviest epilogues: linear with bias + residual + layer scale, the QKV head split with
    LayerNorm, fc1 with LayerNorm + GELU, the patch gather with bias + pos + cls."""
    specs = []
    for table, variants in (
        (
            TUNE_CONFIGS,
            (
                ("gemm_linear", dict(has_bias=True, has_res=True, has_ls=True)),
                ("gemm_qkv", dict(norm=NORM_AFFINE, has_bias=True, out_mode=OUT_QKV)),
                ("gemm_fc1", dict(norm=NORM_AFFINE, has_bias=True, act=ACT_GELU_ERF)),
            ),
        ),
        (
            TUNE_PATCH_CONFIGS,
            (("gemm_patch_embed_nchw", dict(a_mode=A_PATCHES, has_bias=True, has_pos=True, prefix=1)),),
        ),
    ):
        for dtype in DTYPES:
            cfgs = sorted({c for arch in table for c in table[arch].get(dtype, ())})
            for cfg in cfgs:
                archs = tuple(a for a in sorted(table) if cfg in table[a].get(dtype, ()))
                for name, flags in variants:
                    if flags.get("a_mode") == A_PATCHES:  # recorded as patch_embed.aot_specs records NCHW
                        from .patch_embed import aot_spec as patch_aot_spec

                        specs.append(patch_aot_spec(dtype, "nchw", True, True, 1, gemm_config=cfg, archs=archs))
                    else:
                        specs.append(aot_spec(name, dtype, gemm_config=cfg, archs=archs, **flags))
    return specs
