"""Drop-in modules over the fused ops. Each holds the parameters of the modules it replaces,
under the same names (``norm``, ``qkv``, ``proj``, ``fc1``, ``fc2``, LayerScale ``gamma``).

Every module has a ``backend`` attribute: "auto" | "triton" | "cuda" | "torch" pick the op
backend (see :mod:`vit_kernels.backends`); "reference" runs the eager oracle
(:mod:`vit_kernels.reference`), which is what the other backends are verified against.

Under ``torch.autocast`` the fused ops run at the autocast dtype (inputs and parameters cast, as
autocast does for F.linear) and each module returns its input's dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import library, ops, reference
from .ops import attention_stats
from .backends import BACKENDS, unfused
from .ops.patch_embed import check_pixel_norm

MODULE_BACKENDS = BACKENDS + ("reference",)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when torch.autocast is on for x's device and would lower x, else None."""
    if not isinstance(x, Tensor):  # an fx.Proxy: symbolic tracing records the ops as they are
        return None
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if dt != x.dtype else None


def _run_autocast(fn, x: Tensor, params, **kw) -> Tensor:
    """Run ``fn(x, *params, **kw)``; under torch.autocast at the autocast dtype, as autocast runs
    F.linear: x, the parameters and tensor keywords are cast (the copies autocast makes too), and
    the result is cast back to x's dtype so the residual stream keeps its dtype as in eager."""
    dt = _autocast_dtype(x)
    if dt is None:
        return fn(x, *params, **kw)

    def cast(t):
        return t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t

    with torch.autocast(x.device.type, enabled=False):
        out = fn(cast(x), *[cast(p) for p in params], **{k: cast(v) for k, v in kw.items()})
    return out.to(x.dtype) if x.is_floating_point() else out  # uint8 images: the autocast dtype


def _check_module_backend(backend: str) -> str:
    if backend not in MODULE_BACKENDS:
        raise ValueError(f"backend: expected one of {MODULE_BACKENDS}, got {backend!r}")
    return backend


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (dim,), as timm's LayerScale."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Fused(nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = _check_module_backend(backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def __call__(self, *args, **kwargs):
        # the op calls of this module keep launch plans (vit_kernels.library.call_planned)
        return library.call_planned(self, super().__call__, args, kwargs)

    def __prepare_scriptable__(self):
        library.refuse_torchscript(self)


class FusedAttention(_Fused):
    """Pre-norm attention branch with its residual: x + ls * proj(attention(qkv(norm(x)))).

    x: (batch, tokens, dim) -> (batch, tokens, dim). Parameters: norm (LayerNorm), qkv
    (Linear dim -> 3*dim, rows [q; k; v]), proj (Linear), ls.gamma when init_values is set.
    Dropout (attn_drop, proj_drop) is identity in eval mode; in training with p > 0 the module
    runs its unfused PyTorch code so that dropout is applied (the fused kernels have no dropout):
    ``last_decision("qkv_attention")`` and ``("linear")`` say so (path "unfused"), once at INFO too.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        eps: float = 1e-6,
        init_values: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(backend)
        if dim % num_heads:
            raise ValueError(f"num_heads: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.ls = LayerScale(dim, init_values) if init_values is not None else None
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop

    def forward(self, x: Tensor, stats: Optional[ops.StatsRequest] = None):
        """x: (batch, tokens, dim) -> (batch, tokens, dim). With ``stats`` (a StatsRequest) returns
        ``(out, AttentionStats)``: the attention rows, mean attention distance or full weights of
        this call (see :mod:`vit_kernels.ops.attention_stats`)."""
        gamma = self.ls.gamma if self.ls is not None else None
        norm = self.norm
        if self.backend == "reference":
            return self._reference(x, gamma, stats)
        if self.training and (self.attn_drop > 0 or self.proj_drop > 0):
            if stats is not None:
                raise ValueError("stats: not available while dropout is active in training; call .eval() first")
            why = (
                f"dropout is active in training (attn_drop={self.attn_drop:g}, proj_drop={self.proj_drop:g}) "
                f"and the fused kernels apply none: the module ran its unfused PyTorch code"
            )
            for op in ("qkv_attention", "linear"):
                unfused(op, self.backend, why)
            return self._forward_with_dropout(x, gamma)
        params = (self.qkv.weight, self.qkv.bias, norm.weight, norm.bias, self.proj.weight, self.proj.bias, gamma)
        if stats is None:
            return _run_autocast(self._fused, x, params)
        return _run_autocast(self._fused_with_stats, x, params, stats=stats)

    def _fused(self, x, qkv_w, qkv_b, norm_w, norm_b, proj_w, proj_b, gamma):
        o = ops.qkv_attention(
            x,
            qkv_w,
            qkv_b,
            num_heads=self.num_heads,
            norm_weight=norm_w,
            norm_bias=norm_b,
            eps=self.norm.eps,
            backend=self.backend,
        )
        return ops.linear(o, proj_w, proj_b, residual=x, layer_scale=gamma, backend=self.backend)

    def _fused_with_stats(self, x, qkv_w, qkv_b, norm_w, norm_b, proj_w, proj_b, gamma, stats):
        o, st = ops.qkv_attention(
            x,
            qkv_w,
            qkv_b,
            num_heads=self.num_heads,
            norm_weight=norm_w,
            norm_bias=norm_b,
            eps=self.norm.eps,
            backend=self.backend,
            stats=stats,
        )
        return ops.linear(o, proj_w, proj_b, residual=x, layer_scale=gamma, backend=self.backend), st

    def _reference(self, x: Tensor, gamma: Optional[Tensor], stats):
        """The eager oracle; statistics (asked for, or recorded) from its q and k, full matrix."""
        norm = self.norm
        o = reference.qkv_attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            num_heads=self.num_heads,
            norm_weight=norm.weight,
            norm_bias=norm.bias,
            eps=norm.eps,
        )
        y = reference.linear(o, self.proj.weight, self.proj.bias, residual=x, layer_scale=gamma)
        request = stats if stats is not None else attention_stats.active_request()
        if request is None:
            return y
        B, N, C = x.shape
        h = reference.layer_norm(x, norm.weight, norm.bias, norm.eps)
        q, k, _ = (
            reference.linear(h, self.qkv.weight, self.qkv.bias)
            .reshape(B, N, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        st = attention_stats.attention_stats_torch(q, k, self.head_dim**-0.5, request)
        if stats is None:
            attention_stats.record(st)
            return y
        return y, st

    def _forward_with_dropout(self, x: Tensor, gamma: Optional[Tensor]) -> Tensor:
        B, N, C = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop)
        o = F.dropout(self.proj(o.transpose(1, 2).reshape(B, N, C)), self.proj_drop, True)
        return x + (o * gamma if gamma is not None else o)


class FusedMlp(_Fused):
    """Pre-norm MLP branch with its residual: x + ls * fc2(gelu(fc1(norm(x)))).

    x: (..., dim) -> (..., dim). Parameters: norm (LayerNorm), fc1 (Linear dim -> hidden),
    fc2 (Linear hidden -> dim), ls.gamma when init_values is set. approximate: "none" (erf)
    or "tanh". Dropout behaves as in :class:`FusedAttention`.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = True,
        eps: float = 1e-6,
        approximate: str = "none",
        init_values: Optional[float] = None,
        drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(backend)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.ls = LayerScale(dim, init_values) if init_values is not None else None
        self.approximate = approximate
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.ls.gamma if self.ls is not None else None
        args = (x, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        kw = dict(eps=self.norm.eps, approximate=self.approximate, residual=x, layer_scale=gamma)
        if self.backend == "reference":
            return reference.layernorm_gelu_mlp(*args, **kw)
        if self.training and self.drop > 0:
            unfused(
                "layernorm_gelu_mlp",
                self.backend,
                f"dropout is active in training (drop={self.drop:g}) and "
                f"the fused kernels apply none: the module ran its unfused PyTorch code",
            )
            h = F.dropout(F.gelu(self.fc1(self.norm(x)), approximate=self.approximate), self.drop, True)
            h = F.dropout(self.fc2(h), self.drop, True)
            return x + (h * gamma if gamma is not None else h)
        return _run_autocast(ops.layernorm_gelu_mlp, x, args[1:], **kw, backend=self.backend)


class FusedPatchEmbed(_Fused):
    """Patchify + projection: images (batch, in_chans, H, W) -> (batch, prefix + patches, dim).

    Parameters: proj (Conv2d with kernel = stride = patch_size). ``forward`` takes the model's
    pos_embed and cls_token so that the token buffer comes out of one launch.
    patch_size=1 embeds a CNN feature map (the paper's hybrid input).
    image_mean, image_std: in_chans values each (the model's data config): uint8 images (NCHW, or
    NHWC data as channels_last) are normalized as (x / 255 - mean) / std while the kernel loads them;
    float images are taken as normalized already. None: uint8 images are refused, naming them.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        backend: str = "auto",
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
    ):
        super().__init__(backend)
        self.patch_size = patch_size
        self.image_mean = None if image_mean is None else tuple(float(v) for v in image_mean)
        self.image_std = None if image_std is None else tuple(float(v) for v in image_std)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: Tensor, pos_embed: Optional[Tensor] = None, cls_token: Optional[Tensor] = None) -> Tensor:
        kw = dict(patch_size=self.patch_size, pos_embed=pos_embed, cls_token=cls_token)
        if isinstance(images, Tensor) and images.dtype == torch.uint8:
            kw.update(image_mean=self.image_mean, image_std=self.image_std)
            check_pixel_norm(images, self.image_mean, self.image_std)  # named errors on every backend
        if self.backend == "reference":
            return reference.patch_embed(images, self.proj.weight, self.proj.bias, **kw)
        return _run_autocast(ops.patch_embed, images, (self.proj.weight, self.proj.bias), **kw, backend=self.backend)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every vit_kernels module inside ``model``; returns the model."""
    _check_module_backend(backend)
    for m in model.modules():
        if isinstance(m, _Fused):
            m.backend = backend
    return model
