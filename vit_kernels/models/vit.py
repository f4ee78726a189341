"""The reference ViT of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021).

Patch embedding (Conv2d-layout weight), learnable class token, learnable 1-D position
embedding, pre-norm encoder blocks (LN -> MHSA -> residual; LN -> GELU MLP -> residual), final
LN, classification head; pooling "cls" or "mean"; optional qkv bias, LayerScale and register
tokens. The three heavy parts are separate modules (:mod:`vit_kernels.nn`), so a backend can
replace each one; ``backend`` sets them all (``set_backend`` changes it later).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import library
from ..nn import FusedAttention, FusedMlp, FusedPatchEmbed, set_backend
from .registry import SIZES, preset


class Block(nn.Module):
    """One pre-norm encoder block: x + attn(LN(x)), then + mlp(LN(.)). x: (batch, tokens, dim)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        init_values: Optional[float] = None,
        approximate: str = "none",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.attn = FusedAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            eps=eps,
            init_values=init_values,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=backend,
        )
        self.mlp = FusedMlp(
            dim,
            int(dim * mlp_ratio),
            eps=eps,
            approximate=approximate,
            init_values=init_values,
            drop=proj_drop,
            backend=backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


class VisionTransformer(nn.Module):
    """ViT. images: (batch, in_chans, H, W) -> logits (batch, num_classes).

    pool: "cls" (class token) or "mean" (mean of the patch tokens). reg_tokens: register tokens
    inserted after the class token, without position embedding. dynamic_img_size: accept other
    image sizes by resampling the position embedding (bicubic); otherwise another size is an
    error. num_classes=0 makes the head an identity (features).
    image_mean, image_std: the data config (in_chans values each; default 0.5 and 0.5, the original
    ViT's inputs scaled to [-1, 1], as timm's ``vit_*_augreg`` configs). uint8 images (NCHW, or NHWC
    data as channels_last) are normalized with them inside the patch-embedding kernel; float images
    are taken as normalized already.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        pool: str = "cls",
        reg_tokens: int = 0,
        init_values: Optional[float] = None,
        eps: float = 1e-6,
        approximate: str = "none",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dynamic_img_size: bool = False,
        backend: str = "auto",
        image_mean: Optional[Tuple[float, ...]] = None,
        image_std: Optional[Tuple[float, ...]] = None,
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
        if pool == "cls" and not class_token:
            raise ValueError("pool: 'cls' needs class_token=True; use pool='mean' without a class token")
        if img_size % patch_size:
            raise ValueError(f"img_size: expected a multiple of patch_size={patch_size}, got {img_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.pool = pool
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.grid = img_size // patch_size
        self.patch_embed = FusedPatchEmbed(
            patch_size,
            in_chans,
            embed_dim,
            backend=backend,
            image_mean=image_mean or (0.5,) * in_chans,
            image_std=image_std or (0.5,) * in_chans,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = self.grid * self.grid + (1 if class_token else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    eps,
                    init_values,
                    approximate,
                    attn_drop_rate,
                    drop_rate,
                    backend,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_backend(self, backend: str) -> "VisionTransformer":
        return set_backend(self, backend)

    def pos_embed_for(self, H: int, W: int) -> Tensor:
        """The position embedding for an H x W input: (1, prefix + (H/p)*(W/p), dim).

        Another size (dynamic_img_size) resamples it (bicubic, antialiased as timm does) on every
        call, as timm does: never stale, whatever wrote pos_embed (a cache keyed on its version
        counter would miss writes through ``.data``).
        """
        p = self.patch_size
        if (H, W) == (self.img_size, self.img_size):
            return self.pos_embed
        if not self.dynamic_img_size:
            raise ValueError(
                f"images: expected {self.img_size}x{self.img_size}, got {H}x{W}; build the "
                f"model with dynamic_img_size=True to resample the position embedding"
            )
        if H % p or W % p:
            raise ValueError(f"images: expected a size that is a multiple of patch_size={p}, got {H}x{W}")
        grid, prefix = (H // p, W // p), 1 if self.cls_token is not None else 0
        return resample_pos_embed(self.pos_embed, grid, (self.grid, self.grid), prefix)

    def forward_features(self, images: Tensor) -> Tensor:
        """images: (batch, in_chans, H, W), float (normalized) or uint8 (normalized on load with
        ``patch_embed.image_mean`` / ``image_std``) -> tokens after the final LayerNorm (batch, tokens, dim)."""
        if library.symbolic(images):  # torch.fx: sizes unknown; the ops check them when the graph runs
            if self.dynamic_img_size:
                raise ValueError(
                    "dynamic_img_size: True cannot be traced by torch.fx (the position embedding "
                    "is resampled per input size); use torch.compile or torch.export"
                )
            pos = self.pos_embed
        else:
            if images.dim() != 4:
                raise ValueError(f"images: expected (batch, channels, H, W), got shape {tuple(images.shape)}")
            pos = self.pos_embed_for(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images, pos_embed=pos, cls_token=self.cls_token)
        if self.reg_token is not None:
            n_cls = 1 if self.cls_token is not None else 0
            reg = self.reg_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :n_cls], reg, x[:, n_cls:]], dim=1)
        x = self.pos_drop(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """tokens (batch, tokens, dim) -> logits (batch, num_classes)."""
        x = x[:, 0] if self.pool == "cls" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))


def resample_pos_embed(
    pos_embed: Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Resample a (1, prefix + gh*gw, dim) position embedding to another patch grid (bicubic,
    antialiased when it shrinks, as timm's resample_abs_pos_embed), as the ViT paper does to
    fine-tune at a higher resolution. Prefix rows are kept as they are.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


# The sizes (name -> (embed_dim, depth, num_heads, mlp_dim)) and the name parser: vit_kernels.models.registry.
PATCHES = (14, 16, 32)


def model_names():
    """Every named config: vit_{tiny,small,base,large,huge}_patch{14,16,32}_224."""
    return [f"vit_{s}_patch{p}_224" for s in SIZES for p in PATCHES]


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a named config, e.g. ``create_model("vit_base_patch16_224", num_classes=10)``.

    Names: vit_{tiny,small,base,large,huge}_patch{14,16,32}_{img_size}; any constructor
    argument can be overridden.
    """
    (dim, depth, heads, mlp), patch, img = preset(name, argument="name")
    cfg = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp / dim)
    cfg.update(overrides)
    return VisionTransformer(**cfg)
