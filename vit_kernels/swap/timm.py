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
  that is not a LayerNorm.
- A call with ``attn_mask`` or ``is_causal`` runs the Block's own forward; so does a call in
  training mode while a dropout / drop-path of the block has p > 0.
- ``PatchEmbed.proj`` (the Conv2d) is replaced by :class:`~vit_kernels.swap.patch.FusedPatchConv`;
  the position embedding (resampled per input size with ``dynamic_img_size``), class and register
  tokens, ``no_embed_class``, ``pos_embed=None``, pooling and fc_norm stay in timm's code.
"""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

from .. import ops
from .reasons import (
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
from .report import Candidate, block_candidate
from .wrapper import SwapWrapper, at_autocast, with_residual
from .patch import patch_conv_candidate

FAMILY = "timm"


def _timm():
    try:
        from timm.layers import Mlp, PatchEmbed
        from timm.layers.attention import Attention
        from timm.layers.layer_scale import LayerScale
        from timm.models.vision_transformer import Block
    except Exception:  # timm not installed, or a layout this adapter does not know
        return None
    return Block, Attention, Mlp, PatchEmbed, LayerScale


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
                scale=a.scale,
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
                approximate=self.approximate,
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


def data_config(model: nn.Module):
    """(mean, std, source) from the model's timm pretrained_cfg (None when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    return tuple(mean), tuple(std), "timm pretrained_cfg"


def candidates(root: nn.Module, backend: str, ops_: tuple) -> List[Candidate]:
    found = _timm()
    if found is None:
        return []
    Block, Attention, Mlp, PatchEmbed, LayerScale = found
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
            c = patch_conv_candidate(
                join(path, "proj"), m.proj, FAMILY, backend, "patch_embed" in ops_, data_config=data_config(owner)
            )
            out += [c] if c else []
    return out
