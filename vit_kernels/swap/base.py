"""What every family adapter shares: the wrapper that takes a module's place while holding the very
same children, parameters, buffers and hooks, and the report entries that say what was fused.

How a swap keeps the model intact:
- :class:`SwapWrapper` registers the original module's children, parameters and buffers under the
  same names (the same objects: same ``data_ptr()``), so ``state_dict()`` keys and values do not
  change, optimizers holding the parameters keep working and ``load_state_dict`` fills both.
- Forward hooks are shared (the wrapper uses the original's hook dictionaries), so a hook
  registered on either fires once per call. Hooks on modules the fused path would bypass make the
  adapter leave that part unfused (the hook would silently stop firing otherwise).
- Plain attributes the wrapper lacks (``num_heads``, ``grid_size``, ...) are read from the
  original. ``unfuse`` puts the original module back with whatever children, parameters and
  buffers the wrapper holds then (``.to()``/``load_state_dict`` after fuse are kept).
- Anything a fused path cannot do exactly (attention masks, dropout active in training,
  torch.autocast, ...) runs the original module's own ``forward`` at that call: never a wrong
  number.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops.flash_attention import check_head_dim

OPS = ("patch_embed", "attention", "mlp")

# Module attributes holding hooks; the wrapper shares these dictionaries with the original.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclasses.dataclass
class ReportEntry:
    """One fusable part of a model. path: the module path of the part (e.g. ``blocks.0.attn``);
    op: "attention" | "mlp" | "patch_embed"; fused: whether it now runs fused ops; reason: why it
    was left (empty when fused); notes: what else a user should know (runtime fallbacks, ...)."""

    path: str
    op: str
    family: str
    fused: bool
    reason: str = ""
    notes: Tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.path or '<root>'} [{self.op}] {'fused' if self.fused else 'left: ' + self.reason}"
        for n in self.notes:
            s += f"\n      note: {n}"
        return s


@dataclasses.dataclass
class FuseReport:
    """What :func:`vit_kernels.fuse` did (or would do) to a model."""

    entries: List[ReportEntry]
    backend: str = "auto"

    @property
    def fused(self) -> List[ReportEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def left(self) -> List[ReportEntry]:
        return [e for e in self.entries if not e.fused]

    def __str__(self) -> str:
        fams = sorted({e.family for e in self.entries})
        head = (f"fuse report (backend={self.backend!r}, families: {', '.join(fams) or 'none found'}): "
                f"{len(self.fused)} fused, {len(self.left)} left")
        fused = self.fused
        common = [n for n in (fused[0].notes if fused else ()) if all(n in e.notes for e in fused)]
        lines = [head]
        for e in self.entries:
            lines.append("  " + str(dataclasses.replace(e, notes=tuple(n for n in e.notes if n not in common))))
        lines += [f"  note (all fused parts): {n}" for n in common]
        return "\n".join(lines)


@dataclasses.dataclass
class Candidate:
    """A module an adapter can replace. entries: one per op it covers; build: makes the wrapper
    (None when none of its ops is fused)."""

    path: str
    module: nn.Module
    entries: List[ReportEntry]
    build: Optional[Callable[[], "SwapWrapper"]]


def block_candidate(path: str, block: nn.Module, family: str, ops_: tuple, base_why: Optional[str],
                    attn_path: str, attention_reason: Callable[[], tuple], mlp_path: str,
                    mlp_reason: Callable[[], tuple], wrapper: Callable, backend: str) -> "Candidate":
    """The candidate for one pre-norm encoder block (attention branch + MLP branch).

    base_why: why the whole block is left (None when it can be fused); attention_reason() ->
    (why, note) and mlp_reason() -> (why, approximate) judge each branch; wrapper(block, backend,
    entries) builds the fused block, whose ``approximate`` is set to the MLP's GELU flavour.
    """
    if "attention" not in ops_:
        why, note = "not requested (ops)", None
    else:
        why, note = (base_why, None) if base_why else attention_reason()
    entries = [ReportEntry(attn_path, "attention", family, why is None, why or "",
                           (note,) if note and why is None else ())]
    approx = None
    if "mlp" not in ops_:
        why = "not requested (ops)"
    else:
        why, approx = (base_why, None) if base_why else mlp_reason()
    entries.append(ReportEntry(mlp_path, "mlp", family, why is None, why or ""))
    build = None
    if any(e.fused for e in entries):
        def build():
            w = wrapper(block, backend, entries)
            w.approximate = approx
            return w
    return Candidate(path, block, entries, build)


class SwapWrapper(nn.Module):
    """Takes ``original``'s place in the model, holding its children, parameters, buffers and hooks
    (the same objects, under the same names). Subclasses implement ``forward`` with the fused ops
    and call :meth:`original_forward` for what they cannot fuse exactly.

    fused: op -> True for the ops this wrapper runs fused; entries: its report entries.
    """

    family = ""

    def __init__(self, original: nn.Module, backend: str, entries: Sequence[ReportEntry]):
        nn.Module.__init__(self)  # not super(): a subclass may also derive from the original's class
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._modules.update(original._modules)
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        for name in _HOOK_DICTS:
            if hasattr(original, name):
                object.__setattr__(self, name, getattr(original, name))
        self.training = original.training
        object.__setattr__(self, "_vk_original", original)
        object.__setattr__(self, "_version", getattr(original, "_version", 1))
        self.backend = backend
        self.vk_entries = list(entries)
        self.fused_ops = {e.op: e.fused for e in entries}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_vk_original")
            if original is None:
                raise
            return getattr(original, name)

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_vk_original"]

    def _sync_original(self) -> nn.Module:
        """Give the original whatever the wrapper holds now (children, parameters, buffers, mode)."""
        o = self.original
        for name in ("_parameters", "_buffers", "_modules"):
            d, mine = getattr(o, name), getattr(self, name)
            # never emptied on the way (another thread may be running the original's forward):
            # drop what the wrapper no longer holds, then (re)set the rest
            for k in [k for k in d if k not in mine]:
                del d[k]
            d.update(mine)
        o._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        o.training = self.training
        return o

    def restore(self) -> nn.Module:
        """The original module, holding the wrapper's current children, parameters and buffers."""
        return self._sync_original()

    def original_forward(self, *args, **kwargs):
        """Run the original module's own forward (hooks are not run again: they ran on this call)."""
        return self._sync_original().forward(*args, **kwargs)

    def dropouts(self) -> List[Tuple[str, float]]:
        """(name, p) of every dropout / drop-path in the parts this wrapper fuses."""
        return []

    def dropout_active(self) -> bool:
        return self.training and any(p > 0 for _, p in self.dropouts())

    def run_original(self, x: torch.Tensor) -> bool:
        """True when this call must run the original modules: dropout active in training, or
        torch.autocast on (the fused ops take all tensors at one dtype: use model.to(dtype))."""
        return self.dropout_active() or _autocast_on(x)

    def runtime_notes(self) -> List[str]:
        notes = []
        active = [f"{n} p={p:g}" for n, p in self.dropouts() if p > 0]
        if active:
            state = "active now: the model is in training mode" if self.training else "inactive in eval mode"
            notes.append(f"dropout {', '.join(active)} ({state}); while training, calls run the original modules")
        notes.append("under torch.autocast, calls run the original modules (the fused ops take one dtype: "
                     "use model.to(dtype))")
        if any(p.requires_grad for p in self.parameters()):
            notes.append({"triton": "parameters require grad: under autograd the ops run the Triton forward and "
                                    "backward kernels",
                          "cuda": "parameters require grad: under autograd the cuda backend raises (forward-only "
                                  "kernels); run under torch.no_grad() / torch.inference_mode(), or fuse with "
                                  "backend='triton' for training",
                          }.get(self.backend, "parameters require grad: under autograd the ops take the torch path "
                                              "(auto does not pick the unmeasured backward kernels); run under "
                                              "torch.no_grad() / torch.inference_mode() for the fused kernels"))
        return notes

    def report_entries(self) -> List[ReportEntry]:
        notes = tuple(self.runtime_notes())
        return [dataclasses.replace(e, notes=e.notes + notes) if e.fused else e for e in self.vk_entries]

    def extra_repr(self) -> str:
        ops = ", ".join(op for op, f in self.fused_ops.items() if f)
        return f"fused={ops or 'nothing'}, backend={self.backend!r}, original={type(self.original).__name__}"


def _autocast_on(x) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: one flag for CUDA, one for CPU
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


# ---------------------------------------------------------------------------------------------
# Checks shared by the adapters. Each returns None when the part is supported, else the reason.

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
    that cannot serve it leaves the part; auto runs the torch path for it and says so."""
    why = check_head_dim("head_dim", head_dim)
    if why is None:
        return None, None
    if backend in ("triton", "cuda"):
        return f"{why}; backend={backend!r} was asked for", None
    return None, f"{why}: the ops take the torch path for it"


def bypassed_hooks(modules: Dict[str, nn.Module], ignore: Callable = lambda fn: False) -> Optional[str]:
    """A reason when any of ``modules`` (path -> module, each with its descendants) has forward
    hooks that the fused path would bypass. ``ignore(hook_fn)`` exempts hooks handled otherwise."""
    for path, m in modules.items():
        for sub_name, sub in m.named_modules():
            hooks = list(sub._forward_hooks.values()) + list(sub._forward_pre_hooks.values())
            hooks = [h for h in hooks if not ignore(h)]
            if hooks:
                where = path + ("." + sub_name if sub_name else "")
                return f"forward hooks are registered on {where}; the fused path would not run them"
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
