"""The reference ViT and its named configs."""

from .vit import Block, VisionTransformer, create_model, model_names, resample_pos_embed

__all__ = ["VisionTransformer", "Block", "create_model", "model_names", "resample_pos_embed"]
