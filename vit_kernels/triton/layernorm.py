"""LayerNorm for the fused GEMMs: row statistics (mean and 1/std of every row, in fp32), and the fold of
LayerNorm's affine into the weight of the Linear that follows, together with the statistics in one launch
(:func:`layernorm_prologue`, sm_90's TMA GEMM).

The fused GEMMs (QKV projection, fc1) apply LayerNorm while they load x; they need each row's
mean and rstd first. This small pass reads x once (twice from cache: the mean is taken of x minus the row's first
element, summed in fp64, and the variance around the mean, not as E[x^2] - mean^2, so large means do not cancel)
and writes 8 bytes a row.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cdiv
from ..replay import empty, launch
from ..dtypes import KERNEL_DTYPES
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec

DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes
BLOCK_R, BLOCK_D, NUM_WARPS = 8, 256, 4


@triton.jit
def _row_stats_kernel(
    x_ptr,  # x viewed as (batch, T, D) with strides (stride_xb, stride_xt, stride_xd)
    stats_ptr,  # (2, M) fp32 out: the row means, then the rows' 1/std; M = batch * T
    M,
    D,
    T,  # rows, row width, rows per batch
    stride_xb,
    stride_xt,
    stride_xd,
    eps,  # fp32
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _row_stats_rows(tl.program_id(0), x_ptr, stats_ptr, M, D, T, stride_xb, stride_xt, stride_xd, eps, BLOCK_R, BLOCK_D)


@triton.jit
def _row_stats_rows(
    pid, x_ptr, stats_ptr, M, D, T, stride_xb, stride_xt, stride_xd, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Rows pid * BLOCK_R .. + BLOCK_R of :func:`_row_stats_kernel` (arguments as there)."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    row_off = (rows // T).to(tl.int64) * stride_xb + (rows % T).to(tl.int64) * stride_xt
    cols0 = tl.arange(0, BLOCK_D)

    # The mean as first + mean(x - first), first = the row's first element, summed in fp64: for a row of
    # large mean and small spread the differences are exact and small, so their sum keeps its bits (a plain
    # sum of 3e4-sized fp32 values loses the spread; a constant row then gets a nonzero x - mean that
    # 1/sqrt(eps) magnifies); fp64 keeps the sum exact when |first| is far above the mean (an fp32 sum of
    # x - first errs by ~eps_fp32 * |first|, which z in a channel near the mean, times a large gamma and W,
    # shows: tests/test_triton_gemm_tma.py's outlier channel), so the mean is rounded to fp32 once.
    first = tl.load(x_ptr + row_off, mask=rmask & (D > 0), other=0.0).to(tl.float64)
    total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_xd, mask=mask, other=0.0)
        total += tl.where(mask, x.to(tl.float64) - first[:, None], 0.0)
    mean = (first + tl.sum(total, axis=1) / D).to(tl.float32)

    sq = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_xd, mask=mask, other=0.0)
        diff = tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)
        sq += diff * diff
    var = tl.sum(sq, axis=1) / D
    # Rows past M (rmask False) are never stored; give them var 1 so that eps = 0 computes no inf.
    rstd = 1.0 / tl.sqrt_rn(tl.where(rmask, var + eps, 1.0))
    tl.store(stats_ptr + rows, mean, mask=rmask)
    tl.store(stats_ptr + M + rows, rstd, mask=rmask)


def as_rows(name: str, t: Tensor, T: int) -> Tuple[int, int, int]:
    """Strides (stride_b, stride_t, stride_c) that address ``t`` (..., C) as (-1, T, C) without a copy.

    Raises ValueError naming ``name`` when the leading dims cannot be addressed that way (a
    layout no view can express); the caller then decides to make it contiguous, visibly.
    """
    C = t.shape[-1]
    if t.dim() == 3 and t.shape[1] == T:  # already (-1, T, C): its own strides (what the view would have)
        return t.stride()
    try:
        v = t.view(-1, T, C) if t.numel() else t.reshape(-1, T, C)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} with strides {t.stride()} cannot be addressed as "
            f"(-1, {T}, {C}) rows without a copy; pass {name}.contiguous()"
        ) from None
    return v.stride(0), v.stride(1), v.stride(2)


def rows_per_batch(x: Tensor) -> int:
    """T, the row count of x's second-to-last dim (x's leading dims are addressed as (-1, T))."""
    return x.shape[-2] if x.dim() >= 2 else 1


def row_stats(x2d: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Per-row LayerNorm statistics.

    x2d: (..., D), any strides that address it as (-1, T, D) with T = x2d.shape[-2] (a 2-D
    tensor is one batch of rows); float32/float16/bfloat16. eps: added to the variance.
    Returns (mean, rstd), each fp32 (M,) with M = x2d.numel() // D: rstd = 1/sqrt(var + eps),
    var the biased variance over the last dim. Both are rows of one (2, M) buffer, which the GEMMs
    take as one pointer (:func:`stats_pointer`): one allocation per call.
    """
    if x2d.dtype not in DTYPES:
        raise TypeError(f"x2d: expected float32, float16 or bfloat16, got {x2d.dtype}")
    if x2d.dim() < 2:
        raise ValueError(f"x2d: expected at least 2 dims (rows, D), got shape {tuple(x2d.shape)}")
    D = x2d.shape[-1]
    M = x2d.numel() // D if D else 0
    stats = empty((2, M), torch.float32, x2d.device)
    if M == 0:
        return stats[0], stats[1]
    T = rows_per_batch(x2d)
    stride_b, stride_t, stride_d = as_rows("x2d", x2d, T)
    grid = (cdiv(M, BLOCK_R),)
    launch(
        _row_stats_kernel,
        grid,
        x2d,
        stats,
        M,
        D,
        T,
        stride_b,
        stride_t,
        stride_d,
        float(eps),
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return stats[0], stats[1]


def stats_pointer(mean: Tensor, rstd: Tensor) -> Tensor:
    """The one pointer a kernel takes for row statistics: ``mean``, whose M elements ``rstd``
    follows (the (2, M) buffer :func:`row_stats` returns them from). Raises ValueError otherwise."""
    M = mean.shape[0] if mean.dim() == 1 else -1
    adjacent = (
        rstd.data_ptr() == mean.data_ptr() + 4 * M
        and rstd.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr()
    )
    if not (mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (M,) and adjacent):
        raise ValueError(
            f"stats: expected (mean, rstd) as row_stats returns them (fp32 rows of one (2, M) buffer), got "
            f"{mean.dtype} {tuple(mean.shape)} and {rstd.dtype} {tuple(rstd.shape)}"
            + ("" if adjacent else " not adjacent")
        )
    if M > 1 and (mean.stride(0) != 1 or rstd.stride(0) != 1):
        raise ValueError(f"stats: expected unit strides, got {mean.stride()} and {rstd.stride()}")
    return mean


@dataclasses.dataclass(frozen=True)
class FoldedLayerNorm:
    """LayerNorm(gamma, beta) followed by Linear(W, b), folded: weight W' = W * gamma * s (N, K) in W's
    dtype, each row n scaled by a power of two s_n (1 unless float16 would overflow: see
    :func:`_fold_rows`; a view of :func:`layernorm_prologue`'s workspace, after ``affine``); ``sums``
    (SUM_ROWS, N) fp32, in the workspace the GEMM takes as one pointer: the column
    sums c = W' summed over K, from the rounded W' the GEMM multiplies (so x @ W'^T - mean * c =
    (x - mean) @ W'^T), then u = 1 / s, which the GEMM's epilogue multiplies back (exactly: a power of
    two), then the bias b' = b + W @ beta (0 when neither b nor beta exists: ``has_bias`` False), then
    for the tiles that apply LayerNorm in the kernel instead (gemm_tma's exact route): b itself (0 when
    absent) and each output's dominance flag (1.0 where one channel carries more than FOLD_DOMINANCE of
    the norm of W * gamma's row: :func:`_fold_rows`). After the sums, gamma then beta (K each, fp32;
    beta 0 when absent): ``affine``. ``source``: W itself (the exact route's weight). ``eps``: the
    LayerNorm's (the GEMM's cancel test weighs z's scale, sqrt(1 - eps * rstd**2), with it)."""

    weight: Tensor
    sums: Tensor
    affine: Tensor
    source: Tensor
    has_bias: bool
    eps: float

    @property
    def colsum(self) -> Tensor:
        return self.sums[0]

    @property
    def unscale(self) -> Tensor:
        return self.sums[1]

    @property
    def bias(self) -> Optional[Tensor]:
        return self.sums[2] if self.has_bias else None

    @property
    def dominated(self) -> Tensor:
        """(N,) bool: the outputs whose column tiles take the exact route (:func:`_fold_rows`)."""
        return self.sums[4] != 0


SUM_ROWS = 5  # the fold's sums: colsum, unscale, b', b, dominance flag
FOLD_LIMIT = tl.constexpr(32768.0)  # float16 rows of W * gamma past 2**15 are scaled down by a power of two
# An output whose row of W * gamma has one entry above this share of its norm takes the exact route: see _fold_rows
FOLD_DOMINANCE = tl.constexpr(0.9)


@triton.jit
def _fold_tile(w_ptr, gamma_ptr, rows, rmask, k0, K, stride_wn, stride_wk, stride_g, BLOCK_K: tl.constexpr):
    """W's (BLOCK_N, BLOCK_K) tile at column k0 and gamma's columns, both fp32 (0 past the edges), with the
    columns, their mask and the tile's mask."""
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < K
    m = rmask[:, None] & cmask[None, :]
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk, mask=m, other=0.0)
    g = tl.load(gamma_ptr + cols * stride_g, mask=cmask, other=0.0)
    return w.to(tl.float32), g.to(tl.float32), cols, cmask, m


@triton.jit
def _ln_prologue_kernel(
    x_ptr, ws_ptr, M, T, stride_xb, stride_xt, stride_xd, eps,
    w_ptr, gamma_ptr, beta_ptr, b_ptr, wf_off, N, K,
    stride_wn, stride_wk, stride_g, stride_be, stride_b,
    fold_programs, sums_off,
    HAS_BETA: tl.constexpr, HAS_B: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """What sm_90's TMA GEMM needs before a LayerNorm-folded launch, in one launch: programs
    0 .. fold_programs - 1 fold (:func:`_fold_rows`: W (N, K) -> W' at ws_ptr + wf_off in W's dtype, the sums
    at ws_ptr + sums_off), the others take the row statistics of x (M rows of width K,
    :func:`_row_stats_rows`: mean and 1/std at ws_ptr, as :func:`_row_stats_kernel` writes them)."""
    pid = tl.program_id(0)
    if pid < fold_programs:
        _fold_rows(
            pid, w_ptr, gamma_ptr, beta_ptr, b_ptr, (ws_ptr + wf_off).to(w_ptr.dtype, bitcast=True), ws_ptr + sums_off, N, K,
            stride_wn, stride_wk, stride_g, stride_be, stride_b, HAS_BETA, HAS_B, SCALED, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        _row_stats_rows(
            pid - fold_programs, x_ptr, ws_ptr, M, K, T, stride_xb, stride_xt, stride_xd, eps, BLOCK_R, BLOCK_D
        )


@triton.jit
def _fold_rows(
    pid, w_ptr, gamma_ptr, beta_ptr, b_ptr, wf_ptr, sums_ptr,
    N, K,
    stride_wn, stride_wk, stride_g, stride_be, stride_b,
    HAS_BETA: tl.constexpr, HAS_B: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows pid * BLOCK_N .. + BLOCK_N of W (N, K): wf = W * gamma * s rounded to W's dtype (row-major (N, K)),
    sums[0] = sum_k wf (fp64 sum, stored fp32), sums[1] = 1 / s, sums[2] = b + W @ beta (fp64, stored
    fp32; without either term, 0), sums[3] = b (0 without it), sums[4] = the dominance flag; program 0 also
    writes gamma and beta (fp32) after the sums. Memory-bound: W is read twice (the rows' largest |W * gamma|
    and norm first, the second time from cache), wf written once.

    SCALED (float16): a row whose largest |W * gamma| passes FOLD_LIMIT (2**15; float16 overflows at
    65504, where eager LayerNorm + Linear, which never forms W * gamma, may not) is scaled by
    s = 2**-e, the smallest e that brings it under the limit; exact, and undone by the GEMM's epilogue
    (u = 2**e). Other rows (and every row of bfloat16/float32: their range is float32's) keep s = 1,
    bitwise as unscaled. A row with an infinite or NaN W * gamma keeps s = 1 (its column is inf/NaN,
    as eager's is).

    Dominance: the fold rounds each product W * gamma to W's dtype, where eager rounds LayerNorm's output
    z * gamma + beta. Where beta cancels z * gamma in a channel, eager's rounding there vanishes and the
    fold's, eps * |W * gamma * z|, stays; summed over a row's many channels this is noise of eager's own
    size, but when one channel carries most of the row's norm it is that output's whole error (an outlier
    channel of gamma: up to 7.6x eager's error, measured). A row with max_k |W * gamma| > FOLD_DOMINANCE *
    ||W * gamma||_2 is flagged, and the GEMM applies LayerNorm in the kernel for its column tiles (eager's
    rounding). Below the flag, beta cancelling z * gamma in the largest channel leaves an excess of at
    most r / sqrt(1 - r^2) <= 2.1 times the other channels' error (the outlier channels the flag is for
    have r ~ 1). A lower flag would send ordinary weights to the slower route: dense random rows (gamma
    1 +- 0.5) pass r = 0.75 in 4% of (64, 256) weights, r = 0.85 in none of 3000; at K = 768 they stay
    near 0.37."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    e = tl.zeros([BLOCK_N], dtype=tl.int32)
    big = tl.zeros([BLOCK_N], dtype=tl.float32)
    norm2 = tl.zeros([BLOCK_N], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        w, g, cols, cmask, m = _fold_tile(w_ptr, gamma_ptr, rows, rmask, k0, K, stride_wn, stride_wk, stride_g, BLOCK_K)
        wg = w * g[None, :]  # exact in fp32 (two 11- or 8-bit significands)
        big = tl.maximum(big, tl.max(tl.abs(wg), axis=1))
        norm2 += tl.sum(wg.to(tl.float64) * wg.to(tl.float64), axis=1)
    if SCALED:
        over = (big > FOLD_LIMIT) & (big < float("inf"))  # NaN compares False
        # log2 may be off by a little at a power of two: e one too large still fits (and e one too small
        # leaves the row under 2**16 < 65504)
        e = tl.where(over, tl.ceil(tl.log2(big / FOLD_LIMIT)), 0.0).to(tl.int32)
    s = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e and 2**e, built from their exponent bits
    u = ((127 + e) << 23).to(tl.float32, bitcast=True)
    # NaN or Inf compare False: such a row keeps the fold (its output is NaN or Inf either way)
    big64 = big.to(tl.float64)
    dominated = big64 * big64 > norm2 * (FOLD_DOMINANCE * FOLD_DOMINANCE)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float64)
    bias = tl.zeros([BLOCK_N], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        w, g, cols, cmask, m = _fold_tile(w_ptr, gamma_ptr, rows, rmask, k0, K, stride_wn, stride_wk, stride_g, BLOCK_K)
        wf = ((w * g[None, :]) * s[:, None]).to(wf_ptr.dtype.element_ty)
        tl.store(wf_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], wf, mask=m)
        colsum += tl.sum(wf.to(tl.float64), axis=1)
        be = tl.zeros([BLOCK_K], dtype=tl.float32)
        if HAS_BETA:
            be = tl.load(beta_ptr + cols * stride_be, mask=cmask, other=0.0).to(tl.float32)
            bias += tl.sum(w.to(tl.float64) * be.to(tl.float64)[None, :], axis=1)
        if pid == 0:  # gamma and beta for the exact route's tiles
            tl.store(sums_ptr + 5 * N + cols, g, mask=cmask)
            tl.store(sums_ptr + 5 * N + K + cols, be, mask=cmask)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + rows * stride_b, mask=rmask, other=0.0).to(tl.float32)
        bias += b.to(tl.float64)
    tl.store(sums_ptr + rows, colsum.to(tl.float32), mask=rmask)
    tl.store(sums_ptr + N + rows, u, mask=rmask)
    tl.store(sums_ptr + 2 * N + rows, bias.to(tl.float32), mask=rmask)
    tl.store(sums_ptr + 3 * N + rows, b, mask=rmask)
    tl.store(sums_ptr + 4 * N + rows, dominated.to(tl.float32), mask=rmask)


FOLD_BLOCK_N, FOLD_BLOCK_K = 16, 128  # the fold's rows and columns per step (the row statistics: BLOCK_R, BLOCK_D)


def layernorm_prologue(
    x: Tensor,
    eps: float,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Tensor,
    norm_bias: Optional[Tensor],
    room: int = 0,
) -> Tuple[FoldedLayerNorm, Tensor, Tensor]:
    """LayerNorm(x; norm_weight gamma (K,), norm_bias beta (K,) or None, eps) followed by Linear(weight
    (N, K), bias (N,) or None), prepared for sm_90's TMA GEMM in one launch of :func:`_ln_prologue_kernel`:
    the affine folded into the weight (:class:`FoldedLayerNorm`) and x's row statistics. x: (..., K)
    addressed as (-1, T, K) rows (:func:`as_rows`); M = its rows.

    Returns (fold, mean, rstd). All of it lives in one fp32 workspace: mean (M,), rstd (M,) as
    :func:`row_stats` computes them (bit for bit: the same code), ``room`` entries for the GEMM to write (its
    row tiles' LayerNorm route flags), then from the next multiple of 16 the fold's sums (SUM_ROWS, N) and its
    gamma and beta (2, K), then from the next multiple of 64 (256 bytes) W' (N, K) in W's dtype (``fold.weight``,
    a view). So the kernels take one pointer for all of it (and the sums' and W' offsets), and a replayed
    launch plan allocates once (about 1 us of host time per allocation) and launches once.

    Made on every call (replays included) and never cached: a cache keyed on the parameters' version
    counters would miss writes through ``.data`` (a DINO teacher's EMA update, PEFT's merge), and inside a
    CUDA graph the fold is captured with the GEMM, so every replay folds the parameters as they are then.
    Its cost beside the statistics' read of x: one read of W and one write of W' (4.7 MB each for ViT-B's
    fc1 in bfloat16), and a second read of W from cache (each row's largest |W * gamma| and norm: float16's
    scale s and the dominance flag)."""
    N, K = weight.shape
    dev = weight.device
    T = rows_per_batch(x)
    M = x.numel() // K if K else 0  # K = 0: no row statistics (the GEMM refuses it before)
    stride_b, stride_t, stride_d = as_rows("x", x, T)
    # replay.empty / replay.launch: a launch plan records these as its own allocations and launch, and a
    # replay makes them again (no Python between them)
    fold_off = cdiv(2 * M + room, 16) * 16  # 64-byte aligned sums: the GEMM's loads of them stay vectorized
    wf_off = cdiv(fold_off + SUM_ROWS * N + 2 * K, 64) * 64  # W' 256-byte aligned (TMA needs 16)
    wf_floats = cdiv(N * K * weight.element_size(), 4)
    ws = empty((wf_off + wf_floats,), torch.float32, dev)
    # W' as a view (fold.weight, never a kernel argument: the kernels take ws and wf_off)
    w_fold = ws[wf_off:].view(weight.dtype)[: N * K].view(N, K)
    beta, has_beta, has_b = norm_bias, norm_bias is not None, bias is not None
    fold_programs = cdiv(N, FOLD_BLOCK_N)  # K = 0 reads no W: the sums of nothing are 0, u = 1, and b' = b
    if fold_programs + M:
        launch(
            _ln_prologue_kernel, (fold_programs + cdiv(M, BLOCK_R),),
            x, ws, M, T, stride_b, stride_t, stride_d, float(eps),
            weight, norm_weight, beta if has_beta else ws, bias if has_b else ws, wf_off, N, K,
            *weight.stride(), norm_weight.stride(0), beta.stride(0) if has_beta else 0, bias.stride(0) if has_b else 0,
            fold_programs, fold_off,
            has_beta, has_b, weight.dtype == torch.float16, FOLD_BLOCK_N, FOLD_BLOCK_K, BLOCK_R, BLOCK_D,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    sums_end = fold_off + SUM_ROWS * N
    fold = FoldedLayerNorm(
        w_fold,
        ws[fold_off:sums_end].view(SUM_ROWS, N),
        ws[sums_end : sums_end + 2 * K].view(2, K),
        weight,
        has_beta or has_b,
        float(eps),
    )
    return fold, ws[:M], ws[M : 2 * M]


def aot_specs() -> List[AotSpec]:
    """The launches row_stats makes (one block config per input dtype, for an x of aot.REPRESENTATIVE's
    (batch, tokens, dim)) and layernorm_prologue's (per dtype, with and without the Linear's bias, at the
    same x), each recorded from its launcher, so each specialization is the launch's."""
    B, T, dim = REPRESENTATIVE["batch"], REPRESENTATIVE["tokens"], REPRESENTATIVE["dim"]
    specs = []
    for dtype in DTYPES:
        x = torch.empty(B, T, dim, dtype=dtype)
        specs.append(
            recorded_spec(
                "row_stats",
                _row_stats_kernel,
                lambda: row_stats(x, 1e-6),
                f"BLOCK_R={BLOCK_R},BLOCK_D={BLOCK_D},{dtype_name(dtype)}",
                False,
                shape=f"B={B},T={T},D={dim}",
            )
        )
    N, K = 3 * dim, dim  # the QKV projection's weight (fc1's: 4 * dim rows, the same specialization)
    for dtype in (torch.float16, torch.bfloat16):  # the TMA GEMM's (float32 stays on vit_kernels.triton.gemm)
        w, b, ln = torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype), torch.empty(K, dtype=dtype)
        x = torch.empty(B, T, dim, dtype=dtype)
        for bias in (b, None):
            specs.append(
                recorded_spec(
                    "layernorm_prologue",
                    _ln_prologue_kernel,
                    lambda bias=bias, x=x: layernorm_prologue(x, 1e-6, w, bias, ln, ln, room=cdiv(B * T, 128)),
                    f"BLOCK_N={FOLD_BLOCK_N},BLOCK_K={FOLD_BLOCK_K},BLOCK_R={BLOCK_R},BLOCK_D={BLOCK_D},"
                    f"HAS_B={int(bias is not None)},{dtype_name(dtype)}",
                    False,
                    archs=(90,),
                    shape=f"B={B},T={T},N={N},K={K}",
                )
            )
    return specs
