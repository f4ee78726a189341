"""Backend selection, written out in one place.

Every fused op and module takes ``backend="auto" | "triton" | "cuda" | "torch"``.
:func:`resolve` turns that request plus the tensors into a :class:`Decision` that says
which backend runs and, when a fused path is not taken, why. The last decision of each op
is kept so callers can ask (:func:`last_decision`; :func:`record_decisions` collects every call's
decision in the calling thread; the tuner's own runs of candidates are not calls and record nothing,
see :func:`unrecorded`), and every "not taken" reason is logged once at INFO on the
``vit_kernels`` logger. The memo tables are safe to use from several threads.

Rules:
- ``torch``: plain PyTorch (SDPA, F.layer_norm, addmm). Always available, autograd-capable.
- ``triton``: the Triton kernels. On CUDA tensors it needs triton importable; on CPU tensors it
  runs in Triton's interpreter, which must be enabled with ``TRITON_INTERPRET=1`` before
  triton is imported, otherwise an error says how to enable it.
- ``cuda``: the csrc extension. On CUDA tensors the GPU build; on CPU tensors the
  host-emulation build (slow; for verification).
- ``auto``: on CUDA tensors, by measurement: the tuner (:mod:`vit_kernels.tuning`) times every
  candidate (torch and its SDPA backends, each Triton path and tile config, cuda) at the call's
  signature once and keeps the fastest; the op runs the Decision's backend, path and config.
  Untimed (tuning off, cache-only without a cached choice): torch (the fixed configurations were
  measured slower than PyTorch; a named backend still runs). On CPU tensors torch (the interpreter and the emulator are for verification, never
  picked implicitly).
- Gradients: when autograd needs gradients of any input, a backend named in the op's
  ``has_backward`` runs forward and backward kernels (Triton: vit_kernels.autograd); an explicit
  backend without a backward raises (its forward-only kernels cannot serve the call); ``auto``
  keeps the torch path (no backward kernel has been measured against PyTorch's) and the decision
  says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import threading
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from . import replay, tuning

BACKENDS = ("auto", "triton", "cuda", "torch")
logger = logging.getLogger("vit_kernels")


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which backend an op call used, and why the others were not taken.

    op: the op name; backend: "triton" | "cuda" | "torch" ("original": a fused part ran the
    model's own modules instead; see :func:`unfused`); path: an op-specific detail (for
    example "single_kernel" or "split" for qkv_attention, "sdpa_flash" for a torch path pinned to
    one SDPA backend), chosen by the tuner or filled by the op; requested: what the caller asked
    for; reasons: backend -> why it was not taken ("tuning" -> why nothing was timed);
    config: (launcher keyword, tile config) pairs the tuner chose, () for the default tiles;
    tuned: the tuning entry (every candidate's time, :class:`vit_kernels.tuning.Entry`) or None;
    copied: arguments the op copied to the layout the chosen kernels read, each with its old
    strides (see checks.contiguous_params); backward: the backend that computes this call's gradients
    ("triton": the Triton backward kernels, "torch": PyTorch's autograd path), "" when autograd does
    not record the call.
    """

    op: str
    backend: str
    requested: str
    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    path: str = ""
    config: tuple = ()
    tuned: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)
    copied: Tuple[str, ...] = ()
    backward: str = ""

    def with_copied(self, notes: Iterable[str]) -> "Decision":
        notes = tuple(notes)
        if not notes:
            return self
        d = dataclasses.replace(self, copied=self.copied + notes)
        _LAST.replace_call(self, d)
        return d

    def with_path(self, path: str) -> "Decision":
        d = dataclasses.replace(self, path=path)
        _LAST.replace_call(self, d)
        return d

    def with_backward(self, backend: str) -> "Decision":
        d = dataclasses.replace(self, backward=backend)
        _LAST.replace_call(self, d)
        return d

    def __str__(self) -> str:
        s = f"{self.op}: backend={self.backend}"
        if self.path:
            s += f" path={self.path}"
        if self.backward:
            s += f" backward={self.backward}"
        for kw, cfg in self.config:
            s += f" {kw}={cfg}"
        sp = getattr(self.tuned, "speedup", None)
        if sp:
            s += f" (measured {sp:.2f}x the torch path)"
        if self.reasons:
            s += " (" + "; ".join(f"{b} not taken: {r}" for b, r in self.reasons.items()) + ")"
        if self.copied:
            s += " [copied: " + "; ".join(self.copied) + "]"
        return s


_LOCK = threading.Lock()  # guards _LAST and _LOGGED
_RECORDING = threading.local()  # .lists: the open record_decisions() lists of this thread


class _Memo(dict):
    """op -> its last :class:`Decision`. Every write takes the lock and is appended to the lists
    that :func:`record_decisions` has open in the writing thread; ``d.with_path(p)`` and
    ``d.with_copied(notes)`` replace the entry of the same call (``d`` itself) rather than adding one."""

    def __setitem__(self, op: str, d: Decision) -> None:
        self.replace_call(None, d)

    def replace_call(self, old: Optional[Decision], d: Decision) -> None:
        """Record ``d``; where ``old`` (the same call's earlier Decision) is the last recorded entry
        of a list, ``d`` takes its place. Inside :func:`unrecorded` only the lists opened there record."""
        state = _RECORDING.__dict__  # (a missing attribute of a thread-local costs ~1 us; a dict look-up does not)
        if not state.get("unrecorded") and dict.get(self, d.op) is not d:  # (a replay records the same d again)
            with _LOCK:
                dict.__setitem__(self, d.op, d)
        for rec in state.get("lists", ()):
            if old is not None and rec and rec[-1] is old:
                rec[-1] = d
            else:
                rec.append(d)


_LAST: Dict[str, Decision] = _Memo()


def mark_backward(op: str, backend: str) -> None:
    """Name ``backend`` as computing the gradients of ``op``'s latest call that names none, in
    ``last_decision`` and in the open :func:`record_decisions` lists: a backward traced by torch.compile
    runs as an op of its own after every forward call, one call's backward after another in reverse
    order (an eager call names it at its forward, ``Decision.with_backward``)."""
    state = _RECORDING.__dict__
    d = _LAST.get(op)
    if d is not None and not d.backward and not state.get("unrecorded"):
        with _LOCK:
            dict.__setitem__(_LAST, op, dataclasses.replace(d, backward=backend))
    for rec in state.get("lists", ()):
        at = next((i for i in range(len(rec) - 1, -1, -1) if rec[i].op == op and not rec[i].backward), None)
        if at is not None:
            rec[at] = dataclasses.replace(rec[at], backward=backend)


def last_decision(op: Optional[str] = None):
    """The last :class:`Decision` of ``op`` (in any thread), or a dict of all ops' last decisions."""
    with _LOCK:
        if op is None:
            return dict(_LAST)
        return _LAST.get(op)


@contextlib.contextmanager
def record_decisions():
    """``with record_decisions() as calls:`` collects the :class:`Decision` of every op call made
    in this thread inside the block, in order (path included), into the list ``calls``."""
    calls = start_recording()
    try:
        yield calls
    finally:
        stop_recording(calls)


def start_recording() -> list:
    """Open a list that collects every Decision made in this thread until :func:`stop_recording`
    (the two halves of :func:`record_decisions`, for forward pre/post hooks)."""
    calls: list = []
    _RECORDING.__dict__.setdefault("lists", []).append(calls)
    return calls


def stop_recording(calls: list) -> None:
    lists = getattr(_RECORDING, "lists", [])
    if any(c is calls for c in lists):
        del lists[next(i for i, c in enumerate(lists) if c is calls)]


@contextlib.contextmanager
def unrecorded():
    """Inside the block, this thread's op calls are not the caller's: they change neither
    :func:`last_decision` nor the :func:`record_decisions` lists opened before the block (lists
    opened inside, such as a launch plan's, still record). For the tuner's own runs: every candidate
    of a signature and the whole-model guard's timed forwards, each run hundreds of times by a timer
    (vit_kernels.tuning)."""
    outer, was = getattr(_RECORDING, "lists", []), getattr(_RECORDING, "unrecorded", False)
    _RECORDING.lists, _RECORDING.unrecorded = [], True
    try:
        yield
    finally:
        _RECORDING.lists, _RECORDING.unrecorded = outer, was


def check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKENDS} (a string), got {type(backend).__name__} {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1 in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_importable() -> Optional[str]:
    """None when triton can be imported, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton failed to import: {e}"
    return None


def triton_unavailable(device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> Optional[str]:
    """None when Triton kernels can run on ``device`` for tensors of ``dtypes``, else the reason."""
    why = triton_importable()
    if why:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not interpreter_enabled():
            return (
                "tensors are on the CPU and Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "in the environment before triton is imported, or move the tensors to a CUDA device"
            )
        if torch.bfloat16 in set(dtypes):
            from .triton.interpreter import bf16_flaw

            return bf16_flaw()
        return None
    return f"Triton kernels do not run on device type {device.type!r}"


def cuda_unavailable(device: torch.device) -> Optional[str]:
    """None when the csrc extension can run on ``device`` (GPU build or host emulation)."""
    try:
        from . import cuda as _cuda
    except Exception as e:  # pragma: no cover
        return f"vit_kernels.cuda failed to import: {e}"
    fn = getattr(_cuda, "unavailable_reason", None)
    if fn is None:
        return "the CUDA backend is not built into this version of vit_kernels"
    return fn(device)


def needs_grad(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """True when autograd records and any of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(
        t is not None and isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def resolve(
    op: str,
    backend: str,
    tensors: Iterable[Optional[torch.Tensor]],
    unsupported: Optional[Mapping[str, Optional[str]]] = None,
    has_backward: Iterable[str] = (),
    *,
    tune: Optional[str] = None,
    run=None,
    args: tuple = (),
    key_extra: tuple = (),
) -> Decision:
    """Choose the backend for one call of ``op``.

    tensors: the op's tensor arguments (None for absent optional ones); the device of the first
    one decides. unsupported: backend -> reason this call's shapes/dtypes are not supported by
    that backend (None when supported). has_backward: backends whose kernels have a backward
    pass: under autograd an explicit request for another raises, "auto" takes torch.
    With ``backend="auto"`` and ``run`` given, the tuner decides (see :mod:`vit_kernels.tuning`):
    run(decision, *args) runs the op as a Decision says (backend "reference": the float64
    oracle); key_extra: the op's scalars that change which kernels run (part of the signature);
    tune: "on" | "off" | "cache-only" | None (the scope's or environment's mode).

    An explicit request for a backend that cannot serve the call raises ValueError or
    RuntimeError naming why; "auto" moves on and records the reason.
    """
    check_backend(backend)
    if tune is not None:
        tuning.check_mode(tune)
    else:  # VIT_KERNELS_TUNE of another value is refused by every call, also those that never read it (autograd)
        tuning.current_mode()
    all_tensors = tuple(tensors)  # with None entries: the tuning signature counts them
    tensors = [t for t in all_tensors if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    unsupported = dict(unsupported or {})
    reasons: Dict[str, str] = {}

    grad = needs_grad(tensors)
    if grad:
        has_backward = tuple(has_backward)
        if backend == "auto":
            for b in ("triton", "cuda"):
                reasons[b] = GRAD_UNMEASURED if b in has_backward else GRAD_FORWARD_ONLY
            d = Decision(op, "torch", backend, reasons, backward="torch")
            _log_once(d)
            _record(d)
            return d
        if backend != "torch" and backend not in has_backward:
            raise RuntimeError(forward_only_message(op, backend, has_backward))

    def why_not(b: str) -> Optional[str]:
        if b in reasons:
            return reasons[b]
        if b == "triton":
            r = triton_unavailable(device, [t.dtype for t in tensors])
        elif b == "cuda":
            r = cuda_unavailable(device)
        else:
            r = None
        return r or unsupported.get(b)

    if backend == "auto":
        if run is not None and not reasons:
            d = tuning.get_tuner().decide(
                op,
                device,
                all_tensors,
                key_extra,
                tune,
                lambda only=("triton", "cuda"): [b for b in only if why_not(b) is None],
                run,
                args,
                reasons,
            )
            if d is not None:
                _record(d)
                return d
        if device.type == "cuda":
            # Untimed (tuning off, or cache-only without an entry): PyTorch's own path. The fixed
            # configurations were measured slower than PyTorch (an H200, ViT-B/16 bf16 batch 256:
            # the Triton backend 1.32x slower than SDPA; benchmarks/results/2026-11-25-h200), so
            # no kernel is picked without a measurement; naming the backend still runs it.
            order = []
            for b in ("triton", "cuda"):
                reasons.setdefault(
                    b,
                    "nothing was measured for this call (tuning off or no cached choice): "
                    "auto keeps PyTorch's path; tune, or ask for backend=" + repr(b),
                )
        else:
            order = []
            reasons.setdefault(
                "triton",
                "auto does not pick the Triton interpreter on CPU tensors "
                "(it is for verification; ask for backend='triton')",
            )
            reasons.setdefault(
                "cuda",
                "auto does not pick the CUDA host emulator on CPU tensors "
                "(it is for verification; ask for backend='cuda')",
            )
        chosen = "torch"
        for b in order:
            r = why_not(b)
            if r is None:
                chosen = b
                break
            reasons[b] = r
        d = Decision(op, chosen, backend, reasons)
        if reasons:
            _log_once(d)
        _record(d)
        return d

    if backend == "torch":
        d = Decision(op, "torch", backend, {}, backward="torch" if grad else "")
        _record(d)
        return d

    r = why_not(backend)
    if r is not None:
        if backend in unsupported and unsupported[backend] == r:
            raise ValueError(f"{op}: backend={backend!r} cannot run this call: {r}")
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {r}")
    d = Decision(op, backend, backend, {}, backward=backend if grad else "")
    _record(d)
    return d


def forward_only_message(op: str, backend: str, has_backward: Iterable[str]) -> str:
    """The error of an explicit backend without a backward kernel for a call that needs gradients."""
    alt = " or ".join(repr(b) for b in tuple(has_backward) + ("torch",))
    return (
        f"{op}: backend={backend!r} cannot serve this call: gradients are required and "
        f"its kernels are forward-only (no backward); use backend={alt}, or call it "
        f"under torch.no_grad()"
    )


GRAD_UNMEASURED = (
    "gradients are required: auto keeps PyTorch's autograd path (the Triton backward kernels "
    "have not been measured against it; ask for backend='triton')"
)
GRAD_FORWARD_ONLY = "gradients are required and its kernels are forward-only: torch autograd path"
_LOGGED = set()


def _record(d: Decision) -> None:
    _LAST[d.op] = d


def record(d: Decision) -> None:
    """A launch plan's replay records its cached Decision (vit_kernels.library.plans)."""
    if dict.get(_LAST, d.op) is not d or _RECORDING.__dict__.get("lists"):  # (else replace_call would do nothing)
        _LAST.replace_call(None, d)


OFFERS = threading.local()  # .slot: the list a planned call's dispatch offers its launch to (library.plans)


def offer(launch, extras: tuple) -> None:
    """Called by an op's ``dispatch`` just before its launch: ``launch(decision, *tensors, *extras)``
    (tensors: the op's schema tensors) reproduces this call for any tensors of the same signature.
    Kept by vit_kernels.library's launch plans when a fused module makes the call, and from here
    on the call's Triton launches are recorded (vit_kernels.replay); else a no-op."""
    slot = getattr(OFFERS, "slot", None)
    if slot is not None:
        OFFERS.slot = None  # only the outermost dispatch offers (an op that calls another inside)
        slot.append((launch, extras))
        replay.start()


def _log_once(d: Decision) -> None:
    key = (d.op, d.backend, tuple(sorted(d.reasons.items())))
    with _LOCK:
        new = key not in _LOGGED
        _LOGGED.add(key)
    if new:
        logger.info("%s", d)


def unfused(op: str, requested: str, reason: str, *, ran: str = "torch", log: bool = True) -> Decision:
    """Record that ``op``'s work at this call ran unfused, and why: a Decision with path "unfused",
    backend ``ran`` ("torch": a vit_kernels module ran its own plain PyTorch code, for example with
    dropout active in training, which the fused kernels do not apply; "original": a fused part of a
    swapped model (vit_kernels.swap) ran the model's original modules) and reasons {"fused": reason};
    kept for :func:`last_decision` / :func:`record_decisions` and, with ``log``, logged once at INFO.
    Not recorded while torch.compile traces (bookkeeping stays out of compiled graphs)."""
    d = Decision(op, ran, requested, {"fused": reason}, "unfused")
    if _compiling():
        return d
    if log:
        _log_once(d)
    _record(d)
    return d


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False
