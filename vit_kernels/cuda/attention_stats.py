"""The csrc attention statistics (csrc/attention/stats.{h,cu}) as Python functions: what the cuda
branches of the stats requests in :mod:`vit_kernels.ops` call. The flash kernel keeps the row
log-sum-exp; these kernels recompute p = exp(scale * q . k - lse) from it (CUDA cores, fp32)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import module_for
from . import ops as cuda_ops


def attention_probs_forward(
    q: Tensor, k: Tensor, lse: Tensor, scale: float, rows: Optional[Sequence[int]] = None
) -> Tensor:
    """(batch, heads, len(rows), kv_tokens) in q's dtype; rows None: every query row (full weights).
    q: (batch, heads, q_tokens, head_dim); k: (batch, heads, kv_tokens, head_dim); lse: (batch,
    heads, q_tokens) float32 contiguous."""
    B, H, N, _ = q.shape
    rows_t = (
        torch.arange(N, dtype=torch.int32, device=q.device)
        if rows is None
        else torch.tensor(list(rows), dtype=torch.int32, device=q.device)
    )
    out = torch.empty((B, H, rows_t.numel(), k.shape[2]), dtype=q.dtype, device=q.device)
    module_for(q.device).attention_probs(q, k, lse, rows_t, out, float(scale))
    return out


def mean_attention_distance_forward(
    q: Tensor, k: Tensor, lse: Tensor, scale: float, *, grid, patch_size: float, prefix_tokens: int
) -> Tensor:
    """(batch, heads) float32: the mean over query patches of sum_j p_ij * distance (pixels)."""
    B, H, N, _ = q.shape
    gh, gw = grid
    if N != prefix_tokens + gh * gw:
        raise ValueError(f"grid: expected {prefix_tokens + gh * gw} tokens, got {N}")
    per_patch = torch.empty((B, H, gh * gw), dtype=torch.float32, device=q.device)
    module_for(q.device).attention_distance(
        q, k, lse, per_patch, int(prefix_tokens), int(gw), float(scale), float(patch_size)
    )
    return per_patch.mean(-1)


def attention_stats(q: Tensor, k: Tensor, lse: Tensor, scale: float, request, rows):
    """Every statistic of ``request`` (checked) from q, k and lse: an AttentionStats."""
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
    """The flash kernel keeping the LSE, then the statistics: (out, AttentionStats)."""
    out, lse = cuda_ops.flash_attention_forward(q, k, v, scale, return_lse=True)
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
    """The split path (QKV GEMM with head split, Q pre-scaled; flash attention keeping the LSE), then
    the statistics from its Q and K: (out (batch, tokens, inner), AttentionStats)."""
    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    qkv = cuda_ops.qkv_projection_forward(
        x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
    )
    out = torch.empty((B, N, inner), dtype=x.dtype, device=x.device)
    _, lse = cuda_ops.flash_attention_forward(
        qkv[0], qkv[1], qkv[2], 1.0, out=out.view(B, N, num_heads, hd).transpose(1, 2), return_lse=True
    )
    return out, attention_stats(qkv[0], qkv[1], lse, 1.0, request, rows)
