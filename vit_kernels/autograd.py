"""Backward passes of the fused ops: one gradient function per op, and the autograd.Functions
that glue the Triton forward and backward launchers together.

Each ``*_backward`` function takes the incoming gradient and the tensors the forward saved and
returns the input and parameter gradients (None where ``needs`` says not needed), with
backend="triton" (the kernels of vit_kernels/triton/*_bwd.py) or "torch" (the op's torch path
re-run under autograd from the saved inputs). They take tensors and return tensors, so they can
serve a ``torch.library.register_autograd`` as well as the Functions below.

What the Triton backward recomputes instead of saving (activation memory traded for a pass):
- attention: the tokens x tokens probabilities, from the saved row log-sum-exp (FlashAttention-2);
- LayerNorm in front of a GEMM: the normalized rows (from the saved row statistics);
- layernorm_gelu_mlp: fc1's pre-GELU output (one GEMM; the post-GELU hidden is saved);
- layer scale: the branch a @ W^T + b, only when the layer scale needs a gradient.

The ops call :class:`FlashAttention`, :class:`QkvAttention`, :class:`Linear`,
:class:`LayerNormGeluMlp` and :class:`PatchEmbed` when backend="triton" runs under autograd.
"""

from __future__ import annotations

import functools

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import checks

BACKWARD_BACKENDS = ("triton", "torch")


def _check_call(backend: str, **tensors) -> None:
    """The backend, and every tensor argument's memory (checks.in_memory: no negative view, zero tensor or
    nested tensor, which the kernels would read as something else), before any launch."""
    if backend not in BACKWARD_BACKENDS:
        raise ValueError(f"backend: expected one of {BACKWARD_BACKENDS} for a backward, got {backend!r}")
    for name, t in tensors.items():
        for i, u in enumerate(t if isinstance(t, tuple) else (t,)):
            if isinstance(u, Tensor):
                checks.in_memory(f"{name}[{i}]" if isinstance(t, tuple) else name, u)


def dense(t: Tensor) -> Tensor:
    """t itself when contiguous with a 16-byte aligned start (what the kernels read), else a contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _torch_grads(fn, inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], grad: Tensor):
    """Gradients of fn(*inputs) for ``grad`` by re-running fn (a torch path) under autograd."""
    leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(inputs, needs)]
    with torch.enable_grad():
        out = fn(*leaves)
        wrt = [t for t, n in zip(leaves, needs) if t is not None and n]
        got = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True)) if wrt else iter(())
    return tuple(next(got) if t is not None and n else None for t, n in zip(leaves, needs))


# ---------------------------------------------------------------------------------------------
# Gradient functions (saved tensors in, gradients out)
# ---------------------------------------------------------------------------------------------


def flash_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    scale: float,
    backend: str = "triton",
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of out = softmax(scale * q k^T) v.

    grad_out, q, out: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim);
    lse: (batch, heads, q_tokens) fp32 row log-sum-exp of the forward (fp64 allowed for float64 q).
    """
    _check_call(backend, grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse)
    if backend == "torch":
        from .ops.flash_attention import sdpa

        return _torch_grads(lambda q_, k_, v_: sdpa(q_, k_, v_, scale), (q, k, v), (True,) * 3, grad_out)
    from .triton.attention_bwd import flash_attention_backward as launch

    return launch(dense(grad_out), q, k, v, out, lse, scale)


def layernorm_backward(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor] = None,
    *,
    eps: float = 0.0,
    needs: Sequence[bool] = (True, True, True),
    backend: str = "triton",
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, d norm_weight, d norm_bias) of y = LayerNorm(x) [* norm_weight] [+ norm_bias] for dy = grad.

    grad, x: (rows, dim); mean, rstd: (rows,) the forward's statistics (triton); norm_weight, norm_bias:
    (dim,) or None; eps: the forward's (torch); needs: which of (x, norm_weight, norm_bias) need a gradient.
    """
    _check_call(backend, grad=grad, x=x, mean=mean, rstd=rstd, norm_weight=norm_weight, norm_bias=norm_bias)
    nx, nw, nb = needs
    if backend == "torch":
        import torch.nn.functional as F

        return _torch_grads(
            lambda x_, w_, b_: F.layer_norm(x_, (x_.shape[-1],), w_, b_, eps),
            (x, norm_weight, norm_bias),
            (nx, nw and norm_weight is not None, nb and norm_bias is not None),
            grad,
        )
    from .triton.layernorm_bwd import layernorm_backward as launch

    return launch(
        dense(grad),
        dense(x),
        mean,
        rstd,
        norm_weight,
        need_input=nx,
        need_weight=nw and norm_weight is not None,
        need_bias=nb and norm_bias is not None,
    )


def linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    layer_scale: Optional[Tensor] = None,
    *,
    needs: Sequence[bool] = (True,) * 5,
    backend: str = "triton",
) -> Tuple[Optional[Tensor], ...]:
    """(dx, dweight, dbias, dresidual, dlayer_scale) of
    y = [residual +] [layer_scale *] (x @ weight^T [+ bias]).

    grad: (..., out); x: (..., in); weight: (out, in); bias, layer_scale: (out,) or None;
    needs: which of (x, weight, bias, residual, layer_scale) need a gradient.
    """
    _check_call(backend, grad=grad, x=x, weight=weight, bias=bias, layer_scale=layer_scale)
    nx, nw, nb, nr, nl = needs
    nb, nl = nb and bias is not None, nl and layer_scale is not None
    dres = grad if nr else None
    if backend == "torch":
        from .ops.linear import linear_torch

        dx, dw, db, dls = _torch_grads(
            lambda x_, w_, b_, ls_: linear_torch(x_, w_, b_, None, ls_),
            (x, weight, bias, layer_scale),
            (nx, nw, nb, nl),
            grad,
        )
        return dx, dw, db, dres, dls
    from .triton import gemm_bwd

    checks.unit_stride_params(bias=bias, layer_scale=layer_scale)  # before any launch (the kernels' reads)
    K, N = x.shape[-1], weight.shape[0]
    g = dense(grad).reshape(-1, N)
    a = x.reshape(-1, K)
    branch = project(a, weight, bias) if nl else None
    dx, dw, db, dls = gemm_bwd.linear_backward(
        g, a, weight, need_input=nx, need_weight=nw, need_bias=nb, layer_scale=layer_scale, branch=branch
    )
    return (dx.view(x.shape) if dx is not None else None), dw, db, dres, dls


def layernorm_gelu_mlp_backward(
    grad: Tensor,
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    layer_scale: Optional[Tensor] = None,
    *,
    hidden: Optional[Tensor] = None,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    eps: float = 1e-6,
    approximate: str = "none",
    needs: Sequence[bool] = (True,) * 9,
    backend: str = "triton",
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of [residual +] [layer_scale *] fc2(GELU(fc1(LayerNorm(x)))) for dy = grad, in the
    order (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale).

    grad: (..., out); x: (..., dim); hidden: (rows, hidden) the forward's GELU output (triton);
    stats: (mean, rstd) of x's rows when norm_weight is given (triton); needs: which need a gradient.
    """
    _check_call(
        backend,
        grad=grad,
        x=x,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
        layer_scale=layer_scale,
        hidden=hidden,
        stats=stats,
    )
    nx, nnw, nnb, nw1, nb1, nw2, nb2, nr, nl = needs
    params = (norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    dres = grad if nr else None
    if backend == "torch":
        from .ops.mlp import layernorm_gelu_mlp_torch

        fn = lambda x_, a, b, c, d, e, f, ls_: layernorm_gelu_mlp_torch(  # noqa: E731
            x_, a, b, c, d, e, f, eps=eps, approximate=approximate, residual=None, layer_scale=ls_
        )
        g = _torch_grads(fn, (x, *params, layer_scale), (nx, nnw, nnb, nw1, nb1, nw2, nb2, nl), grad)
        return (*g[:7], dres, g[7])
    from .triton import gemm_bwd
    from .triton.layernorm_bwd import layernorm_apply

    checks.unit_stride_params(
        norm_weight=norm_weight, norm_bias=norm_bias, fc1_bias=fc1_bias, fc2_bias=fc2_bias, layer_scale=layer_scale
    )
    dim, out = x.shape[-1], fc2_weight.shape[0]
    x2 = dense(x).reshape(-1, dim)
    g = dense(grad).reshape(-1, out)
    has_norm = norm_weight is not None
    pre = project(x2, fc1_weight, fc1_bias, norm_weight, norm_bias, stats)  # fc1's output before GELU
    branch = project(hidden, fc2_weight, fc2_bias) if nl else None
    need_h = nx or nnw or nnb or nw1 or nb1
    dpre, dw2, db2, dls = gemm_bwd.linear_backward(
        g,
        hidden,
        fc2_weight,
        need_input=need_h,
        need_weight=nw2,
        need_bias=nb2 and fc2_bias is not None,
        layer_scale=layer_scale,
        branch=branch,
        gelu_input=pre,
        approximate=approximate,
    )
    dx = dnw = dnb = dw1 = db1 = None
    if need_h:
        a = layernorm_apply(x2, *stats, norm_weight, norm_bias) if has_norm else x2
        dh, dw1, db1, _ = gemm_bwd.linear_backward(
            dpre, a, fc1_weight, need_input=nx or nnw or nnb, need_weight=nw1, need_bias=nb1 and fc1_bias is not None
        )
        if has_norm and (nx or nnw or nnb):
            from .triton.layernorm_bwd import layernorm_backward as ln_backward

            dx, dnw, dnb = ln_backward(
                dh, x2, *stats, norm_weight, need_input=nx, need_weight=nnw, need_bias=nnb and norm_bias is not None
            )
        elif nx:
            dx = dh
    return (
        (dx.view(x.shape) if dx is not None else None),
        dnw,
        dnb,
        dw1,
        db1,
        dw2,
        (db2 if nb2 else None),
        dres,
        (dls if nl else None),
    )


def project(
    a: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """[LayerNorm(a) from stats ->] a @ weight^T [+ bias] with the Triton GEMM, a: (rows, K) ->
    (rows, N): what the backward recomputes (fc1 before GELU, a layer-scaled branch). float64 rows
    (gradcheck) take the GEMM's fp64 tiles and a normalized copy of a."""
    from .triton import gemm, gemm_bwd
    from .triton.layernorm_bwd import layernorm_apply

    if a.dtype != torch.float64:
        return gemm.dense_forward(a, weight, bias, norm_weight=norm_weight, norm_bias=norm_bias, stats=stats)
    if norm_weight is not None:
        a = layernorm_apply(a, *stats, norm_weight, norm_bias)
    out = torch.empty((a.shape[0], weight.shape[0]), dtype=a.dtype, device=a.device)
    return gemm.launch_gemm(
        a,
        weight,
        out,
        M=a.shape[0],
        N=weight.shape[0],
        K=a.shape[1],
        T=max(a.shape[0], 1),
        a_strides=(0, a.stride(0), a.stride(1)),
        w_strides=weight.stride(),
        out_strides=(0, out.shape[1], 1),
        bias=bias,
        gemm_config=gemm_bwd.FP64_GEMM_CONFIG,
    )


def qkv_attention_backward(
    grad: Tensor,
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    *,
    num_heads: int,
    scale: float,
    eps: float,
    qkv: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    needs: Sequence[bool] = (True,) * 5,
    backend: str = "triton",
) -> Tuple[Optional[Tensor], ...]:
    """(dx, dqkv_weight, dqkv_bias, dnorm_weight, dnorm_bias) of qkv_attention's split path.

    grad, out: (batch, tokens, inner); x: (batch, tokens, dim); qkv: (3, batch, heads, tokens,
    head_dim) the projection as the forward wrote it (q pre-scaled); lse: (batch, heads, tokens);
    stats: (mean, rstd) of x's rows when norm_weight is given (triton: recomputed when None).
    """
    _check_call(
        backend,
        grad=grad,
        x=x,
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        qkv=qkv,
        out=out,
        lse=lse,
        stats=stats,
    )
    nx, nw, nb, nnw, nnb = needs
    if backend == "torch":
        from .ops.qkv_attention import qkv_attention_torch

        fn = lambda x_, w_, b_, nw_, nb_: qkv_attention_torch(  # noqa: E731
            x_, w_, b_, num_heads=num_heads, scale=scale, norm_weight=nw_, norm_bias=nb_, eps=eps
        )
        return _torch_grads(fn, (x, qkv_weight, qkv_bias, norm_weight, norm_bias), needs, grad)
    from .triton import gemm_bwd
    from .triton.attention_bwd import flash_attention_backward as attn_backward
    from .triton.layernorm import row_stats
    from .triton.layernorm_bwd import layernorm_apply

    checks.unit_stride_params(qkv_bias=qkv_bias, norm_weight=norm_weight, norm_bias=norm_bias)
    B, N, dim = x.shape
    inner = qkv_weight.shape[0] // 3
    H, hd = num_heads, inner // num_heads
    g = dense(grad)
    dqkv = torch.empty((B, N, 3, H, hd), dtype=x.dtype, device=x.device)  # = (B*N, 3*inner) rows for the GEMMs
    views = [dqkv[:, :, i].transpose(1, 2) for i in range(3)]
    attn_backward(
        g.view(B, N, H, hd).transpose(1, 2),
        qkv[0],
        qkv[1],
        qkv[2],
        out.view(B, N, H, hd).transpose(1, 2),
        lse,
        1.0,
        dq_scale=scale,
        dq=views[0],
        dk=views[1],
        dv=views[2],
    )
    x2 = dense(x).reshape(B * N, dim)
    has_norm = norm_weight is not None
    if has_norm and stats is None:
        stats = row_stats(x2, eps)
    a = layernorm_apply(x2, *stats, norm_weight, norm_bias) if has_norm else x2
    need_h = nx or nnw or nnb
    dh, dw, db, _ = gemm_bwd.linear_backward(
        dqkv.view(B * N, 3 * inner),
        a,
        qkv_weight,
        need_input=need_h,
        need_weight=nw,
        need_bias=nb and qkv_bias is not None,
    )
    dx = dnw = dnb = None
    if has_norm and need_h:
        from .triton.layernorm_bwd import layernorm_backward as ln_backward

        dx, dnw, dnb = ln_backward(
            dh, x2, *stats, norm_weight, need_input=nx, need_weight=nnw, need_bias=nnb and norm_bias is not None
        )
    elif nx:
        dx = dh
    return (dx.view(B, N, dim) if dx is not None else None), dw, db, dnw, dnb


def patch_embed_backward(
    grad: Tensor,
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pos_embed: Optional[Tensor],
    cls_token: Optional[Tensor],
    *,
    patch_size: int,
    needs: Sequence[bool] = (True,) * 5,
    backend: str = "triton",
) -> Tuple[Optional[Tensor], ...]:
    """(dimages, dweight, dbias, dpos_embed, dcls_token) of patch_embed.

    grad: (batch, prefix + patches, dim); images: (batch, C, H, W); weight: (dim, C, p, p);
    bias: (dim,); pos_embed, cls_token: as the op takes them (gradients in their shapes).
    The weight gradient reads the patches as a (batch * tokens, C*p*p) matrix copied once from the
    images (a reshape; the class-token rows zero): the GEMM's patch loader gathers rows of its A
    operand, while here the patches are the reduction operand.
    """
    _check_call(backend, grad=grad, images=images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    ni, nw, nb, npos, ncls = needs
    nb, npos, ncls = nb and bias is not None, npos and pos_embed is not None, ncls and cls_token is not None
    if backend == "torch":
        from .ops.patch_embed import patch_embed_torch

        fn = lambda i_, w_, b_, p_, c_: patch_embed_torch(
            i_,
            w_,
            b_,
            patch_size=patch_size,  # noqa: E731
            pos_embed=p_,
            cls_token=c_,
        )
        return _torch_grads(fn, (images, weight, bias, pos_embed, cls_token), (ni, nw, nb, npos, ncls), grad)
    from .triton import gemm_bwd

    B, C, Hh, Ww = images.shape
    p = patch_size
    gh, gw = Hh // p, Ww // p
    dim, K = weight.shape[0], C * p * p
    prefix = 1 if cls_token is not None else 0
    T = prefix + gh * gw
    g = dense(grad)  # (B, T, dim)
    dimages = dw = db = dpos = dcls = None
    if nw:
        patches = torch.zeros((B, T, K), dtype=images.dtype, device=images.device)
        patches[:, prefix:] = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, K)
        dw = gemm_bwd.weight_grad(g.view(B * T, dim), patches.view(B * T, K), weight.dtype).view(weight.shape)
    if nb:
        db = gemm_bwd.column_sums(g[:, prefix:], T - prefix, (T * dim, dim, 1), bias.dtype)[1]
    if npos:
        dpos = gemm_bwd.column_sums(g.view(B, T * dim), 1, (T * dim, 0, 1), pos_embed.dtype)[1].view(pos_embed.shape)
    if ncls:
        dcls = gemm_bwd.column_sums(g[:, 0], 1, (T * dim, 0, 1), cls_token.dtype)[1].view(cls_token.shape)
    if ni:
        gp = g[:, prefix:].reshape(B * gh * gw, dim)
        dp = gemm_bwd.input_grad(dense(gp), weight.reshape(dim, K))
        dimages = dp.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, Hh, Ww)
    return dimages, dw, db, dpos, dcls


# ---------------------------------------------------------------------------------------------
# Forward passes that keep what the backward reads (the Functions below, and the custom ops'
# registered backward in vit_kernels.library, which recomputes them from the saved inputs)
# ---------------------------------------------------------------------------------------------


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, config=()) -> Tuple[Tensor, Tensor]:
    """(out, lse) of the Triton flash attention: out (batch, heads, q_tokens, head_dim), lse
    (batch, heads, q_tokens) the row log-sum-exp that :func:`flash_attention_backward` reads."""
    from .triton.attention import flash_attention_forward as launch

    return launch(q, k, v, scale, return_lse=True, **dict(config))


def qkv_attention_forward(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    *,
    num_heads: int,
    scale: float,
    eps: float,
    config=(),
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, qkv, lse) of qkv_attention's Triton split path: out (batch, tokens, inner); qkv
    (3, batch, heads, tokens, head_dim) as the projection wrote it (q pre-scaled); lse (batch,
    heads, tokens): what :func:`qkv_attention_backward` reads."""
    from .triton.qkv_attention import split_forward

    B, N, _ = x.shape
    out = torch.empty((B, N, qkv_weight.shape[0] // 3), dtype=x.dtype, device=x.device)
    qkv, lse = split_forward(
        x,
        qkv_weight,
        qkv_bias,
        out,
        num_heads=num_heads,
        scale=scale,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        eps=eps,
        return_lse=True,
        **dict(config),  # gemm_config, attention_config, tma_config, attention_tma_config: the tuner's choice
    )
    return out, qkv, lse


def mlp_hidden(
    x: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    eps: float,
    approximate: str,
    gemm_config=None,
) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """(hidden, stats) of layernorm_gelu_mlp's first GEMM with the Triton kernels: hidden (rows,
    hidden) = GELU(fc1(LayerNorm(x))), stats (mean, rstd) of x's rows (None without a norm):
    what :func:`layernorm_gelu_mlp_backward` reads."""
    from .triton.gemm import ACTIVATIONS, dense_forward
    from .triton.layernorm import row_stats

    x2 = dense(x).reshape(-1, x.shape[-1])
    stats = row_stats(x2, eps) if norm_weight is not None else None
    hidden = dense_forward(
        x2,
        fc1_weight,
        fc1_bias,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        stats=stats,
        act=ACTIVATIONS[approximate],
        gemm_config=gemm_config,
    )
    return hidden, stats


# ---------------------------------------------------------------------------------------------
# autograd.Functions: Triton forward (saving what the backward reads) + Triton backward
# ---------------------------------------------------------------------------------------------

DOUBLE_BACKWARD_REFUSED = (
    "vit_kernels.{op}: backend='triton' cannot give higher-order gradients (a backward with create_graph=True): "
    "its backward kernels have no backward themselves; use backend='torch' or 'auto' (PyTorch's autograd path) "
    "for double backward (gradient penalties, MAML, Hessian-vector products)"
)


def first_order(op: str):
    """A Triton backward's decorator: ``once_differentiable`` (the kernels have no backward), and under
    ``create_graph=True`` (grad mode on during the backward) a RuntimeError naming the op, where
    ``once_differentiable`` alone gives gradients no graph, so that a second differentiation fails far
    away with "appears to not have been used in the graph", or returns None with ``allow_unused``."""

    def wrap(backward):
        inner = once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(DOUBLE_BACKWARD_REFUSED.format(op=op))
            return inner(ctx, *grads)

        return checked

    return wrap


class FlashAttention(torch.autograd.Function):
    """flash_attention with backend="triton" under autograd. apply(q, k, v, scale, config)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, config):
        out, lse = flash_attention_forward(q, k, v, scale, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order("flash_attention")
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*flash_attention_backward(grad_out, q, k, v, out, lse, scale=ctx.scale), None, None)


class QkvAttention(torch.autograd.Function):
    """qkv_attention's split path with backend="triton" under autograd.
    apply(x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, config)."""

    @staticmethod
    def forward(ctx, x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads, scale, eps, config):
        out, qkv, lse = qkv_attention_forward(
            x, qkv_weight, qkv_bias, norm_weight, norm_bias, num_heads=num_heads, scale=scale, eps=eps, config=config
        )
        ctx.save_for_backward(x, qkv_weight, qkv_bias, norm_weight, norm_bias, qkv, out, lse)
        ctx.args = (num_heads, scale, eps)
        return out

    @staticmethod
    @first_order("qkv_attention")
    def backward(ctx, grad):
        x, w, b, nw, nb, qkv, out, lse = ctx.saved_tensors
        num_heads, scale, eps = ctx.args
        grads = qkv_attention_backward(
            grad,
            x,
            w,
            b,
            nw,
            nb,
            num_heads=num_heads,
            scale=scale,
            eps=eps,
            qkv=qkv,
            out=out,
            lse=lse,
            needs=ctx.needs_input_grad[:5],
        )
        return (*grads, None, None, None, None)


class Linear(torch.autograd.Function):
    """linear with backend="triton" under autograd. apply(x, weight, bias, residual, layer_scale, config)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, layer_scale, config):
        from .triton.gemm import linear_forward

        ctx.save_for_backward(x, weight, bias, layer_scale)
        return linear_forward(x, weight, bias, residual=residual, layer_scale=layer_scale, **dict(config))

    @staticmethod
    @first_order("linear")
    def backward(ctx, grad):
        x, weight, bias, layer_scale = ctx.saved_tensors
        return (*linear_backward(grad, x, weight, bias, layer_scale, needs=ctx.needs_input_grad[:5]), None)


class LayerNormGeluMlp(torch.autograd.Function):
    """layernorm_gelu_mlp with backend="triton" under autograd. apply(x, norm_weight, norm_bias,
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, eps, approximate, config)."""

    @staticmethod
    def forward(
        ctx,
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
        config,
    ):
        from .triton.gemm import dense_forward

        cfg = dict(config).get("gemm_config")
        hidden, stats = mlp_hidden(x, norm_weight, norm_bias, fc1_weight, fc1_bias, eps, approximate, cfg)
        stats = stats if stats is not None else (None, None)
        out = dense_forward(
            hidden,
            fc2_weight,
            fc2_bias,
            layer_scale=layer_scale,
            gemm_config=cfg,
            residual=residual.reshape(-1, fc2_weight.shape[0]) if residual is not None else None,
        )
        ctx.save_for_backward(
            x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, hidden, *stats
        )
        ctx.args = (eps, approximate)
        return out.view(*x.shape[:-1], fc2_weight.shape[0])

    @staticmethod
    @first_order("layernorm_gelu_mlp")
    def backward(ctx, grad):
        x, nw, nb, w1, b1, w2, b2, ls, hidden, mean, rstd = ctx.saved_tensors
        eps, approximate = ctx.args
        grads = layernorm_gelu_mlp_backward(
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
            stats=(mean, rstd) if nw is not None else None,
            eps=eps,
            approximate=approximate,
            needs=ctx.needs_input_grad[:9],
        )
        return (*grads, None, None, None)


class PatchEmbed(torch.autograd.Function):
    """patch_embed with backend="triton" under autograd.
    apply(images, weight, bias, pos_embed, cls_token, patch_size, config)."""

    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, cls_token, patch_size, config):
        from .triton.patch_embed import patch_embed_forward

        ctx.save_for_backward(images, weight, bias, pos_embed, cls_token)
        ctx.patch_size = patch_size
        return patch_embed_forward(
            images, weight, bias, patch_size=patch_size, pos_embed=pos_embed, cls_token=cls_token, **dict(config)
        )

    @staticmethod
    @first_order("patch_embed")
    def backward(ctx, grad):
        images, weight, bias, pos_embed, cls_token = ctx.saved_tensors
        return (
            *patch_embed_backward(
                grad,
                images,
                weight,
                bias,
                pos_embed,
                cls_token,
                patch_size=ctx.patch_size,
                needs=ctx.needs_input_grad[:5],
            ),
            None,
            None,
        )
