"""vit-pytorch (lucidrains): ``vit_pytorch.vit.ViT`` and its ``Transformer``.

Two layouts of ``Transformer.layers[i] = [attention, feed-forward]`` are read:
- the current release: ``Attention(norm, to_qkv, to_out)`` and ``FeedForward(net=[LayerNorm,
  Linear, GELU, Dropout, Linear, Dropout])``, a final ``Transformer.norm``;
- the older release (quoted in the ViT notes this project started from): ``PreNorm(norm,
  fn=Attention(to_qkv, to_out))`` and ``PreNorm(norm, fn=FeedForward(net=[Linear, GELU, Dropout,
  Linear, Dropout]))``, no final norm.
``to_qkv`` has no bias; ``to_out`` is ``[Linear, Dropout]`` or Identity (one head of dim_head = dim).

The residual adds live in ``Transformer.forward`` (``x = attn(x) + x; x = ff(x) + x``), so the
``Transformer`` is what is replaced (by :class:`FusedVitPytorchTransformer`, same children: layers,
norm); per layer it runs ``x = linear(qkv_attention(x, to_qkv, norm), to_out, residual=x)`` and
``x = layernorm_gelu_mlp(x, norm, fc1, fc2, residual=x)``, or the layer's own modules for a part
that is left. In training mode with dropout p > 0 the Transformer's own forward runs.

Patch embedding: the older ``[Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)'), Linear]`` is
fused (the Linear's weight, viewed as (dim, C, p, p) without a copy, is the Conv2d-layout weight of
the patch_embed op); the current ``[Rearrange, LayerNorm(patch_dim), Linear, LayerNorm(dim)]`` is
left: the LayerNorm over each patch's pixels comes before the projection and the fused op has no
such pre-norm.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from .. import ops
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
from .report import Candidate, ReportEntry
from .wrapper import SwapWrapper, at_autocast, with_residual

FAMILY = "vit-pytorch"

# Transformer / ViT classes whose forward is the one described above. The older release's classes
# (same names in vit_pytorch.vit) can be appended here by whoever holds a copy of them.
EXTRA_TRANSFORMER_CLASSES: List[type] = []
EXTRA_VIT_CLASSES: List[type] = []

_PATCH_PATTERN = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"


def _classes() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    t, v = list(EXTRA_TRANSFORMER_CLASSES), list(EXTRA_VIT_CLASSES)
    try:
        from vit_pytorch.vit import ViT, Transformer

        t.append(Transformer)
        v.append(ViT)
    except Exception:
        pass
    return tuple(t), tuple(v)


class _Attn:
    """norm, to_qkv, heads, scale, out (Linear or None), drops of one attention entry."""

    def __init__(self, entry: nn.Module):
        inner = getattr(entry, "fn", None)
        if inner is not None and hasattr(entry, "norm"):  # PreNorm(norm, fn=Attention)
            self.norm, a, self.prefix = entry.norm, inner, "fn."
        else:
            self.norm, a, self.prefix = getattr(entry, "norm", None), entry, ""
        self.attn = a
        self.to_qkv, self.heads, self.scale = a.to_qkv, a.heads, a.scale
        self.out = a.to_out[0] if isinstance(a.to_out, nn.Sequential) else None
        self.drops = {"dropout": getattr(a, "dropout", None)}
        if isinstance(a.to_out, nn.Sequential):
            self.drops.update({f"to_out.{i}": m for i, m in enumerate(a.to_out) if i > 0})


class _FF:
    """norm, fc1, act, fc2, drops of one feed-forward entry."""

    def __init__(self, entry: nn.Module):
        inner = getattr(entry, "fn", None)
        if inner is not None and hasattr(entry, "norm"):  # PreNorm(norm, fn=FeedForward)
            self.norm, net, self.prefix = entry.norm, inner.net, "fn.net."
        else:
            net, self.prefix = entry.net, "net."
            self.norm = net[0] if isinstance(net[0], nn.LayerNorm) else None
        rest = list(net)[1:] if self.norm is not None and not hasattr(entry, "fn") else list(net)
        self.layout = [type(m).__name__ for m in rest]
        self.ok = len(rest) == 5
        if self.ok:
            self.fc1, self.act, d1, self.fc2, d2 = rest
            off = len(net) - 5
            self.drops = {f"{self.prefix}{off + 2}": d1, f"{self.prefix}{off + 4}": d2}


def _attention_reason(path: str, entry: nn.Module, backend: str):
    try:
        a = _Attn(entry)
    except AttributeError as e:
        return f"{path} is not a vit-pytorch Attention ({e})", None, None
    if a.norm is None:
        return f"{path} has no LayerNorm before the attention", None, None
    dim = a.to_qkv.in_features if isinstance(a.to_qkv, nn.Linear) else None
    why = first_reason(
        layernorm_reason(join(path, "norm"), a.norm, dim),
        linear_reason(join(path, a.prefix + "to_qkv"), a.to_qkv),
        None if a.out is None else linear_reason(join(path, a.prefix + "to_out.0"), a.out),
        *(dropout_reason(join(path, a.prefix + n), m) for n, m in a.drops.items()),
    )
    if why:
        return why, None, None
    if not isinstance(a.attn.to_out, (nn.Sequential, nn.Identity)):
        return f"{path}.to_out is {type(a.attn.to_out).__name__}", None, None
    inner = a.to_qkv.out_features // 3
    if inner % a.heads:
        return f"to_qkv inner dim {inner} is not divisible by heads={a.heads}", None, None
    why, note = head_dim_reason(backend, inner // a.heads)
    return why or bypassed_hooks({path: entry}), note, a


def _mlp_reason(path: str, entry: nn.Module):
    try:
        f = _FF(entry)
    except (AttributeError, TypeError, IndexError) as e:
        return f"{path} is not a vit-pytorch FeedForward ({e})", None
    if f.norm is None:
        return f"{path} has no LayerNorm before the MLP", None
    if not f.ok:
        return f"{path} net is {f.layout}, expected [Linear, GELU, Dropout, Linear, Dropout] after the norm", None
    approx, why = gelu_approximate(f.act)
    why = first_reason(
        why,
        layernorm_reason(f"{path}.norm", f.norm),
        linear_reason(f"{path}.fc1", f.fc1),
        linear_reason(f"{path}.fc2", f.fc2),
        *(dropout_reason(join(path, n), m) for n, m in f.drops.items()),
        bypassed_hooks({path: entry}),
    )
    return why, approx


class FusedVitPytorchTransformer(SwapWrapper):
    """vit-pytorch's ``Transformer`` running fused ops per layer. x: (batch, tokens, dim) -> same."""

    family = FAMILY

    def dropouts(self):
        out = []
        for i, (attn, ff) in enumerate(self.layers):
            plan = self.vk_plan[i]
            if plan[0]:
                a = _Attn(attn)
                out += [(f"layers.{i}.0.{a.prefix}{n}", dropout_p(m)) for n, m in a.drops.items()]
            if plan[1] is not None:
                out += [(f"layers.{i}.1.{n}", dropout_p(m)) for n, m in _FF(ff).drops.items()]
        return out

    def bypassed(self):
        mods = {}
        for i, (attn, ff) in enumerate(self.layers):
            fuse_attn, approx = self.vk_plan[i]
            if fuse_attn:
                mods[f"layers.{i}.0"] = attn
            if approx is not None:
                mods[f"layers.{i}.1"] = ff
        return mods

    def forward(self, x: Tensor) -> Tensor:
        why = "x is not (batch, tokens, dim)" if x.dim() != 3 else self.original_reason(x)
        if why:
            return self.fall_back(why, x)
        for i, (attn, ff) in enumerate(self.layers):
            fuse_attn, approx = self.vk_plan[i]
            if fuse_attn:
                a = _Attn(attn)
                o = at_autocast(
                    ops.qkv_attention,
                    x,
                    a.to_qkv.weight,
                    a.to_qkv.bias,
                    num_heads=a.heads,
                    scale=a.scale,
                    norm_weight=a.norm.weight,
                    norm_bias=a.norm.bias,
                    eps=a.norm.eps,
                    backend=self.backend,
                )
                if a.out is not None:
                    x = with_residual(ops.linear, o, a.out.weight, a.out.bias, residual=x, backend=self.backend)
                else:
                    x = o + x
            else:
                x = attn(x) + x
            if approx is not None:
                f = _FF(ff)
                x = with_residual(
                    ops.layernorm_gelu_mlp,
                    x,
                    f.norm.weight,
                    f.norm.bias,
                    f.fc1.weight,
                    f.fc1.bias,
                    f.fc2.weight,
                    f.fc2.bias,
                    eps=f.norm.eps,
                    approximate=approximate_now(f.act, approx),
                    residual=x,
                    backend=self.backend,
                )
            else:
                x = ff(x) + x
        norm = self._modules.get("norm")
        return norm(x) if norm is not None else x


class FusedVitPytorchPatchEmbed(SwapWrapper):
    """The older ``to_patch_embedding = [Rearrange, Linear]``: images (batch, C, H, W) ->
    (batch, patches, dim) by the patch_embed op, the Linear weight (dim, p*p*C) viewed as the
    Conv2d-layout (dim, C, p, p) weight (a strided view, no copy)."""

    family = FAMILY

    def bypassed(self):
        return dict(self._modules)  # [Rearrange, Linear]: the op replaces both

    def forward(self, images: Tensor) -> Tensor:
        lin = self[1]
        p = self.vk_patch
        why = self.structure_reason()  # first: a module inserted after fuse may stand where the Linear was
        if why is None:
            if images.dim() != 4 or images.shape[1] * p * p != lin.in_features:
                why = f"images are not (batch, channels, H, W) with channels * {p} * {p} = {lin.in_features}"
            elif images.shape[-2] % p or images.shape[-1] % p:
                why = f"the image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}"
        why = why or self.original_reason(images)
        if why:
            return self.fall_back(why, images)
        w = lin.weight.view(lin.out_features, p, p, images.shape[1]).permute(0, 3, 1, 2)
        return at_autocast(ops.patch_embed, images, w, lin.bias, patch_size=p, backend=self.backend)

    def __getitem__(self, i):
        return self._modules[str(i)]


def _patch_candidate(path: str, seq: nn.Module, backend: str, enabled: bool) -> Optional[Candidate]:
    if isinstance(seq, SwapWrapper):
        return None
    why, p = None, None
    mods = list(seq) if isinstance(seq, nn.Sequential) else []
    names = [type(m).__name__ for m in mods]
    if not enabled:
        why = "not requested (ops)"
    elif type(seq).forward is not nn.Sequential.forward or len(mods) < 2 or names[0] != "Rearrange":
        why = f"{path} is not [Rearrange, ...] (got {names})"
    elif getattr(mods[0], "pattern", None) != _PATCH_PATTERN:
        why = f"{path}.0 has pattern {getattr(mods[0], 'pattern', None)!r}, expected {_PATCH_PATTERN!r}"
    elif names[1:] == ["LayerNorm", "Linear", "LayerNorm"]:
        why = (
            "LayerNorm over each patch's pixels before the projection (current vit-pytorch): the fused "
            "patch_embed op has no pre-LayerNorm"
        )
    elif len(mods) != 2 or linear_reason(f"{path}.1", mods[1]):
        why = f"{path} is {names}, expected [Rearrange, Linear] or [Rearrange, LayerNorm, Linear, LayerNorm]"
    else:
        ax = mods[0].axes_lengths
        if ax.get("p1") != ax.get("p2"):
            why = f"non-square patches {ax}; the fused op takes one patch_size"
        else:
            p = int(ax["p1"])
            why = bypassed_hooks({f"{path}.0": mods[0], f"{path}.1": mods[1]})
    entry = ReportEntry(
        path,
        "patch_embed",
        FAMILY,
        why is None,
        why or "",
        ("class token and position embedding stay in ViT.forward",) if why is None else (),
    )
    build = None
    if why is None:

        def build():
            w = FusedVitPytorchPatchEmbed(seq, backend, [entry])
            w.vk_patch = p
            return w

    return Candidate(path, seq, [entry], build)


def candidates(root: nn.Module, backend: str, ops_: tuple) -> List[Candidate]:
    transformers_, vits = _classes()
    if not transformers_:
        return []
    out: List[Candidate] = []
    for path, m in root.named_modules():
        if isinstance(m, SwapWrapper):
            continue
        if isinstance(m, vits) and "to_patch_embedding" in m._modules:
            c = _patch_candidate(join(path, "to_patch_embedding"), m.to_patch_embedding, backend, "patch_embed" in ops_)
            out += [c] if c else []
        if not isinstance(m, transformers_):
            continue
        base_why = overrides_load_state_dict(m)
        if type(m).forward not in tuple(c.forward for c in transformers_):
            base_why = f"{type(m).__name__} overrides Transformer.forward"
        entries, plan = [], []
        for i, pair in enumerate(m.layers):
            lp = join(path, f"layers.{i}")
            if not (isinstance(pair, nn.ModuleList) and len(pair) == 2):
                entries.append(ReportEntry(lp, "attention", FAMILY, False, "layer is not [attention, feed-forward]"))
                plan.append((False, None))
                continue
            if "attention" not in ops_:
                why, note = "not requested (ops)", None
            else:
                why, note, _ = (base_why, None, None) if base_why else _attention_reason(f"{lp}.0", pair[0], backend)
            entries.append(
                ReportEntry(
                    f"{lp}.0", "attention", FAMILY, why is None, why or "", (note,) if note and why is None else ()
                )
            )
            fuse_attn = why is None
            approx = None
            if "mlp" not in ops_:
                why = "not requested (ops)"
            else:
                why, approx = (base_why, None) if base_why else _mlp_reason(f"{lp}.1", pair[1])
            entries.append(ReportEntry(f"{lp}.1", "mlp", FAMILY, why is None, why or ""))
            plan.append((fuse_attn, approx if why is None else None))
        build = None
        if any(e.fused for e in entries):

            def build(m=m, entries=entries, plan=plan):
                w = FusedVitPytorchTransformer(m, backend, entries)
                w.vk_plan = plan
                return w

        out.append(Candidate(path, m, entries, build))
    return out
