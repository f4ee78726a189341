"""timm: VisionTransformer and every model reusing its Block / Attention / Mlp / PatchEmbed
(vit_*, deit_*, ...).

- Each ``Block`` (or a subclass that keeps ``Block.forward``) is replaced by :class:`FusedTimmBlock`,
  which holds the Block's children under the same names (norm1, attn, ls1, drop_path1, norm2, mlp,
  ls2, drop_path2) and runs
  attention: ``x = linear(qkv_attention(x, attn.qkv, norm1), attn.proj, residual=x, layer_scale=ls1.gamma)``
  mlp:       ``x = layernorm_gelu_mlp(x, norm2, mlp.fc1, mlp.fc2, residual=x, layer_scale=ls2.gamma)``.
  qkv bias on or off, LayerScale, any number of prefix tokens (class, register) are covered: the
  blocks see tokens only. Left (reported) per part: qk_norm, scale_norm (attn.norm), gated
  attention, an Attention/Mlp class other than timm's, a non-GELU activation, mlp.norm, a norm
  that is not a LayerNorm. Blocks of other classes in a timm ViT's ``blocks`` (ParallelThingsBlock,
  ParallelScalingBlock, EvaBlock, ...) or in per-stage ``blocks`` lists (Swin, PVTv2) run as they are;
  the report lists their attention and MLP as left.
- A call with ``attn_mask`` or ``is_causal`` runs the Block's own forward; so does a call in
  training mode while a dropout / drop-path of the block has p > 0.
- ``PatchEmbed.proj`` (the Conv2d) is replaced by :class:`~vit_kernels.swap.patch.FusedPatchConv`;
  the position embedding, class and register tokens, ``no_embed_class``, ``pos_embed=None``, pooling
  and fc_norm stay in timm's code.
- With ``dynamic_img_size=True`` (a VisionTransformer that resamples its position embedding in
  ``_pos_embed`` on every call) the whole ``patch_embed`` is replaced by :class:`FusedTimmPatchEmbed`:
  one ``patch_embed`` launch writes the tokens with the class token and the position embedding,
  resampled with timm's own ``resample_abs_pos_embed`` on every call at another patch grid, as timm
  does; register tokens and ``no_embed_class`` too (see that class for how, and for how the root
  model's ``_pos_embed`` takes the tokens).
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import library, ops
from ..ops.patch_embed import check_pixel_norm, normalize_pixels, pixel_norm_tensors
from .reasons import (
    approximate_now,
    bypassed_hooks,
    dropout_p,
    dropout_reason,
    first_reason,
    gelu_approximate,
    head_dim_reason,
    join,
    layernorm_reason,
    linear_reason,
    overrides_load_state_dict,
)
from .report import Candidate, ReportEntry, block_candidate
from .wrapper import SwapWrapper, at_autocast, with_residual
from .patch import conv_reason, patch_conv_candidate

FAMILY = "timm"
_ARMED = threading.local()  # .ids: the FusedTimmPatchEmbed modules armed in this thread


def _timm():
    try:
        from timm.layers import Mlp, PatchEmbed
        from timm.layers.attention import Attention
        from timm.layers.layer_scale import LayerScale
        from timm.models.vision_transformer import Block, VisionTransformer
    except Exception:  # timm not installed, or a layout this adapter does not know
        return None
    return Block, Attention, Mlp, PatchEmbed, LayerScale, VisionTransformer


def _layer_scale(m: nn.Module, name: str, LayerScale):
    """(gamma or None, reason)."""
    if isinstance(m, nn.Identity):
        return None, None
    if type(m) is LayerScale or (isinstance(m, LayerScale) and type(m).forward is LayerScale.forward):
        return m.gamma, None
    return None, f"{name} is {type(m).__name__}, not timm's LayerScale"


class FusedTimmBlock(SwapWrapper):
    """A timm ``Block`` whose attention and/or MLP branch run fused ops (see the module docstring).
    x: (batch, tokens, dim) -> (batch, tokens, dim); ``forward(x, attn_mask=None, ...)`` as Block."""

    family = FAMILY

    def dropouts(self):
        out = []
        if self.fused_ops.get("attention"):
            out += [
                ("attn.attn_drop", dropout_p(self.attn.attn_drop)),
                ("attn.proj_drop", dropout_p(self.attn.proj_drop)),
                ("drop_path1", dropout_p(self.drop_path1)),
            ]
        if self.fused_ops.get("mlp"):
            out += [
                ("mlp.drop1", dropout_p(self.mlp.drop1)),
                ("mlp.drop2", dropout_p(self.mlp.drop2)),
                ("drop_path2", dropout_p(self.drop_path2)),
            ]
        return out

    def bypassed(self):
        names = (["norm1", "attn", "ls1", "drop_path1"] if self.fused_ops.get("attention") else []) + (
            ["norm2", "mlp", "ls2", "drop_path2"] if self.fused_ops.get("mlp") else []
        )
        return {n: self._modules[n] for n in names if n in self._modules}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        # attn_mask / is_causal (positionally or by name), hooks, active dropout: the Block's own forward
        why = None
        if any(a is not None and a is not False for a in args) or any(
            v is not None and v is not False for v in kwargs.values()
        ):
            why = "attn_mask / is_causal given: the fused attention takes no mask"
        why = why or self.original_reason(x)
        if why:
            return self.fall_back(why, x, *args, **kwargs)
        if self.fused_ops.get("attention"):
            a, n = self.attn, self.norm1
            o = at_autocast(
                ops.qkv_attention,
                x,
                a.qkv.weight,
                a.qkv.bias,
                num_heads=a.num_heads,
                # as timm: attn.scale on its eager path only; its SDPA path (fused_attn) takes SDPA's 1/sqrt(head_dim)
                scale=None if getattr(a, "fused_attn", False) else a.scale,
                norm_weight=n.weight,
                norm_bias=n.bias,
                eps=n.eps,
                backend=self.backend,
            )
            gamma = None if isinstance(self.ls1, nn.Identity) else self.ls1.gamma
            x = with_residual(
                ops.linear,
                o,
                a.proj.weight,
                a.proj.bias,
                residual=x,
                layer_scale=gamma,
                backend=self.backend,
            )
        else:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.fused_ops.get("mlp"):
            m, n = self.mlp, self.norm2
            gamma = None if isinstance(self.ls2, nn.Identity) else self.ls2.gamma
            x = with_residual(
                ops.layernorm_gelu_mlp,
                x,
                n.weight,
                n.bias,
                m.fc1.weight,
                m.fc1.bias,
                m.fc2.weight,
                m.fc2.bias,
                eps=n.eps,
                approximate=approximate_now(m.act, self.approximate),
                residual=x,
                layer_scale=gamma,
                backend=self.backend,
            )
        else:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _attention_reason(path: str, b: nn.Module, Attention, LayerScale, backend: str):
    a = b.attn
    if not (isinstance(a, Attention) and type(a).forward is Attention.forward):
        return f"{join(path, 'attn')} is {type(a).__name__}, not timm's Attention", None
    if not isinstance(a.q_norm, nn.Identity) or not isinstance(a.k_norm, nn.Identity):
        return "qk_norm is on (LayerNorm of q and k per head); the fused attention has no qk norm", None
    if not isinstance(getattr(a, "norm", nn.Identity()), nn.Identity):
        return "scale_norm is on (attn.norm after attention); the fused attention has none", None
    if getattr(a, "gate", None) is not None:
        return "gated attention (attn.gate); the fused attention has no gate", None
    dim = a.qkv.in_features if isinstance(a.qkv, nn.Linear) else None
    why = first_reason(
        layernorm_reason(join(path, "norm1"), b.norm1, dim),
        linear_reason(join(path, "attn.qkv"), a.qkv),
        linear_reason(join(path, "attn.proj"), a.proj),
        _layer_scale(b.ls1, join(path, "ls1"), LayerScale)[1],
        dropout_reason(join(path, "attn.attn_drop"), a.attn_drop),
        dropout_reason(join(path, "attn.proj_drop"), a.proj_drop),
        dropout_reason(join(path, "drop_path1"), b.drop_path1),
    )
    if why:
        return why, None
    if a.proj.out_features != dim:
        return f"attn.proj maps to {a.proj.out_features} features, the residual has {dim}", None
    why, note = head_dim_reason(backend, a.qkv.out_features // 3 // a.num_heads)
    if why:
        return why, None
    why = bypassed_hooks({join(path, "norm1"): b.norm1, join(path, "attn"): a, join(path, "ls1"): b.ls1})
    return why, note


def _mlp_reason(path: str, b: nn.Module, Mlp, LayerScale):
    m = b.mlp
    if not (isinstance(m, Mlp) and type(m).forward is Mlp.forward):
        return f"{join(path, 'mlp')} is {type(m).__name__}, not timm's Mlp", None
    approx, why = gelu_approximate(m.act)
    dim = m.fc1.in_features if isinstance(m.fc1, nn.Linear) else None
    why = first_reason(
        why,
        layernorm_reason(join(path, "norm2"), b.norm2, dim),
        linear_reason(join(path, "mlp.fc1"), m.fc1),
        linear_reason(join(path, "mlp.fc2"), m.fc2),
        None
        if isinstance(m.norm, nn.Identity)
        else "mlp.norm (scale_mlp_norm) is on; the fused MLP has no hidden norm",
        _layer_scale(b.ls2, join(path, "ls2"), LayerScale)[1],
        dropout_reason(join(path, "mlp.drop1"), m.drop1),
        dropout_reason(join(path, "mlp.drop2"), m.drop2),
        dropout_reason(join(path, "drop_path2"), b.drop_path2),
    )
    if why:
        return why, None
    if m.fc2.out_features != dim:
        return f"mlp.fc2 maps to {m.fc2.out_features} features, the residual has {dim}", None
    why = bypassed_hooks({join(path, "norm2"): b.norm2, join(path, "mlp"): m, join(path, "ls2"): b.ls2})
    return why, approx


class FusedTimmPatchEmbed(SwapWrapper):
    """The ``patch_embed`` of a timm VisionTransformer built with ``dynamic_img_size=True``: patch
    projection, class token and position embedding in one ``patch_embed`` launch at every image size.

    timm resamples ``pos_embed`` to the input's patch grid in the root model's ``_pos_embed`` on every
    call. Here too (timm's own ``resample_abs_pos_embed``: bicubic, antialiased), at another grid than
    the native one, nothing cached: never stale, whatever wrote the parameters (a write through
    ``.data`` bumps no version counter); under autograd gradients reach them through it.

    What the kernel gets, per variant (:meth:`embedding_for`):
    - a class token or none, ``pos_embed`` over prefix + patches (timm's default): the resampled
      ``pos_embed`` and the class token, as is;
    - ``no_embed_class`` (``pos_embed`` covers the patches only) with a class token: the resampled
      embedding behind one zero row, which the kernel adds to the class token (x + 0 = x exactly);
    - register tokens (``reg_tokens > 0``, with or without a class token or ``no_embed_class``): the
      kernel writes the patch tokens with their position embedding; the prefix rows (class token,
      registers, plus their ``pos_embed`` rows unless ``no_embed_class``) are
      concatenated in front: one copy of the token buffer, as timm's own concatenation costs.

    How the root model takes the tokens: fuse sets two attributes on the root instance (unfuse removes
    them): ``forward_features`` runs timm's own ``VisionTransformer.forward_features`` with this module
    armed, and ``_pos_embed`` returns ``pos_drop(tokens)`` for the output this module made while armed.
    Armed, ``forward`` returns the patch rows of the (batch, prefix + patches, dim) token buffer as the
    (batch, H/p, W/p, dim) NHWC view timm expects, carrying the buffer; anything else (a direct
    ``model.patch_embed(images)`` call, ``forward_intermediates``, a forward hook on ``patch_embed``)
    gets exactly what timm's PatchEmbed returns (the projection alone, fused) and timm's own
    ``_pos_embed``. images: (batch, C, H, W), float or uint8 (normalized on load with the model's data
    config, see :class:`~vit_kernels.swap.patch.FusedPatchConv`)."""

    family = FAMILY
    image_mean = None
    image_std = None

    def bypassed(self):
        return dict(self._modules)  # proj, norm (an Identity)

    def attach(self, root: nn.Module) -> None:
        """Hold the root model and set its instance attributes (see the class docstring)."""
        object.__setattr__(self, "_vk_root", root)
        root.__dict__["forward_features"] = _ArmedForwardFeatures(root)
        root.__dict__["_pos_embed"] = _FusedPosEmbed(root)

    def restore(self) -> nn.Module:
        root = self.__dict__.get("_vk_root")
        if root is not None:
            for name in ("forward_features", "_pos_embed"):
                if isinstance(root.__dict__.get(name), (_ArmedForwardFeatures, _FusedPosEmbed)):
                    del root.__dict__[name]
        return super().restore()

    def embedding_for(self, grid) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(pos_embed, cls_token, prefix) for the patch grid ``grid`` (gh, gw): the kernel's
        ``pos_embed`` (1, [1 +] gh * gw, dim) and ``cls_token`` (1, 1, dim) or None, and the prefix
        rows (1, prefix_tokens, dim) to put in front of the kernel's output, or None (see the class
        docstring). Made on every call at another grid (or with registers), as timm's own _pos_embed does:
        never stale, whatever wrote the parameters."""
        root = self.__dict__["_vk_root"]
        pe, cls, reg = root.pos_embed, root.cls_token, root.reg_token
        if reg is None and not root.no_embed_class and tuple(grid) == tuple(self.grid_size):
            return pe, cls, None  # the native grid: pos_embed as it is, nothing to resample
        return self._embedding(root, grid)

    def _embedding(self, root: nn.Module, grid) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """embedding_for off the native grid: timm's resample_abs_pos_embed, then the variant's layout."""
        from timm.layers import resample_abs_pos_embed

        pe, cls, reg = root.pos_embed, root.cls_token, root.reg_token
        n = 0 if root.no_embed_class else root.num_prefix_tokens  # prefix rows pos_embed holds
        pos = resample_abs_pos_embed(pe, new_size=grid, old_size=tuple(self.grid_size), num_prefix_tokens=n)
        if reg is None:
            if cls is not None and root.no_embed_class:  # a zero row: the kernel adds it to the class token
                pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
            return pos, cls, None
        prefix = torch.cat(([cls] if cls is not None else []) + [reg], dim=1)
        if not n:
            return pos, None, prefix
        # clone: the patch rows as a tensor of their own (at the native grid pos is pos_embed itself)
        return pos[:, n:].clone(), None, prefix + pos[:, :n]

    def forward(self, images: Tensor) -> Tensor:
        p = self.proj.kernel_size[0]
        armed = id(self) in getattr(_ARMED, "ids", ())
        why = None
        if library.symbolic(images) or images.dim() != 4:
            why = "images are not a concrete (batch, channels, H, W) tensor"
        elif images.shape[-2] % p or images.shape[-1] % p:
            why = f"the image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}"
        norm = {}
        if isinstance(images, Tensor) and images.dtype == torch.uint8:
            mean, std = check_pixel_norm(images, self.image_mean, self.image_std)
            norm = dict(image_mean=mean, image_std=std)
        why = why or self.original_reason(images)
        if why:
            if norm:  # timm's Conv2d takes float images: normalized as the kernel would
                images = normalize_pixels(
                    images, *pixel_norm_tensors((mean, std), images.device), self.proj.weight.dtype
                )
            return self.fall_back(why, images)
        B, _, H, W = images.shape
        grid = (H // p, W // p)
        embed = armed and not self._forward_hooks  # a hook on patch_embed sees timm's own output
        pos, cls, prefix = self.embedding_for(grid) if embed else (None, None, None)
        w, b = self.proj.weight, self.proj.bias
        # under autocast at the autocast dtype, as timm's Conv2d runs; the tokens then in the dtype timm's
        # _pos_embed leaves them in (its fp32 position embedding and class token promote the conv's output)
        out_dtype = None
        if embed and pos is not None and torch.is_autocast_enabled(images.device.type):
            out_dtype = torch.promote_types(torch.get_autocast_dtype(images.device.type), pos.dtype)
        tokens = at_autocast(
            ops.patch_embed, images, w, b, patch_size=p, pos_embed=pos, cls_token=cls, backend=self.backend,
            out_dtype=out_dtype, **norm,
        )  # fmt: skip
        x = tokens[:, 1 if cls is not None else 0 :].unflatten(1, grid)  # (B, gh, gw, dim): timm's NHWC output
        if embed:  # the whole buffer, for the root's _pos_embed
            x.vk_tokens = tokens if prefix is None else torch.cat([prefix.expand(B, -1, -1), tokens], dim=1)
        return x


class _ArmedForwardFeatures:
    """root.forward_features: timm's own, with the fused patch_embed armed (see FusedTimmPatchEmbed)."""

    def __init__(self, root: nn.Module):
        self.root = root

    def __call__(self, *args, **kwargs):
        from timm.models.vision_transformer import VisionTransformer

        pe = self.root.patch_embed
        if not isinstance(pe, FusedTimmPatchEmbed):
            return VisionTransformer.forward_features(self.root, *args, **kwargs)
        ids = _ARMED.__dict__.setdefault("ids", set())
        ids.add(id(pe))
        try:
            return VisionTransformer.forward_features(self.root, *args, **kwargs)
        finally:
            ids.discard(id(pe))


class _FusedPosEmbed:
    """root._pos_embed: the token buffer the armed patch_embed wrote (class token and position
    embedding in it), through pos_drop; any other input: timm's own ``_pos_embed``."""

    def __init__(self, root: nn.Module):
        self.root = root

    def __call__(self, x: Tensor) -> Tensor:
        from timm.models.vision_transformer import VisionTransformer

        tokens = getattr(x, "vk_tokens", None)
        if tokens is None:
            return VisionTransformer._pos_embed(self.root, x)
        return self.root.pos_drop(tokens)


def _dynamic_embed_reason(root: nn.Module, pe: nn.Module, path: str, VisionTransformer) -> Optional[str]:
    """None when the root's dynamic-size embedding (resampled pos_embed, class token) is served whole."""
    for name in ("forward_features", "_pos_embed"):
        if getattr(type(root), name) is not getattr(VisionTransformer, name):
            return f"{type(root).__name__} overrides VisionTransformer.{name}"
    if root.pos_embed is None:
        return "pos_embed is None (no position embedding)"
    for name in ("cls_token", "reg_token"):
        t = getattr(root, name)
        if t is not None and (t.dim() != 3 or t.shape[0] != 1 or t.shape[-1] != pe.proj.out_channels):
            return f"{name} is not (1, n, {pe.proj.out_channels}) (the projection's width)"
    if getattr(pe, "dynamic_img_pad", False):
        return "dynamic_img_pad pads images to a multiple of the patch size; the fused op does not pad"
    if not isinstance(pe.norm, nn.Identity):
        return f"{join(path, 'norm')} is {type(pe.norm).__name__}: the position embedding comes after it"
    if getattr(pe, "flatten", False) or str(getattr(pe, "output_fmt", "")) not in ("Format.NHWC", "NHWC"):
        return "patch_embed does not return NHWC (as dynamic_img_size sets it)"
    return None


def _dynamic_embed_candidate(
    root: nn.Module, path: str, pe: nn.Module, backend: str, enabled: bool, PatchEmbed, VisionTransformer
) -> Optional[Candidate]:
    """The whole ``patch_embed`` of a dynamic_img_size VisionTransformer (None when the model does not
    qualify: the projection alone is fused then, as for a fixed size)."""
    if not (isinstance(root, VisionTransformer) and getattr(root, "dynamic_img_size", False)):
        return None
    if root._modules.get("patch_embed") is not pe or type(pe).forward is not PatchEmbed.forward:
        return None
    if _dynamic_embed_reason(root, pe, path, VisionTransformer):
        return None
    why = "not requested (ops)" if not enabled else conv_reason(join(path, "proj"), pe.proj)
    cfg = data_config(root)
    notes = (
        "dynamic_img_size: class token and position embedding written by the patch_embed kernel; the position "
        "embedding is resampled (timm's resample_abs_pos_embed) on every call at another patch grid, as timm does",
    )
    if root.reg_token is not None:
        notes += (
            "register tokens: the kernel writes the patch tokens with their position embedding; the class and "
            "register rows are concatenated in front (one copy of the token buffer)",
        )
    elif root.no_embed_class and root.cls_token is not None:
        notes += ("no_embed_class: the kernel adds a zero position-embedding row to the class token",)
    if cfg is not None:
        notes += (f"uint8 images are normalized on load with mean={tuple(cfg[0])}, std={tuple(cfg[1])} ({cfg[2]})",)

    def build():
        w = FusedTimmPatchEmbed(pe, backend, [entry])
        if cfg is not None:
            w.image_mean, w.image_std = tuple(map(float, cfg[0])), tuple(map(float, cfg[1]))
        w.attach(root)
        return w

    entry = ReportEntry(path, "patch_embed", FAMILY, why is None, why or "", notes if why is None else ())
    return Candidate(path, pe, [entry], build if why is None else None)


def data_config(model: nn.Module):
    """(mean, std, source) from the model's timm pretrained_cfg (None when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    return tuple(mean), tuple(std), "timm pretrained_cfg"


def _other_block_candidates(root: nn.Module, Block) -> List[Candidate]:
    """A candidate with nothing to build for each block of a timm model with a patch embedding (a timm
    model holding ``patch_embed``) that is not timm's ``Block``: blocks in its ``blocks`` list
    (ParallelThingsBlock, ParallelScalingBlock, EvaBlock, ...) and in ``blocks`` lists deeper down, as
    hierarchical models keep them per stage (Swin's ``layers.N.blocks``, PVTv2's ``stages.N.blocks``;
    nested lists are walked). They run as they are; their attention and MLP entries (the ``attn`` /
    ``mlp`` child where the block has one, else the block) say so, naming the class."""
    out: List[Candidate] = []
    seen = set()  # the blocks lists reported (a timm model inside another is walked once)
    for path, m in root.named_modules():
        if not (type(m).__module__.startswith("timm.") and "patch_embed" in m._modules):
            continue
        for sub, blocks in m.named_modules(prefix=path):
            if sub.rpartition(".")[2] != "blocks" or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
                continue
            if sub in seen:
                continue
            seen.add(sub)
            stack = list(blocks.named_children())[::-1]
            while stack:
                name, b = stack.pop()
                p = join(sub, name)
                if isinstance(b, (Block, SwapWrapper)):
                    continue
                if type(b) in (nn.Sequential, nn.ModuleList):  # a list of lists (one per stage or group)
                    stack += [(join(name, n), c) for n, c in b.named_children()][::-1]
                    continue
                cls = type(b).__name__
                if cls == Block.__name__:  # another model's class of that name (pvt_v2.Block)
                    cls = f"{type(b).__module__}.{cls}"
                why = f"{p} is {cls}, not timm's Block: it runs unfused, as it is"
                entries = [
                    ReportEntry(join(p, child) if child in b._modules else p, op, FAMILY, False, why)
                    for op, child in (("attention", "attn"), ("mlp", "mlp"))
                ]
                out.append(Candidate(p, b, entries, None))
    return out


def candidates(root: nn.Module, backend: str, ops_: tuple) -> List[Candidate]:
    found = _timm()
    if found is None:
        return []
    Block, Attention, Mlp, PatchEmbed, LayerScale, VisionTransformer = found
    out: List[Candidate] = []
    for path, m in root.named_modules():
        if isinstance(m, SwapWrapper):
            continue
        if isinstance(m, Block):
            base_why = None
            if type(m).forward is not Block.forward:
                base_why = f"{type(m).__name__} overrides Block.forward"
            base_why = base_why or overrides_load_state_dict(m)
            out.append(
                block_candidate(
                    path,
                    m,
                    FAMILY,
                    ops_,
                    base_why,
                    join(path, "attn"),
                    lambda p=path, m=m: _attention_reason(p, m, Attention, LayerScale, backend),
                    join(path, "mlp"),
                    lambda p=path, m=m: _mlp_reason(p, m, Mlp, LayerScale),
                    FusedTimmBlock,
                    backend,
                )
            )
        elif isinstance(m, PatchEmbed) and "proj" in m._modules:
            owner = root.get_submodule(path.rpartition(".")[0]) if "." in path else root
            c = _dynamic_embed_candidate(owner, path, m, backend, "patch_embed" in ops_, PatchEmbed, VisionTransformer)
            if c is not None:
                out.append(c)
                continue
            c = patch_conv_candidate(
                join(path, "proj"), m.proj, FAMILY, backend, "patch_embed" in ops_, data_config=data_config(owner)
            )
            out += [c] if c else []
    return out + _other_block_candidates(root, Block)
