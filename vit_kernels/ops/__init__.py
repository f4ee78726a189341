"""The fused ops: input checks, backend dispatch and the plain PyTorch path, one file per op."""

from .attention_stats import AttentionStats, StatsRequest
from .flash_attention import flash_attention
from .linear import linear
from .mlp import layernorm_gelu_mlp
from .patch_embed import patch_embed
from .qkv_attention import qkv_attention

__all__ = [
    "flash_attention",
    "qkv_attention",
    "layernorm_gelu_mlp",
    "patch_embed",
    "linear",
    "StatsRequest",
    "AttentionStats",
]
