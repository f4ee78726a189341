"""The eager oracle: plain-PyTorch versions of the three fused ops (and the output projection),
written for clarity, with the public signatures of :mod:`vit_kernels.ops`. Run in float64 they
are what every backend is checked against. No fused kernel, no SDPA, no shortcuts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """x: (..., dim) -> (..., dim), statistics over the last dim, biased variance."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU: exact x * Phi(x) with erf, or the tanh approximation."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
) -> Tensor:
    """x: (..., in), weight: (out, in) -> (..., out); then residual + layer_scale * that."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    if layer_scale is not None:
        y = y * layer_scale
    if residual is not None:
        y = residual + y
    return y


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """q, k, v: (batch, heads, tokens, head_dim) -> (batch, heads, tokens, head_dim).

    softmax(q k^T * scale) v, non-causal; scale defaults to head_dim ** -0.5.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-2, -1)) * scale
    p = torch.softmax(s, dim=-1)
    return p @ v


def qkv_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor] = None,
    *,
    num_heads: int,
    scale: Optional[float] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tensor:
    """x: (batch, tokens, dim); qkv_weight: (3*inner, dim), rows [q; k; v], head-major.

    Returns (batch, tokens, inner): attention output before the output projection, heads
    concatenated. With norm_weight given, LayerNorm(x) (weight, bias, eps) comes first.
    """
    B, N, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    if norm_weight is not None:
        x = layer_norm(x, norm_weight, norm_bias, eps)
    qkv = linear(x, qkv_weight, qkv_bias)  # (B, N, 3*inner)
    qkv = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    o = flash_attention(qkv[0], qkv[1], qkv[2], scale=scale)  # (B, H, N, hd)
    return o.transpose(1, 2).reshape(B, N, inner)


def layernorm_gelu_mlp(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
) -> Tensor:
    """x: (..., dim); fc1_weight: (hidden, dim); fc2_weight: (out, hidden) -> (..., out).

    fc2(gelu(fc1(LN(x)))); with residual: residual + layer_scale * that. norm_weight None
    skips the LayerNorm (as the op does).
    """
    h = layer_norm(x, norm_weight, norm_bias, eps) if norm_weight is not None else x
    h = gelu(linear(h, fc1_weight, fc1_bias), approximate)
    return linear(h, fc2_weight, fc2_bias, residual=residual, layer_scale=layer_scale)


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    patch_size: int,
    pos_embed: Optional[Tensor] = None,
    cls_token: Optional[Tensor] = None,
    image_mean=None,
    image_std=None,
) -> Tensor:
    """images: (batch, channels, H, W); weight: (dim, channels, p, p) (Conv2d layout).

    uint8 images become (x / 255 - image_mean[c]) / image_std[c] (sequences or (C,) tensors), computed
    at the weight's dtype (at least float32) and rounded to it.

    Returns (batch, prefix + (H/p)*(W/p), dim): patches flattened in (channel, row, col) order
    and projected, row-major over the patch grid; the class token in front when given.
    pos_embed: (1 or batch, prefix + num_patches, dim) or (prefix + num_patches, dim), added to
    all tokens (the class token gets pos_embed[0]).
    """
    B, C, H, W = images.shape
    if isinstance(images, Tensor) and images.dtype == torch.uint8:  # (torch.fx traces float images)
        work = torch.promote_types(weight.dtype, torch.float32)
        mean = torch.as_tensor(image_mean, dtype=work, device=images.device).view(1, C, 1, 1)
        std = torch.as_tensor(image_std, dtype=work, device=images.device).view(1, C, 1, 1)
        images = ((images.to(work) / 255 - mean) / std).to(weight.dtype)
    p = patch_size
    gh, gw = H // p, W // p
    patches = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    tokens = linear(patches, weight.reshape(weight.shape[0], -1), bias)
    if cls_token is not None:
        cls = cls_token.reshape(1, 1, -1).expand(B, 1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(-1, tokens.shape[1], tokens.shape[2])
    return tokens


# ---------------------------------------------------------------------------------------------
# Attention statistics (what vit_kernels.ops.attention_stats returns), from the full matrix.


def attention_probs(q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """q: (batch, heads, q_tokens, head_dim), k: (batch, heads, kv_tokens, head_dim)
    -> softmax(q k^T * scale) (batch, heads, q_tokens, kv_tokens), the full matrix."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


def patch_distances(grid: tuple, patch_size: float, dtype=torch.float64, device=None) -> Tensor:
    """(grid_h * grid_w, grid_h * grid_w) Euclidean distances in pixels between patch centres,
    patches in row-major order (as the patch embedding flattens them)."""
    gh, gw = grid
    idx = torch.arange(gh * gw, device=device)
    rc = torch.stack([idx // gw, idx % gw], dim=-1).to(dtype)
    return torch.cdist(rc, rc) * patch_size


def mean_attention_distance(
    q: Tensor, k: Tensor, *, grid: tuple, patch_size: float, prefix_tokens: int = 1, scale: Optional[float] = None
) -> Tensor:
    """The ViT paper's mean attention distance per head: (batch, heads).

    For each query patch i: sum over key patches j of p_ij * distance(i, j) in pixels, with p the
    softmax over all tokens; then the mean over the query patches. The prefix tokens (class token,
    registers: the first ``prefix_tokens``) are left out as queries and as keys, without
    renormalising (as the paper's figure and vit-keras compute it).
    q, k: (batch, heads, prefix_tokens + grid_h * grid_w, head_dim).
    """
    p = attention_probs(q, k, scale=scale)[..., prefix_tokens:, prefix_tokens:]
    d = patch_distances(grid, patch_size, p.dtype, p.device)
    return (p * d).sum(-1).mean(-1)
