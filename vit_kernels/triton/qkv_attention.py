"""[LayerNorm ->] QKV projection -> multi-head attention, in Triton: two paths behind one launcher.

single_kernel: one program per (batch, head). LayerNorm is applied as x loads; that head's K and V
for the whole sequence are computed into on-chip tiles, once per program: up to 256 tokens one tile
of the next power of two of the token count (masked); longer sequences a main tile (the largest
power of two <= tokens) plus a tail tile (a power of two >= the rest), as Triton tiles must be
powers of two: 577 tokens take 512 + 128 rows instead of 1024 (:func:`kv_layout`). Then the
program walks its query tiles: Q tile from x and the weights, scores against all of K at once (the
whole row is on chip, so the online softmax of the flash kernel is a single step, its max and sum
taken over both tiles), softmax with exp2, P @ V (+ P_tail @ V_tail), and the
output written as (batch, tokens, heads * head_dim). Q, K, V never reach global memory: the kernel
reads x and the weights and writes the output.

split: where K and V do not fit on chip. ``vit_kernels.triton.gemm.qkv_projection_forward`` computes Q, K, V
(LayerNorm as operands load, bias, softmax scale folded into Q) straight into a (3, B, H, N, head_dim)
buffer, then the flash attention kernel (vit_kernels.triton.attention) reads it and writes the
(batch, tokens, heads * head_dim) output through a strided view.

:func:`choose_path` is the untimed default ("split", see its docstring); :func:`single_kernel_fits` says
where the single kernel may run when asked for or chosen by measurement (vit_kernels.tuning).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import checks
from . import attention
from .attention import LOG2E
from . import FP32_DOT_PRECISION, next_power_of_2
from ..arch import shared_per_block
from ..dtypes import KERNEL_DTYPES
from ..replay import empty, launch
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec

PATHS = ("single_kernel", "split")
DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes


@triton.jit
def _row_stats(
    x_base, rows, row_mask, stride_xn, DIM, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr
):
    """Mean and 1/std over the last dim of x rows ``rows`` (BLOCK_R,), two passes in fp32, the first
    shifted by each row's first element (zeros, unused by _project, without a LayerNorm)."""
    if HAS_NORM:
        offs_k = tl.arange(0, BLOCK_K)
        row_off = tl.multiple_of(rows.to(tl.int64) * stride_xn, 8)
        # mean = first + mean(x - first): exact small differences for rows of large mean, tiny spread
        first = tl.load(x_base + row_off, mask=row_mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            cols = k0 + offs_k
            m = row_mask[:, None] & (cols < DIM)[None, :]
            xk = tl.load(x_base + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.where(m, xk - first[:, None], 0.0)
        mean = first + tl.sum(acc, axis=1) / DIM
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            cols = k0 + offs_k
            m = row_mask[:, None] & (cols < DIM)[None, :]
            xk = tl.load(x_base + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xk = tl.where(m, xk - mean[:, None], 0.0)
            acc += xk * xk
        # Rows past the sequence (row_mask False) load zeros, var 0: with eps = 0 their rstd would be inf
        # and their K/V rows NaN, which P @ V would spread (0 * NaN) into every output row. Use var 1.
        rstd = 1.0 / tl.sqrt(tl.where(row_mask, tl.sum(acc, axis=1) / DIM + eps, 1.0))
    else:
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)
        rstd = mean
    return mean, rstd


@triton.jit
def _project(
    x_base,
    rows,
    row_mask,
    stride_xn,
    w_base,
    stride_wn,
    b_base,
    mean,
    rstd,
    norm_weight_ptr,
    norm_bias_ptr,
    DIM,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """[LayerNorm(x rows)] @ w^T (+ bias) for one head's HEAD_DIM rows of the weight at w_base:
    (BLOCK_R, BLOCK_D) fp32, LayerNorm applied as x loads (mean, rstd from _row_stats)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_xn, 8)
    w_off = tl.multiple_of(offs_d.to(tl.int64) * stride_wn, 8)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < DIM
        xk = tl.load(x_base + row_off[:, None] + cols[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        if HAS_NORM:
            xn = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None]
            xn = xn * tl.load(norm_weight_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_BIAS:
                xn = xn + tl.load(norm_bias_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            xk = xn.to(xk.dtype)  # LayerNorm's output in the input dtype, as F.layer_norm gives it
        # (BLOCK_K, BLOCK_D) tile of w^T: w is (rows, DIM) row-major
        wk = tl.load(w_base + w_off[None, :] + cols[:, None], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(xk, wk, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_base + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _kv_tile(
    x_base,
    row0,
    N,
    stride_xn,
    wk_base,
    wv_base,
    stride_wn,
    bk_base,
    bv_base,
    norm_weight_ptr,
    norm_bias_ptr,
    DIM,
    eps,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """K and V of token rows [row0, row0 + ROWS) in x's dtype, (ROWS, BLOCK_D) each, and the row mask
    (rows < N)."""
    kv_rows = row0 + tl.arange(0, ROWS)
    kv_mask = kv_rows < N
    mean, rstd = _row_stats(x_base, kv_rows, kv_mask, stride_xn, DIM, eps, ROWS, BLOCK_K, HAS_NORM)
    k = _project(
        x_base,
        kv_rows,
        kv_mask,
        stride_xn,
        wk_base,
        stride_wn,
        bk_base,
        mean,
        rstd,
        norm_weight_ptr,
        norm_bias_ptr,
        DIM,
        HEAD_DIM,
        ROWS,
        BLOCK_D,
        BLOCK_K,
        HAS_NORM,
        HAS_NORM_BIAS,
        HAS_BIAS,
        INPUT_PRECISION,
    ).to(x_base.dtype.element_ty)  # cast now: one fp32 accumulator live at a time
    v = _project(
        x_base,
        kv_rows,
        kv_mask,
        stride_xn,
        wv_base,
        stride_wn,
        bv_base,
        mean,
        rstd,
        norm_weight_ptr,
        norm_bias_ptr,
        DIM,
        HEAD_DIM,
        ROWS,
        BLOCK_D,
        BLOCK_K,
        HAS_NORM,
        HAS_NORM_BIAS,
        HAS_BIAS,
        INPUT_PRECISION,
    ).to(x_base.dtype.element_ty)
    return k, v, kv_mask


@triton.jit
def _qkv_attn_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    o_ptr,  # x_ptr: (B, N, DIM); w_ptr: (3*INNER, DIM); bias_ptr: (3*INNER,); norm_weight_ptr, norm_bias_ptr: (DIM,); o_ptr: (B, N, INNER)
    stride_xb,
    stride_xn,  # strides of x_ptr in elements (last dim stride 1)
    stride_wn,  # row stride of w_ptr (last dim stride 1)
    stride_ob,
    stride_on,  # strides of o_ptr (last dim stride 1)
    H,
    N,
    DIM,
    INNER,  # heads, tokens, model dim, heads * head_dim
    eps,
    qk_scale,  # LayerNorm eps; softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head_dim and its next power of two
    N_MAIN: tl.constexpr,
    N_TAIL: tl.constexpr,  # rows of the main and the tail K/V tile (0: no tail)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # query tile rows; reduction chunk over DIM
    HAS_NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # dot precision for fp32 inputs ("tf32x3")
):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # int64 offsets: B * N * DIM can pass 2**31
    h = pid % H
    x_base = tl.multiple_of(x_ptr + b * stride_xb, 16)
    wq_base = tl.multiple_of(w_ptr + (h * HEAD_DIM).to(tl.int64) * stride_wn, 16)
    wk_base = tl.multiple_of(w_ptr + (INNER + h * HEAD_DIM).to(tl.int64) * stride_wn, 16)
    wv_base = tl.multiple_of(w_ptr + (2 * INNER + h * HEAD_DIM).to(tl.int64) * stride_wn, 16)
    bq_base = bias_ptr + h * HEAD_DIM
    bk_base = bias_ptr + INNER + h * HEAD_DIM
    bv_base = bias_ptr + 2 * INNER + h * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # K and V of this head for the whole sequence, on chip: a main tile of rows [0, N_MAIN) and, past
    # 256 tokens unless N is a power of two, a tail tile of rows [N_MAIN, N_MAIN + N_TAIL) (rows >= N
    # are masked below). Two power-of-two tiles hold 577 tokens in 512 + 128 rows instead of 1024.
    k, v, kv_mask = _kv_tile(
        x_base,
        0,
        N,
        stride_xn,
        wk_base,
        wv_base,
        stride_wn,
        bk_base,
        bv_base,
        norm_weight_ptr,
        norm_bias_ptr,
        DIM,
        eps,
        HEAD_DIM,
        N_MAIN,
        BLOCK_D,
        BLOCK_K,
        HAS_NORM,
        HAS_NORM_BIAS,
        HAS_BIAS,
        INPUT_PRECISION,
    )
    if N_TAIL > 0:
        k_t, v_t, kv_mask_t = _kv_tile(
            x_base,
            N_MAIN,
            N,
            stride_xn,
            wk_base,
            wv_base,
            stride_wn,
            bk_base,
            bv_base,
            norm_weight_ptr,
            norm_bias_ptr,
            DIM,
            eps,
            HEAD_DIM,
            N_TAIL,
            BLOCK_D,
            BLOCK_K,
            HAS_NORM,
            HAS_NORM_BIAS,
            HAS_BIAS,
            INPUT_PRECISION,
        )

    o_base = tl.multiple_of(o_ptr + b * stride_ob + h * HEAD_DIM, 16)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        mean_q, rstd_q = _row_stats(x_base, rows, row_mask, stride_xn, DIM, eps, BLOCK_M, BLOCK_K, HAS_NORM)
        q = _project(
            x_base,
            rows,
            row_mask,
            stride_xn,
            wq_base,
            stride_wn,
            bq_base,
            mean_q,
            rstd_q,
            norm_weight_ptr,
            norm_bias_ptr,
            DIM,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_D,
            BLOCK_K,
            HAS_NORM,
            HAS_NORM_BIAS,
            HAS_BIAS,
            INPUT_PRECISION,
        ).to(x_ptr.dtype.element_ty)
        # The whole score row is on chip, so the softmax is exact in one step: its max and sum run
        # over the main and the tail tile together.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(kv_mask[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        if N_TAIL > 0:
            s_t = tl.dot(q, tl.trans(k_t), input_precision=INPUT_PRECISION) * qk_scale
            s_t = tl.where(kv_mask_t[None, :], s_t, float("-inf"))
            m = tl.maximum(m, tl.max(s_t, axis=1))
        p = tl.math.exp2(s - m[:, None])
        l = tl.sum(p, axis=1)
        o = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        if N_TAIL > 0:
            p_t = tl.math.exp2(s_t - m[:, None])
            l += tl.sum(p_t, axis=1)
            o = tl.dot(p_t.to(v_t.dtype), v_t, o, input_precision=INPUT_PRECISION)
        o = o / l[:, None]
        o_ptrs = o_base + tl.multiple_of(rows.to(tl.int64) * stride_on, 8)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & mask_d[None, :])


# Shared memory the single kernel needs beside K and V (x and weight chunks, the Q and P tiles).
# Measured with the launched specialization (inspect, 2026-11-25) over every layout aot_specs lists:
# compiled shared memory - onchip_bytes is at most 32 KB on sm_80 and 33 KB on sm_90 (1 KB more).
SMEM_HEADROOM = 33 * 1024
# Largest fp32 projection accumulator (rows x BLOCK_D x 4 bytes) of one K/V tile the single kernel
# was verified to compile for without spills (AOT for sm_80 and sm_90): each tile's K and V pass
# through registers before they settle in shared memory, which caps a tile, not the whole sequence.
MAX_TILE_ACC_BYTES = 128 * 1024
MIN_N_PAD, MAX_N_PAD = 64, 256  # one-tile layouts: N_MAIN = next power of two of tokens in [64, 256]
MAX_N_MAIN, MAX_N_TAIL = 512, 256  # longer sequences: a main tile of up to 512 rows plus a tail tile
# ... for head dims padded to at least 32: with BLOCK_D 16 layouts beyond 256 tokens spilled (8 to
# 10104 bytes, fp32/fp16/bf16, sm_80/sm_90, compiled without the launch's specialization). As
# launched (2026-11-25), fp16 (256, 64) compiles without spills but at 255 registers on sm_80 and
# (512, 128) still spills (1816 bytes sm_80, 1152 sm_90): the rule stays.
MIN_LONG_BLOCK_D = 32
# (dtype, BLOCK_D, N_MAIN, N_TAIL) -> the archs where ptxas still spills on it within the budgets,
# compiled as launched (aot_specs): there these shapes take the split path. (fp32, 16, 256, 0):
# 512 bytes sm_80, 336 sm_90. fp16/bf16 (64, 64, 0) on sm_80: 8 bytes since padding rows' rstd is
# masked (the eps=0 fix); sm_90 compiles it clean. (bf16, 32, 256, 0) spilled only without the
# launch's divisibility facts: as launched it compiles to 128 registers, no spills, and is admitted.
SPILLING = {
    (torch.float32, 16, 256, 0): (80, 90),
    (torch.float16, 64, 64, 0): (80,),
    (torch.bfloat16, 64, 64, 0): (80,),
}
# The single kernel's block configs: (BLOCK_M, BLOCK_K, num_warps, num_stages). Beyond MAX_N_PAD
# tokens the reduction chunk over DIM is 16: the x chunk of a 512-row main tile then leaves ptxas
# enough registers (BLOCK_K 32 spilled 24 bytes at 577 tokens, head_dim 64, fp16, sm_90).
SINGLE_KERNEL_CONFIG = (16, 32, 8, 1)
LONG_KERNEL_CONFIG = (16, 16, 8, 1)


def kv_layout(tokens: int) -> Tuple[int, int]:
    """(N_MAIN, N_TAIL): the rows of the single kernel's main and tail K/V tiles, powers of two.
    Up to 256 tokens one tile, the next power of two (at least 64), no tail; longer sequences the
    largest power of two <= tokens plus a tail of the next power of two >= the rest (at least 64),
    or none when tokens is a power of two. 257 -> (256, 64), 577 -> (512, 128), 512 -> (512, 0)."""
    if tokens <= MAX_N_PAD:
        return max(MIN_N_PAD, next_power_of_2(tokens)), 0
    main = 1 << (tokens.bit_length() - 1)
    rest = tokens - main
    return main, (max(MIN_N_PAD, next_power_of_2(rest)) if rest else 0)


def n_pad(tokens: int) -> int:
    """Rows of K (and of V) the single kernel holds on chip: N_MAIN + N_TAIL of :func:`kv_layout`."""
    return sum(kv_layout(tokens))


def kernel_config(tokens: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the single kernel for ``tokens``."""
    return LONG_KERNEL_CONFIG if tokens > MAX_N_PAD else SINGLE_KERNEL_CONFIG


def onchip_bytes(dtype: torch.dtype, tokens: int, head_dim: int) -> int:
    """Bytes of one head's K and V as the single kernel holds them: two n_pad x BLOCK_D tiles in
    x's dtype; fp32 counts twice, as its tf32x3 dots keep a high and a low TF32 part of each."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * n_pad(tokens) * attention.block_d(head_dim) * size * (2 if dtype == torch.float32 else 1)


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90). On CPU (the interpreter) sm_90's rule applies."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def single_kernel_fits(dtype: torch.dtype, tokens: int, head_dim: int, arch: int) -> bool:
    """Whether one head's K and V fit on chip for the single kernel on sm_<arch>."""
    smem = shared_per_block(arch)
    main, tail = kv_layout(tokens)
    bd = attention.block_d(head_dim)
    return (
        main <= MAX_N_MAIN
        and tail <= MAX_N_TAIL
        and main * bd * 4 <= MAX_TILE_ACC_BYTES
        and (tokens <= MAX_N_PAD or bd >= MIN_LONG_BLOCK_D)
        and onchip_bytes(dtype, tokens, head_dim) <= smem - SMEM_HEADROOM
        and arch not in SPILLING.get((dtype, bd, main, tail), ())
    )


def choose_path(x: Tensor, num_heads: int, head_dim: int) -> str:
    """The path taken when nothing was timed (tuning off or cache-only without an entry, no GPU,
    CPU tensors): always "split". The single kernel runs only when the caller asks for it
    (``path="single_kernel"``) or when a measurement on the device chose it
    (:mod:`vit_kernels.tuning` times both paths and keeps the faster).

    Why not the single kernel where it fits: a static read of its sm_90 code (issue 10) says it is
    latency-bound, and an H200 measured it so (2026-11-25, ViT-B/16 bf16 batch 256: 6.08 ms against
    0.91 ms for split and 0.56 ms for cuDNN SDPA; benchmarks/results/2026-11-25-h200). Each
    program owns one (batch, head) and walks 16-row query tiles with no software pipelining (num_stages=1), and it re-reads its
    image's x and recomputes the LayerNorm per head (about 7 reads of x per program, ~84 per ViT-B
    layer), so a ViT-B layer at batch 256 is estimated at 2-5 ms against ~0.5 ms for LayerNorm +
    cuBLAS QKV + SDPA. The split path (a tiled QKV GEMM writing (3, B, H, N, head_dim), then flash
    attention) reads x once and is estimated near parity with eager. The most the single kernel
    can save is the Q, K, V round trip (~0.14 ms per ViT-B layer), so only a measurement may pick
    it. Where it may run at all is :func:`single_kernel_fits` (for example fp16/bf16, head_dim 64:
    up to 768 tokens on sm_90, 512 on sm_80). x, num_heads and head_dim are kept so a rule per
    shape can come back once timings exist."""
    return "split"


def split_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    out: Tensor,
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    gemm_config: Optional[Tuple[int, ...]] = None,
    attention_config: Optional[Tuple[int, ...]] = None,
    tma_config: Optional[Tuple[int, ...]] = None,
    attention_tma_config: Optional[Tuple[int, ...]] = None,
    return_lse: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The split path into ``out`` (batch, tokens, inner): the QKV projection (the TMA GEMM with
    tma_config, else the pointer GEMM) into a (3, batch, heads, tokens, head_dim) buffer with q
    pre-scaled, then flash attention. Returns (qkv, lse); lse (batch, heads, tokens) with
    return_lse, else None. Used by :func:`qkv_attention_forward` and by the backward's forward
    (vit_kernels.autograd), which keeps qkv and lse."""
    B, N, _ = x.shape
    head_dim = qkv_weight.shape[0] // 3 // num_heads
    if tma_config is not None:  # the TMA GEMM (sm_90), else the pointer GEMM; the tuner's tile config either way
        from .gemm_tma import qkv_projection_forward as project

        tiles = dict(config=tma_config)
    else:
        from .gemm import qkv_projection_forward as project

        tiles = dict(gemm_config=gemm_config)
    qkv = project(
        x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
        **tiles,
    )  # fmt: skip
    # Q is already scaled: softmax(q' k^T) with scale 1.
    res = attention.flash_attention_forward(
        qkv[0],
        qkv[1],
        qkv[2],
        1.0,
        out=out.view(B, N, num_heads, head_dim).transpose(1, 2),
        return_lse=return_lse,
        attention_config=attention_config,
        attention_tma_config=attention_tma_config,
        qkv=qkv,
    )
    return qkv, (res[1] if return_lse else None)


def qkv_attention_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    path: Optional[str] = None,
    out: Optional[Tensor] = None,
    gemm_config: Optional[Tuple[int, ...]] = None,
    attention_config: Optional[Tuple[int, ...]] = None,
    tma_config: Optional[Tuple[int, ...]] = None,
    attention_tma_config: Optional[Tuple[int, ...]] = None,
) -> Tensor:
    """[LayerNorm ->] QKV projection -> attention, heads concatenated.

    x: (batch, tokens, dim), unit last-dim stride; qkv_weight: (3*inner, dim), rows [q; k; v], each
    head-major, unit last-dim stride; qkv_bias: (3*inner,) or None; norm_weight, norm_bias: (dim,)
    apply LayerNorm(x, eps) first (as x loads). scale: the softmax scale. path: "single_kernel",
    "split" or None (:func:`choose_path`). out: optional (batch, tokens, inner) output.
    gemm_config, attention_config: the split path's QKV GEMM and flash attention tiles (None: their
    defaults; the tuner passes alternatives). tma_config: the split path's QKV projection on sm_90's
    TMA GEMM (vit_kernels.triton.gemm_tma, float16/bfloat16; LayerNorm folded into the weight) with
    this config (gemm_tma.TmaConfig or its fields). attention_tma_config: the split path's attention on
    sm_90's tensor-descriptor kernel (vit_kernels.triton.attention_tma) with these tiles. Returns (batch, tokens, inner). qkv_bias, norm_weight,
    norm_bias: contiguous (the kernels read them with unit stride; vit_kernels.ops guarantees it,
    copying other layouts). The single kernel also needs x and qkv_weight in 16-byte row vectors
    (checks.vector_rows_layout; checked here).
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, tokens, dim), got shape {tuple(x.shape)}")
    checks.unit_stride_params(qkv_bias=qkv_bias, norm_weight=norm_weight, norm_bias=norm_bias)
    B, N, dim = x.shape
    inner = qkv_weight.shape[0] // 3
    if inner % num_heads != 0:
        raise ValueError(f"num_heads: inner dim {inner} is not divisible by num_heads={num_heads}")
    head_dim = inner // num_heads
    why = checks.head_dim_unsupported(head_dim, "triton")
    if why:
        raise ValueError(why)
    if path is None:
        path = choose_path(x, num_heads, head_dim)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    if out is None:
        out = empty((B, N, inner), x.dtype, x.device)
    elif out.shape != (B, N, inner) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out: expected a ({B}, {N}, {inner}) {x.dtype} tensor with unit last-dim stride, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )

    if tma_config is not None and path != "split":
        raise ValueError(f"tma_config: the TMA GEMM runs the split path's projection, got path={path!r}")
    if attention_tma_config is not None and path != "split":
        raise ValueError(f"attention_tma_config: the TMA attention runs the split path's, got path={path!r}")
    if path == "split":
        split_forward(
            x,
            qkv_weight,
            qkv_bias,
            out,
            num_heads=num_heads,
            scale=scale,
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            eps=eps,
            gemm_config=gemm_config,
            attention_config=attention_config,
            tma_config=tma_config,
            attention_tma_config=attention_tma_config,
        )
        return out

    arch = device_arch(x.device)
    if not single_kernel_fits(x.dtype, N, head_dim, arch):
        raise ValueError(
            f"path: 'single_kernel' cannot hold K and V of {N} tokens at head_dim {head_dim} in "
            f"{x.dtype} on chip on sm_{arch} ({onchip_bytes(x.dtype, N, head_dim)} bytes in tiles of "
            f"{kv_layout(N)} rows); use path='split' or None"
        )
    for name, t in (("x", x), ("qkv_weight", qkv_weight), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride in the last dim, got strides {t.stride()}")
        attention.check_aligned(name, t)
    if N == 0 or B == 0:
        return out
    BLOCK_M, BLOCK_K, num_warps, num_stages = kernel_config(N)
    n_main, n_tail = kv_layout(N)
    launch(
        _qkv_attn_kernel,
        (B * num_heads,),
        x,
        qkv_weight,
        qkv_bias if qkv_bias is not None else x,
        norm_weight if norm_weight is not None else x,
        norm_bias if norm_bias is not None else x,
        out,
        x.stride(0),
        x.stride(1),
        qkv_weight.stride(0),
        out.stride(0),
        out.stride(1),
        num_heads,
        N,
        dim,
        inner,
        float(eps),
        float(scale) * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=attention.block_d(head_dim),
        N_MAIN=n_main,
        N_TAIL=n_tail,
        BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K,
        HAS_NORM=norm_weight is not None,
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=qkv_bias is not None,
        INPUT_PRECISION=FP32_DOT_PRECISION,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def aot_spec(dtype: torch.dtype, head_dim: int, tokens: int, has_norm: bool = True, has_bias: bool = True) -> AotSpec:
    """The single kernel's launch for ``tokens`` (its kv_layout and kernel_config), recorded from
    :func:`qkv_attention_forward` at the representative batch and heads (aot.REPRESENTATIVE) with
    dim = heads * head_dim, so its specialization is the launch's."""
    B, H = REPRESENTATIVE["batch"], REPRESENTATIVE["heads"]
    dim = H * head_dim
    x = torch.empty(B, tokens, dim, dtype=dtype)
    w = torch.empty(3 * dim, dim, dtype=dtype)
    vec = torch.empty(3 * dim, dtype=dtype)
    ln = torch.empty(dim, dtype=dtype)
    BLOCK_M, BLOCK_K, _, _ = kernel_config(tokens)
    n_main, n_tail = kv_layout(tokens)
    label = (
        f"head_dim={head_dim},N_MAIN={n_main},N_TAIL={n_tail},BLOCK_M={BLOCK_M},BLOCK_K={BLOCK_K},"
        f"{dtype_name(dtype)},norm={int(has_norm)},bias={int(has_bias)}"
    )
    archs = tuple(a for a in (80, 90) if single_kernel_fits(dtype, tokens, head_dim, a))
    call = lambda: qkv_attention_forward(  # noqa: E731
        x,
        w,
        vec if has_bias else None,
        num_heads=H,
        scale=head_dim**-0.5,
        norm_weight=ln if has_norm else None,
        norm_bias=ln if has_norm else None,
        path="single_kernel",
    )
    return recorded_spec(
        "qkv_attention_single", _qkv_attn_kernel, call, label, True, archs, f"B={B},N={tokens},dim={dim},H={H}"
    )


# One token count per layout kv_layout gives, up to MAX_N_MAIN plus a tail of 256 rows; ViT token
# counts (cls + patches: 50, 101, 197, 257, 577) where one exists, so the specialization on N is a ViT's.
LAYOUT_TOKENS = (50, 101, 197, 257, 321, 385, 512, 513, 577, 641)


def aot_specs() -> List[AotSpec]:
    """Every configuration the single kernel launches: dtype x BLOCK_D bucket (its power-of-two
    head_dim, plus 80 for the masked case) x (N_MAIN, N_TAIL) layout, where single_kernel_fits,
    each with LayerNorm and bias (the variants without them only drop loads). The split path
    launches the GEMM (vit_kernels.triton.gemm.aot_specs) and the flash kernel (attention.aot_specs)."""
    specs = []
    for dtype in DTYPES:
        for hd in (16, 32, 64, 80, 128, 256):
            for tokens in LAYOUT_TOKENS:
                if any(single_kernel_fits(dtype, tokens, hd, a) for a in (80, 90)):
                    specs.append(aot_spec(dtype, hd, tokens))
    return specs
