"""transformers' attention interface served by the vit_kernels attention op.

:func:`register` adds ``"vit_kernels"`` to transformers' ``AttentionInterface``, so an HF ViT built
with ``attn_implementation="vit_kernels"`` (or switched with ``model.set_attn_implementation``)
runs its attention core through :func:`vit_kernels.ops.flash_attention`. With
``output_attentions=True`` the weights come from the P-from-LSE kernel
(:mod:`vit_kernels.triton.attention_stats`): exp(S - LSE) from the flash kernel's own row
statistics, not from a fallback to eager attention. What the fused op cannot serve (an attention
mask, attention dropout in training) is refused with an error, never run another way in silence.

This fuses only the attention core (q, k, v -> o); :func:`vit_kernels.fuse` stays the way to fuse
whole layers (LayerNorm + QKV projection + attention, the MLP).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .backends import check_backend
from .ops.attention_stats import StatsRequest

NAME = "vit_kernels"
_WEIGHTS = StatsRequest(rows=None, weights=True)


def _attentions_requested(module, kwargs) -> bool:
    """Whether this forward must return attention weights: ``output_attentions`` passed down as a
    keyword, or set on the config, or asked for through transformers' output collector (5.x)."""
    if kwargs.get("output_attentions"):
        return True
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers 4.x passes output_attentions down as a keyword
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def make_attention(backend: str = "auto"):
    """The attention function transformers calls: (module, query, key, value, attention_mask,
    scaling, dropout, **kwargs) -> (attn_output (batch, tokens, heads, head_dim), attn_weights
    (batch, heads, tokens, tokens) or None). query, key, value: (batch, heads, tokens, head_dim)."""
    check_backend(backend)

    def vit_kernels_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        if attention_mask is not None:
            raise ValueError(
                f"attention_mask: the {NAME} attention takes no mask (ViT attends to every "
                f"token), got a tensor of shape {tuple(attention_mask.shape)}"
            )
        if dropout and module.training:
            raise ValueError(
                f"dropout: the {NAME} attention has no attention dropout, got p={dropout} in "
                f"training mode; call model.eval() or set attention_probs_dropout_prob=0"
            )
        if _attentions_requested(module, kwargs):
            out, st = ops.flash_attention(query, key, value, scale=scaling, backend=backend, stats=_WEIGHTS)
            weights = st.weights
        else:
            out, weights = ops.flash_attention(query, key, value, scale=scaling, backend=backend), None
        return out.transpose(1, 2), weights

    return vit_kernels_attention


def register(backend: str = "auto", name: str = NAME) -> str:
    """Register the vit_kernels attention with transformers' AttentionInterface under ``name``
    (registering again replaces it, e.g. with another backend). Returns the name to pass as
    ``attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, make_attention(backend))
    return name
