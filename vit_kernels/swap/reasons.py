"""The checks the family adapters share. Each returns None when the part is supported, else the
reason it is left (a sentence for the fuse report)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..checks import head_dim_unsupported


def layernorm_reason(name: str, m: nn.Module, dim: Optional[int] = None) -> Optional[str]:
    """None when ``m`` is a plain LayerNorm over the last dim with a weight (bias optional)."""
    if not isinstance(m, nn.LayerNorm):
        return f"{name} is {type(m).__name__}, not a LayerNorm"
    if not _plain_layernorm_forward(m):
        return f"{name} is {type(m).__name__}, a LayerNorm subclass with its own forward"
    if len(m.normalized_shape) != 1 or (dim is not None and m.normalized_shape[0] != dim):
        return f"{name} normalizes shape {tuple(m.normalized_shape)}, expected ({dim},)"
    if m.weight is None:
        return f"{name} has no affine weight (elementwise_affine=False)"
    return None


def _plain_layernorm_forward(m: nn.LayerNorm) -> bool:
    fwd = type(m).forward
    if fwd is nn.LayerNorm.forward:
        return True
    try:  # timm's LayerNorm: F.layer_norm (or apex's fused layer norm when fast_norm is set)
        from timm.layers.norm import LayerNorm as TimmLayerNorm

        return fwd is TimmLayerNorm.forward
    except Exception:
        return False


def gelu_approximate(act: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(approximate, None) for a GELU module ("none" = erf, "tanh"), else (None, reason)."""
    cls = type(act)
    name = f"{cls.__module__}.{cls.__name__}"
    if isinstance(act, nn.GELU) and cls.forward is nn.GELU.forward:
        return act.approximate, None
    known = {
        "timm.layers.activations.GELU": "none",
        "timm.layers.activations.GELUTanh": "tanh",
        "transformers.activations.NewGELUActivation": "tanh",
        "transformers.activations.GELUTanh": "tanh",
        "transformers.activations.PytorchGELUTanh": "tanh",
    }
    if name in known:
        return known[name], None
    if name == "transformers.activations.GELUActivation":
        fn = getattr(act, "act", None)
        if fn is torch.nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python":
            return "none", None
    return None, f"the activation is {cls.__name__}, not GELU (erf or tanh)"


def approximate_now(act: nn.Module, at_fuse: str) -> str:
    """The GELU variant ``act`` computes at this call: an nn.GELU's ``approximate`` attribute as it is now
    (it may be set after fuse), else the one :func:`gelu_approximate` found at fuse (its class decides
    it; a class change after fuse is caught by the wrappers' structure check)."""
    return act.approximate if isinstance(act, nn.GELU) else at_fuse


def linear_reason(name: str, m: nn.Module) -> Optional[str]:
    if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
        return f"{name} is {type(m).__name__}, not an nn.Linear"
    return None


def dropout_p(m: Optional[nn.Module]) -> float:
    """Dropout probability of an nn.Dropout / timm DropPath / Identity / float."""
    if m is None:
        return 0.0
    if isinstance(m, (int, float)):
        return float(m)
    if isinstance(m, nn.Identity):
        return 0.0
    for attr in ("p", "drop_prob"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def dropout_reason(name: str, m: Optional[nn.Module]) -> Optional[str]:
    """None for modules that are identity in eval mode (Dropout, DropPath, Identity)."""
    if m is None or isinstance(m, (nn.Identity, nn.Dropout)):
        return None
    if type(m).__name__ == "DropPath":
        return None
    return f"{name} is {type(m).__name__}, not a dropout"


def head_dim_reason(backend: str, head_dim: int) -> Tuple[Optional[str], Optional[str]]:
    """(reason to leave, note) for a head_dim under ``backend``: an explicit triton/cuda request
    that cannot serve it leaves the part; auto runs the torch path for a head_dim neither takes and
    says so."""
    if backend in ("triton", "cuda"):
        why = head_dim_unsupported(head_dim, backend)
        return (f"{why}; backend={backend!r} was asked for" if why else None), None
    whys = [head_dim_unsupported(head_dim, b) for b in ("triton", "cuda")]
    if all(whys):
        return None, f"{whys[0]}: the ops take the torch path for it"
    return None, None


def bypassed_hooks(modules: Dict[str, nn.Module], ignore: Callable = lambda fn: False) -> Optional[str]:
    """A reason when any of ``modules`` (path -> module, each with its descendants) has forward
    hooks, or a ``forward`` set on the instance (accelerate's hooks, a patched module), that the
    fused path would bypass. ``ignore(hook_fn)`` exempts hooks handled otherwise."""
    for path, m in modules.items():
        for sub_name, sub in m.named_modules():
            where = path + ("." + sub_name if sub_name else "")
            hooks = list(sub._forward_hooks.values()) + list(sub._forward_pre_hooks.values())
            hooks = [h for h in hooks if not ignore(h)]
            if hooks:
                return f"forward hooks are registered on {where}; the fused path would not run them"
            if "forward" in sub.__dict__:
                return f"{where}.forward is set on the instance; the fused path would not call it"
    return None


def first_reason(*reasons: Optional[str]) -> Optional[str]:
    for r in reasons:
        if r:
            return r
    return None


def overrides_load_state_dict(m: nn.Module) -> Optional[str]:
    if type(m)._load_from_state_dict is not nn.Module._load_from_state_dict:
        return f"{type(m).__name__} overrides _load_from_state_dict; a wrapper could not keep it"
    return None


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
