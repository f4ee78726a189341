"""The sm_90 GEMM of vit_kernels' Triton backend: out = epilogue(A @ W^T) on tensor descriptors.

Same job as :mod:`vit_kernels.triton.gemm` (which stays the sm_80 kernel, cp.async + mma.sync), shaped
for Hopper:

- A (M, K), the weight W (N, K) and a row-major output are read and written through tensor descriptors
  (``tl.make_tensor_descriptor``): on sm_90 the loads are bulk tensor copies (TMA) into shared memory,
  and the dot is a wgmma fed from there. A tile that runs past an edge is zero-filled on load and
  clipped on store, so M, N and K need no masks in the main loop.
- A persistent grid: ``min(tiles, SMs * blocks_per_sm)`` programs walk the output tiles in grouped
  order (GROUP_M row tiles share the weight tiles while they are in L2).
- A pipelined K loop (``num_stages`` >= 3 shared-memory buffers in flight).
- An epilogue in fp32 that works on 1, 2 or 4 column sub-tiles of the accumulator (``EPI_SPLIT``), so its
  registers and the staging buffer of the store stay small: bias, GELU (erf or tanh), layer scale,
  residual, head split into (3, B, H, T, hd) with Q scaled, and LayerNorm applied after the product
  (``LN_EPI``, see :func:`~vit_kernels.triton.layernorm.layernorm_prologue`).

| use | epilogue |
|---|---|
| QKV projection | [LayerNorm], bias, Q * scale, head-split write (``OUT_MODE=OUT_QKV``; plain stores: no 2-D box) |
| out projection, fc2 | bias, layer scale, residual |
| fc1 | [LayerNorm], bias, GELU erf or tanh |

The patch embedding stays on :mod:`gemm`: its A operand is gathered from the image (a (C, p, p) patch is
no box of a tensor descriptor over an NCHW image), so there is no TMA load for it.

Inputs: float16 and bfloat16 (wgmma reads both from shared memory). float32 stays on :mod:`gemm`
(its tf32x3 splits the operands in registers). TMA needs 16-byte aligned base addresses and row
strides and a unit last stride: :func:`tma_unsupported` says why a call cannot run here and the
launchers raise ValueError with that reason before any launch (the caller picks :mod:`gemm`, visibly).

LayerNorm out of the main loop (``LN_EPI``). LayerNorm(x) @ W^T + b with gamma, beta folded into the
weight by a small kernel on every call, which also takes x's row statistics
(:func:`~vit_kernels.triton.layernorm.layernorm_prologue`, one launch, never cached): W' = W * gamma,
b' = b + W @ beta, c = sum_k W'[:, k], and each row's (mean, rstd) applied in the epilogue:
y = rstd * (x @ W'^T - mean * c) + b'. In float16 a row of W * gamma past 2**15 (which
would overflow float16, where eager LayerNorm + Linear may not) is folded scaled down by a power of two
and scaled back in the epilogue, exactly (the fold's ``sums[1]``). The fold is less exact than eager in
two cases, and a tile meeting either takes the exact route instead:

- the subtraction cancels when a row's mean is large against its spread (|mean| / std large): the fp32
  accumulator's rounding, ~eps_fp32 * |mean| * sum |W'|, is then multiplied by rstd, where LayerNorm's
  output scales with z's rms, sqrt(var) * rstd (below 1 where eps is not small against var). Row tiles
  holding a row past :func:`ln_cancel_threshold`.
- the fold rounds W * gamma where eager rounds z * gamma + beta; when one channel dominates an output's
  row of W * gamma (an outlier channel of gamma), beta cancelling z * gamma there leaves eager exact and
  the fold not. Column tiles holding an output the fold flags (``FOLD_DOMINANCE``).

The exact route applies LayerNorm in the K loop as eager does (A = x's LayerNorm rounded to x's dtype,
in registers, times W itself) and its epilogue adds b. Same kernel, no extra pass over x and no host sync
(each tile decides from the row statistics and the fold's flags); other tiles keep the TMA -> shared
memory -> wgmma loop. Each tile flags its row tile's cancelling route on the device;
:func:`last_ln_route` counts the flags on request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..replay import derived, launch
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec
from .gemm import (
    ACT_GELU_ERF,
    ACT_GELU_TANH,
    ACT_NONE,
    OUT_QKV,
    OUT_ROWS,
    bias_gelu,
    check_out,
    check_qkv_projection,
    fp32_placeholder,
    mode_value,
)
from .layernorm import (
    FOLD_DOMINANCE,
    SUM_ROWS,
    FoldedLayerNorm,
    as_rows,
    layernorm_prologue,
    rows_per_batch,
    stats_pointer,
)

logger = logging.getLogger("vit_kernels")

DTYPES = (torch.float16, torch.bfloat16)
GROUP_M = 8


@triton.jit
def _tile_coords(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: tile ids run down GROUP_M row tiles before moving one column tile right."""
    group = GROUP_M * num_n
    first_m = (tile_id // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % group_size
    pid_n = (tile_id % group) // group_size
    return pid_m, pid_n


@triton.jit
def _cancel_tile(stats_ptr, off_m, M, ln_tau, ln_eps, BLOCK_M: tl.constexpr, LN_EPI: tl.constexpr):
    """Whether the row tile at off_m has a row with |mean| * rstd > ln_tau * sqrt(var) * rstd, i.e. |mean| >
    ln_tau * std (always False without LN_EPI). sqrt(var) * rstd = sqrt(1 - ln_eps * rstd**2), z's rms: 1
    unless eps is comparable to var, where LayerNorm's output shrinks and the fold's cancellation does not."""
    if LN_EPI:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        mean = tl.load(stats_ptr + offs_m, mask=offs_m < M, other=0.0)
        rstd = tl.load(stats_ptr + M + offs_m, mask=offs_m < M, other=0.0)
        z_rms = tl.sqrt(tl.maximum(1.0 - ln_eps * rstd * rstd, 0.0))
        # compared row by row, then reduced: a NaN row (NaN or Inf in its sample) compares False and leaves
        # the tile's decision to its other rows, whatever tl.max does with NaN
        return tl.max((tl.abs(mean) * rstd > ln_tau * z_rms).to(tl.int32), axis=0) > 0
    else:
        return False


@triton.jit
def _dominated_tile(stats_ptr, fold_off, off_n, N, BLOCK_N: tl.constexpr, LN_EPI: tl.constexpr):
    """Whether the column tile at off_n holds an output one channel dominates (the fold's flags, sums[4];
    always False without LN_EPI). With :func:`_cancel_tile`, what sends a tile to the exact route."""
    if LN_EPI:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        flag = tl.load(stats_ptr + fold_off + 4 * N + offs_n, mask=offs_n < N, other=0.0)
        return tl.max(flag, axis=0) > 0
    else:
        return False


@triton.jit
def _epilogue(
    acc,
    off_m,
    n0,
    out_desc,
    out_ptr,
    bias_ptr,
    res_ptr,
    ls_ptr,
    fold_sums_ptr,
    mean,
    rstd,
    exact,
    M,
    N,
    T,
    stride_o3,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_rb,
    stride_rt,
    INNER,
    HEAD_DIM,
    q_scale,
    BLOCK_M: tl.constexpr,
    SUB_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_MODE: tl.constexpr,
    LN_EPI: tl.constexpr,
):
    """One (BLOCK_M, SUB_N) fp32 sub-tile of the accumulator, columns n0 .. n0 + SUB_N: epilogue + store."""
    offs_n = n0 + tl.arange(0, SUB_N)
    n_mask = offs_n < N
    if LN_EPI:
        if exact:  # LayerNorm was applied in the K loop, with W itself: y = acc + b (fp32, 0 without b)
            bias_ptr = fold_sums_ptr + 3 * N
        else:  # y = rstd * (x @ W'^T - mean * c) * u + b' (u: the fold's power-of-two unscale, 1 for most columns)
            c = tl.load(fold_sums_ptr + offs_n, mask=n_mask, other=0.0)
            u = tl.load(fold_sums_ptr + N + offs_n, mask=n_mask, other=1.0)
            acc = (acc - mean[:, None] * c[None, :]) * rstd[:, None] * u[None, :]
            bias_ptr = fold_sums_ptr + 2 * N  # b' = b + W @ beta, fp32 [HAS_BIAS]
    acc = bias_gelu(acc, bias_ptr, offs_n, n_mask, HAS_BIAS, ACT)
    if HAS_LS:
        acc *= tl.load(ls_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES or OUT_MODE == OUT_QKV:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        b = (offs_m // T).to(tl.int64)
        t = (offs_m % T).to(tl.int64)
    if HAS_RES:
        res = tl.load(
            res_ptr + (b * stride_rb + t * stride_rt)[:, None] + offs_n.to(tl.int64)[None, :], mask=mask, other=0.0
        )
        acc += res.to(tl.float32)
    if OUT_MODE == OUT_ROWS:
        out_desc.store([off_m, n0], acc.to(out_desc.dtype))  # clipped at the M and N edges
    else:
        # Head split: column n = which * INNER + head * HEAD_DIM + d goes to out[which, b, head, t, d]
        # (HEAD_DIM % 8 == 0 and a contiguous out, checked by the launcher: runs of 8 contiguous elements).
        which = offs_n // INNER
        col = (
            which.to(tl.int64) * stride_o3
            + ((offs_n % INNER) // HEAD_DIM).to(tl.int64) * stride_oh
            + (offs_n % HEAD_DIM)
        )
        col = tl.max_contiguous(tl.multiple_of(col, 8), 8)
        acc *= tl.where(which == 0, q_scale, 1.0)[None, :]
        tl.store(
            out_ptr + (b * stride_ob + t * stride_ot)[:, None] + col[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _gemm_tma_kernel(
    a_ptr,  # A (M, K), row stride stride_am, unit column stride, 16-byte aligned
    w_ptr,  # weight (N, K), row stride stride_wn, unit column stride (unread when LN_EPI: W' is in the workspace)
    w0_ptr,  # [LN_EPI] W itself (N, K), strides (stride_w0n, stride_w0k): the exact route's weight
    out_ptr,  # OUT_ROWS: (M, N) row stride stride_om;
    # OUT_QKV: (3, B, H, T, HEAD_DIM) strides (stride_o3, stride_ob, stride_oh, stride_ot, 1)
    bias_ptr,  # (N,)                         [HAS_BIAS]  (unread when LN_EPI: b' is the fold's)
    res_ptr,  # (M, N) as (b, t, n), strides (stride_rb, stride_rt, 1)   [HAS_RES]
    ls_ptr,  # (N,) layer scale             [HAS_LS]
    # [LN_EPI] the LayerNorm prologue's fp32 workspace (layernorm_prologue): row means (M), row 1/std (M), the
    # route flags (cdiv(M, BLOCK_M), written here), and from fold_off on the fold's (5, N) column sums of W',
    # unscale u, bias b', bias b, dominance flags, then gamma (K) and beta (K)
    stats_ptr,
    fold_off,  # a multiple of 16 (Triton specializes it so: the fold's loads stay vectorized)
    wf_off,  # [LN_EPI] W' (N, K) in W's dtype, row stride stride_wn, at stats_ptr + wf_off (a multiple of 64)
    M,
    N,
    K,
    T,  # rows, output features, reduction length, rows per batch (residual, head split)
    stride_am,
    stride_wn,
    stride_w0n,
    stride_w0k,
    stride_om,
    stride_o3,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_rb,
    stride_rt,
    INNER,
    HEAD_DIM,  # QKV: heads * head_dim, head_dim
    q_scale,  # fp32: QKV scales the Q columns (n < INNER) by this
    ln_tau,  # fp32: a row tile with some |mean| > ln_tau * std takes the exact route (ln_cancel_threshold)
    ln_eps,  # fp32: the LayerNorm's eps (std * rstd = sqrt(1 - ln_eps * rstd**2))
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_LS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_MODE: tl.constexpr,
    LN_EPI: tl.constexpr,
):
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    if LN_EPI:  # the fold's W', in the prologue's workspace (one allocation per call: layernorm_prologue)
        w_ptr = (stats_ptr + wf_off).to(w0_ptr.dtype, bitcast=True)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if OUT_MODE == OUT_ROWS:
        out_desc = tl.make_tensor_descriptor(
            out_ptr, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, SUB_N]
        )
    else:
        out_desc = a_desc  # unused: the head split stores through pointers

    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    start = tl.program_id(0)
    step = tl.num_programs(0)
    # The epilogue recomputes its tile from its own counter: no value lives from the loop's
    # prologue to its epilogue, which keeps the flattened pipeline simple.
    tile_c = start - step
    for tile_id in tl.range(start, num_tiles, step, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_m, num_n, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_wn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        cancel = _cancel_tile(stats_ptr, off_am, M, ln_tau, ln_eps, BLOCK_M, LN_EPI)
        if cancel | _dominated_tile(stats_ptr, fold_off, off_wn, N, BLOCK_N, LN_EPI):
            # LayerNorm applied in the K loop, as eager applies it: A = x's LayerNorm rounded to x's dtype (in
            # registers), times W itself (pointer loads); the epilogue adds b. For row tiles whose fold would
            # cancel and outputs one channel dominates. Decided on the device: no host sync.
            offs_am = off_am + tl.arange(0, BLOCK_M)
            mean_a = tl.load(stats_ptr + offs_am, mask=offs_am < M, other=0.0)
            rstd_a = tl.load(stats_ptr + M + offs_am, mask=offs_am < M, other=0.0)
            offs_wn = off_wn + tl.arange(0, BLOCK_N)
            affine_ptr = stats_ptr + fold_off + 5 * N  # gamma (K), then beta (K)
            for ki in tl.range(k_tiles, num_stages=NUM_STAGES):
                offs_k = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                g = tl.load(affine_ptr + offs_k, mask=k_mask, other=0.0)
                be = tl.load(affine_ptr + K + offs_k, mask=k_mask, other=0.0)
                a = a_desc.load([off_am, ki * BLOCK_K])
                z = (a.to(tl.float32) - mean_a[:, None]) * rstd_a[:, None]
                a = (z * g[None, :] + be[None, :]).to(a.dtype)  # 0 past K (g = be = 0)
                w = tl.load(
                    w0_ptr + offs_wn.to(tl.int64)[:, None] * stride_w0n + offs_k.to(tl.int64)[None, :] * stride_w0k,
                    mask=(offs_wn < N)[:, None] & k_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, w.T, acc)
        else:
            for ki in tl.range(k_tiles, num_stages=NUM_STAGES):
                a = a_desc.load([off_am, ki * BLOCK_K])
                w = w_desc.load([off_wn, ki * BLOCK_K])
                acc = tl.dot(a, w.T, acc)
        if LN_EPI:
            # the row tile's cancelling route, after the statistics: 1.0 (its rows' LayerNorm applied in the K
            # loop), else 0.0; every tile of the row writes the same flag (the outputs' flags are the fold's)
            tl.store(stats_ptr + 2 * M + pid_m, cancel.to(tl.float32))

        tile_c += step
        pid_m, pid_n = _tile_coords(tile_c, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        exact = _cancel_tile(stats_ptr, off_m, M, ln_tau, ln_eps, BLOCK_M, LN_EPI) | _dominated_tile(
            stats_ptr, fold_off, off_n, N, BLOCK_N, LN_EPI
        )
        if LN_EPI:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            mean = tl.load(stats_ptr + offs_m, mask=offs_m < M, other=0.0)
            rstd = tl.load(stats_ptr + M + offs_m, mask=offs_m < M, other=0.0)
        # Sub-tiles: (BLOCK_M, BLOCK_N) -> (BLOCK_M, 2, BLOCK_N/2) -> split the halves (twice for 4).
        if EPI_SPLIT == 1:
            _epilogue(
                acc,
                off_m,
                off_n,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
        elif EPI_SPLIT == 2:
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _epilogue(
                h0,
                off_m,
                off_n,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
            _epilogue(
                h1,
                off_m,
                off_n + SUB_N,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
        else:
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            q0, q1 = tl.split(tl.permute(tl.reshape(h0, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
            _epilogue(
                q0,
                off_m,
                off_n,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
            _epilogue(
                q1,
                off_m,
                off_n + SUB_N,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
            q2, q3 = tl.split(tl.permute(tl.reshape(h1, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
            _epilogue(
                q2,
                off_m,
                off_n + 2 * SUB_N,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )
            _epilogue(
                q3,
                off_m,
                off_n + 3 * SUB_N,
                out_desc,
                out_ptr,
                bias_ptr,
                res_ptr,
                ls_ptr,
                stats_ptr + fold_off,
                mean,
                rstd,
                exact,
                M,
                N,
                T,
                stride_o3,
                stride_ob,
                stride_oh,
                stride_ot,
                stride_rb,
                stride_rt,
                INNER,
                HEAD_DIM,
                q_scale,
                BLOCK_M,
                SUB_N,
                HAS_BIAS,
                ACT,
                HAS_LS,
                HAS_RES,
                OUT_MODE,
                LN_EPI,
            )


# ---------------------------------------------------------------------------------------------
# Configs: a small set per (N, K) class of the ViT shapes, for a measured dispatch to choose from
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TmaConfig:
    """One launchable tile config. Shared memory ~ num_stages * (block_m + block_n) * block_k * 2 bytes
    for the operand ring plus block_m * (block_n / epi_split) * 2 for the store's staging buffer;
    blocks_per_sm is the occupancy it is sized for (the persistent grid is SMs * blocks_per_sm)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    epi_split: int
    blocks_per_sm: int

    @property
    def name(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"
            f"_e{self.epi_split}_b{self.blocks_per_sm}"
        )


# Every config the kernel is launched with (aot_specs compiles each one).
CONFIGS: List[TmaConfig] = [
    TmaConfig(128, 256, 64, 8, 3, 4, 1),  # large N (3*dim, 4*dim): 2 warpgroups, 128x256 per SM
    TmaConfig(128, 128, 64, 8, 4, 2, 1),  # the middle: 4 stages, 2 warpgroups of 64 rows
    TmaConfig(128, 128, 32, 4, 4, 2, 2),  # one warpgroup, two blocks per SM (the second hides the epilogue)
    TmaConfig(64, 128, 64, 4, 3, 2, 2),  # few rows (small batch): more tiles to spread over the SMs
    TmaConfig(128, 64, 64, 4, 3, 1, 2),  # small N (dim 192..384 outputs)
]
# Two blocks per SM need each block within (228 KB - 2 x 1 KB reserved) / 2 = 113 KB of shared memory, the
# residual's staging included (measured ahead of time: tests/test_triton_gemm_tma.py).
# (N, K) class -> the configs a measured dispatch chooses from (indices into CONFIGS).
CLASSES: Dict[str, Tuple[int, ...]] = {
    "qkv": (0, 1, 2, 3),  # dim -> 3*dim
    "proj": (1, 2, 3, 4),  # dim -> dim (out projection)
    "fc1": (0, 1, 2, 3),  # dim -> 4*dim
    "fc2": (1, 2, 3, 4),  # 4*dim -> dim
}


def shape_class(N: int, K: int) -> str:
    """The ViT class of an (N, K) GEMM: "qkv" (N = 3K), "proj" (N = K), "fc1" (N = 4K), "fc2" (K = 4N),
    else "other"."""
    if N == 3 * K:
        return "qkv"
    if N == K:
        return "proj"
    if N == 4 * K:
        return "fc1"
    if K == 4 * N:
        return "fc2"
    return "other"


def configs_for(N: int, K: int) -> List[TmaConfig]:
    """The candidate configs for an (N, K) GEMM (every config for shapes outside the ViT classes)."""
    idx = CLASSES.get(shape_class(N, K), tuple(range(len(CONFIGS))))
    return [CONFIGS[i] for i in idx]


def default_config(N: int, K: int) -> TmaConfig:
    """The first candidate of the class: what runs when no measurement chose another."""
    return configs_for(N, K)[0]


def tune_configs(dtype: torch.dtype, arch: int, gemms: Tuple[Tuple[int, int], ...]) -> Tuple[Tuple[int, ...], ...]:
    """The configs vit_kernels.tuning times for an op whose Triton path runs the GEMMs ``gemms`` ((N, K)
    each; the MLP's fc1 and fc2 share one config, so it gets the configs both classes list), as tuples of
    TmaConfig's fields (what ``config=`` of the launchers accepts). None on an architecture other than
    sm_90, for float32, or for a GEMM outside the ViT classes (aot_specs compiles the configs per class)."""
    if arch != 90 or dtype not in DTYPES or not gemms:
        return ()
    classes = [shape_class(N, K) for N, K in gemms]
    if "other" in classes:
        return ()
    idx = set(CLASSES[classes[0]])
    for c in classes[1:]:
        idx &= set(CLASSES[c])
    return tuple(dataclasses.astuple(CONFIGS[i]) for i in sorted(idx))


# ---------------------------------------------------------------------------------------------
# Checks: what TMA needs
# ---------------------------------------------------------------------------------------------


def _aligned(name: str, t: Tensor, row_stride: int) -> Optional[str]:
    es = t.element_size()
    if t.data_ptr() % 16:
        return f"{name}: TMA needs a 16-byte aligned base address, got data_ptr() % 16 = {t.data_ptr() % 16}"
    if (row_stride * es) % 16:
        return f"{name}: TMA needs a row stride that is a multiple of 16 bytes, got {row_stride} elements x {es} bytes"
    return None


def _rows2d(name: str, t: Tensor) -> Tuple[Optional[int], Optional[str]]:
    """The one row stride that addresses t (..., C) as (rows, C) with a unit last stride, or why not.
    Size-1 dims are skipped (their stride says nothing); a single row gets the stride C."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None, f"{name}: TMA needs a unit last stride, got strides {t.stride()}"
    s, rows = None, 1
    for d in range(t.dim() - 2, -1, -1):  # inner to outer: each dim must continue the row pattern
        if t.shape[d] == 1:
            continue
        if s is None:
            s, rows = t.stride(d), t.shape[d]
        elif t.stride(d) == rows * s:
            rows *= t.shape[d]
        else:
            return None, (
                f"{name}: TMA reads rows with one row stride; shape {tuple(t.shape)} with strides "
                f"{t.stride()} has none (pass {name}.contiguous())"
            )
    if s == 0:
        return None, f"{name}: TMA cannot read broadcast rows (row stride 0, strides {t.stride()})"
    return (t.shape[-1] if s is None else s), None


def tma_unsupported(x: Tensor, weight: Tensor, out: Optional[Tensor] = None) -> Optional[str]:
    """None when this GEMM can run x (..., K) @ weight (N, K)^T [-> out (..., N)], else the reason."""
    if x.dtype not in DTYPES:
        return f"x: the TMA GEMM takes float16 or bfloat16, got {x.dtype} (float32 runs on vit_kernels.triton.gemm)"
    if weight.dtype != x.dtype:
        return f"weight: expected {x.dtype} like x, got {weight.dtype}"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return f"weight: expected ({{N}}, {x.shape[-1]}), got {tuple(weight.shape)}"
    for name, t in (("x", x), ("weight", weight)) + ((("out", out),) if out is not None else ()):
        s, why = _rows2d(name, t)
        if why is None:
            why = _aligned(name, t, s)
        if why is not None:
            return why
    return None


def _ensure_allocator(device: torch.device) -> None:
    """Tensor descriptors made on the device need a small global scratch buffer per launch; Triton asks
    the allocator set with triton.set_allocator. Install a torch one when none is set (a caller's own
    allocator is kept). It allocates on the current CUDA device, where Triton launches (the ops launch
    under their tensors' device guard), not on the device of the first launch: one allocator serves
    every GPU of the process."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """The tensor-descriptor scratch Triton asks for at a launch, on the current CUDA device."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the interpreter: few programs, so each walks several tiles (the persistent loop is exercised)


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------


def launch_gemm_tma(
    a: Tensor,
    weight: Tensor,
    out: Tensor,
    *,
    M: int,
    N: int,
    K: int,
    T: int,
    stride_am: int,
    config: TmaConfig,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    res_strides: Tuple[int, int] = (0, 0),
    layer_scale: Optional[Tensor] = None,
    act: int = ACT_NONE,
    ln: Optional[Tuple[FoldedLayerNorm, Tensor, Tensor]] = None,
    qkv: Optional[Tuple[int, int, float]] = None,
) -> Tensor:
    """Launch :func:`_gemm_tma_kernel` once; every argument already checked by the caller.

    a: A rows with row stride stride_am (unit column stride); weight: (N, K) contiguous rows; out: (M, N) rows
    (row stride out.stride(-2)) or, with qkv = (INNER, HEAD_DIM, q_scale), a contiguous (3, B, H, T, hd);
    residual: (b, t, n) rows through res_strides = (stride_b, stride_t), unit n stride; ln: (fold, mean, rstd)
    for LayerNorm in the epilogue, as :func:`layernorm_prologue` returns them with room for
    cdiv(M, BLOCK_M) route flags (weight is the fold's W', a view of that workspace which the kernel reads
    at its offset there; the fold's sums hold the bias, so ``bias`` is None);
    tiles whose fold would be inexact take the exact route (the module's docstring), counted for
    :func:`last_ln_route`.
    """
    if M == 0 or N == 0:
        return out
    _ensure_allocator(a.device)
    c = config
    flags = dict(
        HAS_BIAS=bias is not None if ln is None else ln[0].has_bias,
        ACT=mode_value(act),
        HAS_LS=layer_scale is not None,
        HAS_RES=residual is not None,
        OUT_MODE=mode_value(OUT_QKV if qkv is not None else OUT_ROWS),
        LN_EPI=ln is not None,
    )
    stride_o3 = stride_ob = stride_oh = stride_ot = inner = head_dim = 0
    q_scale = 1.0
    if qkv is not None:
        stride_o3, stride_ob, stride_oh, stride_ot, _ = out.stride()
        inner, head_dim, q_scale = qkv[0], qkv[1], float(qkv[2])
        stride_om = 0
    else:
        stride_om = _rows2d("out", out)[0]  # the row stride (a size-1 dim's stride says nothing)
    stats, fold_off, wf_off = fp32_placeholder(a.device), 0, 0  # never read without LN_EPI
    tau = ln_eps = 0.0
    w0, w0_strides = weight, (0, 0)  # W itself: the exact route's (LN_EPI)
    if ln is not None:
        fold, mean, rstd = ln
        w0, w0_strides = fold.source, fold.source.stride()
        stats, row_tiles = stats_pointer(mean, rstd), triton.cdiv(M, c.block_m)
        if bias is not None:
            raise ValueError("bias: expected None with ln (the fold's sums hold the folded bias)")
        fold_off = (fold.sums.data_ptr() - stats.data_ptr()) // 4
        affine_off = (fold.affine.data_ptr() - stats.data_ptr()) // 4
        wf_off = (weight.data_ptr() - stats.data_ptr()) // 4
        if (
            fold_off < 2 * M + row_tiles
            or fold_off % 16
            or not fold.sums.is_contiguous()
            or fold.sums.shape != (SUM_ROWS, N)
            or affine_off != fold_off + SUM_ROWS * N
            or not fold.affine.is_contiguous()
            or weight is not fold.weight
            or wf_off < affine_off + 2 * K
            or wf_off % 64
            or weight.untyped_storage().data_ptr() != stats.untyped_storage().data_ptr()
            or not weight.is_contiguous()
            or weight.dtype != w0.dtype
        ):
            raise ValueError(
                f"ln: expected layernorm_prologue's workspace with room for {row_tiles} route flags (the fold's "
                f"({SUM_ROWS}, {N}) sums at a multiple of 16 floats from the mean, past {2 * M + row_tiles}, then "
                f"gamma and beta, then the contiguous W' at a multiple of 64 floats, as weight), got sums "
                f"{tuple(fold.sums.shape)} at {fold_off}, gamma and beta at {affine_off}, weight at {wf_off}"
            )
        tau, ln_eps = ln_cancel_threshold(K, a.dtype), fold.eps
        derived(_note_route, stats, M, row_tiles, c.block_m, tau, fold_off + 4 * N, N)
    tiles = triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n)
    grid = (min(tiles, _num_sms(a.device) * c.blocks_per_sm),)
    launch(
        _gemm_tma_kernel,
        grid,
        a,
        stats if ln is not None else weight,  # LN_EPI: the kernel reads W' from the workspace
        w0,
        out,
        stats if ln is not None else _or(bias, w0),  # LN_EPI: the kernel reads b' from the fold's sums
        _or(residual, w0),  # (placeholders: W itself, an input; never W', a view of the workspace)
        _or(layer_scale, w0),
        stats,
        fold_off,
        wf_off,
        M,
        N,
        K,
        T,
        stride_am,
        weight.stride(0),
        *w0_strides,
        stride_om,
        stride_o3,
        stride_ob,
        stride_oh,
        stride_ot,
        res_strides[0],
        res_strides[1],
        inner,
        head_dim,
        q_scale,
        tau,
        ln_eps,
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        GROUP_M=GROUP_M,
        NUM_STAGES=c.num_stages,
        EPI_SPLIT=c.epi_split,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        **flags,
    )
    return out


def _or(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    return placeholder if t is None else t


def _note_route(stats: Tensor, M: int, tiles: int, block_m: int, tau: float, flags_off: int, N: int) -> Tuple[()]:
    """Keep the statistics buffer of this LN_EPI launch as the last route (:func:`last_ln_route` reads its
    ``tiles`` row-tile flags after the 2 * M statistics, and the fold's N dominance flags at ``flags_off``).
    Called per launch, replays included (vit_kernels.replay.derived, with the replay's buffer). Keeps that
    workspace (W' with it: N * K elements in W's dtype, 4.7 MB for ViT-B's fc1 in bfloat16) until the next
    LN_EPI launch."""
    _LAST_LN_ROUTE[0] = (stats, 2 * M, tiles, block_m, tau, flags_off, N)
    return ()


# ---------------------------------------------------------------------------------------------
# LayerNorm folded into the weight (LN_EPI)
# ---------------------------------------------------------------------------------------------


def tuning_state():
    """What timing candidates leaves here: the last LayerNorm route (see :func:`restore_tuning_state`)."""
    return _LAST_LN_ROUTE[0]


def restore_tuning_state(state) -> None:
    """After the tuner timed a signature's candidates (vit_kernels.tuning): the last LayerNorm route is
    the caller's again (not a candidate's)."""
    _LAST_LN_ROUTE[0] = state


def ln_cancel_threshold(K: int, dtype: torch.dtype) -> float:
    """The largest |mean| / std a row may have for the folded route.

    The epilogue's x @ W'^T - mean * c carries the fp32 accumulator's rounding, at most about
    eps_fp32 * |mean| * sum_k |W'_nk| (each partial sum is ~|mean| * |W'| large), times rstd; eager
    LayerNorm + Linear errs by about eps_dtype * |y| with |y| ~ r * sum_k |W'_nk| / sqrt(K), r = std * rstd
    = sqrt(1 - eps * rstd**2) z's rms (1 unless eps is comparable to the variance). Keeping the first below
    a quarter of the second: |mean| * rstd <= r * eps_dtype / (4 * eps_fp32 * sqrt(K)), i.e. |mean| / std
    at most this (~74 for float16 and ~590 for bfloat16 at K = 768). (Without r, rows of variance far
    below a large eps kept the fold with |mean| * rstd just below it and z ~ 0: 5.9e-3 off where eager
    gave 0, float16, eps 1, K = 64.)"""
    return torch.finfo(dtype).eps / (4 * torch.finfo(torch.float32).eps * math.sqrt(max(K, 1)))


_LAST_LN_ROUTE: List[object] = [""]  # _note_route's tuple for the last LN_EPI launch


def last_ln_route() -> str:
    """The LayerNorm route of the last LN_EPI launch: "epilogue", or "exact: ..." with how many row tiles
    (rows whose fold would cancel) and outputs (one channel dominating W * gamma's row) applied LayerNorm in
    the kernel instead, and why. Reads the launch's device flags, so it waits for that launch (the forward
    itself never syncs)."""
    r = _LAST_LN_ROUTE[0]
    if not isinstance(r, tuple):
        return r
    stats, offset, tiles, block_m, tau, flags_off, N = r
    base = stats.storage_offset()
    rows = int((stats.as_strided((tiles,), (1,), base + offset) != 0).sum().item())
    outputs = int((stats.as_strided((N,), (1,), base + flags_off) != 0).sum().item())
    if rows == outputs == 0:
        return "epilogue"
    why = []
    if rows:
        why.append(
            f"{rows} of {tiles} row tiles ({block_m} rows) have a row with |mean| > {tau:.3g} * std (the folded "
            f"epilogue would cancel)"
        )
    if outputs:
        why.append(
            f"{outputs} of {N} outputs have one channel carrying over {FOLD_DOMINANCE.value} of their row of "
            f"W * gamma's norm (the fold's rounding there is not LayerNorm's)"
        )
    return f"exact: {'; '.join(why)}; those tiles apply LayerNorm in the K loop with W itself (eager's rounding)"


# ---------------------------------------------------------------------------------------------
# Public launchers (same arguments as vit_kernels.triton.gemm's, plus the tile config)
# ---------------------------------------------------------------------------------------------


def _check_config(config, N: int, K: int) -> TmaConfig:
    """config: None (:func:`default_config`), a TmaConfig, or its fields as a tuple (the tuner's form)."""
    if config is None:
        return default_config(N, K)
    if isinstance(config, tuple) and len(config) == len(dataclasses.fields(TmaConfig)):
        config = TmaConfig(*config)
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of gemm_tma.CONFIGS (what aot_specs compiles), got {config}")
    return config


def _check_vec(name: str, t: Optional[Tensor], n: int, like: Tensor) -> None:
    if t is not None and (tuple(t.shape) != (n,) or t.device != like.device):
        raise ValueError(f"{name}: expected shape ({n},) on {like.device}, got {tuple(t.shape)} on {t.device}")


def dense_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    act: int = ACT_NONE,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    config: Optional[TmaConfig] = None,
) -> Tensor:
    """[LayerNorm ->] x @ weight^T [+ bias] [-> GELU] [* layer_scale] [+ residual], one GEMM launch.

    x: (..., K) float16/bfloat16 whose rows share one 16-byte-multiple row stride; weight: (N, K); bias,
    layer_scale: (N,); norm_weight: (K,) (with optional norm_bias (K,)) applies LayerNorm(x, eps): folded
    into the weight and row statistics taken in one launch (:func:`layernorm_prologue`, every call), applied
    in the epilogue; act: ACT_NONE / ACT_GELU_ERF / ACT_GELU_TANH; residual: (..., N) with
    a unit last stride; config: one of :data:`CONFIGS` or its fields as a tuple (None:
    :func:`default_config`). Returns (..., N).
    Raises ValueError (before any launch) when TMA cannot read or write these tensors.
    """
    K = x.shape[-1]
    N = weight.shape[0]
    out = check_out(out, tuple(x.shape[:-1]) + (N,), x)
    why = tma_unsupported(x, weight, out)
    if why is not None:
        raise ValueError(f"gemm_tma: {why}")
    config = _check_config(config, N, K)
    for name, t in (("bias", bias), ("layer_scale", layer_scale)):
        _check_vec(name, t, N, x)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vec(name, t, K, x)
    T = rows_per_batch(x)
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    res_strides = (0, 0)
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape) or residual.stride(-1) != 1:
            raise ValueError(
                f"residual: expected shape {tuple(out.shape)} with a unit last stride, got "
                f"{tuple(residual.shape)} strides {residual.stride()}"
            )
        res_strides = as_rows("residual", residual, T)[:2]
    stride_am, _ = _rows2d("x", x)
    a, w, ln = x, weight, None
    if norm_weight is not None and M:
        ln = layernorm_prologue(x, eps, weight, bias, norm_weight, norm_bias, room=triton.cdiv(M, config.block_m))
        w, bias = ln[0].weight, None
    return launch_gemm_tma(
        a,
        w,
        out,
        M=M,
        N=N,
        K=K,
        T=T,
        stride_am=stride_am,
        config=config,
        bias=bias,
        residual=residual,
        res_strides=res_strides,
        layer_scale=layer_scale,
        act=act,
        ln=ln,
    )


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    config: Optional[TmaConfig] = None,
) -> Tensor:
    """residual + layer_scale * (x @ weight^T + bias) (out projection, fc2); shapes as :func:`dense_forward`."""
    return dense_forward(x, weight, bias, residual=residual, layer_scale=layer_scale, out=out, config=config)


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
    config: Optional[TmaConfig] = None,
) -> Tensor:
    """[LayerNorm ->] QKV projection written into the attention layout.

    x: (B, N, dim) float16/bfloat16 with one 16-byte-multiple row stride; qkv_weight: (3*inner, dim), rows
    [q; k; v], head-major; qkv_bias: (3*inner,) or None; norm_weight, norm_bias: (dim,) LayerNorm(x, eps)
    folded as in :func:`dense_forward`; scale multiplies Q (after the bias). Returns a contiguous
    (3, B, H, N, head_dim): qkv[0] = scale * q, qkv[1] = k, qkv[2] = v.
    """
    B, Ntok, dim, inner, head_dim, out = check_qkv_projection(x, qkv_weight, num_heads, out)
    why = tma_unsupported(x, qkv_weight)
    if why is not None:
        raise ValueError(f"gemm_tma: {why}")
    N = 3 * inner
    config = _check_config(config, N, dim)
    _check_vec("qkv_bias", qkv_bias, N, x)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vec(name, t, dim, x)
    M = B * Ntok
    stride_am, _ = _rows2d("x", x)
    a, w, bias, ln = x, qkv_weight, qkv_bias, None
    if norm_weight is not None and M:
        ln = layernorm_prologue(
            x, eps, qkv_weight, qkv_bias, norm_weight, norm_bias, room=triton.cdiv(M, config.block_m)
        )
        w, bias = ln[0].weight, None
    return launch_gemm_tma(
        a,
        w,
        out,
        M=M,
        N=N,
        K=dim,
        T=Ntok,
        stride_am=stride_am,
        config=config,
        bias=bias,
        ln=ln,
        qkv=(inner, head_dim, scale),
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs
# ---------------------------------------------------------------------------------------------

# The epilogues each ViT class launches: flags as in _gemm_tma_kernel (LN_EPI: LayerNorm folded).
EPILOGUES: Dict[str, Tuple[Dict[str, object], ...]] = {
    "qkv": tuple(
        dict(OUT_MODE=mode_value(OUT_QKV), HAS_BIAS=b, LN_EPI=ln) for ln in (False, True) for b in (False, True)
    ),
    "proj": tuple(
        dict(HAS_BIAS=b, HAS_RES=r, HAS_LS=s)
        for b in (False, True)
        for r, s in ((False, False), (True, False), (True, True))
    ),
    "fc1": tuple(
        dict(HAS_BIAS=True, ACT=mode_value(act), LN_EPI=ln)
        for ln in (False, True)
        for act in (ACT_GELU_ERF, ACT_GELU_TANH)
    ),
}
EPILOGUES["fc2"] = EPILOGUES["proj"]


# (N, K) of each class at a model dimension (qkv: dim -> 3*dim, proj: dim -> dim, fc1: dim -> 4*dim,
# fc2: 4*dim -> dim).
CLASS_SHAPES = {
    "qkv": lambda d: (3 * d, d),
    "proj": lambda d: (d, d),
    "fc1": lambda d: (4 * d, d),
    "fc2": lambda d: (d, 4 * d),
}


def _aot_call(config: TmaConfig, flags: Dict[str, object], tensors: Dict[str, Tensor]):
    """The public launcher call that makes the ``flags`` epilogue on ``tensors`` (empty CPU operands of one
    class, from :func:`_aot_tensors`). With LN_EPI and no HAS_BIAS the LayerNorm has no beta (b' = None)."""
    t = tensors
    bias = t["bias"] if flags.get("HAS_BIAS") else None
    ln = flags.get("LN_EPI", False)
    norm_weight = t["ln"] if ln else None
    norm_bias = t["ln"] if ln and bias is not None else None
    if flags.get("OUT_MODE", OUT_ROWS) == OUT_QKV:
        H = REPRESENTATIVE["heads"]
        return lambda: qkv_projection_forward(
            t["x"], t["w"], bias, num_heads=H, scale=0.125, norm_weight=norm_weight, norm_bias=norm_bias, config=config
        )
    return lambda: dense_forward(
        t["x"],
        t["w"],
        bias,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        act=mode_value(flags.get("ACT", ACT_NONE)),
        residual=t["res"] if flags.get("HAS_RES") else None,
        layer_scale=t["bias"] if flags.get("HAS_LS") else None,
        config=config,
    )


def _aot_tensors(cls: str, dtype: torch.dtype) -> Dict[str, Tensor]:
    """Empty CPU operands of class ``cls`` at aot.REPRESENTATIVE's ViT (B, T, dim); shared by a class's specs."""
    B, T, dim = (REPRESENTATIVE[k] for k in ("batch", "tokens", "dim"))
    N, K = CLASS_SHAPES[cls](dim)
    return dict(
        x=torch.empty(B, T, K, dtype=dtype),
        w=torch.empty(N, K, dtype=dtype),
        bias=torch.empty(N, dtype=dtype),
        ln=torch.empty(K, dtype=dtype),
        res=torch.empty(B, T, N, dtype=dtype),
    )


def aot_spec(
    config: TmaConfig, dtype: torch.dtype, name: str = "gemm_tma", tensors: Optional[Dict[str, Tensor]] = None, **flags
) -> AotSpec:
    """The AotSpec of ``config`` for ``dtype`` with epilogue ``flags`` (kernel flag names; unset: off), recorded
    from the public launcher (qkv_projection_forward for OUT_MODE=OUT_QKV, else dense_forward) on empty CPU
    tensors of the class ``name`` ends with ("gemm_tma_qkv", ...; "proj" otherwise) at aot.REPRESENTATIVE's
    shape: its signature, constants and 16-divisibility are the launch's. The LayerNorm path's row-statistics
    launch is recorded too and left to layernorm.aot_specs; its (unwritten) statistics only pick which A
    the same launch reads. tensors: operands from :func:`_aot_tensors` to reuse."""
    f = dict(HAS_BIAS=False, ACT=ACT_NONE, HAS_LS=False, HAS_RES=False, OUT_MODE=OUT_ROWS, LN_EPI=False)
    f.update(flags)
    f.update(ACT=mode_value(f["ACT"]), OUT_MODE=mode_value(f["OUT_MODE"]))
    cls = name.rsplit("_", 1)[-1]
    cls = cls if cls in CLASS_SHAPES else ("qkv" if f["OUT_MODE"] == OUT_QKV else "proj")
    t = tensors if tensors is not None else _aot_tensors(cls, dtype)
    on = ",".join(f"{k}={int(v)}" for k, v in f.items() if v)
    label = f"{config.name},{dtype_name(dtype)}" + (f",{on}" if on else "")
    B, T = REPRESENTATIVE["batch"], REPRESENTATIVE["tokens"]
    N, K = t["w"].shape
    spec = recorded_spec(
        name, _gemm_tma_kernel, _aot_call(config, f, t), label, True, archs=(90,), shape=f"B={B},T={T},K={K},N={N}"
    )
    got = {k: spec.constexprs[k] for k in f}
    if got != f:  # the call above must make exactly the epilogue asked for
        raise RuntimeError(f"{name}: the launch for {label} set the flags {got}")
    return spec


def aot_specs() -> List[AotSpec]:
    """Every (config of a class) x (epilogue of that class) x dtype, for sm_90 only, each recorded from a
    launcher call at the class's ViT shape (a (config, epilogue, dtype) shared by two classes: the first)."""
    specs, seen = [], set()
    for cls, idx in CLASSES.items():
        tensors = {dtype: _aot_tensors(cls, dtype) for dtype in DTYPES}
        for i in idx:
            for flags in EPILOGUES[cls]:
                for dtype in DTYPES:
                    key = (i, dtype, tuple(sorted(flags.items())))
                    if key not in seen:
                        seen.add(key)
                        specs.append(aot_spec(CONFIGS[i], dtype, f"gemm_tma_{cls}", tensors[dtype], **flags))
    return specs
