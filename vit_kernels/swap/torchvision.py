"""torchvision: vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14 (head_dim 80).

- Each ``EncoderBlock`` is replaced by :class:`FusedEncoderBlock`, holding its children under the
  same names (ln_1, self_attention, dropout, ln_2, mlp) and running
  attention: ``x = linear(qkv_attention(x, self_attention.in_proj_weight/in_proj_bias, ln_1),
  self_attention.out_proj, residual=x)``; the ``nn.MultiheadAttention`` is bypassed whole, so its
  ``(out, None)`` return never has to be produced;
  mlp: ``x = layernorm_gelu_mlp(x, ln_2, mlp[0], mlp[3], residual=x)``.
  Left (reported): a MultiheadAttention that is not batch_first, has separate q/k/v weights,
  bias_k/bias_v or add_zero_attn; an MLP that is not [Linear, GELU, Dropout, Linear, Dropout].
  In training mode with dropout p > 0 a call runs the EncoderBlock's own forward.
- ``VisionTransformer.conv_proj`` (Conv2d) is replaced by
  :class:`~vit_kernels.swap.patch.FusedPatchConv` (a conv stem, ``conv_stem_configs``, is left).
"""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

from .. import library, ops
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
from .report import Candidate, block_candidate
from .wrapper import SwapWrapper, at_autocast, with_residual
from .patch import patch_conv_candidate

FAMILY = "torchvision"


def _tv():
    try:
        from torchvision.models.vision_transformer import EncoderBlock, MLPBlock, VisionTransformer
    except Exception:
        return None
    return EncoderBlock, MLPBlock, VisionTransformer


class FusedEncoderBlock(SwapWrapper):
    """A torchvision ``EncoderBlock`` running fused ops. input: (batch, tokens, dim) -> same."""

    family = FAMILY

    def dropouts(self):
        out = [("dropout", dropout_p(self.dropout))]
        if self.fused_ops.get("attention"):
            out.append(("self_attention.dropout", float(self.self_attention.dropout)))
        if self.fused_ops.get("mlp"):
            out += [("mlp.2", dropout_p(self.mlp[2])), ("mlp.4", dropout_p(self.mlp[4]))]
        return out

    def bypassed(self):
        names = (["ln_1", "self_attention", "dropout"] if self.fused_ops.get("attention") else []) + (
            ["ln_2", "mlp"] if self.fused_ops.get("mlp") else []
        )
        return {n: self._modules[n] for n in names if n in self._modules}

    def forward(self, input: Tensor) -> Tensor:
        # traced by torch.fx the fused ops check sizes when the graph runs; the rest is known at trace time
        # (create_feature_extractor's train-mode graph: dropout active runs the original modules there too)
        why = None if library.symbolic(input) or input.dim() == 3 else "input is not (batch, tokens, dim)"
        why = why or self.original_reason(input)
        if why:
            return self.fall_back(why, input)
        if self.fused_ops.get("attention"):
            a, n = self.self_attention, self.ln_1
            o = at_autocast(
                ops.qkv_attention,
                input,
                a.in_proj_weight,
                a.in_proj_bias,
                num_heads=a.num_heads,
                norm_weight=n.weight,
                norm_bias=n.bias,
                eps=n.eps,
                backend=self.backend,
            )
            x = with_residual(
                ops.linear,
                o,
                a.out_proj.weight,
                a.out_proj.bias,
                residual=input,
                backend=self.backend,
            )
        else:
            y = self.ln_1(input)
            y, _ = self.self_attention(y, y, y, need_weights=False)
            x = self.dropout(y) + input
        n, m = self.ln_2, self.mlp
        if self.fused_ops.get("mlp"):
            return with_residual(
                ops.layernorm_gelu_mlp,
                x,
                n.weight,
                n.bias,
                m[0].weight,
                m[0].bias,
                m[3].weight,
                m[3].bias,
                eps=n.eps,
                approximate=approximate_now(m[1], self.approximate),
                residual=x,
                backend=self.backend,
            )
        return x + m(n(x))


def _attention_reason(path: str, b: nn.Module, backend: str):
    a = b.self_attention
    if not isinstance(a, nn.MultiheadAttention) or type(a).forward is not nn.MultiheadAttention.forward:
        return f"{join(path, 'self_attention')} is {type(a).__name__}, not nn.MultiheadAttention", None
    if not a.batch_first:
        return "self_attention is not batch_first", None
    if not a._qkv_same_embed_dim or a.in_proj_weight is None:
        return "self_attention has separate q/k/v projection weights (kdim/vdim differ)", None
    if a.bias_k is not None or a.bias_v is not None or a.add_zero_attn:
        return "self_attention has bias_k/bias_v or add_zero_attn", None
    why = first_reason(
        layernorm_reason(join(path, "ln_1"), b.ln_1, a.embed_dim),
        linear_reason(join(path, "self_attention.out_proj"), a.out_proj),
        dropout_reason(join(path, "dropout"), b.dropout),
    )
    if why:
        return why, None
    why, note = head_dim_reason(backend, a.head_dim)
    return why or bypassed_hooks(
        {join(path, "ln_1"): b.ln_1, join(path, "self_attention"): a, join(path, "dropout"): b.dropout}
    ), note


def _mlp_reason(path: str, b: nn.Module):
    m = b.mlp
    layout = [type(x).__name__ for x in m] if isinstance(m, nn.Sequential) else None
    if layout is None or len(m) != 5 or type(m).forward is not nn.Sequential.forward:
        return f"{join(path, 'mlp')} is not a Sequential [Linear, GELU, Dropout, Linear, Dropout] (got {layout})", None
    approx, why = gelu_approximate(m[1])
    why = first_reason(
        why,
        layernorm_reason(join(path, "ln_2"), b.ln_2, m[0].in_features),
        linear_reason(join(path, "mlp.0"), m[0]),
        linear_reason(join(path, "mlp.3"), m[3]),
        dropout_reason(join(path, "mlp.2"), m[2]),
        dropout_reason(join(path, "mlp.4"), m[4]),
        bypassed_hooks({join(path, "ln_2"): b.ln_2, join(path, "mlp"): m}),
    )
    return why, approx


def data_config():
    """(mean, std, source): every torchvision ViT weight (IMAGENET1K_V1, the SWAG ones) normalizes
    with ImageNet's mean and std in its transforms; read from them."""
    try:
        from torchvision.models import ViT_B_16_Weights

        t = ViT_B_16_Weights.DEFAULT.transforms()
        return tuple(t.mean), tuple(t.std), "torchvision ViT weights transforms"
    except Exception:
        return None


def candidates(root: nn.Module, backend: str, ops_: tuple) -> List[Candidate]:
    found = _tv()
    if found is None:
        return []
    EncoderBlock, _, VisionTransformer = found
    out: List[Candidate] = []
    for path, m in root.named_modules():
        if isinstance(m, SwapWrapper):
            continue
        if isinstance(m, EncoderBlock):
            base_why = (
                f"{type(m).__name__} overrides EncoderBlock.forward"
                if type(m).forward is not EncoderBlock.forward
                else overrides_load_state_dict(m)
            )
            out.append(
                block_candidate(
                    path,
                    m,
                    FAMILY,
                    ops_,
                    base_why,
                    join(path, "self_attention"),
                    lambda p=path, m=m: _attention_reason(p, m, backend),
                    join(path, "mlp"),
                    lambda p=path, m=m: _mlp_reason(p, m),
                    FusedEncoderBlock,
                    backend,
                )
            )
        elif isinstance(m, VisionTransformer) and "conv_proj" in m._modules:
            c = patch_conv_candidate(
                join(path, "conv_proj"), m.conv_proj, FAMILY, backend, "patch_embed" in ops_, data_config=data_config()
            )
            out += [c] if c else []
    return out
