"""The csrc (CUDA C++) kernels as Python functions: what the ``cuda`` branches of
:mod:`vit_kernels.ops` call.

Each function allocates its outputs, takes the build for the tensors' device (the GPU build for CUDA
tensors, the host emulator for CPU tensors; see :mod:`vit_kernels.cuda`) and calls one binding of
``csrc/bindings.cpp``. The public ops have already checked the arguments; the bindings check again
(naming the argument) before any launch. Forward only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import module_for

# Tests set this (monkeypatch) so that every output starts as NaN and an element a kernel fails to
# write shows up as an error.
_poison = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------- attention
# The largest head dim of VK_ATTN_HEAD_DIMS in csrc/attention/flash_fwd.h (the kernel is compiled
# for 32, 64, 72, 80, 96, 128; any multiple of 8 up to the largest runs in the next compiled one,
# the extra columns masked). tests/test_cuda_attention.py checks that this agrees with the build.
MAX_HEAD_DIM = 128


def attention_unsupported(head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA attention kernel runs this head dim and dtype, else why not."""
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        return (f"head_dim={head_dim} is not supported by the CUDA attention kernel (expected a multiple of 8 "
                f"from 8 to {MAX_HEAD_DIM})")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported by the CUDA attention kernel (float16, bfloat16, float32)"
    return None


def attention_amax(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """For float32 inputs: (3,) float32 on the inputs' device, max |q|, max |k|, max |v|; else None.

    The kernel computes float32 attention with fp16 hi/lo pairs on tensor cores and scales each
    tensor by a power of two chosen from these maxima first (see csrc/attention/flash_fwd.cuh).
    Costs one extra read of q, k and v (no host synchronisation, no copies).
    """
    if q.dtype != torch.float32:
        return None
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros(3, dtype=torch.float32, device=q.device)
    inf = float("inf")
    return torch.stack([torch.linalg.vector_norm(t, inf) for t in (q, k, v)])


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, *, out: Optional[Tensor] = None,
                            lse: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The attention kernel's launcher: softmax(scale * q k^T) v, non-causal, forward only.

    q: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim); any strides,
    read in place (no copies); float16, bfloat16 or float32 (all the same); head_dim a multiple of 8
    up to MAX_HEAD_DIM.
    out: None (a new (batch, heads, q_tokens, head_dim) tensor) or a tensor of that shape with any
    strides, written in place: pass ``o.view(B, N, H, hd).transpose(1, 2)`` of an o of shape
    (batch, q_tokens, heads * head_dim) to get the heads concatenated directly.
    lse: None (not computed) or a contiguous float32 (batch, heads, q_tokens) tensor that receives
    each row's log-sum-exp of the scaled scores (natural log).
    Returns (out, lse).
    """
    B, H, N, D = q.shape
    if out is None:
        out = _empty((B, H, N, D), q.dtype, q.device)
    module_for(q.device).flash_attention_forward(q, k, v, out, lse, attention_amax(q, k, v), float(scale))
    return out, lse


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim)
    -> (batch, heads, q_tokens, head_dim). See :func:`flash_attention_forward`."""
    return flash_attention_forward(q, k, v, scale)[0]


def qkv_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor] = None, *, num_heads: int,
                  scale: float, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                  eps: float = 1e-6) -> Tensor:
    """[LayerNorm ->] QKV projection -> attention, the split path: two kernels.

    x: (batch, tokens, dim); qkv_weight: (3*inner, dim); qkv_bias: (3*inner,); norm_weight,
    norm_bias: (dim,). Returns (batch, tokens, inner).
    1. :func:`qkv_projection` (the GEMM with LayerNorm applied as x loads and a head-split
       epilogue) writes (3, batch, heads, tokens, head_dim) with Q already multiplied by scale;
    2. the attention kernel reads Q, K, V straight from that buffer (scale 1) and writes the heads
       concatenated, (batch, tokens, heads * head_dim), with no transpose or copy in between.
    """
    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    qkv = qkv_projection(x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight,
                         norm_bias=norm_bias, eps=eps)
    out = _empty((B, N, inner), x.dtype, x.device)
    flash_attention_forward(qkv[0], qkv[1], qkv[2], 1.0, out=out.view(B, N, num_heads, hd).transpose(1, 2))
    return out
