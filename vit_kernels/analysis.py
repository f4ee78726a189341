"""What ViT users look at, read out of the fused kernels: attention maps over the image, attention
rollout, and the ViT paper's mean attention distance per head and layer.

Every function runs the model once under :func:`vit_kernels.ops.attention_stats.recording`, so each
attention op call of a fused model (vit_kernels' reference ViT, or a timm / torchvision / HF /
vit-pytorch model after :func:`vit_kernels.fuse`) returns its statistics beside its output: on the
triton backend from the flash kernel's row log-sum-exp (the tokens x tokens matrix is written only
for rollout, which needs it). A layer that did not run a vit_kernels attention op (not fused, or
running its original modules) is an error that says so, never a silent gap.

Shapes: images (batch, channels, H, W); maps (layers, batch, [heads,] grid_h, grid_w);
distances (layers, heads) in pixels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.attention_stats import AttentionStats, StatsRequest, recording

# The normalisation applied to images read from files (ImageNet's, as timm and torchvision use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """img_size: input side in pixels ((height, width) for a non-square input); patch_size: pixels per
    patch; grid: (grid_h, grid_w); prefix_tokens: class token + registers (or DeiT's distillation
    token) in front of the patches; depth: attention layers; class_token: whether token 0 is a class
    token (False: the prefix, if any, is registers only)."""

    img_size: Union[int, Tuple[int, int]]
    patch_size: int
    grid: Tuple[int, int]
    prefix_tokens: int
    depth: int
    class_token: bool = True


def geometry(model: nn.Module, img_size: Union[int, Sequence[int], None] = None) -> Geometry:
    """Image size, patch size, prefix tokens and depth read from a ViT of a known family. img_size: the
    input's side or (height, width) (default: the model's image size)."""
    if isinstance(img_size, (tuple, list, torch.Size)):
        h, w = (int(v) for v in img_size)
    else:
        h, w = (img_size, img_size) if img_size else _image_size(model)
    cfg = getattr(model, "config", None)
    cls = True  # every family but timm's, vit-pytorch's and the reference ViT's always has one
    if cfg is not None and hasattr(cfg, "patch_size"):  # transformers
        # DeiT's embeddings put a distillation token after the class token
        distill = any(isinstance(getattr(m, "distillation_token", None), Tensor) for m in model.modules())
        p, prefix, depth = cfg.patch_size, 1 + int(distill), cfg.num_hidden_layers
    elif hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # timm, vit_kernels
        pe = model.patch_embed
        p = pe.patch_size
        prefix, depth = model.num_prefix_tokens, len(model.blocks)
        cls = getattr(model, "cls_token", None) is not None
    elif hasattr(model, "conv_proj") and hasattr(model, "encoder"):  # torchvision
        p, prefix, depth = model.patch_size, 1, len(model.encoder.layers)
    elif hasattr(model, "to_patch_embedding"):  # vit-pytorch
        p = model.to_patch_embedding[0].axes_lengths["p1"]
        token = model.cls_token
        prefix = token.shape[-2] if token.dim() == 3 else token.shape[0]  # 0 with pool="mean"
        depth, cls = len(model.transformer.layers), prefix > 0
    else:
        raise ValueError(
            f"model: expected a ViT of a known family (vit_kernels, timm, torchvision, transformers, "
            f"vit-pytorch), got {type(model).__name__}"
        )
    if isinstance(p, (tuple, list)):
        if p[0] != p[1]:  # the grid, the distance's unit and the kernels' patch centres take one side
            raise ValueError(f"model: expected square patches, got patch size {tuple(p)} (height, width)")
        p = p[0]
    img = h if h == w else (h, w)
    if h is None or h % p or w % p:
        raise ValueError(f"img_size: expected a multiple of the patch size {p}, got {img}")
    return Geometry(img, p, (h // p, w // p), prefix, depth, cls)


def _image_size(model: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """The model's own input (height, width): timm's ``patch_embed.img_size`` and transformers'
    ``config.image_size`` may be a pair; the other families have one side (registry.image_spec)."""
    from .models.registry import image_spec

    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    side = image_spec(model)[0]
    return side, side


def _geometry_of(model: nn.Module, images: Tensor, geo: Optional[Geometry]) -> Geometry:
    """``geo``, or the geometry of the images' (H, W); checked against the images' size."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected (batch, channels, H, W), got {got}")
    geo = geo or geometry(model, images.shape[-2:])
    want = tuple(g * geo.patch_size for g in geo.grid)
    if tuple(images.shape[-2:]) != want:
        raise ValueError(
            f"images: expected (batch, channels, {want[0]}, {want[1]}) for the geometry's {geo.grid[0]}x"
            f"{geo.grid[1]} grid of {geo.patch_size}-pixel patches, got shape {tuple(images.shape)}"
        )
    return geo


def collect(model: nn.Module, images: Tensor, request: StatsRequest, geo: Geometry) -> List[AttentionStats]:
    """Run ``model(images)`` (no grad) recording ``request`` in every attention layer; one
    AttentionStats per layer, in order. Raises when a layer ran no vit_kernels attention op."""
    with torch.no_grad(), recording(request) as records:
        model(images)
    if len(records) != geo.depth and _compiled(model):
        raise RuntimeError(
            f"model: {len(records)} of its {geo.depth} attention layers handed their statistics to "
            f"vit_kernels.analysis: it runs a graph made by torch.compile, which keeps none; pass the module "
            f"it compiled (model._orig_mod) or call under torch.compiler.set_stance('force_eager')"
        )
    if len(records) != geo.depth:
        raise RuntimeError(
            f"model: {len(records)} of its {geo.depth} attention layers ran a vit_kernels attention "
            f"op; the others are not fused or ran their original modules (see "
            f"vit_kernels.fuse_report(model)): no statistics for them"
        )
    return records


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a module in it runs a torch.compile graph (torch.compile(module) or
    module.compile())."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )


def _need_class_token(geo: Geometry) -> None:
    if not geo.class_token or geo.prefix_tokens < 1:
        regs = f" (its {geo.prefix_tokens} prefix tokens are registers)" if geo.prefix_tokens else ""
        raise ValueError(
            f"model: has no class token{regs}: CLS attention maps need one; use attention-distance instead"
        )


def cls_attention(model: nn.Module, images: Tensor, geo: Optional[Geometry] = None) -> Tensor:
    """The class token's attention to every patch, per layer and head:
    (layers, batch, heads, grid_h, grid_w) float32 (rows of probabilities, prefix keys dropped)."""
    geo = _geometry_of(model, images, geo)
    _need_class_token(geo)
    records = collect(model, images, StatsRequest(rows=(0,)), geo)
    gh, gw = geo.grid
    return torch.stack(
        [r.rows[:, :, 0, geo.prefix_tokens :].float().reshape(*r.rows.shape[:2], gh, gw) for r in records]
    )


def attention_rollout(model: nn.Module, images: Tensor, geo: Optional[Geometry] = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per layer the head-mean weights plus the identity
    (the residual), rows renormalised, multiplied from the first layer up; the class token's row of
    the product over the patches. Needs the full weights (the P-from-LSE kernel).
    Returns (batch, grid_h, grid_w) float32."""
    geo = _geometry_of(model, images, geo)
    _need_class_token(geo)
    records = collect(model, images, StatsRequest(rows=None, weights=True), geo)
    rollout = None
    for r in records:
        a = r.weights.double().mean(1)  # (B, N, N)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, geo.prefix_tokens :].float().reshape(images.shape[0], *geo.grid)


def mean_attention_distance(model: nn.Module, images: Tensor, geo: Optional[Geometry] = None) -> Tensor:
    """The ViT paper's mean attention distance of every head of every layer, averaged over the
    batch: (layers, heads) float32, pixels (see vit_kernels.reference.mean_attention_distance)."""
    geo = _geometry_of(model, images, geo)
    request = StatsRequest(rows=None, grid=geo.grid, patch_size=float(geo.patch_size), prefix_tokens=geo.prefix_tokens)
    return torch.stack([r.distance.mean(0) for r in collect(model, images, request, geo)])


# ---------------------------------------------------------------------------- images and pictures
def load_image(path: str, size: Union[int, Tuple[int, int]]):
    """(PIL RGB image resized to size: a side, or (height, width); (1, 3, height, width) float32
    tensor normalised with ImageNet's mean and std)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        img = im.convert("RGB").resize((w, h), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    x = x.permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return img, ((x - mean) / std).unsqueeze(0)


def overlay(image, amap: Tensor, alpha: float = 0.5):
    """The map (grid_h, grid_w), scaled to [0, 1] and upsampled (bilinear) to the image, in the
    'jet' colour map blended over the PIL image. Returns a PIL RGB image."""
    import matplotlib
    from PIL import Image

    m = amap.detach().double().cpu()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    W, H = image.size
    m = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    rgb = (matplotlib.colormaps["jet"](m.numpy())[..., :3] * 255).astype("uint8")
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), alpha)


def panels(images: Sequence, labels: Sequence[str], columns: int, scale: int = 1):
    """Tile PIL images (all one size) in rows of ``columns``, each with its label above."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    w, h = w * scale, h * scale
    label_h = 14
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (w + 4) + 4, rows * (h + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = 4 + (i % columns) * (w + 4), 4 + (i // columns) * (h + label_h + 4)
        draw.text((x, y), label, fill="black")
        sheet.paste(im.resize((w, h), Image.NEAREST), (x, y + label_h))
    return sheet


def plot_distances(distances: Tensor, path: str, title: str, img_size: Union[int, Tuple[int, int]]) -> None:
    """The paper's figure: layer on x, mean attention distance (pixels) on y from 0, one dot per
    head. The y axis runs to at least 0.6 x the image's (longer) side (the paper's range at 224 px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = distances.shape
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    colours = matplotlib.colormaps["tab10" if H <= 10 else "tab20" if H <= 20 else "viridis"]
    for h in range(H):
        c = colours(h) if H <= 20 else colours(h / (H - 1))
        ax.scatter(range(1, L + 1), distances[:, h].tolist(), s=14, color=c, label=f"head {h}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(1, L + 1))
    side = img_size if isinstance(img_size, int) else max(img_size)
    ax.set_ylim(0, max(0.6 * side, 1.1 * distances.max().item()))
    ax.set_title(title, fontsize=8, wrap=True)
    if H <= 16:
        ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
