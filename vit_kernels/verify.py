"""verify: run an original model and its fused counterpart on the same inputs and apply the
tolerance rule (:mod:`vit_kernels.testing`) against the original computed in float64.

The rule: the fused output's max abs error against the float64 run of the original may be at most
2x the error of the original run at the same dtype (plain PyTorch), plus a small floor.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .models.registry import image_spec
from .testing import Comparison, compare


# the ops a fused part of each kind calls (the attention's output projection is ops.linear)
PART_OPS = {
    "attention": ("qkv_attention", "flash_attention", "linear"),
    "mlp": ("layernorm_gelu_mlp",),
    "patch_embed": ("patch_embed",),
}


@dataclasses.dataclass
class PartCheck:
    """What one fused part of the model ran during verify. path: the part (e.g. ``blocks.0.attn``);
    op: "attention" | "mlp" | "patch_embed"; backend: what it was fused with; ran: the decisions
    of its op calls (backend and kernel path); status: "checked", "FAIL" (it took another backend
    than the one it was fused with) or "NOT CHECKED" (it ran no fused op: the original module
    ran, or the part was not called); why: the reason for FAIL / NOT CHECKED."""

    path: str
    op: str
    backend: str
    ran: List[object]
    status: str
    why: str = ""

    def summary(self) -> str:
        """What ran, e.g. ``qkv_attention triton/single_kernel, linear triton``."""
        seen = []
        for d in self.ran:
            s = f"{d.op} {d.backend}" + (f"/{d.path}" if d.path and d.path != d.backend else "")
            if s not in seen:
                seen.append(s)
        return ", ".join(seen) or "no fused op"


@dataclasses.dataclass
class VerifyReport:
    """Per-output comparisons and per-part checks. ``status``: "PASS" when every output is within
    the tolerance rule and every fused part ran the backend it was fused with; "FAIL" when an
    output is off, a part took another backend, or a problem was found; "NOT CHECKED" when the
    numbers agree but some fused part ran no fused op (or nothing is fused, or no attention or MLP
    is: the model has no transformer block, or all are left). ``ok`` is ``status == "PASS"``.
    fuse_report: what was fused in the model that was checked; decisions: which backend each op
    took in its last call (and why)."""

    dtype: torch.dtype
    comparisons: List[Comparison]
    fuse_report: object = None
    decisions: Dict[str, object] = dataclasses.field(default_factory=dict)
    problems: List[str] = dataclasses.field(default_factory=list)
    parts: List[PartCheck] = dataclasses.field(default_factory=list)
    not_checked: List[str] = dataclasses.field(default_factory=list)

    @property
    def status(self) -> str:
        if (
            not self.comparisons
            or not all(c.ok for c in self.comparisons)
            or self.problems
            or any(p.status == "FAIL" for p in self.parts)
        ):
            return "FAIL"
        if self.not_checked or any(p.status == "NOT CHECKED" for p in self.parts):
            return "NOT CHECKED"
        return "PASS"

    @property
    def ok(self) -> bool:
        return self.status == "PASS"

    def __str__(self) -> str:
        lines = [f"verify at {str(self.dtype).replace('torch.', '')}: {self.status}"]
        lines += ["  " + str(c) for c in self.comparisons]
        lines += ["  problem: " + p for p in self.problems]
        lines += ["  NOT CHECKED: " + n for n in self.not_checked]
        if self.parts:
            lines.append("  fused parts (the backend each was fused with: the backend/kernel path its ops ran):")
            groups: Dict[tuple, List[str]] = {}
            for p in self.parts:
                groups.setdefault((p.op, p.backend, p.summary(), p.status, p.why), []).append(p.path)
            for (op, backend, ran, status, why), paths in groups.items():
                where = paths[0] if len(paths) == 1 else f"{len(paths)} parts, {paths[0]} .. {paths[-1]}"
                verdict = "checked" if status == "checked" else f"{status}: {why}"
                lines.append(f"    {op} ({where}) fused with {backend!r}: {ran}: {verdict}")
        if self.decisions:
            lines.append("  backends (last call of each op):")
            lines += ["    " + str(d) for d in self.decisions.values()]
        return "\n".join(lines)


def _outputs(y, name: str = "output") -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating tensor in a model's output (tensors, tuples, dicts,
    transformers ModelOutput objects)."""
    if isinstance(y, torch.Tensor):
        return [(name, y)]
    if isinstance(y, dict):  # also transformers' ModelOutput (an OrderedDict)
        return [t for k, v in y.items() if v is not None for t in _outputs(v, k)]
    if isinstance(y, (list, tuple)):
        if len(y) == 1:
            return _outputs(y[0], name)
        return [t for i, v in enumerate(y) for t in _outputs(v, f"{name}[{i}]")]
    return []


def default_inputs(model: nn.Module, batch: int = 2, img_size: Optional[int] = None) -> torch.Tensor:
    """Random images (batch, channels, img, img) for ``model``, image size and channels read from
    its attributes (timm, torchvision, transformers, vit-pytorch, vit_kernels)."""
    img, chans = image_spec(model)
    img = img_size or img
    if img is None:
        raise ValueError(f"model: cannot tell the input image size of {type(model).__name__}; pass inputs")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.randn(batch, chans or 3, img, img, device=device)


def _has_swaps(model: nn.Module) -> bool:
    from .swap import SwapWrapper

    return any(isinstance(m, SwapWrapper) for m in model.modules())


def _is_fused(model: nn.Module) -> bool:
    """True when ``model`` holds fused wrappers or vit_kernels modules set to run fused ops."""
    from .nn import _Fused

    return _has_swaps(model) or any(
        isinstance(m, _Fused) and m.backend != "reference" and not getattr(m, "vk_fuse_excluded", False)
        for m in model.modules()
    )


def _param_dtype(model: nn.Module) -> Optional[torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else None


def _fused_parts(model: nn.Module) -> List[Tuple[str, nn.Module, List[Tuple[str, str]], str]]:
    """(module path, module, [(part path, op)], backend) of every module of ``model`` that runs
    fused ops: the swap wrappers and vit_kernels' own modules."""
    from .nn import FusedAttention, FusedMlp, FusedPatchEmbed
    from .swap import SwapWrapper

    kinds = ((FusedAttention, "attention"), (FusedMlp, "mlp"), (FusedPatchEmbed, "patch_embed"))
    out = []
    for path, m in model.named_modules():
        if isinstance(m, SwapWrapper):
            parts = [(e.path, e.op) for e in m.vk_entries if e.fused]
            if parts:
                out.append((path, m, parts, m.backend))
        else:
            op = next((op for cls, op in kinds if isinstance(m, cls)), None)
            if op and not getattr(m, "vk_fuse_excluded", False):
                out.append((path, m, [(path, op)], m.backend))
    return out


def _watch(model: nn.Module, calls: list):
    """Hooks that record, for each fused module of ``model``, the slice of ``calls`` (the
    decisions recorded by :func:`record_decisions`) made while it ran. Returns (parts, runs,
    handles): runs maps a module path to a list with one list of decisions per call."""
    parts = _fused_parts(model)
    runs: Dict[str, List[list]] = {path: [] for path, *_ in parts}
    handles = []
    for path, m, _, _ in parts:
        starts = []

        def pre(mod, args, starts=starts):
            starts.append(len(calls))

        def post(mod, args, out, starts=starts, path=path):
            runs[path].append(list(calls[starts.pop() :]))

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    return parts, runs, handles


def _judge(parts, runs) -> List[PartCheck]:
    """One :class:`PartCheck` per fused part: did each call run its ops on the backend it was fused with?"""
    out = []
    for path, _, entries, backend in parts:
        for part_path, op in entries:
            ran = [d for call in runs[path] for d in call if d.op in PART_OPS[op] and d.path != "unfused"]
            # a part that ran unfused code (the original modules, dropout in training) says why
            fell_back = [d for call in runs[path] for d in call if d.op in PART_OPS[op] and d.path == "unfused"]
            if not runs[path]:
                status, why = "NOT CHECKED", "it was not called"
            elif fell_back:
                status, why = (
                    "NOT CHECKED",
                    (f"it ran the original module instead of the fused ops: {fell_back[0].reasons.get('fused', '')}"),
                )
            elif any(not any(d.op in PART_OPS[op] for d in call) for call in runs[path]):
                status, why = (
                    "NOT CHECKED",
                    (
                        "it ran the original module instead of the fused ops (dropout in "
                        "training, an attention mask, a hook or another runtime "
                        "fallback: see the fuse report's notes)"
                    ),
                )
            else:
                wrong = [d for d in ran if backend != "auto" and d.backend != backend]
                status, why = (
                    ("FAIL", f"it was fused with backend={backend!r} but ran {wrong[0]}") if wrong else ("checked", "")
                )
            out.append(PartCheck(part_path, op, backend, ran, status, why))
    return out


def _check_options(original, fused, inputs, dtype, backend, oracle) -> None:
    """Refuse wrong argument types before anything runs; errors name the argument."""
    from .backends import check_backend
    from .swap import check_model

    check_model(original, "original")
    if fused is not None:
        check_model(fused, "fused", vit=False)  # one with nothing fused is reported NOT CHECKED
    if oracle is not None:
        check_model(oracle, "oracle", vit=False)
    if inputs is not None and not isinstance(inputs, (torch.Tensor, tuple)):
        raise TypeError(f"inputs: expected a tensor, a tuple of positional inputs or None, got {type(inputs).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        hint = " (a string: use torch.float16, torch.bfloat16, ...)" if isinstance(dtype, str) else ""
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}{hint}")
    if backend is not None:
        check_backend(backend)


@torch.no_grad()
def verify(
    original: nn.Module,
    fused: Optional[nn.Module] = None,
    inputs=None,
    *,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    oracle: Optional[nn.Module] = None,
) -> VerifyReport:
    """Compare ``fused`` with ``original`` under the tolerance rule; nothing passed in is changed.

    original: the eager model, or a model fused already (then it is what gets checked, against an
    unfused copy); fused: the fused model (None: a copy of ``original`` as it is fused when it is,
    else fused with ``vit_kernels.fuse(backend=backend or "auto")``); backend: None keeps the
    backend the model was fused with, a name re-fuses the copy with that backend;
    inputs: a tensor, a tuple of positional inputs, or None for random images (:func:`default_inputs`);
    dtype: the dtype both run at (None: the original's); oracle: the float64 reference (None: a
    float64 copy of the eager original; vit_kernels models run their eager oracle backend there).
    Both models run in eval mode. Returns a :class:`VerifyReport` with the max abs/rel error of
    every output, pass/fail per output, per fused part the backend and kernel path its ops ran
    (FAIL when another backend ran, NOT CHECKED when no fused op ran), the fuse report and the
    backend decisions. Never a PASS when nothing is fused or no attention or MLP is.
    """
    from . import fuse, fuse_report, unfuse
    from .backends import record_decisions
    from .models.vit import VisionTransformer
    from .nn import set_backend

    _check_options(original, fused, inputs, dtype, backend, oracle)
    eager = unfuse(copy.deepcopy(original)) if _has_swaps(original) else original
    if fused is None:
        if _is_fused(original):
            fused = copy.deepcopy(original)  # checked as it is fused
            if backend is not None:
                fuse(fused, backend=backend)
        else:
            fused = fuse(copy.deepcopy(eager), backend=backend or "auto")
    elif backend is not None:
        raise ValueError(
            f"backend: expected None when a fused model is given (it runs the backend it was fused "
            f"with), got {backend!r}"
        )
    dtype = dtype or _param_dtype(original) or torch.float32
    p = next(original.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if inputs is None:
        inputs = default_inputs(eager)
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def at(model: nn.Module, dt: torch.dtype) -> nn.Module:
        """model at dtype dt in eval mode: itself when it is already so, else a copy."""
        if _param_dtype(model) == dt and not model.training:
            return model
        return copy.deepcopy(model).to(dt).eval()

    def run(model, dt):
        a = tuple(
            t.to(device=device, dtype=dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args
        )
        return _outputs(model(*a))

    if oracle is None:
        oracle = copy.deepcopy(eager).to(torch.float64).eval()
        if isinstance(oracle, VisionTransformer):
            set_backend(oracle, "reference")
    want = run(oracle, torch.float64)
    base_model = at(eager, dtype)
    if isinstance(base_model, VisionTransformer):  # the baseline: the oracle's code at dtype, not a path under test
        base_model = set_backend(copy.deepcopy(base_model) if base_model is eager else base_model, "reference")
    base = run(base_model, dtype)
    fused_at = at(fused, dtype)
    with record_decisions() as calls:
        parts, runs, handles = _watch(fused_at, calls)
        try:
            got = run(fused_at, dtype)
        finally:
            for h in handles:
                h.remove()
    decisions = {d.op: d for d in calls}
    if len(got) != len(want) or [n for n, _ in got] != [n for n, _ in want]:
        raise RuntimeError(
            f"verify: the fused model returned outputs {[n for n, _ in got]}, the original {[n for n, _ in want]}"
        )
    comps = [compare(g, w, b, name=n) for (n, g), (_, w), (_, b) in zip(got, want, base)]
    problems = [
        f"{n}: the float64 original's output is identically zero (a zero-initialised head?): "
        f"comparing it checks nothing"
        for n, w in want
        if w.numel() and not w.abs().max().item()
    ]
    if not want:
        problems.append("the model returned no floating-point tensor to compare")
    report = fuse_report(fused)
    not_checked = []
    if not parts:
        not_checked.append("nothing in the fused model is fused: the comparison checked plain PyTorch only")
    blocks = [e for e in report.entries if e.op in ("attention", "mlp")]
    if not blocks:
        not_checked.append(
            "no attention or MLP was found (the model has no transformer block, or none of a kind "
            "vit_kernels knows): no block was checked"
        )
    elif not any(e.fused for e in blocks):
        not_checked.append(
            f"no attention or MLP is fused: {len(blocks)} attention / MLP parts were left (first: "
            f"{blocks[0].path}: {blocks[0].reason}); the blocks were not checked (see fuse_report)"
        )
    return VerifyReport(dtype, comps, report, decisions, problems, _judge(parts, runs), not_checked)
