"""Attention statistics from the flash kernel's row log-sum-exp, in Triton, and their launchers.

The flash kernel (:mod:`vit_kernels.triton.attention`) keeps each query row's log-sum-exp
``lse_i = log sum_j exp(s_ij)`` of the scaled scores ``s = scale * q k^T``. Any probability is then
``p_ij = exp(s_ij - lse_i)``, exact, without a second softmax pass. Two kernels use that:

- ``_attn_probs_kernel`` writes the probabilities of chosen query rows (gathered by index):
  (batch, heads, rows, kv_tokens). With every row it writes the full weights P (HF's
  ``output_attentions``); with the class-token row only, one row per head.
- ``_attn_distance_kernel`` computes the ViT paper's mean attention distance: for every query patch
  i, sum_j p_ij * |pos_i - pos_j| (pixels, patch centres on the grid; prefix tokens left out as
  keys), one float per query row; the host averages over the patches. The tokens x tokens matrix is
  never written.

Both stream the keys in BLOCK_N tiles like the flash kernel and reuse its tile configuration and
dot precision (tf32x3 for fp32).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import checks
from . import FP32_DOT_PRECISION, attention
from .attention import LOG2E
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec

if TYPE_CHECKING:  # the result type lives with the op (vit_kernels.ops.attention_stats)
    from ..ops.attention_stats import AttentionStats


@triton.jit
def _attn_probs_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    p_ptr,
    rows_ptr,  # q_ptr: (B, H, NQ, D); k_ptr: (B, H, NKV, D); lse_ptr: (B, H, NQ) fp32;
    # p_ptr: (B, H, R, NKV); rows_ptr: (R,) int32 query row of each p row
    stride_qb,
    stride_qh,
    stride_qn,  # strides in elements; the last dim of q_ptr, k_ptr has stride 1
    stride_kb,
    stride_kh,
    stride_kn,
    stride_pb,
    stride_ph,
    stride_pr,  # p's last dim has stride 1
    H,
    NQ,
    R,
    NKV,
    qk_scale,  # scale * log2(e), fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of p
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < R
    mask_d = offs_d < HEAD_DIM
    qrow = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)  # query row of each p row

    # q and k were checked by the flash launcher: 16-byte aligned, strides multiples of 8 elements.
    q_base = tl.multiple_of(q_ptr + b * stride_qb + h * stride_qh, 16)
    q = tl.load(
        q_base + tl.multiple_of(qrow * stride_qn, 8)[:, None] + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * NQ + qrow, mask=mask_r, other=0.0) * LOG2E
    k_base = tl.multiple_of(k_ptr + b * stride_kb + h * stride_kh, 16)
    p_base = p_ptr + b * stride_pb + h * stride_ph + offs_r.to(tl.int64)[:, None] * stride_pr
    for start_n in range(0, NKV, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NKV
        k = tl.load(
            k_base + tl.multiple_of(cols.to(tl.int64) * stride_kn, 8)[:, None] + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        tl.store(p_base + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


@triton.jit
def _attn_distance_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    dist_ptr,  # q_ptr: (B, H, N, D); k_ptr: (B, H, N, D); lse_ptr: (B, H, N) fp32;
    # dist_ptr: (B, H, N - PREFIX) fp32, per query patch
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    N,
    PREFIX,
    GRID_W,  # tokens, prefix tokens, patches per grid row
    qk_scale,  # scale * log2(e), fp32
    patch_size,  # pixels per patch, fp32
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    NP = N - PREFIX

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query patch index
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NP
    mask_d = offs_d < HEAD_DIM
    qrow = (PREFIX + offs_m).to(tl.int64)
    q_base = tl.multiple_of(q_ptr + b * stride_qb + h * stride_qh, 16)
    q = tl.load(
        q_base + tl.multiple_of(qrow * stride_qn, 8)[:, None] + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + qrow, mask=mask_m, other=0.0) * LOG2E
    qr = (offs_m // GRID_W).to(tl.float32)
    qc = (offs_m % GRID_W).to(tl.float32)

    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = tl.multiple_of(k_ptr + b * stride_kb + h * stride_kh, 16)
    for start_n in range(0, NP, BLOCK_N):
        kp = start_n + offs_n  # key patch index
        mask_n = kp < NP
        k = tl.load(
            k_base + tl.multiple_of((PREFIX + kp).to(tl.int64) * stride_kn, 8)[:, None] + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        dr = qr[:, None] - (kp // GRID_W).to(tl.float32)[None, :]
        dc = qc[:, None] - (kp % GRID_W).to(tl.float32)[None, :]
        dist = tl.sqrt(dr * dr + dc * dc) * patch_size
        acc += tl.sum(tl.where(mask_n[None, :], p * dist, 0.0), axis=1)
    tl.store(dist_ptr + pid_bh.to(tl.int64) * NP + offs_m, acc, mask=mask_m)


def _tiles(dtype: torch.dtype, head_dim: int) -> Tuple[int, int, int, int]:
    """The flash kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) for these inputs, except fp32 at
    BLOCK_D 256: key tiles of 32 (the flash kernel's 16x16 spilled 8-16 bytes here as launched, sm_80
    probs and sm_90 distance; 16x32 with 8 warps and 2 stages compiles without spills on both)."""
    BLOCK_M, BLOCK_N, num_warps, num_stages = attention.kernel_config(dtype, head_dim)
    if dtype == torch.float32 and attention.block_d(head_dim) == 256:
        BLOCK_M, BLOCK_N, num_warps, num_stages = 16, 32, 8, 2
    return BLOCK_M, BLOCK_N, num_warps, num_stages


def attention_probs_forward(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    scale: float,
    rows: Optional[Sequence[int]] = None,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """p_ij = exp(scale * q_i . k_j - lse_i) for the query rows ``rows`` (None: every row).

    q: (batch, heads, q_tokens, head_dim); k: (batch, heads, kv_tokens, head_dim), unit last-dim
    stride; lse: (batch, heads, q_tokens) float32 contiguous, the row log-sum-exp of scale * q k^T
    (``flash_attention_forward(..., return_lse=True)``). out: optional (batch, heads, rows,
    kv_tokens) tensor of q's dtype, contiguous in its last dim.
    Returns (batch, heads, len(rows), kv_tokens) in q's dtype.
    """
    _check_qk(q, k)
    B, H, NQ, D = q.shape
    NKV = k.shape[2]
    _check_lse(lse, (B, H, NQ), q.device)
    rows_t = (
        torch.arange(NQ, dtype=torch.int32, device=q.device)
        if rows is None
        else torch.tensor(list(rows), dtype=torch.int32, device=q.device)
    )
    R = rows_t.numel()
    if out is None:
        out = torch.empty((B, H, R, NKV), dtype=q.dtype, device=q.device)
    elif out.shape != (B, H, R, NKV) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out: expected a ({B}, {H}, {R}, {NKV}) {q.dtype} tensor with unit last-dim stride, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if out.numel() == 0:
        return out
    BLOCK_M, BLOCK_N, num_warps, num_stages = _tiles(q.dtype, D)
    _attn_probs_kernel[(B * H, triton.cdiv(R, BLOCK_M))](
        q,
        k,
        lse,
        out,
        rows_t,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        NQ,
        R,
        NKV,
        float(scale) * LOG2E.value,
        HEAD_DIM=D,
        BLOCK_D=attention.block_d(D),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        INPUT_PRECISION=FP32_DOT_PRECISION,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def mean_attention_distance_forward(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    scale: float,
    *,
    grid: Tuple[int, int],
    patch_size: float,
    prefix_tokens: int,
    per_patch: Optional[Tensor] = None,
) -> Tensor:
    """The mean attention distance per head, (batch, heads) float32, in pixels.

    q, k: (batch, heads, prefix_tokens + grid_h * grid_w, head_dim), unit last-dim stride; lse:
    (batch, heads, tokens) float32 contiguous (see :func:`attention_probs_forward`).
    per_patch: optional contiguous float32 (batch, heads, grid_h * grid_w) buffer that receives each
    query patch's distance (the kernel's output, averaged here).
    """
    _check_qk(q, k)
    B, H, N, D = q.shape
    _check_lse(lse, (B, H, N), q.device)
    gh, gw = grid
    NP = gh * gw
    if N != prefix_tokens + NP or k.shape[2] != N:
        raise ValueError(
            f"grid: expected {prefix_tokens + NP} tokens ({prefix_tokens} prefix + {gh}x{gw} patches), "
            f"got {N} queries and {k.shape[2]} keys"
        )
    dist = per_patch
    if dist is None:
        dist = torch.empty((B, H, NP), dtype=torch.float32, device=q.device)
    elif dist.shape != (B, H, NP) or dist.dtype != torch.float32 or not dist.is_contiguous():
        raise ValueError(
            f"per_patch: expected a contiguous float32 ({B}, {H}, {NP}) tensor, got {tuple(dist.shape)} {dist.dtype}"
        )
    if dist.numel() > 0:
        BLOCK_M, BLOCK_N, num_warps, num_stages = _tiles(q.dtype, D)
        _attn_distance_kernel[(B * H, triton.cdiv(NP, BLOCK_M))](
            q,
            k,
            lse,
            dist,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            H,
            N,
            prefix_tokens,
            gw,
            float(scale) * LOG2E.value,
            float(patch_size),
            HEAD_DIM=D,
            BLOCK_D=attention.block_d(D),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            INPUT_PRECISION=FP32_DOT_PRECISION,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return dist.mean(-1)


def _check_qk(q: Tensor, k: Tensor) -> None:
    """The flash launcher's checks: 4-D, one dtype and device, unit last stride, 16-byte aligned rows
    (the kernels' multiple_of hints rely on them), matching batch, heads and head_dim."""
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (batch, heads, tokens, head_dim), got shape {tuple(q.shape)}")
    why = checks.head_dim_unsupported(q.shape[-1], "triton")
    if why:
        raise ValueError(why)
    attention._check_operand("q", q, q)
    attention._check_operand("k", k, q)
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k: expected shape ({q.shape[0]}, {q.shape[1]}, kv_tokens, {q.shape[3]}), got {tuple(k.shape)}"
        )


def _check_lse(lse: Tensor, shape: tuple, device) -> None:
    if lse.shape != shape or lse.dtype != torch.float32 or not lse.is_contiguous() or lse.device != device:
        raise ValueError(
            f"lse: expected a contiguous float32 {shape} tensor on {device}, got {tuple(lse.shape)} "
            f"{lse.dtype} on {lse.device}"
        )


def attention_stats(q: Tensor, k: Tensor, lse: Tensor, scale: float, request, rows) -> AttentionStats:
    """Every statistic ``request`` (vit_kernels.ops.StatsRequest, checked) asks for, from q, k and lse.
    rows: the checked query rows (None for none)."""
    from ..ops.attention_stats import AttentionStats

    st = AttentionStats()
    if rows is not None:
        st.rows = attention_probs_forward(q, k, lse, scale, rows)
    if request.grid is not None:
        st.distance = mean_attention_distance_forward(
            q,
            k,
            lse,
            scale,
            grid=tuple(request.grid),
            patch_size=request.patch_size,
            prefix_tokens=request.prefix_tokens,
        )
    if request.weights:
        st.weights = attention_probs_forward(q, k, lse, scale)
    return st


def flash_attention_with_stats(q: Tensor, k: Tensor, v: Tensor, scale: float, request, rows):
    """flash_attention_forward keeping the LSE, then the statistics: (out, AttentionStats)."""
    out, lse = attention.flash_attention_forward(q, k, v, scale, return_lse=True)
    return out, attention_stats(q, k, lse, scale, request, rows)


def qkv_attention_with_stats(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    *,
    num_heads: int,
    scale: float,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    request,
    rows,
):
    """The split path of qkv_attention (QKV GEMM with a head-split epilogue, then flash attention
    keeping the LSE), then the statistics from its Q (pre-scaled) and K: (out, AttentionStats).
    x: (batch, tokens, dim) -> out (batch, tokens, inner)."""
    from .gemm import qkv_projection_forward

    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    qkv = qkv_projection_forward(
        x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
    )
    out = torch.empty((B, N, inner), dtype=x.dtype, device=x.device)
    _, lse = attention.flash_attention_forward(
        qkv[0], qkv[1], qkv[2], 1.0, return_lse=True, out=out.view(B, N, num_heads, hd).transpose(1, 2)
    )
    return out, attention_stats(qkv[0], qkv[1], lse, 1.0, request, rows)


def aot_requests(tokens: int) -> list:
    """(kernel, label, StatsRequest) of each statistic aot_specs() compiles, at ``tokens`` tokens of a
    ViT (one class token in front of a square patch grid): the class-token row (R = 1, which Triton
    makes a constant), every row (HF's weights: R = tokens, the general case) and the mean attention
    distance on the grid."""
    from ..ops.attention_stats import StatsRequest

    side = math.isqrt(tokens - 1)
    return [
        ("attention_probs", "rows=cls", StatsRequest(rows=(0,))),
        ("attention_probs", "weights", StatsRequest(rows=None, weights=True)),
        (
            "attention_distance",
            f"distance,grid={side}x{side}",
            StatsRequest(rows=None, grid=(side, side), patch_size=16.0, prefix_tokens=tokens - side * side),
        ),
    ]


def aot_spec(kernel: str, dtype: torch.dtype, head_dim: int, variant: str, request) -> AotSpec:
    """The launch of ``kernel`` ("attention_probs" or "attention_distance") that
    flash_attention_with_stats makes for ``request`` (a StatsRequest asking for that one statistic),
    recorded on empty CPU q, k, v (views of one (3, B, H, N, head_dim) buffer, as the split
    qkv_attention path gives them) at aot.REPRESENTATIVE's batch, heads and tokens, so its
    specialization is the launch's. The flash launch before it is attention.aot_specs'."""
    from ..ops.attention_stats import check_request

    B, H, N = REPRESENTATIVE["batch"], REPRESENTATIVE["heads"], REPRESENTATIVE["tokens"]
    qkv = torch.empty(3, B, H, N, head_dim, dtype=dtype)
    rows = check_request(request, N, N)
    BLOCK_M, BLOCK_N, _, _ = _tiles(dtype, head_dim)
    label = (
        f"head_dim={head_dim},BLOCK_D={attention.block_d(head_dim)},BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},"
        f"{dtype_name(dtype)},{variant}"
    )
    fn = _attn_probs_kernel if kernel == "attention_probs" else _attn_distance_kernel
    call = lambda: flash_attention_with_stats(qkv[0], qkv[1], qkv[2], head_dim**-0.5, request, rows)  # noqa: E731
    return recorded_spec(kernel, fn, call, label, True, shape=f"B={B},H={H},N={N},head_dim={head_dim},{variant}")


def aot_specs() -> List[AotSpec]:
    """Both kernels for every dtype and the flash kernel's head dims (the same tile configurations),
    for each statistic of aot_requests (class-token row, every row, distance)."""
    requests = aot_requests(REPRESENTATIVE["tokens"])
    return [
        aot_spec(kernel, dtype, hd, variant, request)
        for dtype in attention.DTYPES
        for hd in attention.AOT_HEAD_DIMS
        for kernel, variant, request in requests
    ]
