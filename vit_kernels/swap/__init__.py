"""fuse / unfuse / fuse_report: swap fused modules into existing ViTs, one adapter per family.

- :mod:`.timm`: timm VisionTransformer and models reusing its Block / Attention / Mlp / PatchEmbed.
- :mod:`.torchvision`: torchvision vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14.
- :mod:`.hf`: Hugging Face transformers ViT (5.x and 4.x module layouts).
- :mod:`.vit_pytorch`: lucidrains' vit-pytorch ``ViT`` (the current release and the older PreNorm one).
- vit_kernels' own models are fused already; ``fuse`` sets their backend.

Each adapter lists candidates (modules it can replace and, per op, fused or the reason it is
left); ``fuse`` replaces them by wrappers that share the original parameters (see
:mod:`.wrapper`). The dispatch below is the whole of it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, List, Optional, Tuple

from torch import nn

from ..backends import check_backend
from ..nn import _Fused, set_backend
from . import hf, timm, torchvision, vit_pytorch
from .report import OPS, Candidate, FuseReport, ReportEntry
from .wrapper import SwapWrapper

logger = logging.getLogger("vit_kernels")

ADAPTERS = (timm, torchvision, hf, vit_pytorch)

# model -> the ops its last fuse call asked for (what fuse_report assumes by default)
_FUSE_OPS: "weakref.WeakKeyDictionary[nn.Module, Tuple[str, ...]]" = weakref.WeakKeyDictionary()

__all__ = ["fuse", "unfuse", "fuse_report", "check_model", "FuseReport", "ReportEntry", "SwapWrapper", "OPS"]


def _check_ops(ops: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(ops, str):
        raise TypeError(f"ops: expected a sequence of op names from {OPS}, got the string {ops!r}")
    ops = tuple(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops: expected names from {OPS}, got {op!r}")
    return ops


def check_model(model, name: str = "model", *, vit: bool = True) -> nn.Module:
    """``model`` must be a torch.nn.Module and, with ``vit``, hold a ViT of a known family (or
    fused parts); raises TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name}: expected a torch.nn.Module (a ViT or a module holding one), got {type(model).__name__}"
        )
    if (
        vit
        and not any(isinstance(m, (SwapWrapper, _Fused)) for m in model.modules())
        and not _candidates(model, "auto", OPS)
    ):
        raise ValueError(
            f"{name}: expected a ViT of a known family (timm, torchvision, transformers, vit-pytorch, "
            f"vit_kernels) or a module holding one, got {type(model).__name__}, which holds none"
        )
    return model


def _candidates(model: nn.Module, backend: str, ops: Tuple[str, ...]) -> List[Candidate]:
    out: List[Candidate] = []
    for adapter in ADAPTERS:
        out += adapter.candidates(model, backend, ops)
    return out


def _native_entries(model: nn.Module) -> List[ReportEntry]:
    """vit_kernels' own modules: fused by construction (unless fuse left their op out)."""
    from ..nn import FusedAttention, FusedMlp, FusedPatchEmbed
    from .wrapper import autograd_note

    kinds = ((FusedAttention, "attention"), (FusedMlp, "mlp"), (FusedPatchEmbed, "patch_embed"))
    out = []
    for path, m in model.named_modules():
        for cls, op in kinds:
            if isinstance(m, cls):
                if not getattr(m, "vk_fuse_excluded", False):
                    notes = (f"backend={m.backend!r}",)
                    if any(p.requires_grad for p in m.parameters()):
                        notes += (autograd_note(m.backend),)
                    out.append(ReportEntry(path, op, "vit_kernels", True, "", notes))
                else:
                    out.append(
                        ReportEntry(path, op, "vit_kernels", False, "not requested (ops) in fuse; runs backend='torch'")
                    )
    return out


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new  # the same slot: keeps the key order of the parent's children


def fuse(model: nn.Module, *, backend: str = "auto", ops: Iterable[str] = OPS) -> nn.Module:
    """Replace, in place, the attention (with the LayerNorm and QKV projection before it), the
    LayerNorm + GELU MLP and the patch embedding of every ViT found in ``model`` by modules that
    run the fused ops and share the original Parameters; return ``model``.

    backend: "auto" | "triton" | "cuda" | "torch" (see :mod:`vit_kernels.backends`); ops: which of
    "patch_embed", "attention", "mlp" to fuse. What was fused and what was left (and why) is
    logged at INFO on the ``vit_kernels`` logger; :func:`fuse_report` returns it. Calling fuse on
    a fused model sets the backend of the fused modules and fuses whatever is new.
    ``unfuse`` puts the original modules back.
    """
    check_model(model, vit=False)
    check_backend(backend)
    ops = _check_ops(ops)
    check_model(model)
    for m in model.modules():
        if isinstance(m, SwapWrapper):
            m.backend = backend
    native = [m for m in model.modules() if isinstance(m, _Fused)]
    if native:
        set_backend(model, backend)
        # ops not asked for run the plain PyTorch path
        from ..nn import FusedAttention, FusedMlp, FusedPatchEmbed

        kinds = {FusedAttention: "attention", FusedMlp: "mlp", FusedPatchEmbed: "patch_embed"}
        for m in native:
            excluded = kinds.get(type(m)) not in ops
            m.vk_fuse_excluded = excluded
            if excluded:
                m.backend = "torch"
    built = []
    for c in _candidates(model, backend, ops):
        if c.build is None:
            continue
        if c.path == "":
            for e in c.entries:
                if e.fused:
                    e.fused, e.reason, e.notes = (
                        False,
                        ("it is the model itself: fuse replaces submodules in place; pass the module that holds it"),
                        (),
                    )
            continue
        w = c.build()
        w.vk_path = c.path  # names the part in fall-back messages
        _set(model, c.path, w)
        built.append(w)
    for w in built:  # once every part is in place: each call checks its modules are still these
        w.remember_structure()
    _FUSE_OPS[model] = ops
    report = fuse_report(model, backend=backend, ops=ops)
    logger.info("%s", report)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Put the original modules back (with the wrappers' current parameters); return ``model``.
    vit_kernels' own models get backend="torch" (the plain PyTorch path). A model that holds no
    ViT of a known family is refused (ValueError)."""
    check_model(model)
    wrappers = [(p, m) for p, m in model.named_modules() if isinstance(m, SwapWrapper)]
    for path, w in sorted(wrappers, key=lambda pm: -pm[0].count(".")):
        if path == "":
            raise ValueError("model: is itself a fused wrapper; call unfuse on the model that holds it")
        _set(model, path, w.restore())
    _FUSE_OPS.pop(model, None)
    if any(isinstance(m, _Fused) for m in model.modules()):
        set_backend(model, "torch")
        for m in model.modules():
            if isinstance(m, _Fused):
                m.vk_fuse_excluded = True
    return model


def fuse_report(model: nn.Module, *, backend: Optional[str] = None, ops: Optional[Iterable[str]] = None) -> FuseReport:
    """What is fused in ``model`` and what is left, and why. On a model that was not fused it says
    what :func:`fuse` would do (with ``backend``, default "auto", and ``ops``, default: those of
    the last fuse call on this model, else all). Fused parts carry notes on runtime behaviour
    (dropout in training, autograd) as of now. A model with no ViT part of a known family gets a
    report that says so."""
    check_model(model, vit=False)
    if backend is not None:
        check_backend(backend)
    ops = _check_ops(ops if ops is not None else _FUSE_OPS.get(model, OPS))
    wrappers = [m for m in model.modules() if isinstance(m, SwapWrapper)]
    if backend is None:
        backends = {w.backend for w in wrappers} | {m.backend for m in model.modules() if isinstance(m, _Fused)}
        backend = backends.pop() if len(backends) == 1 else "auto"
    entries: List[ReportEntry] = []
    for w in wrappers:
        entries += w.report_entries()
    for c in _candidates(model, backend, ops):
        for e in c.entries:
            if not e.fused:
                entries.append(e)
            elif c.path == "":
                entries.append(
                    ReportEntry(
                        e.path, e.op, e.family, False, "it is the model itself: fuse replaces submodules in place"
                    )
                )
            else:  # a part fuse() would fuse: not fused now
                entries.append(ReportEntry(e.path, e.op, e.family, False, "not fused yet (fuse() would fuse it)"))
    entries += _native_entries(model)
    _add_tuning_notes(model, entries)
    _add_plan_notes(model, entries)
    if not entries:
        entries.append(
            ReportEntry(
                "",
                "-",
                "unknown",
                False,
                f"no ViT part of a known family (timm, torchvision, transformers, vit-pytorch, "
                f"vit_kernels) was found in {type(model).__name__}",
            )
        )
    entries.sort(key=lambda e: _path_key(e.path))
    return FuseReport(entries, backend)


def _add_tuning_notes(model: nn.Module, entries: List[ReportEntry]) -> None:
    """Per fused part, what its op calls chose when :func:`vit_kernels.tune` ran it: backend, path,
    config and the measured speed-up over the torch path; and a fallback to the torch path."""
    from ..tuning import OP_PARTS, decision_note

    by_path = {e.path: e for e in entries if e.fused}
    for path, m in model.named_modules():
        decisions = getattr(m, "vk_decisions", ())
        # vk.tune's fallback note, while the part still runs the torch path it set (not a backend set since)
        fallback = getattr(m, "vk_tune_note", None) if getattr(m, "backend", None) == "torch" else None
        if not decisions and not fallback:
            continue
        for e in by_path.values():
            if e.path != path and not e.path.startswith(path + ".") and path:
                continue
            notes = tuple(decision_note(d) for d in decisions if OP_PARTS.get(d.op) == e.op)
            e.notes = e.notes + tuple(f"tuned: {n}" for n in notes) + ((fallback,) if fallback else ())


def _add_plan_notes(model: nn.Module, entries: List[ReportEntry]) -> None:
    """Per fused part that has run, how its op calls launch (vit_kernels.library's launch plans): by
    replaying the recorded Triton launches (the least host work per call), or through the op's
    launcher on every call, and why (another backend, a launch a replay cannot name)."""
    by_path = {e.path: e for e in entries if e.fused}
    for path, m in model.named_modules():
        store, e = m.__dict__.get("_vk_plans"), by_path.get(path)
        if not store or e is None:
            continue
        plans = list(store.values())
        replayed = sum(p.replay is not None for p in plans)
        note = f"launch plans: {replayed} of {len(plans)} op call signatures replay their recorded Triton launches"
        why = sorted({f"{p.decision.op}: {p.replay_refused}" for p in plans if p.replay is None})
        if why:
            note += "; the others run their launcher on every call (" + "; ".join(why) + ")"
        e.notes = e.notes + (note,)


def _path_key(path: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]
