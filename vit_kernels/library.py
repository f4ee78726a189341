"""The fused ops as PyTorch custom ops (``torch.ops.vit_kernels.<op>``), registered with torch.library.

Each op in vit_kernels/ops/ is one custom op with
- a schema (below, ``SCHEMAS``): tensors, then the op's numbers, then ``backend`` and ``tune``;
- an implementation: that op file's ``dispatch`` (argument checks, ``backends.resolve``, the launch),
  so the backend choice, ``last_decision``, logging and tuning look-ups run when the op runs, never
  while torch.compile, torch.export or torch.fx trace it (a traced graph holds one node per call);
- a fake (meta) implementation: the same argument checks, then an empty output of the right shape, so
  a tracer sees the same clear error an eager call gets;
- a backward (``register_autograd``, :func:`_backward`), one function per op (``_<op>_backward``). For
  backend "triton" it runs the Triton backward kernels (vit_kernels.autograd) on the saved inputs, first
  recomputing with the Triton forward what they read that the op does not return (attention's row
  log-sum-exp and q, k, v; the MLP's hidden activation and LayerNorm statistics); a backward that is
  traced (AOT autograd under torch.compile) records them as one more custom op,
  ``torch.ops.vit_kernels.<op>_backward``; under ``create_graph=True`` it raises (the kernels have no
  backward). For the other backends it recomputes the op's plain PyTorch path and takes its
  vector-Jacobian product (torch.func.vjp).

Every output of the registered op is a new contiguous tensor (what the fake implementation promises
the compiler): a backend whose result has other strides (SDPA's on some devices) is copied once
there. A plain eager call returns the backend's result as it is.

The public functions (``vit_kernels.ops.flash_attention`` etc.) call :func:`run`: with autograd
recording (an input requires grad) in eager mode they run the op's implementation, which takes
Triton's forward and backward kernels for backend "triton" (vit_kernels.autograd), PyTorch's
autograd path for "torch" and "auto", and raises for "cuda" (forward-only kernels); so does
torch.compile with autograd recording (:func:`_compiled_with_grad`): "triton" traces the custom op
(and its backward op), "torch" and "auto" the plain PyTorch path op by op, "cuda" raises; a plain eager
call runs the op's implementation without the dispatcher's Python round trip; anything that traces or intercepts gets the custom op. Under ``torch.fx.symbolic_trace``
(tensors are ``fx.Proxy``) they record the custom op as one node whatever the grad mode: the graph
then runs the op and its backward above.

Under ``torch.autocast`` (for the tensors' device) backends "auto", "triton" and "cuda" run the op as
``torch.library.register_autocast`` makes a custom op run, at the autocast dtype of the moment: its
floating tensors (float64 apart) cast to that dtype, the op run with autocast off (:func:`_autocast`:
the public functions, their statistics path included, and the custom op's own Autocast kernels,
:func:`_register_autocast`). So they
compute at that dtype and return it whichever path ``auto`` timed fastest (the kernels take one dtype;
before, ``auto`` returned the PyTorch path's autocast result or the kernels' float32 one, by timing).
Backend "torch" runs the op's PyTorch path under autocast itself, op by op as PyTorch runs it (LayerNorm
in float32, the matmuls at the autocast dtype, a float32 residual added in float32); the custom op's
Autocast kernel runs that path op by op too, so a traced graph holds autocast's casts (a compiled graph
runs its nodes with autocast off: the op's own node would run the path in float32). The swap wrappers
call the ops the same way
(vit_kernels.swap.wrapper.at_autocast); vit_kernels.nn's modules cast before they call.

Under torch.compile the op's implementation runs when the compiled code runs, so ``last_decision``,
``record_decisions``, logging and tuning work as in eager; ``attention_stats.recording`` does not
(statistics are eager-only). A timm model traced by torch.fx with its ``attn_mask`` argument
symbolic runs its blocks' own forward (a mask may come): pass
``concrete_args={"attn_mask": None, "is_causal": False}`` for the fused path.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import types
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import autograd, backends, checks, replay, tuning

# the op files (vit_kernels.ops re-exports functions of the same names, hence import_module)
_fa, _qkv, _mlp, _pe, _linear = (
    importlib.import_module(f"vit_kernels.ops.{m}")
    for m in ("flash_attention", "qkv_attention", "mlp", "patch_embed", "linear")
)

NAMESPACE = "vit_kernels"

SCHEMAS = {
    "flash_attention": "(Tensor q, Tensor k, Tensor v, float? scale, str backend, str? tune) -> Tensor",
    "qkv_attention": "(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor? norm_weight, Tensor? norm_bias, "
    "int num_heads, float? scale, float eps, str? path, str backend, str? tune) -> Tensor",
    "layernorm_gelu_mlp": "(Tensor x, Tensor? norm_weight, Tensor? norm_bias, Tensor fc1_weight, "
    "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? residual, "
    "Tensor? layer_scale, float eps, str approximate, str backend, str? tune) -> Tensor",
    "patch_embed": "(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
    "int patch_size, float[]? image_mean, float[]? image_std, str backend, str? tune) -> Tensor",
    "linear": "(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? layer_scale, str backend, "
    "str? tune) -> Tensor",
}

# op -> number of leading tensor arguments in its schema
N_TENSORS = {"flash_attention": 3, "qkv_attention": 5, "layernorm_gelu_mlp": 9, "patch_embed": 5, "linear": 5}


# ------------------------------------------------------------------ each op: checks -> output shape
def _flash_attention_shape(q, k, v, scale, backend, tune) -> Tuple[int, ...]:
    """q, k, v: (batch, heads, tokens, head_dim) -> (batch, heads, q_tokens, head_dim)."""
    _fa.check_flash_attention(q, k, v, scale)
    return tuple(q.shape)


def _qkv_attention_shape(
    x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune
) -> Tuple[int, ...]:
    """x: (batch, tokens, dim) -> (batch, tokens, inner)."""
    _, inner, _, _, _ = _qkv.check_qkv_attention(x, qkv_weight, qkv_bias, num_heads, norm_weight, norm_bias, scale, eps)
    return (x.shape[0], x.shape[1], inner)


def _layernorm_gelu_mlp_shape(
    x,
    norm_weight,
    norm_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    residual,
    layer_scale,
    eps,
    approximate,
    backend,
    tune,
) -> Tuple[int, ...]:
    """x: (..., dim) -> (..., out)."""
    _mlp.check_mlp(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, eps
    )
    return tuple(x.shape[:-1]) + (fc2_weight.shape[0],)


def _patch_embed_shape(
    images, weight, bias, pos_embed, cls_token, patch_size, image_mean, image_std, backend, tune
) -> Tuple[int, ...]:
    """images: (batch, C, H, W) -> (batch, prefix + patches, dim)."""
    tokens, dim, _ = _pe.check_patch_embed(
        images, weight, bias, patch_size, pos_embed, cls_token, image_mean, image_std
    )
    return (images.shape[0], tokens, dim)


def _linear_shape(x, weight, bias, residual, layer_scale, backend, tune) -> Tuple[int, ...]:
    """x: (..., in) -> (..., out)."""
    _linear.check_linear(x, weight, bias, residual, layer_scale)
    return tuple(x.shape[:-1]) + (weight.shape[0],)


# ------------------------------------------------------------- each op: the plain PyTorch path
# Called with the op's schema arguments; differentiable. What autograd runs (see run) and what the
# backward functions recompute.
def _flash_attention_torch(q, k, v, scale, backend, tune):
    return _fa.sdpa(q, k, v, _fa.check_flash_attention(q, k, v, scale))


def _qkv_attention_torch(x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune):
    num_heads, _, _, scale, eps = _qkv.check_qkv_attention(
        x, qkv_weight, qkv_bias, num_heads, norm_weight, norm_bias, scale, eps
    )
    return _qkv.qkv_attention_torch(
        x, qkv_weight, qkv_bias, num_heads=num_heads, scale=scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps
    )


def _layernorm_gelu_mlp_torch(
    x,
    norm_weight,
    norm_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    residual,
    layer_scale,
    eps,
    approximate,
    backend,
    tune,
):
    eps = _mlp.check_mlp(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, eps
    )
    return _mlp.layernorm_gelu_mlp_torch(
        x,
        norm_weight,
        norm_bias,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        eps=eps,
        approximate=approximate,
        residual=residual,
        layer_scale=layer_scale,
    )


def _patch_embed_torch(images, weight, bias, pos_embed, cls_token, patch_size, image_mean, image_std, backend, tune):
    _, _, pixel_norm = _pe.check_patch_embed(
        images, weight, bias, patch_size, pos_embed, cls_token, image_mean, image_std
    )
    norm = (
        {}
        if pixel_norm is None
        else dict(zip(("image_mean", "image_std"), _pe.pixel_norm_tensors(pixel_norm, images.device)))
    )
    return _pe.patch_embed_torch(
        images, weight, bias, patch_size=int(patch_size), pos_embed=pos_embed, cls_token=cls_token, **norm
    )


def _linear_torch(x, weight, bias, residual, layer_scale, backend, tune):
    _linear.check_linear(x, weight, bias, residual, layer_scale)
    return _linear.linear_torch(x, weight, bias, residual, layer_scale)


# ------------------------------------------------------------------ each op: the implementation
def _flash_attention_impl(q, k, v, scale, backend, tune):
    return _fa.dispatch(q, k, v, scale, backend, tune)


def _qkv_attention_impl(x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune):
    return _qkv.dispatch(x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, path, backend, tune)


def _layernorm_gelu_mlp_impl(
    x,
    norm_weight,
    norm_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    residual,
    layer_scale,
    eps,
    approximate,
    backend,
    tune,
):
    return _mlp.dispatch(
        x,
        norm_weight,
        norm_bias,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        residual,
        layer_scale,
        eps,
        approximate,
        backend,
        tune,
    )


def _patch_embed_impl(images, weight, bias, pos_embed, cls_token, patch_size, image_mean, image_std, backend, tune):
    return _pe.dispatch(images, weight, bias, pos_embed, cls_token, patch_size, image_mean, image_std, backend, tune)


def _linear_impl(x, weight, bias, residual, layer_scale, backend, tune):
    return _linear.dispatch(x, weight, bias, residual, layer_scale, backend, tune)


# ------------------------------------------------------------------------ each op: the backward
# One function per op, the place where a backward kernel plugs in. Each returns one gradient per
# schema argument (None for the numbers and strings).
def _recompute_vjp(op: str, ctx, grad: Tensor) -> tuple:
    """The gradients of ``op``'s tensor inputs: the plain PyTorch path run again on the saved inputs
    and its vector-Jacobian product with ``grad``; None for absent tensors and the other arguments."""
    tensors, rest = ctx.saved_tensors, ctx.vk_rest
    present = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point()]  # not uint8 images
    torch_path = TORCH_PATHS[op]

    def f(*xs):
        full = list(tensors)
        for i, x in zip(present, xs):
            full[i] = x
        return torch_path(*full, *rest)

    _, vjp = torch.func.vjp(f, *[tensors[i] for i in present])
    grads = [None] * (len(tensors) + len(rest))
    for i, g in zip(present, vjp(grad)):
        grads[i] = g
    return tuple(grads)


def _backward(op: str) -> Callable:
    """The backward registered for ``op`` (``register_autograd``). Backend "triton": run eagerly on
    plain tensors, the Triton backward kernels (``BACKWARDS[op]``, on parameters of other strides copied
    as the forward's dispatch copies them, :data:`UNIT_STRIDE_PARAMS`); traced (torch.compile's AOT
    autograd, opcheck, a mode: fake or wrapped tensors, which no kernel can take), the custom op
    ``<op>_backward`` (:func:`_traced_triton_backward`), one node of the backward graph that runs those
    kernels when the graph runs; under ``create_graph=True`` a RuntimeError (the kernels have no
    backward: the gradients would carry no graph, and a gradient penalty built on them would drop out
    silently). The other backends: the plain PyTorch path's vector-Jacobian product
    (:func:`_recompute_vjp`), differentiable again."""

    def backward(ctx, grad):
        if ctx.vk_rest[-2] != "triton":
            return _recompute_vjp(op, ctx, grad)
        if torch.is_grad_enabled():  # create_graph=True: gradients without a graph would drop, silently
            raise RuntimeError(autograd.DOUBLE_BACKWARD_REFUSED.format(op=op))
        if not _plain_eager(ctx.saved_tensors):
            return _traced_triton_backward(op, ctx, grad)
        return _triton_grads(op, grad, ctx.saved_tensors, ctx.vk_rest, ctx.needs_input_grad)

    return backward


# op -> the saved tensors its dispatch copies to contiguous for the kernels (checks.contiguous_params:
# bias, LayerNorm weight and bias, layer scale, position embedding, class token). The forward read the
# copies, the saved tensors are the caller's: the backward kernels need the copies too (a layer scale
# of strides (2,) read with unit stride gave wrong gradients, silently).
UNIT_STRIDE_PARAMS = {
    "flash_attention": (),
    "qkv_attention": (2, 3, 4),
    "layernorm_gelu_mlp": (1, 2, 4, 6, 8),
    "patch_embed": (2, 3, 4),
    "linear": (2, 4),
}


def _unit_stride_params(op: str, saved: Sequence[Optional[Tensor]]) -> tuple:
    """``saved`` with ``op``'s parameters of other strides copied to contiguous, as its dispatch copies
    them for the forward (:data:`UNIT_STRIDE_PARAMS`); same shapes, so the gradients keep theirs."""
    params = UNIT_STRIDE_PARAMS[op]
    return tuple(
        t.contiguous() if i in params and t is not None and not t.is_contiguous() else t for i, t in enumerate(saved)
    )


def _triton_grads(op: str, grad: Tensor, saved: Sequence, rest: Sequence, needs_input_grad: Sequence[bool]) -> tuple:
    """``BACKWARDS[op]``, the Triton backward kernels, on the saved tensors (parameters of other strides
    copied: :func:`_unit_stride_params`), the op's other arguments and which inputs need a gradient."""
    ctx = types.SimpleNamespace(
        saved_tensors=_unit_stride_params(op, saved), vk_rest=tuple(rest), needs_input_grad=tuple(needs_input_grad)
    )
    return BACKWARDS[op](ctx, grad)


def _traced_triton_backward(op: str, ctx, grad: Tensor) -> tuple:
    """The gradients of ``op``'s inputs from the custom op ``<op>_backward`` (``grad``, the saved
    tensors, the op's other arguments, which tensors need a gradient): one tensor per input that
    needs one, None for the others."""
    n = N_TENSORS[op]
    saved = list(ctx.saved_tensors)
    needs = [bool(g) and t is not None for g, t in zip(ctx.needs_input_grad[:n], saved)]
    grads = iter(getattr(torch.ops.vit_kernels, op + "_backward")(grad, saved, *ctx.vk_rest, needs))
    return tuple(next(grads) if i < n and needs[i] else None for i in range(len(ctx.needs_input_grad)))


def _flash_attention_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    scale = _fa.check_flash_attention(q, k, v, ctx.vk_rest[0])
    out, lse = autograd.flash_attention_forward(q, k, v, scale)  # the forward again, for its row log-sum-exp
    return (*autograd.flash_attention_backward(grad, q, k, v, out, lse, scale=scale), None, None, None)


def _qkv_attention_backward(ctx, grad):
    x, w, b, nw, nb = ctx.saved_tensors
    num_heads, scale, eps = ctx.vk_rest[:3]
    num_heads, _, _, scale, eps = _qkv.check_qkv_attention(x, w, b, num_heads, nw, nb, scale, eps)
    kw = dict(num_heads=num_heads, scale=scale, eps=eps)
    out, qkv, lse = autograd.qkv_attention_forward(x, w, b, nw, nb, **kw)  # the split path again (q, k, v, lse)
    grads = autograd.qkv_attention_backward(
        grad, x, w, b, nw, nb, **kw, qkv=qkv, out=out, lse=lse, needs=ctx.needs_input_grad[:5]
    )
    return (*grads, None, None, None, None, None, None)


def _layernorm_gelu_mlp_backward(ctx, grad):
    x, nw, nb, w1, b1, w2, b2, residual, ls = ctx.saved_tensors
    eps, approximate = ctx.vk_rest[:2]
    eps = _mlp.check_mlp(x, nw, nb, w1, b1, w2, b2, approximate, residual, ls, eps)
    hidden, stats = autograd.mlp_hidden(x, nw, nb, w1, b1, eps, approximate)  # fc1 + GELU again
    grads = autograd.layernorm_gelu_mlp_backward(
        grad,
        x,
        nw,
        nb,
        w1,
        b1,
        w2,
        b2,
        ls,
        hidden=hidden,
        stats=stats,
        eps=eps,
        approximate=approximate,
        needs=ctx.needs_input_grad[:9],
    )
    return (*grads, None, None, None, None)


def _patch_embed_backward(ctx, grad):
    images, weight, bias, pos_embed, cls_token = ctx.saved_tensors
    patch_size, image_mean, image_std = ctx.vk_rest[:3]
    needs = ctx.needs_input_grad[:5]
    if images.dtype == torch.uint8:  # the backward kernels read float images: normalized as the forward did
        _, _, pixel_norm = _pe.check_patch_embed(
            images, weight, bias, patch_size, pos_embed, cls_token, image_mean, image_std
        )
        images = _pe.normalize_pixels(images, *_pe.pixel_norm_tensors(pixel_norm, images.device), weight.dtype)
    grads = autograd.patch_embed_backward(
        grad, images, weight, bias, pos_embed, cls_token, patch_size=int(patch_size), needs=needs
    )
    return (*grads, None, None, None, None, None)


def _linear_backward(ctx, grad):
    x, weight, bias, residual, layer_scale = ctx.saved_tensors
    return (*autograd.linear_backward(grad, x, weight, bias, layer_scale, needs=ctx.needs_input_grad[:5]), None, None)


def _setup_context(op: str):
    n = N_TENSORS[op]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n])
        ctx.vk_rest = tuple(inputs[n:])
        _backward_served(op, inputs[-2], inputs[:n])

    return setup_context


def _backward_served(op: str, requested: str, tensors: Sequence) -> None:
    """Autograd records a call of the custom op itself (a torch.fx / torch.export graph run eagerly, a
    mode): setup_context runs only then, right after the forward, which ran with gradients off (as
    every autograd.Function's forward does), so the op's dispatch could not see that gradients are
    needed. Here, before any backward: an explicit forward-only backend raises (as an eager call
    raises before its launch), and the op's last decision gains which backend computes the gradients
    (the Triton backward kernels for "triton", else PyTorch's path: see _triton). Not while the
    compiler traces or under a mode (no decision is made there)."""
    if torch.compiler.is_compiling() or not _plain_eager(tensors):
        return
    if requested not in autograd.BACKWARD_BACKENDS and requested != "auto":
        raise RuntimeError(backends.forward_only_message(op, requested, ("triton",)))
    d = backends.last_decision(op)
    if d is not None and not d.backward:
        d.with_backward("triton" if requested == "triton" else "torch")


SHAPES: Dict[str, Callable] = {
    "flash_attention": _flash_attention_shape,
    "qkv_attention": _qkv_attention_shape,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_shape,
    "patch_embed": _patch_embed_shape,
    "linear": _linear_shape,
}
TORCH_PATHS: Dict[str, Callable] = {
    "flash_attention": _flash_attention_torch,
    "qkv_attention": _qkv_attention_torch,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_torch,
    "patch_embed": _patch_embed_torch,
    "linear": _linear_torch,
}
IMPLS: Dict[str, Callable] = {
    "flash_attention": _flash_attention_impl,
    "qkv_attention": _qkv_attention_impl,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_impl,
    "patch_embed": _patch_embed_impl,
    "linear": _linear_impl,
}
BACKWARDS: Dict[str, Callable] = {
    "flash_attention": _flash_attention_backward,
    "qkv_attention": _qkv_attention_backward,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_backward,
    "patch_embed": _patch_embed_backward,
    "linear": _linear_backward,
}


def _implementation(op: str, args: Sequence) -> Tensor:
    guard = device_guard(args[0])
    if guard is not None:
        with guard:
            return _implementation(op, args)
    out = IMPLS[op](*args)
    return out if out.is_contiguous() else out.contiguous()


def device_guard(x) -> Optional[torch.cuda.device]:
    """``torch.cuda.device(x.device)`` when ``x`` is a CUDA tensor on another device than the current
    one, else None. Triton launches on the current device and its current stream, so an op whose
    tensors live on cuda:1 while cuda:0 is current runs under this guard (as PyTorch's own ops guard
    their device); ``x``: the op's first tensor (checks bind the others to its device)."""
    if isinstance(x, Tensor) and x.is_cuda and not torch.compiler.is_compiling():  # (compiled code guards its device)
        if x.get_device() != torch.cuda.current_device():
            return torch.cuda.device(x.get_device())
    return None


# ------------------------------------------------------------------------------- registration
_LIB = torch.library.Library(NAMESPACE, "DEF")


def _register(op: str) -> None:
    qualname = f"{NAMESPACE}::{op}"
    _LIB.define(op + SCHEMAS[op])
    shape = SHAPES[op]

    def implementation(*args):
        return _implementation(op, args)

    def fake(*args):
        like = args[1] if op == "patch_embed" else args[0]  # patch_embed: the weight's dtype (uint8 images)
        return like.new_empty(shape(*args))

    _LIB.impl(op, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=_LIB)
    torch.library.register_autograd(qualname, _backward(op), setup_context=_setup_context(op), lib=_LIB)


def _backward_schema(op: str) -> str:
    """The schema of ``<op>_backward``: the output's gradient, the forward's tensors (as saved), its other
    arguments as the forward's schema has them, and which tensors need a gradient; it returns one
    gradient per tensor that needs one, in order."""
    params = SCHEMAS[op][1 : SCHEMAS[op].index(") -> ")].split(", ")
    return f"(Tensor grad, Tensor?[] saved, {', '.join(params[N_TENSORS[op] :])}, bool[] needs) -> Tensor[]"


def _register_backward(op: str) -> None:
    """``torch.ops.vit_kernels.<op>_backward``: the Triton backward kernels of ``op`` as one custom op,
    so a traced backward (torch.compile's AOT autograd) holds them as one node (:func:`_backward`)."""
    name = op + "_backward"
    _LIB.define(name + _backward_schema(op))
    n = N_TENSORS[op]

    def implementation(grad, saved, *rest):
        *rest, needs = rest
        if rest[-2] != "triton":
            raise ValueError(f"backend: expected 'triton' (the op runs the Triton backward kernels), got {rest[-2]!r}")
        if len(saved) != n or len(needs) != n or any(need and t is None for need, t in zip(needs, saved)):
            raise ValueError(
                f"saved, needs: expected {n} tensors and {n} flags, none set for an absent tensor, got "
                f"{len(saved)} and {list(needs)}"
            )
        guard = device_guard(grad)
        if guard is not None:
            with guard:
                return implementation(grad, saved, *rest, needs)
        grads = _triton_grads(op, grad, saved, rest, (*needs, *[False] * len(rest)))
        backends.mark_backward(op, "triton")  # as _backward_served says it for an eager call of the op
        inputs = [grad, *(t for t in saved if t is not None)]
        return [_own_gradient(grads[i], saved[i], inputs) for i in range(n) if needs[i]]

    def fake(grad, saved, *rest):
        return [t.new_empty(t.shape) for t, need in zip(saved, rest[-1]) if need]

    _LIB.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)


def _own_gradient(g: Optional[Tensor], like: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """A gradient as a custom op returns it: a new contiguous tensor of ``like``'s shape (zeros for
    None; a copy where the backward returned an input or a view of one, as ``grad`` itself is the
    residual's gradient)."""
    if g is None:
        return like.new_zeros(like.shape)
    ptr = g.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):
        return g.clone(memory_format=torch.contiguous_format)
    return g.contiguous()


def autocast_device(x, backend: str) -> Optional[str]:
    """The device type of ``x`` (an op's first tensor) when a call with ``backend`` runs under the kernel
    backends' autocast rule (the module docstring: torch.autocast on for that device, a backend other
    than "torch"), else None."""
    if backend == "torch" or not _any_autocast() or not isinstance(x, Tensor):
        return None
    return x.device.type if torch.is_autocast_enabled(x.device.type) else None


def autocast_tensors(tensors: Sequence, device_type: str) -> tuple:
    """``tensors`` with the floating ones on ``device_type`` (float64 apart, as autocast leaves it) cast to
    the autocast dtype of that device type (a tensor already of it, or None, passed as it is)."""
    dt = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dt)
        if isinstance(t, Tensor)
        and t.is_floating_point()
        and t.dtype is not torch.float64
        and t.device.type == device_type
        else t
        for t in tensors
    )


def _autocast_args(op: str, args: Sequence, device_type: str) -> tuple:
    """``args`` with ``op``'s tensors cast as :func:`autocast_tensors` casts them."""
    n = N_TENSORS[op]
    return (*autocast_tensors(args[:n], device_type), *args[n:])


def _autocast(op: str, args: Sequence):
    """``op`` called with a kernel backend ("auto", "triton", "cuda") under torch.autocast for its
    tensors' device (the module docstring): its floating tensors cast to the autocast dtype, then
    :func:`run` with autocast off on that device."""
    device_type = args[0].device.type
    cast = _autocast_args(op, args, device_type)
    with torch.autocast(device_type, enabled=False):
        return run(op, cast)


def _register_autocast(op: str) -> None:
    """The custom op's AutocastCPU and AutocastCUDA kernels: for the kernel backends what
    ``torch.library.register_autocast`` registers, with the autocast dtype of the call rather than a
    fixed one (the floating tensors cast, the op called again below autocast); for backend "torch" its
    PyTorch path op by op, under autocast (so a traced graph holds autocast's casts: a compiled graph
    runs its nodes with autocast off, where the op's own node would run that path in float32)."""
    overload = getattr(torch.ops.vit_kernels, op).default
    for device_type in ("cpu", "cuda"):
        key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

        def autocast_kernel(*args, device_type=device_type, key=key):
            if args[-2] == "torch":  # (a new contiguous tensor, as the op's own implementation returns)
                return TORCH_PATHS[op](*_scalars(op, args)).contiguous()
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return overload(*_autocast_args(op, args, device_type))

        _LIB.impl(op, autocast_kernel, key.name)


for _op in SCHEMAS:
    _register(_op)
    _register_backward(_op)
    _register_autocast(_op)


# ------------------------------------------------------------------------------ FLOP formulas
# torch.utils.flop_counter.FlopCounterMode sees each custom op as one call; these count what the
# op's plain PyTorch path would count there (matmuls and convolutions, 2 FLOPs per multiply-add;
# LayerNorm, GELU, softmax and the epilogues not counted, as for aten ops). Arguments arrive as
# shapes (tensors) or values.
def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _flash_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """q (B, H, N, D), k (B, H, M, D): the two products, 2 * 2 * B * H * N * M * D."""
    B, H, N, D = q
    return 4 * B * H * N * k[2] * D


def _qkv_attention_flops(
    x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, *args, out_shape=None, **kwargs
) -> int:
    """x (B, N, dim), qkv_weight (3 * inner, dim): the projection and the attention's two products."""
    B, N, dim = x
    inner = qkv_weight[0] // 3
    return 2 * B * N * dim * qkv_weight[0] + 4 * B * N * N * inner


def _layernorm_gelu_mlp_flops(
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, *args, out_shape=None, **kwargs
) -> int:
    """x (..., dim), fc1 (hidden, dim), fc2 (out, hidden): the two GEMMs."""
    rows = _numel(x[:-1])
    return 2 * rows * fc1_weight[0] * fc1_weight[1] + 2 * rows * fc2_weight[0] * fc2_weight[1]


def _patch_embed_flops(images, weight, *args, out_shape=None, **kwargs) -> int:
    """images (B, C, H, W), weight (dim, C, p, p): the projection of every patch."""
    B, C, Hh, W = images
    dim, _, p, _ = weight
    return 2 * B * (Hh // p) * (W // p) * dim * C * p * p


def _linear_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    """x (..., in), weight (out, in)."""
    return 2 * _numel(x[:-1]) * weight[0] * weight[1]


FLOPS: Dict[str, Callable] = {
    "flash_attention": _flash_attention_flops,
    "qkv_attention": _qkv_attention_flops,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_flops,
    "patch_embed": _patch_embed_flops,
    "linear": _linear_flops,
}


# The backward ops (``<op>_backward``: saved shapes, the other arguments, which tensors need a gradient)
# count what PyTorch's autograd counts for the plain path's backward: each GEMM's (and the patch
# embedding's convolution's) input gradient where something before it needs a gradient and its weight
# gradient where the weight needs one, as much as the forward product each; attention's backward as
# torch counts SDPA's (the scores recomputed, then dV, dP, dQ, dK: 2.5 times the forward's two products).
def _gemm_grads(flops: int, input_grad: bool, weight_grad: bool) -> int:
    return flops * (int(input_grad) + int(weight_grad))


def _flash_attention_backward_flops(grad, saved, *args, out_shape=None, **kwargs) -> int:
    q, k, v = saved[:3]
    return _flash_attention_flops(q, k, v) * 5 // 2


def _qkv_attention_backward_flops(grad, saved, num_heads, *args, out_shape=None, **kwargs) -> int:
    x, w, b, nw, nb = saved
    needs = args[-1]
    B, N, dim = x
    projection = 2 * B * N * dim * w[0]
    attention = 4 * B * N * N * (w[0] // 3) * 5 // 2
    return attention + _gemm_grads(projection, needs[0] or needs[3] or needs[4], needs[1])


def _layernorm_gelu_mlp_backward_flops(grad, saved, *args, out_shape=None, **kwargs) -> int:
    x, nw, nb, w1, b1, w2 = saved[:6]
    needs = args[-1]
    rows = _numel(x[:-1])
    fc1, fc2 = 2 * rows * w1[0] * w1[1], 2 * rows * w2[0] * w2[1]
    return _gemm_grads(fc2, any(needs[:5]), needs[5]) + _gemm_grads(fc1, any(needs[:3]), needs[3])


def _patch_embed_backward_flops(grad, saved, *args, out_shape=None, **kwargs) -> int:
    needs = args[-1]
    return _gemm_grads(_patch_embed_flops(saved[0], saved[1]), needs[0], needs[1])


def _linear_backward_flops(grad, saved, *args, out_shape=None, **kwargs) -> int:
    needs = args[-1]
    return _gemm_grads(_linear_flops(saved[0], saved[1]), needs[0], needs[1])


BACKWARD_FLOPS: Dict[str, Callable] = {
    "flash_attention": _flash_attention_backward_flops,
    "qkv_attention": _qkv_attention_backward_flops,
    "layernorm_gelu_mlp": _layernorm_gelu_mlp_backward_flops,
    "patch_embed": _patch_embed_backward_flops,
    "linear": _linear_backward_flops,
}
try:
    from torch.utils.flop_counter import register_flop_formula
except ImportError:  # pragma: no cover - torch without the flop counter's registry
    register_flop_formula = None
if register_flop_formula is not None:
    for _op in FLOPS:
        register_flop_formula(getattr(torch.ops.vit_kernels, _op))(FLOPS[_op])
        register_flop_formula(getattr(torch.ops.vit_kernels, _op + "_backward"))(BACKWARD_FLOPS[_op])


def symbolic(t) -> bool:
    """True while torch.fx symbolically traces (``t`` is an fx.Proxy): shapes and values are unknown,
    so the callers record the custom op as it is, without checks or a grad decision."""
    return isinstance(t, _PROXY)


_PROXY = torch.fx.Proxy


def _scalars(op: str, args: Sequence) -> tuple:
    """``args`` with the op's numbers and strings checked (clear errors naming the argument, before
    the dispatcher converts a bool to an int or refuses a string in its own words) and made plain
    Python numbers (a numpy integer num_heads, say)."""
    a = list(args)
    backends.check_backend(a[-2])
    tuning.check_mode(a[-1])
    if op in ("flash_attention", "qkv_attention"):
        i = 3 if op == "flash_attention" else 6
        a[i] = None if a[i] is None else checks.real("scale", a[i], minimum=0.0, exclusive=True)
    if op == "qkv_attention":
        a[5] = checks.positive_int("num_heads", a[5])
        a[7] = checks.eps(a[7])
        checks.choice("path", a[8], (None, "single_kernel", "split"))
    elif op == "layernorm_gelu_mlp":
        a[9] = checks.eps(a[9])
        checks.choice("approximate", a[10], ("none", "tanh"))
    elif op == "patch_embed":
        a[5] = checks.positive_int("patch_size", a[5])
    return tuple(a)


def intercepted() -> bool:
    """True while something traces or intercepts eager calls: torch.compile / torch.jit.trace, a
    torch function or dispatch mode (torch.export, FakeTensorMode, FlopCounterMode, ...), a torch.func
    transform (vmap, grad) or forward-mode AD (:func:`transform`)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or fwAD._current_level >= 0
    )


def transform() -> Optional[str]:
    """What differentiates or batches eager calls now, outside torch.compile: "torch.func" (a vmap / grad /
    jacrev / jvp level is active), "forward AD" (a ``torch.autograd.forward_ad.dual_level``: an input may
    carry a tangent, which a kernel would drop), or None."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "torch.func"
    if fwAD._current_level >= 0:
        return "forward AD"
    return None


def _plain_eager(tensors: Sequence) -> bool:
    """True for an eager call that nothing traces or intercepts (:func:`intercepted`), with plain
    tensors (or Parameters) only."""
    return not intercepted() and PLAIN_TYPES.issuperset(map(type, tensors))


PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))  # what the kernels read directly
_any_autocast = torch._C._is_any_autocast_enabled  # (torch.compile folds it to the traced region's state)


# ------------------------------------------------------------------------------- launch plans
# A fused module (vit_kernels.nn, the swap wrappers) runs its forward inside ``plans(store)``, where
# ``store`` is a dict the module owns. The first plain eager call of each signature (every tensor's
# shape, strides, dtype and device; the numbers and strings; the backend; the tuning mode and the
# tuner's state) runs the op's full ``dispatch``: every check, the layout rules, ``backends.resolve``
# and the tuner's look-up. That dispatch offers its launch (``backends.offer``): the op's ``_launch`` and the
# checked, normalized numbers it passes; from there on its Triton launches and allocations are recorded
# (vit_kernels.replay). The plan keeps that launch with the call's final Decision, and every later call of
# the same signature replays it: the Decision recorded again (last_decision, record_decisions), then the
# recorded launches with the new tensors and fresh allocations (``Plan.replay``; where the launches cannot
# be named that way, ``Plan.replay_refused`` says why and ``_launch`` runs with the new tensors, as it
# does when inputs that shared an address at the first call no longer do). The key holds every tensor's
# shape, strides, dtype, device and 16-byte alignment class: nothing of the checks, nor of the launchers'
# strides, flags, grid and argument lists, depends on what it leaves out (values, the data pointers
# themselves), so a replayed call would have passed the checks and launched the same kernels with the
# same arguments.
# Computing that key (about 0.5 us a tensor in Python) and hashing it cost more than the rest of a
# replayed call's host work, so a store first tries the plans it served latest for the op
# (``PlanStore.recent``) by a quick test of each one's signature (vit_kernels.replay.matcher: PyTorch's C++
# tensor guard, the alignment classes, the numbers and strings), which is True only where the key is
# equal; the key is computed when none says so.
# A call that copied a parameter (``Decision.copied``), has an empty output, or needs gradients is
# never planned: it takes the full dispatch every time.
# A plain eager call of a public function outside any fused module keeps its plans the same way in the
# process's store, ``FUNCTION_PLANS`` (bounded; ``clear_plans()`` empties it).


@dataclasses.dataclass(frozen=True)
class Plan:
    """One op signature's launch: decision (recorded on each replay), launch (the op's ``_launch``:
    launch(decision, *tensors, *extras)), extras (the checked numbers and strings ``_launch`` takes
    after the tensors), replay (the recorded Triton launches, :class:`vit_kernels.replay.Replay`:
    replay(tensors) launches them again; None when the call is not replayed that way, and then
    replay_refused says why: for example another backend than Triton)."""

    decision: backends.Decision
    launch: Callable
    extras: tuple
    replay: Optional[replay.Replay] = None
    replay_refused: str = ""
    # the quick tests of its signature made so far (vit_kernels.replay.matcher; None where none could be
    # made), at most MAX_MATCHERS: one per thread dispatch state or tensor-sharing pattern it served
    matchers: list = dataclasses.field(default_factory=list, compare=False)


MAX_MATCHERS = 4
RECENT = 8  # plans per op a store tries by their quick test before it computes the key


class PlanStore(dict):
    """A module's launch plans: signature key -> :class:`Plan`. ``recent``: op -> the plans it served
    latest, each with a quick test of its signature ((match, tuner state, plan), newest first, at most
    :data:`RECENT`), tried before the key is computed (:func:`_recent_plan`). Copies and pickles are
    empty (a plan holds the tuner; a copied module makes its own plans on its first calls)."""

    def __init__(self):
        super().__init__()
        self.recent: Dict[str, list] = {}

    def clear(self) -> None:
        super().clear()
        self.recent.clear()

    def __reduce__(self):
        return (PlanStore, ())

    def __deepcopy__(self, memo):
        return PlanStore()


_PLANS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("vit_kernels_plans", default=None)
MAX_PLANS = 64  # signatures one module keeps (an input of many shapes: the oldest are dropped)

# The plans of calls made outside a fused module (the public functions, vit_kernels.ops.*): one store
# for the process, as Triton keeps its compiled kernels. A plan holds no tensor of a call (the Replay
# keeps shapes, strides, empty like-tensors and the process-long placeholders; the Decision and the
# checked numbers), so it keeps no user memory alive.
FUNCTION_PLANS = PlanStore()
MAX_FUNCTION_PLANS = 256


def clear_plans() -> None:
    """Forget the launch plans of the public functions' calls (:data:`FUNCTION_PLANS`; each fused
    module keeps its own in ``module._vk_plans``). Nothing a user does through vit_kernels' API needs
    it (a plan's key holds every input the decision and the launch depend on, and the tuner's state);
    tests call it after replacing a kernel or a backend rule by hand."""
    FUNCTION_PLANS.clear()


class plans:
    """``with plans(module_store): ...``: op calls inside keep and replay their launch plans in
    ``store`` (a dict; one per fused module). A class, not a generator: entering and leaving cost
    a fraction of a microsecond (issue 10's host budget)."""

    __slots__ = ("store", "token")

    def __init__(self, store: dict):
        self.store = store

    def __enter__(self) -> dict:
        self.token = _PLANS.set(self.store)
        return self.store

    def __exit__(self, *exc) -> None:
        _PLANS.reset(self.token)


def call_planned(module, call: Callable, args: tuple, kwargs: dict):
    """``call(*args, **kwargs)`` (a fused module's ``nn.Module.__call__``) with the op calls inside
    keeping their launch plans in the module (``module._vk_plans``, made on first use). Under
    torch.compile the call runs as it is (the compiled graph holds the custom ops)."""
    if torch.compiler.is_compiling():
        return call(*args, **kwargs)
    store = module.__dict__.get("_vk_plans")
    if store is None:
        store = module.__dict__["_vk_plans"] = PlanStore()
    token = _PLANS.set(store)
    try:
        return call(*args, **kwargs)
    finally:
        _PLANS.reset(token)


def _signature(op: str, args: Sequence, n: int) -> tuple:
    """The plan key of a call with schema arguments ``args`` (``n`` tensors first): the op, the
    tuner's state for the call's tuning mode, the numbers and strings with their types (12 and 12.0
    are different calls to the checks), and the tensors' :func:`vit_kernels.replay.signature`."""
    rest = args[n:]
    types = tuple(map(type, rest))
    if list in types:
        rest = tuple(tuple(a) if type(a) is list else a for a in rest)
    return (op, tuning.get_tuner().plan_state(args[-1]), types, rest, replay.signature(args[:n]))


def _recent_plan(op: str, args: Sequence, store: dict) -> Optional[Plan]:
    """The plan of ``args``' signature among the ones ``store`` served latest (``PlanStore.recent``),
    found by their quick tests (vit_kernels.replay.matcher: True only where the key is equal); None
    when none says so (then :func:`_run_planned` computes the key)."""
    recent = getattr(store, "recent", None)
    entries = recent.get(op) if recent else None
    if entries:
        state = tuning.get_tuner().plan_state(args[-1])
        for match, s, p in entries:
            if s == state and match(*args):
                return p
    return None


def _serve(p: Plan, tensors: Sequence):
    """A planned call: ``p``'s Decision recorded, then its recorded launches replayed with ``tensors``
    (or, where they cannot be, its launcher run)."""
    backends.record(p.decision)
    r = p.replay
    if r is not None and (not r.aliases or r.serves(tensors)):
        return r(tensors)
    return p.launch(p.decision, *tensors, *p.extras)


def _remember(store: dict, op: str, args: Sequence, n: int, p: Plan, state: tuple) -> None:
    """Put ``p`` first among ``store``'s recent plans of ``op`` with a quick test of its signature that
    ``args`` passes: one made before, or a new one (at most :data:`MAX_MATCHERS` per plan)."""
    recent = getattr(store, "recent", None)
    if recent is None:
        return
    match = next((m for m in p.matchers if m is not None and m(*args)), None)
    if match is None:
        if len(p.matchers) >= MAX_MATCHERS or None in p.matchers:  # (None: none can be made for it)
            return
        match = replay.matcher(args, n)
        p.matchers.append(match)
        if match is None:
            return
    others = [e for e in recent.get(op, ()) if e[0] is not match]
    recent[op] = [(match, state, p)] + others[: RECENT - 1]


def _run_planned(op: str, args: Sequence, tensors: Sequence, store: dict):
    """``op`` with schema arguments ``args`` (``tensors``: its leading tensors) through the plan
    for its signature in ``store``, made by this call when there is none."""
    n = len(tensors)
    try:
        key = _signature(op, args, n)
    except RuntimeError:  # a tensor without storage (sparse, ...): the full dispatch says what is wrong
        return IMPLS[op](*args)
    p = store.get(key)
    if p is not None:
        _remember(store, op, args, n, p, key[1])
        return _serve(p, tensors)
    slot: list = []
    backends.OFFERS.slot = slot
    try:
        with backends.record_decisions() as calls:
            out = IMPLS[op](*args)
    finally:
        backends.OFFERS.slot = None
        rec = replay.stop()  # started by the dispatch's offer
    if slot and calls and calls[-1].op == op and not calls[-1].copied and calls[-1].path != "empty":
        if len(store) >= (MAX_FUNCTION_PLANS if store is FUNCTION_PLANS else MAX_PLANS):
            store.clear()
        d = calls[-1]
        if d.backend != "triton":
            r = f"backend {d.backend!r}: only Triton launches are recorded"
        elif rec is None:  # an op planned inside this one's launch took the recording over
            r = "the launch was not recorded whole (an op was called inside it)"
        else:
            r = replay.Replay.build(rec, tensors, out)
        kept = (r, "") if isinstance(r, replay.Replay) else (None, r)
        # keyed by the state after the call (tuning it added an entry: the tuner's generation moved)
        key = _signature(op, args, n)
        store[key] = p = Plan(d, *slot[0], *kept)
        _remember(store, op, args, n, p, key[1])
    return out


def run(op: str, args: Sequence):
    """Call ``op`` with its schema arguments ``args`` (see the module docstring):
    - autograd recording (an input requires grad): eager, the op's implementation (Triton's backward
      kernels for backend "triton", PyTorch's autograd path for "torch" / "auto"); under
      torch.compile, the plain PyTorch path;
    - a plain eager call (:func:`_plain_eager`): the op's implementation itself, the same function
      the dispatcher would call, without the dispatcher's Python round trip (its autograd wrapper
      and redispatch, several microseconds against the 15 us host budget of a call), through the
      launch plan of its signature: a fused module's own (:func:`call_planned`), else the process's
      (:data:`FUNCTION_PLANS`), made by the first such call, found by its quick test
      (:func:`_recent_plan`) or else by its key;
    - otherwise (torch.compile, torch.export, torch.fx, torch.jit.trace, modes, subclasses,
      functorch): the custom op, which they see as one node."""
    tensors = args[: N_TENSORS[op]]
    if isinstance(args[0], _PROXY):  # symbolic(args[0])
        return getattr(torch.ops.vit_kernels, op)(*_scalars(op, args))
    if args[0].__class__ is not Tensor or args[0].is_cuda:  # (a plain CPU tensor: ~0.1 us of the host budget)
        guard = device_guard(args[0])
        if guard is not None:
            with guard:  # launches on the tensors' device, with its current stream
                return run(op, args)
    if _any_autocast() and autocast_device(args[0], args[-2]) is not None:  # (autocast off: one C call)
        return _autocast(op, args)
    if torch.is_grad_enabled() and backends.needs_grad(tensors):
        compiling = torch.compiler.is_compiling()  # transform() means nothing while dynamo traces
        if not compiling and transform() is not None:
            return _under_transform(op, args)
        args = _scalars(op, args)  # path, approximate, tune, ... checked as the op does
        if not compiling:
            # eager autograd: the op's implementation decides (recorded): backend "triton" runs the
            # forward and backward kernels (vit_kernels.autograd), "torch" / "auto" PyTorch's autograd
            # path, "cuda" raises (forward-only kernels)
            return IMPLS[op](*args)
        return _compiled_with_grad(op, args)
    if not intercepted():
        # a fused module's call: its own launch plans; a call of the public function: the process's.
        # The first call of a signature runs the op's implementation (every check; strides as the backend
        # made them: no tracer holds the fake's contiguous promise, so no copy of SDPA's output in eager)
        store = _PLANS.get()
        if store is None:
            store = FUNCTION_PLANS
        p = _recent_plan(op, args, store)  # (its quick test checks the tensors' exact types)
        if p is not None:
            return _serve(p, tensors)
        if PLAIN_TYPES.issuperset(map(type, tensors)):
            return _run_planned(op, args, tensors, store)
    if not torch.compiler.is_compiling() and transform() is not None:
        return _under_transform(op, args)
    return getattr(torch.ops.vit_kernels, op)(*_scalars(op, args))


def _compiled_with_grad(op: str, args: tuple):
    """``op`` traced by torch.compile with an input that requires grad, as eager autograd runs it:
    backend "triton", the custom op (its Triton forward kernels, and its registered backward the Triton
    backward kernels, each one node of the compiled graphs); "auto" and "torch", the plain PyTorch path,
    traced op by op (auto keeps PyTorch's autograd path in eager too: no backward kernel has been
    measured against it); a forward-only backend ("cuda") raises, as an eager call does."""
    backend = args[-2]
    if backend == "triton":
        return getattr(torch.ops.vit_kernels, op)(*args)
    if backend not in ("auto", "torch"):
        raise RuntimeError(backends.forward_only_message(op, backend, ("triton",)))
    return TORCH_PATHS[op](*args)  # checks the tensors


def _under_transform(op: str, args: Sequence):
    """``op`` inside a torch.func transform (vmap, grad, jacrev, ...) or a forward-AD dual level
    (:func:`transform`): backend "auto" / "torch" run the op's PyTorch path (torch.func batches and
    differentiates it, forward AD carries the tangents; recorded as unfused, with the reason); an explicit
    kernel backend runs the custom op (vmap: one call per sample, PyTorch's fallback), except where it
    would be wrong or fail, each a RuntimeError that says so: forward AD with an input carrying a tangent
    (the custom op returns the primal alone, the tangent silently dropped), and any torch.func level that
    differentiates, grad or jvp (PyTorch's custom-op autograd does not support torch.func; a jvp tangent
    would be dropped silently)."""
    args = _scalars(op, args)
    backend = args[-2]
    kind = transform()
    if backend in ("auto", "torch"):
        backends.unfused(op, backend, TRANSFORM_REASON.format(kind=TRANSFORM_KINDS[kind]), ran="torch")
        return TORCH_PATHS[op](*args)
    if kind == "forward AD":
        dual = [t for t in args[: N_TENSORS[op]] if t is not None and fwAD.unpack_dual(t).tangent is not None]
        if dual:  # the custom op would return the primal alone: the tangent dropped, silently
            raise RuntimeError(FORWARD_AD_REFUSED.format(op=op, backend=backend))
        return getattr(torch.ops.vit_kernels, op)(*args)
    stack = getattr(
        torch._C._functorch, "get_interpreter_stack", lambda: [torch._C._functorch.peek_interpreter_stack()]
    )
    if {level.key() for level in stack()} & _DIFFERENTIATING:
        raise RuntimeError(FUNC_DIFF_REFUSED.format(op=op, backend=backend))
    return getattr(torch.ops.vit_kernels, op)(*args)


_DIFFERENTIATING = {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}


TRANSFORM_KINDS = {
    "torch.func": "a torch.func transform (vmap, grad, ...)",
    "forward AD": "forward-mode AD (a dual level)",
}
TRANSFORM_REASON = "under {kind}: the op's PyTorch path, which serves it"
FORWARD_AD_REFUSED = (
    "vit_kernels.{op}: backend={backend!r} cannot carry forward-mode AD tangents (an input is a dual tensor: its "
    "kernels compute the primal only); use backend='auto' or 'torch' there (the op's PyTorch path)"
)
FUNC_DIFF_REFUSED = (
    "vit_kernels.{op}: backend={backend!r} cannot run under a torch.func transform that differentiates (grad, "
    "vjp, jacrev, jvp, jacfwd, hessian): its kernels have no torch.func derivative (PyTorch's custom-op autograd "
    "does not support torch.func, and a jvp tangent would be dropped); use backend='auto' or 'torch' there (the "
    "op's PyTorch path), or torch.autograd (loss.backward(), torch.autograd.grad)"
)


TORCHSCRIPT_REFUSED = (
    "torch.jit.script cannot compile vit_kernels' fused modules (they choose a backend in Python "
    "at run time); use torch.jit.trace, torch.compile, torch.export or torch.fx, or "
    "vit_kernels.unfuse(model) first"
)


def refuse_torchscript(module) -> None:
    """``__prepare_scriptable__`` of the fused modules: torch.jit.script calls it on every submodule
    before compiling, so scripting a fused model fails with one sentence instead of a parser error."""
    raise RuntimeError(f"{type(module).__name__}: {TORCHSCRIPT_REFUSED}")
