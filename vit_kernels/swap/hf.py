"""Hugging Face transformers ViT (ViTModel, ViTForImageClassification, ...).

Two module layouts, read from what is there:
- 5.x: ``layers[i]`` = ViTLayer(layernorm_before, attention=ViTAttention(q_proj, k_proj, v_proj,
  o_proj), layernorm_after, mlp=ViTMLP(fc1, activation_fn, fc2), dropout);
  ``forward(hidden_states, attention_mask=None, **kwargs) -> Tensor``.
- 4.x (4.57): ``encoder.layer[i]`` = ViTLayer(layernorm_before, attention=ViTAttention(
  attention=ViTSelfAttention(query, key, value), output=ViTSelfOutput(dense, dropout)),
  layernorm_after, intermediate=ViTIntermediate(dense, intermediate_act_fn),
  output=ViTOutput(dense, dropout)); ``forward(hidden_states, head_mask=None) -> Tensor``.
  Older 4.x layers that take ``output_attentions`` and return tuples are left (reported).

Each layer is replaced by a fused layer that holds its children under the same names and is also
an instance of the layer's own class (a subclass made per class), so transformers' output
capturing (``output_hidden_states``: hooks installed by class, lazily, or before fuse and then
shared) and gradient checkpointing find it as they find a ViTLayer.
It runs ``x = linear(qkv_attention(x, [Wq; Wk; Wv], layernorm_before), o_proj, residual=x)`` and
``x = layernorm_gelu_mlp(x, layernorm_after, fc1, fc2, residual=x)``.
``ViTEmbeddings`` (its own forward) is replaced whole by :class:`FusedHFEmbeddings`: one
``patch_embed`` launch writes projection + class token + position embedding, the position embedding
resampled by the module's own ``interpolate_pos_encoding`` on every call at another image size, as
transformers does (dynamic resolution with ``interpolate_pos_encoding=True``). Other embeddings classes holding a
``ViTPatchEmbeddings`` get only its ``projection`` (Conv2d) replaced by
:class:`~vit_kernels.swap.patch.FusedPatchConv`. uint8 images are not served: ``ViTModel`` casts
``pixel_values`` to the weight's dtype before the embeddings.

The separate q/k/v Linears feed the fused projection through a concatenation ``[Wq; Wk; Wv]``
(and biases) made on every call (one copy of the three weights, ~2 weight reads more than HF's three
projections): the stored parameters do not change, and it is never stale. A cache keyed on the
version counters would miss in-place writes through ``.data`` (a DINO teacher's EMA update,
PEFT's merge), which do not bump them.

Attention weights (``output_attentions=True``, or the config's): transformers (5.x) collects them with
forward hooks it installs on the attention modules, which the fused layer does not call. While its
collector asks for ``attentions``, the fused layer runs ``qkv_attention`` with a weights request
(:class:`~vit_kernels.ops.attention_stats.StatsRequest`): on triton and cuda the flash kernel keeps
the row log-sum-exp and a second kernel writes P = exp(S - LSE) (torch: the full softmax), then
``o_proj`` apart from the residual add, and hands ``(o_proj output, P)`` to those hooks as the
attention module's output. Calls that ask for nothing run the fast path untouched. The weights are
served whatever ``attn_implementation`` the config names (SDPA would return none). Inside an
``attention_stats.recording`` block the same kernels also give what the recording asks for. Under autograd
(the weights kernel has no backward) and with 4.x's capture (which patches the module's forward),
such calls run the layer's own forward instead; so they do under torch.compile (the statistics path
is not a custom op).

A call with an attention mask / head mask, the weight captures above, or in training mode with
dropout p > 0 runs the layer's own forward, saying so
(:meth:`~vit_kernels.swap.wrapper.SwapWrapper.fall_back`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..backends import needs_grad
from ..ops import attention_stats
from ..ops.attention_stats import StatsRequest
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
from .wrapper import _LOCK, SwapWrapper, at_autocast, with_residual
from .patch import conv_reason, patch_conv_candidate

FAMILY = "transformers"

# Layer classes whose forward is known to be the ViTLayer forward of one of the two layouts above.
# Other classes copied from ViTLayer (DeiTLayer, ViTMAELayer, ...) can be appended by a user who
# has checked that their forward is the same; only ViTLayer is tested.
EXTRA_LAYER_CLASSES: List[type] = []

_IGNORABLE_KWARGS = ("output_hidden_states", "output_attentions", "return_dict")
_WEIGHTS = StatsRequest(rows=None, weights=True)  # output_attentions: the full P, from the kernel's LSE


def _layer_classes() -> Tuple[type, ...]:
    classes = list(EXTRA_LAYER_CLASSES)
    try:
        from transformers.models.vit.modeling_vit import ViTLayer

        classes.append(ViTLayer)
    except Exception:
        pass
    return tuple(classes)


def _layout(layer: nn.Module) -> Optional[str]:
    a = getattr(layer, "attention", None)
    if (
        a is not None
        and all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and hasattr(getattr(layer, "mlp", None), "fc1")
    ):
        return "5.x"
    if (
        a is not None
        and all(hasattr(getattr(a, "attention", None), n) for n in ("query", "key", "value"))
        and hasattr(getattr(a, "output", None), "dense")
        and hasattr(getattr(layer, "intermediate", None), "dense")
        and hasattr(getattr(layer, "output", None), "dense")
    ):
        return "4.x"
    return None


class _Parts:
    """The tensors and modules of one layer, named the same for both layouts."""

    def __init__(self, layer: nn.Module, layout: str):
        if layout == "5.x":
            a = layer.attention
            self.q, self.k, self.v, self.o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
            self.self_attn = a
            self.num_heads, self.head_dim = a.num_attention_heads, a.head_dim
            self.scale = getattr(a, "scaling", self.head_dim**-0.5)
            self.attn_p = float(a.attention_dropout)
            self.fc1, self.act, self.fc2 = layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2
            self.drops = {"dropout": layer.dropout}
            self.attn_modules = {"attention": a}
            self.mlp_modules = {"mlp": layer.mlp}
        else:
            sa = layer.attention.attention
            self.q, self.k, self.v, self.o = sa.query, sa.key, sa.value, layer.attention.output.dense
            self.self_attn = sa
            self.num_heads, self.head_dim = sa.num_attention_heads, sa.attention_head_size
            self.scale = getattr(sa, "scaling", self.head_dim**-0.5)
            self.attn_p = float(getattr(sa, "dropout_prob", dropout_p(getattr(sa, "dropout", None))))
            self.fc1, self.act, self.fc2 = (
                layer.intermediate.dense,
                layer.intermediate.intermediate_act_fn,
                layer.output.dense,
            )
            self.drops = {
                "attention.output.dropout": layer.attention.output.dropout,
                "output.dropout": layer.output.dropout,
            }
            self.attn_modules = {"attention": layer.attention}
            self.mlp_modules = {"intermediate": layer.intermediate, "output": layer.output}


def _capturing_attentions(self_attn: nn.Module):
    """How transformers is collecting attention weights now: "patched" (4.x: check_model_inputs
    patches the module's forward per call; only the module's own forward serves it), "hooks" (5.x:
    its collector asks for ``attentions`` and hooks on the module append them), or None."""
    if "forward" in self_attn.__dict__:
        return "patched"
    try:
        from transformers.utils.output_capturing import _active_collector
    except Exception:
        return None
    collected = _active_collector.get()
    return "hooks" if collected and "attentions" in collected else None


def _is_capture_hook(fn) -> bool:
    return getattr(fn, "__name__", "") == "output_capturing_hook"


class FusedHFLayer(SwapWrapper):
    """A transformers ViTLayer running fused ops; see the module docstring. Instances are also
    instances of the replaced layer's class. hidden_states: (batch, tokens, dim) -> same."""

    family = FAMILY

    def __reduce_ex__(self, protocol):
        """Pickled (torch.save of the model, copy.deepcopy) by the layer's own class: the fused class,
        made at fuse time, is not importable by name, so loading makes it again (:func:`_new_fused`)."""
        (base,) = [c for c in type(self).__bases__ if c is not FusedHFLayer]
        return (_new_fused, (base,), self.__getstate__())

    def _parts(self) -> _Parts:
        return _Parts(self, self.vk_layout)

    def dropouts(self):
        p = self._parts()
        out = []
        if self.fused_ops.get("attention"):
            out.append(("attention dropout", p.attn_p))
        out += [(n, dropout_p(m)) for n, m in p.drops.items()]
        return out

    def qkv_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """[Wq; Wk; Wv] (3*inner, dim) and [bq; bk; bv] (or None), concatenated on every call (under
        autograd and torch.compile part of the graph): never a stale copy (see the module docstring)."""
        p = self._parts()
        bs = (p.q.bias, p.k.bias, p.v.bias)
        return torch.cat((p.q.weight, p.k.weight, p.v.weight)), (torch.cat(bs) if bs[0] is not None else None)

    def bypassed(self):
        p = self._parts()
        mods = {}
        if self.fused_ops.get("attention"):
            mods.update(layernorm_before=self.layernorm_before, **p.attn_modules)
        if self.fused_ops.get("mlp"):
            mods.update(layernorm_after=self.layernorm_after, **p.mlp_modules)
        if "dropout" in self._modules:
            mods["dropout"] = self._modules["dropout"]
        return mods

    def hook_exempt(self, hook) -> bool:
        return _is_capture_hook(hook)  # the attention weights it collects: served by _serve_weights

    def weight_hooks(self, p: _Parts) -> list:
        """The output-capturing hooks on the attention module (5.x), which take its (output, weights)."""
        return [h for h in p.self_attn._forward_hooks.values() if _is_capture_hook(h)]

    def runtime_notes(self):
        notes = super().runtime_notes()
        n = self.__dict__.get("_vk_weights_served", 0)
        if n:
            notes.insert(
                0,
                f"attention weights (output_attentions) served fused {n} time(s): P = exp(S - LSE) from the "
                "attention kernel's row statistics, the fast path untouched when none are asked for",
            )
        return notes

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        p = self._parts()
        extra = [a for a in args if a is not None and a is not False]
        extra += [v for k, v in kwargs.items() if k not in _IGNORABLE_KWARGS and v is not None and v is not False]
        why = capture = None
        if extra:
            why = "an attention mask / head mask is given: the fused attention takes none"
        elif hidden_states.dim() != 3:
            why = "hidden_states is not (batch, tokens, dim)"
        elif self.fused_ops.get("attention"):
            capture = _capturing_attentions(p.self_attn)
            if capture == "patched":
                why = (
                    "attention weights are asked for (output_attentions) through transformers 4.x's patched "
                    "forward, which only the attention module's own forward serves"
                )
            elif capture and not self.weight_hooks(p):
                capture = None  # nothing would take them: the original returns none either
            elif capture and needs_grad((hidden_states, *self.parameters())):
                why = (
                    "attention weights are asked for (output_attentions) under autograd: the weights kernel "
                    "(P = exp(S - LSE)) has no backward"
                )
            elif capture and torch.compiler.is_compiling():
                why = (
                    "attention weights are asked for (output_attentions) under torch.compile: the weights "
                    "kernel is not a custom op the graph can hold"
                )
        why = why or self.original_reason(hidden_states)
        if why:
            return self.fall_back(why, hidden_states, *args, **kwargs)
        x = hidden_states
        if self.fused_ops.get("attention"):
            w, b = self.qkv_weights()
            n = self.layernorm_before
            o = at_autocast(
                ops.qkv_attention,
                x,
                w,
                b,
                num_heads=p.num_heads,
                scale=p.scale,
                norm_weight=n.weight,
                norm_bias=n.bias,
                eps=n.eps,
                backend=self.backend,
                **(dict(stats=self._weights_request()) if capture else {}),
            )
            if capture:
                x = self._serve_weights(p, x, *o)
            else:
                x = with_residual(ops.linear, o, p.o.weight, p.o.bias, residual=x, backend=self.backend)
        elif self.vk_layout == "5.x":
            h, _ = self.attention(self.layernorm_before(x), None)
            x = self.dropout(h) + x
        else:
            x = self.attention(self.layernorm_before(x), None) + x
        if self.fused_ops.get("mlp"):
            n = self.layernorm_after
            return with_residual(
                ops.layernorm_gelu_mlp,
                x,
                n.weight,
                n.bias,
                p.fc1.weight,
                p.fc1.bias,
                p.fc2.weight,
                p.fc2.bias,
                eps=n.eps,
                approximate=approximate_now(p.act, self.approximate),
                residual=x,
                backend=self.backend,
            )
        if self.vk_layout == "5.x":
            return self.dropout(self.mlp(self.layernorm_after(x))) + x
        return self.output(self.intermediate(self.layernorm_after(x)), x)

    @staticmethod
    def _weights_request() -> StatsRequest:
        """The full weights, plus what an active ``attention_stats.recording`` block asks for (the
        explicit request keeps the op from recording: _serve_weights records it)."""
        active = attention_stats.active_request()
        return _WEIGHTS if active is None else dataclasses.replace(active, weights=True)

    def _serve_weights(self, p: _Parts, x: Tensor, o: Tensor, stats) -> Tensor:
        """The attention branch when weights are collected: o_proj apart (the attention module's
        output), the capture hooks given (output, P) as the module's own call gives them, then the
        residual add. x: the layer input (batch, tokens, dim); o: (batch, tokens, inner)."""
        active = attention_stats.active_request()
        if active is not None:  # what the recording asked for, as the op would have recorded it
            w = stats.weights if active.weights else None
            attention_stats.record(dataclasses.replace(stats, weights=w))
        h = at_autocast(ops.linear, o, p.o.weight, p.o.bias, backend=self.backend)
        # the module's input (the LayerNorm output) is never formed: the hooks get the layer's input
        for hook in self.weight_hooks(p):
            hook(p.self_attn, (x,), (h, stats.weights))
        with _LOCK:
            self.__dict__["_vk_weights_served"] = self.__dict__.get("_vk_weights_served", 0) + 1
        return h + x  # dropout is inactive on the fused path (eval mode or p = 0: original_reason)


_FUSED_CLASSES: Dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """FusedHFLayer + the layer's own class, so isinstance(fused, ViTLayer) holds."""
    if cls not in _FUSED_CLASSES:  # setdefault: threads fusing at once all get the first class made
        _FUSED_CLASSES.setdefault(cls, type(f"Fused{cls.__name__}", (FusedHFLayer, cls), {"__module__": __name__}))
    return _FUSED_CLASSES[cls]


def _new_fused(cls: type) -> FusedHFLayer:
    """An empty instance of the fused class of ``cls`` (its state set by pickle after)."""
    return object.__new__(_fused_class(cls))


def _attention_reason(path: str, layer: nn.Module, p: _Parts, backend: str):
    why = first_reason(
        layernorm_reason(join(path, "layernorm_before"), layer.layernorm_before),
        *(linear_reason(join(path, n), m) for n, m in (("q", p.q), ("k", p.k), ("v", p.v), ("o", p.o))),
    )
    if why:
        return why, None
    dim = layer.layernorm_before.normalized_shape[0]
    shapes = {tuple(m.weight.shape) for m in (p.q, p.k, p.v)}
    if len(shapes) != 1 or p.q.in_features != dim or p.o.out_features != dim:
        return f"q/k/v/o shapes do not form a self-attention over dim {dim}", None
    if len({m.bias is None for m in (p.q, p.k, p.v)}) != 1:
        return "some of q/k/v have a bias and some do not", None
    if p.q.out_features != p.num_heads * p.head_dim:
        return f"q projects to {p.q.out_features} features, not num_heads*head_dim={p.num_heads * p.head_dim}", None
    why = first_reason(*(dropout_reason(join(path, n), m) for n, m in p.drops.items()))
    if why:
        return why, None
    why, note = head_dim_reason(backend, p.head_dim)
    mods = {join(path, "layernorm_before"): layer.layernorm_before}
    mods.update({join(path, n): m for n, m in p.attn_modules.items()})
    return why or bypassed_hooks(mods, ignore=_is_capture_hook), note


def _mlp_reason(path: str, layer: nn.Module, p: _Parts):
    approx, why = gelu_approximate(p.act)
    dim = layer.layernorm_after.normalized_shape[0] if isinstance(layer.layernorm_after, nn.LayerNorm) else None
    why = first_reason(
        why,
        layernorm_reason(join(path, "layernorm_after"), layer.layernorm_after),
        linear_reason(join(path, "fc1"), p.fc1),
        linear_reason(join(path, "fc2"), p.fc2),
        *(dropout_reason(join(path, n), m) for n, m in p.drops.items()),
    )
    if why:
        return why, None
    if p.fc1.in_features != dim or p.fc2.out_features != dim:
        return f"fc1/fc2 do not map dim {dim} -> hidden -> {dim}", None
    mods = {join(path, "layernorm_after"): layer.layernorm_after}
    mods.update({join(path, n): m for n, m in p.mlp_modules.items()})
    return bypassed_hooks(mods, ignore=_is_capture_hook), approx


def _patch_classes() -> Tuple[type, ...]:
    try:
        from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

        return (ViTPatchEmbeddings,)
    except Exception:
        return ()


def _embeddings_class() -> Optional[type]:
    try:
        from transformers.models.vit.modeling_vit import ViTEmbeddings

        return ViTEmbeddings
    except Exception:
        return None


class FusedHFEmbeddings(SwapWrapper):
    """transformers' ``ViTEmbeddings`` as one ``patch_embed`` launch: patch projection, class token
    and position embedding written into the (batch, 1 + patches, dim) token buffer. With
    ``interpolate_pos_encoding=True`` another image size takes the module's own
    ``interpolate_pos_encoding`` (bicubic, as transformers does), computed on every call as
    transformers does (never stale, whatever wrote the parameter). ``bool_masked_pos``, active dropout and the
    rest of the fall-backs run the original module (visibly).
    pixel_values: (batch, num_channels, H, W) -> (batch, 1 + (H/p)*(W/p), dim)."""

    family = FAMILY

    def dropouts(self):
        return [("dropout", dropout_p(self.dropout))]

    def bypassed(self):
        return dict(self._modules)  # patch_embeddings (and its projection), dropout

    def hook_exempt(self, hook) -> bool:
        return _is_capture_hook(hook)

    def pos_embed_for(self, H: int, W: int, dim: int, interpolate: bool) -> Tensor:
        """The position embedding transformers adds to a (H, W) image: as it is without ``interpolate``
        (forward admits only the configured size then), else what ``interpolate_pos_encoding`` returns,
        which keeps it as it is only for a square image of the same patch count (a non-square configured
        size is resampled too, as transformers does)."""
        pe = self.position_embeddings
        p = self.patch_size
        if not interpolate or (H == W and (H // p) * (W // p) == pe.shape[1] - 1):
            return pe
        probe = torch.empty((1, 1 + (H // p) * (W // p), dim), device="meta")  # only its shape is read
        return self._sync_original().interpolate_pos_encoding(probe, H, W)  # every call, as transformers does

    def forward(
        self, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None, interpolate_pos_encoding: bool = False
    ) -> Tensor:
        pe, p = self.patch_embeddings, self.patch_size
        why = None
        if bool_masked_pos is not None:
            why = "bool_masked_pos is given: masked patches are not fused"
        elif pixel_values.dim() != 4 or pixel_values.shape[1] != pe.num_channels:
            why = f"pixel_values are not (batch, {pe.num_channels}, H, W)"
        elif pixel_values.shape[-2] % p or pixel_values.shape[-1] % p:
            why = f"the image size {tuple(pixel_values.shape[-2:])} is not a multiple of the patch size {p}"
        elif not interpolate_pos_encoding and tuple(pixel_values.shape[-2:]) != tuple(self.image_size):
            why = "another image size without interpolate_pos_encoding=True (the original module refuses it)"
        why = why or self.original_reason(pixel_values)
        if why:
            return self.fall_back(
                why, pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
            )
        conv = pe.projection
        pos = self.pos_embed_for(*pixel_values.shape[-2:], conv.out_channels, interpolate_pos_encoding)
        # under autocast: the result in the dtype eager gives (its class token and pos embedding's), the
        # kernel adding them at the autocast dtype (tests/test_swap_autocast.py: within 2x eager's error)
        return at_autocast(
            ops.patch_embed,
            pixel_values,
            conv.weight,
            conv.bias,
            patch_size=p,
            pos_embed=pos,
            cls_token=self.cls_token,
            backend=self.backend,
            out_dtype=torch.promote_types(self.cls_token.dtype, pos.dtype),
        )


def _embeddings_candidate(path: str, m: nn.Module, backend: str, enabled: bool) -> Candidate:
    """ViTEmbeddings (its own forward, no mask token in use) fused whole: projection, class token, position embedding."""
    proj = join(path, "patch_embeddings.projection")
    why = (
        "not requested (ops)"
        if not enabled
        else (
            first_reason(
                conv_reason(proj, m.patch_embeddings.projection),
                dropout_reason(join(path, "dropout"), m.dropout),
                bypassed_hooks({join(path, n): c for n, c in m._modules.items()}, ignore=_is_capture_hook),
                overrides_load_state_dict(m),
            )
        )
    )
    notes = (
        "class token and position embedding written by the patch_embed kernel; with interpolate_pos_encoding "
        "the position embedding is resampled on every call at another size, as transformers does",
        "uint8 images not served: ViTModel casts pixel_values to the weight's dtype before the embeddings "
        "(normalize with the image processor)",
    )
    entry = ReportEntry(path, "patch_embed", FAMILY, why is None, why or "", notes if why is None else ())
    return Candidate(path, m, [entry], (lambda: FusedHFEmbeddings(m, backend, [entry])) if why is None else None)


def candidates(root: nn.Module, backend: str, ops_: tuple) -> List[Candidate]:
    classes = _layer_classes()
    if not classes:
        return []
    out: List[Candidate] = []
    patch_classes, emb_cls = _patch_classes(), _embeddings_class()
    whole = set()  # ViTPatchEmbeddings fused as part of their ViTEmbeddings
    for path, m in root.named_modules():
        if isinstance(m, FusedHFEmbeddings):
            whole.add(join(path, "patch_embeddings"))
        elif (
            emb_cls is not None
            and type(m) is emb_cls
            and isinstance(m.patch_embeddings, patch_classes)
            and type(m.patch_embeddings).forward is patch_classes[0].forward
            and "projection" in m.patch_embeddings._modules
        ):
            out.append(_embeddings_candidate(path, m, backend, "patch_embed" in ops_))
            whole.add(join(path, "patch_embeddings"))
    for path, m in root.named_modules():
        if path in whole or any(path.startswith(w + ".") for w in whole) or isinstance(m, SwapWrapper):
            continue
        if patch_classes and isinstance(m, patch_classes) and "projection" in m._modules:
            c = patch_conv_candidate(
                join(path, "projection"),
                m.projection,
                FAMILY,
                backend,
                "patch_embed" in ops_,
                note="uint8 images not served: ViTModel casts pixel_values to the weight's "
                "dtype before the patch embedding (normalize with the image processor)",
            )
            out += [c] if c else []
    layers = [
        (path, m) for path, m in root.named_modules() if not isinstance(m, SwapWrapper) and isinstance(m, classes)
    ]
    for path, m in layers:
        layout = _layout(m)
        base_why = None
        if layout is None:
            base_why = f"{type(m).__name__} has neither the 5.x nor the 4.x ViT layer layout"
        elif "output_attentions" in inspect.signature(type(m).forward).parameters:
            base_why = f"{type(m).__name__}.forward takes output_attentions and returns tuples (transformers < 4.54)"
        base_why = base_why or overrides_load_state_dict(m)
        parts = None if base_why else _Parts(m, layout)
        names = ("attention", "mlp") if layout == "5.x" else ("attention", "intermediate")
        note = approx = None
        if "attention" not in ops_:
            why = "not requested (ops)"
        else:
            why, note = (base_why, None) if base_why else _attention_reason(path, m, parts, backend)
        notes = ("q/k/v weights concatenated on every call (one copy of the three weights)",) + (
            (note,) if note else ()
        )
        notes += (
            (
                "output_attentions served fused: P = exp(S - LSE) from the attention kernel's row statistics "
                "(under autograd or torch.compile the original layer serves it)",
            )
            if layout == "5.x"
            else ("output_attentions (4.x capture) runs the original layer",)
        )
        entries = [
            ReportEntry(join(path, names[0]), "attention", FAMILY, why is None, why or "", notes if why is None else ())
        ]
        if "mlp" not in ops_:
            why = "not requested (ops)"
        else:
            why, approx = (base_why, None) if base_why else _mlp_reason(path, m, parts)
        entries.append(ReportEntry(join(path, names[1]), "mlp", FAMILY, why is None, why or ""))
        build = None
        if any(e.fused for e in entries):

            def build(m=m, entries=entries, approx=approx, layout=layout):
                w = _fused_class(type(m))(m, backend, entries)
                w.vk_layout = layout
                w.approximate = approx
                return w

        out.append(Candidate(path, m, entries, build))
    return out
