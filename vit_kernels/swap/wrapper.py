"""The wrapper every family adapter builds on: it takes a module's place while holding the very
same children, parameters, buffers and hooks.

How a swap keeps the model intact:
- :class:`SwapWrapper` registers the original module's children, parameters and buffers under the
  same names (the same objects: same ``data_ptr()``), so ``state_dict()`` keys and values do not
  change, optimizers holding the parameters keep working and ``load_state_dict`` fills both.
- Forward hooks are shared (the wrapper uses the original's hook dictionaries), so a hook
  registered on either fires once per call. Hooks on modules the fused path would bypass make the
  adapter leave that part unfused when they exist at fuse time; registered after fuse (or global
  module hooks), they make each call run the original modules, so they fire (never silently dropped).
- The modules under the wrapper are remembered as fuse admitted them; one replaced, parametrized
  or given an instance ``forward`` after fuse makes each call run the original modules
  (:meth:`SwapWrapper.structure_reason`): the fused path reads their weights, never their forward.
  So does a LayerNorm whose weight was set to None after fuse (the fused ops read that as no LayerNorm).
  So does a tensor subclass among the parameters or the input (torchao's quantized weights,
  :meth:`SwapWrapper.param_reason`): the original modules dispatch to it.
- Plain attributes the wrapper lacks (``num_heads``, ``grid_size``, ...) are read from the
  original; its methods (timm's ``PatchEmbed.set_input_size``, ``nn.Sequential.append``, ...) run on
  it, and the wrapper then takes its children, parameters and buffers (a module they replaced or added
  makes calls run the original modules, as above). ``unfuse`` puts the original module back with whatever children, parameters and
  buffers the wrapper holds then (``.to()``/``load_state_dict`` after fuse are kept).
- Under ``torch.autocast`` the fused parts run the fused ops at the autocast dtype
  (:func:`at_autocast`): for the kernel backends inputs and parameters cast as autocast casts a
  matmul's operands, the residual add and layer scale in the residual stream's dtype
  (:func:`with_residual`), as eager autocast computes them; backend "torch" runs the ops' PyTorch
  path under autocast itself.
- Anything a fused path cannot do exactly (attention masks, dropout active in training,
  hooks, ...) runs the original module's own ``forward`` at that call
  (:meth:`SwapWrapper.fall_back`): never a wrong number, and never silently: an INFO line the first
  time per reason, ``last_fallback`` / ``fallbacks`` on the wrapper, the fuse report's notes, and
  ``last_decision(op).backend == "original"`` with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .. import library
from ..backends import unfused
from .reasons import join
from .report import ReportEntry

logger = logging.getLogger("vit_kernels")
_LOCK = threading.Lock()

# report op -> the op whose last_decision records a fallback of that part
OP_NAMES = {"attention": "qkv_attention", "mlp": "layernorm_gelu_mlp", "patch_embed": "patch_embed"}


# Module attributes holding hooks; the wrapper shares these dictionaries with the original.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def autograd_note(backend: str) -> str:
    """fuse_report's note for a fused part whose parameters require grad: which backend computes the
    gradients under autograd for ``backend`` (each call's Decision says it too: ``backward``)."""
    return {
        "triton": "parameters require grad: under autograd the ops run the Triton forward and backward kernels "
        "(last_decision(op).backward == 'triton')",
        "cuda": "parameters require grad: under autograd the cuda backend raises (forward-only "
        "kernels); run under torch.no_grad() / torch.inference_mode(), or fuse with "
        "backend='triton' for training",
    }.get(
        backend,
        "parameters require grad: under autograd the ops take the torch path, forward and backward "
        "(auto does not pick the unmeasured backward kernels; last_decision(op).backward == 'torch'); run under "
        "torch.no_grad() / torch.inference_mode() for the fused kernels, or fuse with backend='triton'",
    )


class _Structure(NamedTuple):
    """The modules under a wrapper as fuse admitted them (:meth:`SwapWrapper.remember_structure`): each
    module below the wrapper with its path, class and instance ``forward`` (None: its class's); those
    without children (``leaves``); every module with children, the wrapper first, with its path and
    a copy of its children (name -> module); the parameter dicts (``_parameters``) of the wrapper and
    of the modules that held parameters at fuse (those the fused path reads), read at every call
    (:meth:`SwapWrapper.param_reason`); and the LayerNorms that had a weight at fuse (the fused ops read a
    None norm weight as no LayerNorm at all, so one set to None after fuse must not reach them)."""

    names: List[str]
    mods: List[nn.Module]
    classes: List[type]
    forwards: List[object]
    leaves: List[nn.Module]
    parent_names: List[str]
    parents: List[nn.Module]
    children: List[Dict[str, nn.Module]]
    params: List[Dict[str, Optional[torch.Tensor]]]  # the wrapper's and the modules' non-empty parameter dicts
    norms: Tuple[nn.LayerNorm, ...] = ()  # a default: a wrapper pickled before this field loads (unchecked)


def _take_state(dst: nn.Module, src: nn.Module) -> None:
    """dst's children, parameters and buffers become src's, never emptied on the way (another thread may be
    running dst's forward): what src no longer holds is dropped, then the rest (re)set."""
    for name in ("_parameters", "_buffers", "_modules"):
        d, theirs = getattr(dst, name), getattr(src, name)
        for k in [k for k in d if k not in theirs]:
            del d[k]
        d.update(theirs)
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)


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
        self.vk_path = ""  # the part's path in the model (set by fuse), for messages
        self.last_fallback: Optional[str] = None  # why the last call that ran the original did
        self.fallbacks: Dict[str, int] = {}  # reason -> calls that ran the original for it

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_vk_original")
            if original is None:
                raise
            value = getattr(original, name)
            if callable(value) and getattr(value, "__self__", None) is original:  # a method of the original's class
                return self._on_original(value)
            return value

    def _on_original(self, method):
        """``method``, bound to the original and reached through the wrapper (timm's
        ``PatchEmbed.set_input_size``, an ``nn.Sequential``'s ``append``, ...), run on the original as the
        wrapper holds it now; then the wrapper takes the original's children, parameters and buffers, so a
        module the method replaced or added is seen by :meth:`structure_reason` (calls run the original
        modules, saying so), never ignored by the fused path nor undone by the next sync."""

        @functools.wraps(method)
        def call(*args, **kwargs):
            o = self._sync_original()
            out = method(*args, **kwargs)
            _take_state(self, o)
            return self if out is o else out

        return call

    def __call__(self, *args, **kwargs):
        # the op calls of this part keep launch plans (vit_kernels.library.call_planned)
        return library.call_planned(self, super().__call__, args, kwargs)

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_vk_original"]

    def _sync_original(self) -> nn.Module:
        """Give the original whatever the wrapper holds now (children, parameters, buffers, mode)."""
        o = self.original
        _take_state(o, self)
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
        """Whether a dropout of the fused parts would drop at this call: one with p > 0 while the wrapper
        or a module under it is in training mode (Monte-Carlo dropout sets only the dropout modules of
        an eval model to training; the original modules then decide what drops)."""
        s = self.__dict__.get("_vk_structure")
        mods = s.mods if s is not None else list(self.modules())
        return (self.training or any([m.training for m in mods])) and any(p > 0 for _, p in self.dropouts())

    def bypassed(self) -> Dict[str, nn.Module]:
        """name -> child whose forward the fused path does not call (its forward hooks would not
        fire): the modules of the parts this wrapper runs fused. Hooks on the wrapper itself fire."""
        return {}

    def hook_exempt(self, hook) -> bool:
        """True for a hook the adapter serves another way (transformers' output-capturing hooks)."""
        return False

    def hook_reason(self) -> Optional[str]:
        """Why forward hooks need the original modules at this call (None: no hook is bypassed):
        hooks registered, before or after fuse, on a module the fused path does not call, or global
        module hooks. Cheap per call: the watched modules are listed once per set of children."""
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return (
                "global module forward hooks are registered (register_module_forward_hook); calls run the "
                "original modules so they fire"
            )
        children = tuple(self._modules.values())
        watch = self.__dict__.get("_vk_watch")
        if watch is None or watch[0] != children:  # (re)listed when a child is replaced
            mods = [
                (join(name, sub_name), sub)
                for name, m in self.bypassed().items()
                for sub_name, sub in m.named_modules()
            ]
            dicts = [d for _, sub in mods for d in (sub._forward_hooks, sub._forward_pre_hooks)]
            watch = self.__dict__["_vk_watch"] = (children, mods, dicts)
        if not any(watch[2]):  # the per-call cost: one truth test per hook dict
            return None
        for name, m in watch[1]:
            hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if not hooks:
                continue
            if not all(self.hook_exempt(h) for h in hooks):
                where = join(self.vk_path, name)
                return f"forward hooks are registered on {where}; calls run the original modules so they fire"
        return None

    def remember_structure(self) -> None:
        """Keep the modules under this wrapper as fuse admitted them (fuse calls it once the model is
        fused): their objects, classes, children and instance ``forward`` attributes. Each call
        compares them (:meth:`structure_reason`): the fused path reads the parameters of modules whose
        forward it does not call, so a module replaced after fuse (PEFT's LoRA layers, a quantized
        Linear, ``register_parametrization``, a module of another class) would otherwise be
        silently ignored. (The wrapper's own class is not kept: HF's fused classes are made at fuse
        time, and a model holding one is pickled by the layer's own class.)"""
        named = [(n, m) for n, m in self.named_modules() if m is not self]
        mods = [m for _, m in named]
        parents = [(self.vk_path, self)] + [(join(self.vk_path, n), m) for n, m in named if m._modules]
        self.__dict__["_vk_structure"] = _Structure(
            names=[join(self.vk_path, n) for n, _ in named],
            mods=mods,
            classes=list(map(type, mods)),
            forwards=[m.__dict__.get("forward") for m in mods],
            leaves=[m for m in mods if not m._modules],
            parent_names=[n for n, _ in parents],
            parents=[m for _, m in parents],
            children=[dict(m._modules) for _, m in parents],
            params=[d for d in [self._parameters] + [m._parameters for m in mods] if d],
            norms=tuple(m for m in mods if isinstance(m, nn.LayerNorm) and m._parameters.get("weight") is not None),
        )

    def structure_reason(self) -> Optional[str]:
        """Why the modules under this wrapper are no longer those fuse admitted (None: they are; see
        :meth:`remember_structure`), or a LayerNorm under it lost its weight. The per-call cost: a class, a
        children and an instance-forward comparison per module, a weight look-up per LayerNorm (~2.5-3.5 us for
        a timm Block's 21 modules on this project's 2-core VM)."""
        s = self.__dict__.get("_vk_structure")
        if s is None:
            return None
        if (
            list(map(type, s.mods)) == s.classes
            and [m._modules for m in s.parents] == s.children
            and not any([m._modules for m in s.leaves])  # a list: cheaper than a generator here
            and [m.__dict__.get("forward") for m in s.mods] == s.forwards
            and all([m._parameters.get("weight") is not None for m in s.norms])
        ):
            return None
        change = "a module changed"
        for where, m, old in zip(s.parent_names, s.parents, s.children):
            if m._modules != old:
                k = next(k for k in {**old, **m._modules} if old.get(k) is not m._modules.get(k))
                was, now = (type(d[k]).__name__ if d.get(k) is not None else "nothing" for d in (old, m._modules))
                change = f"{join(where, k)} was replaced ({was} -> {now})"
                break
        else:
            for where, m, cls, fwd in zip(s.names, s.mods, s.classes, s.forwards):
                if type(m) is not cls:
                    change = f"{where} changed class ({cls.__name__} -> {type(m).__name__})"
                elif m.__dict__.get("forward") is not fwd:
                    change = f"{where}.forward was set on the instance"
                elif m._modules and m in s.leaves:
                    change = f"modules were added under {where} ({', '.join(m._modules)})"
                elif m in s.norms and m._parameters.get("weight") is None:
                    change = f"{where}.weight was set to None (a LayerNorm without its affine weight)"
                else:
                    continue
                break
        return (
            f"{change} after fuse; calls run the original modules (vk.unfuse(model) then vk.fuse(model) "
            "fuses what can be)"
        )

    def param_reason(self, x=None) -> Optional[str]:
        """Why the fused path cannot read this call's tensors (None: it can): a parameter under the
        wrapper, or the input ``x``, is a tensor subclass (torchao's quantized weights, a DTensor, ...),
        set before or after fuse. The fused ops take plain tensors; the original modules dispatch to the
        subclass (a subclass that does not implement vit_kernels' ops would raise inside a fused op).
        Under torch.compile, export, fake tensors or other modes (their tensors are subclasses
        too) nothing is refused here. Per call: a type check per parameter (~0.9 us for a timm Block here)."""
        s = self.__dict__.get("_vk_structure")
        if s is None or torch.compiler.is_compiling():
            return None
        odd = x is not None and x.__class__ is not torch.Tensor and isinstance(x, torch.Tensor)
        if not odd:
            for d in s.params:
                for p in d.values():
                    if p.__class__ not in library.PLAIN_TYPES:
                        odd = True
                        break
        if not odd:
            return None
        if library.intercepted():
            return None
        named = [("x (the input)", x)] + [(join(self.vk_path, n), p) for n, p in self.named_parameters()]
        for where, t in named:
            if t is not None and t.__class__ not in library.PLAIN_TYPES:
                return (
                    f"{where} is a {type(t).__name__} (a tensor subclass): the fused kernels read plain tensors; "
                    "calls run the original modules, which dispatch to it"
                )
        return None

    def original_reason(self, x) -> Optional[str]:
        """Why this call must run the original modules (None: the fused path serves it): a module
        under it changed after fuse (:meth:`structure_reason`), a tensor subclass among its parameters
        or input (:meth:`param_reason`), forward hooks the fused path would bypass, a torch.func transform
        (vmap, grad, ...) or forward-mode AD, dropout active in training. (torch.autocast is served: see
        :func:`at_autocast`.)"""
        why = self.structure_reason() or self.param_reason(x) or self.hook_reason()
        if why:
            return why
        if not torch.compiler.is_compiling():
            kind = library.transform()
            if kind is not None:
                return (
                    f"under {library.TRANSFORM_KINDS[kind]}: calls run the original modules (the fused kernels "
                    "neither batch, nor carry tangents, nor differentiate under torch.func)"
                )
        if self.dropout_active():
            return "dropout is active (a module in training mode, p > 0): calls run the original modules"
        return None

    def fall_back(self, why: str, *args, **kwargs):
        """Run the original module's forward for this call because ``why``, visibly: an INFO line on
        the ``vit_kernels`` logger the first time per reason, the reason in ``last_fallback`` and
        counted in ``fallbacks`` (fuse_report lists them), and ``last_decision(op)`` of each fused op
        says backend "original" with the reason. Traced by torch.compile, only the original's forward:
        the bookkeeping (a lock, a log line, counters) stays out of the graph; fuse_report still names
        the reason (:meth:`runtime_notes`)."""
        if torch.compiler.is_compiling():
            return self.original_forward(*args, **kwargs)
        with _LOCK:
            counts = self.fallbacks
            first = why not in counts
            counts[why] = counts.get(why, 0) + 1
            self.__dict__["last_fallback"] = why
        if first:
            logger.info(
                "%s (%s, fused %s): running the original module: %s",
                self.vk_path or "<root>",
                type(self.original).__name__,
                "+".join(op for op, f in self.fused_ops.items() if f),
                why,
            )
        for op, fused in self.fused_ops.items():
            if fused:
                unfused(OP_NAMES[op], self.backend, why, ran="original", log=False)
        return self.original_forward(*args, **kwargs)

    def runtime_notes(self) -> List[str]:
        notes = []
        why = self.structure_reason() or self.param_reason() or self.hook_reason()
        if why:
            notes.append(why)
        with _LOCK:
            counts = dict(self.fallbacks)
        for reason, n in counts.items():
            notes.append(f"ran the original modules {n} time(s) since fuse: {reason}")
        active = [f"{n} p={p:g}" for n, p in self.dropouts() if p > 0]
        if active:
            if self.dropout_active():
                state = "active now: " + ("the model is in training mode" if self.training else "a module under it is")
            else:
                state = "inactive in eval mode"
            notes.append(
                f"dropout {', '.join(active)} ({state}); while any module of the part is training, calls run the "
                "original modules"
            )
        notes.append(
            "under torch.autocast the fused ops run at the autocast dtype (inputs and parameters cast as autocast "
            "casts a matmul's operands; LayerNorm statistics in fp32 inside the kernels)"
        )
        if any(p.requires_grad for p in self.parameters()):
            notes.append(autograd_note(self.backend))
        return notes

    def report_entries(self) -> List[ReportEntry]:
        notes = tuple(self.runtime_notes())
        return [dataclasses.replace(e, notes=e.notes + notes) if e.fused else e for e in self.vk_entries]

    def __prepare_scriptable__(self):
        library.refuse_torchscript(self)

    def extra_repr(self) -> str:
        ops = ", ".join(op for op, f in self.fused_ops.items() if f)
        return f"fused={ops or 'nothing'}, backend={self.backend!r}, original={type(self.original).__name__}"


def at_autocast(fn, *args, out_dtype: Optional[torch.dtype] = None, **kwargs):
    """``fn(*args, **kwargs)``: a fused op called by an adapter. Under torch.autocast (on for the
    first argument's device) it runs at the autocast dtype:
    - the kernel backends ("auto", "triton", "cuda"), which take one dtype: every floating tensor
      among the arguments (input, weights, biases, norm parameters) cast to the autocast dtype, as
      autocast casts a matmul's operands, autocast off inside; the result left at the autocast dtype
      (a projection's output, as autocast leaves it) or cast to ``out_dtype``. The kernels compute
      LayerNorm statistics in fp32;
    - backend "torch": autocast left on, so the op's PyTorch path is cast exactly as the unfused
      modules are (LayerNorm in fp32, the matmuls at the autocast dtype, the residual add in the
      stream's dtype); its tensors are first widened to one dtype (an autocast output meeting fp32
      parameters: fp32, exact), as the op takes one dtype.
    Without autocast (or for an fx.Proxy) ``fn`` runs as called."""
    x = args[0]
    if not _autocast_on(x):
        return fn(*args, **kwargs)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if kwargs.get("backend") == "torch":
        dt = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        context = contextlib.nullcontext()
    else:
        dt = torch.get_autocast_dtype(x.device.type)
        context = torch.autocast(x.device.type, enabled=False)

    def cast(t):
        return t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    with context:
        out = fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
    return out if out_dtype is None else out.to(out_dtype)


def with_residual(fn, *args, residual, layer_scale=None, **kwargs):
    """``fn(*args, residual=residual, layer_scale=layer_scale, **kwargs)``: a fused op whose epilogue
    adds ``layer_scale * branch`` to the residual stream. Under torch.autocast with a kernel backend
    the branch runs at the autocast dtype (:func:`at_autocast`) and ``residual + layer_scale *
    branch`` in the residual's dtype after it, as eager autocast computes a block's residual add: the
    kernels' epilogue takes one dtype, and a residual cast to bfloat16 there rounds the whole stream
    (measured: 2.2x eager's error on a 2-block timm ViT). The cost is eager's: one elementwise pass
    over the stream."""
    if not _autocast_on(args[0]):
        return fn(*args, residual=residual, layer_scale=layer_scale, **kwargs)
    if kwargs.get("backend") == "torch":  # the op's PyTorch path under autocast adds the residual in its dtype
        return at_autocast(fn, *args, residual=residual, layer_scale=layer_scale, **kwargs)
    branch = at_autocast(fn, *args, **kwargs)
    return residual + (branch * layer_scale if layer_scale is not None else branch)


def _autocast_on(x) -> bool:
    """torch.autocast is on for x's device (False for an fx.Proxy: the graph records the ops as called)."""
    return isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
