"""Recorded kernel launches, replayed: the host side of a fused module's launch plan (vit_kernels.library).

A Triton launcher (vit_kernels/triton/*.py) spends its host time on checks, strides, flags, the grid
and the argument list, all of which depend only on the call's signature (every tensor's shape,
strides, dtype, device and 16-byte alignment, and the numbers). So the first call of a signature is
recorded and later calls replay it:

- the forward launchers start their kernels with :func:`launch` (``launch(kernel, grid, *args,
  **kwargs)`` is ``kernel[grid](*args, **kwargs)``) and allocate their outputs and intermediates
  with :func:`empty`; placeholders that live as long as the process are marked with
  :func:`persistent`; tensors a launcher computes with host state of its own (the TMA GEMM's
  LayerNorm route flags) come from :func:`derived`, which a replay calls again. Besides
  those, a launcher's host work is checks and views: a tensor it computes otherwise with torch is
  refused here when it reaches a kernel, and it never writes with torch into what it
  allocated (a replay would not repeat that write; tests/test_launch_plans.py checks the launchers'
  source for kernel launches made another way);
- between :func:`start` and :func:`stop` (a planned call, from its dispatch's ``offer`` on) those
  calls are also kept, and :meth:`Replay.build` turns them into a
  :class:`Replay`: each launch's kernel, grid, keyword arguments (the constexprs, num_warps) and
  argument list, where every tensor is named by where it comes from: an input of the call (the op's
  schema tensors, or a view of one at the same address and dtype), an allocation of the call (or a
  view of one), or a persistent placeholder; a host tensor descriptor by where its base comes from;
- ``replay(tensors)`` allocates what the call allocated, substitutes the new tensors into the
  argument lists and launches: exactly the launches the launcher would make for these tensors
  (tests/test_launch_plans.py compares both argument lists).

A launch whose arguments cannot be named that way (a tensor the launcher computed, a tensor in
the keyword arguments) is not replayed: :meth:`Replay.build` returns the
reason instead and the plan keeps calling the launcher (``Plan.replay_refused``).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - a Triton without host tensor descriptors (none is made then)
    TensorDescriptor = type("NoTensorDescriptor", (), {})

_STATE = threading.local()  # .rec: the Recording open in this thread (None: not recording)
_PERSISTENT: dict = {}  # id -> tensor: placeholders that are never freed (never read by their kernels)


class Recording:
    """What one call launched (``launches``: (kernel, grid, args, kwargs)) and allocated (``allocs``)."""

    def __init__(self):
        self.launches: List[tuple] = []
        self.allocs: List[Tensor] = []
        self.derived: List[tuple] = []  # (fn, args, outputs) per derived() call
        self.whole = True  # False: another recording took this thread's over meanwhile (:class:`recording`)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, kept by this thread's recording when one is open (:func:`start`)."""
    rec = getattr(_STATE, "rec", None)
    if rec is not None:
        rec.launches.append((kernel, grid, args, kwargs))
    kernel[grid](*args, **kwargs)


def empty(shape, dtype: torch.dtype, device) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)`` (contiguous), kept by this thread's open
    recording: a replay allocates the same."""
    t = torch.empty(shape, dtype=dtype, device=device)
    rec = getattr(_STATE, "rec", None)
    if rec is not None:
        rec.allocs.append(t)
    return t


def derived(fn, *args) -> Tuple[Optional[Tensor], ...]:
    """``fn(*args)``: a tuple of tensors (or None) that a launcher computes from the call's tensors
    with work of its own, which keeps host state (the TMA GEMM's LayerNorm route flags, kept as the last
    route). Kept by this thread's recording: a
    replay calls ``fn`` again, on the new call's tensors (``args``: tensors named as launch arguments
    are, numbers and strings as they are), so a launch that reads its results is replayed, not
    refused. What ``fn`` itself launches or allocates is not the call's (not recorded)."""
    rec = getattr(_STATE, "rec", None)
    if rec is None:
        return fn(*args)
    _STATE.rec = None
    try:
        out = fn(*args)
    finally:
        _STATE.rec = rec
    rec.derived.append((fn, args, out))
    return out


class recording:
    """``with recording() as rec:`` records this thread's launches, allocations and derivations
    into ``rec`` (a :class:`Recording`), and gives an open recording back after (the tuner records a
    candidate's run inside an op call's dispatch)."""

    __slots__ = ("rec", "outer")

    def __enter__(self) -> Recording:
        self.outer = getattr(_STATE, "rec", None)
        self.rec = _STATE.rec = Recording()
        return self.rec

    def __exit__(self, *exc) -> None:
        if getattr(_STATE, "rec", None) is not self.rec:  # an op planned inside started and stopped its own
            self.rec.whole = False
        _STATE.rec = self.outer


def persistent(t: Tensor) -> Tensor:
    """Mark ``t`` (a placeholder kept for the life of the process) as passed as it is by a replay."""
    _PERSISTENT[id(t)] = t
    return t


def start() -> None:
    """Start recording this thread's launches and allocations (vit_kernels.backends.offer calls it
    when a planned call's dispatch is about to launch)."""
    _STATE.rec = Recording()


def stop() -> Optional[Recording]:
    """Stop recording; the Recording (None when none was started)."""
    rec = getattr(_STATE, "rec", None)
    _STATE.rec = None
    return rec


_PLAIN_TYPES = (int, float, bool, str, type(None))


class Replay:
    """The launches of one recorded call. ``replay(tensors)`` (the op's schema tensors, of the
    recorded call's signature) makes them again and returns the new output.

    Every launch argument is an entry of a pool made per call: the ``n_inputs`` tensors, then fresh
    allocations (``allocs``: (shape, strides, an empty tensor of the dtype and device) each, contiguous
    as :func:`empty` made them), then the recorded numbers, strings and persistent placeholders
    (``consts``), then the results of the :func:`derived` calls (``derived``: (fn, pool indices of its
    arguments, how many tensors it returns) each, called again in order), then views of the
    allocations (``views``: (pool index, size, stride, storage offset) each). ``steps``: (launcher,
    indices) per launch: the launch with its grid and keyword arguments bound (:func:`_bound`), and the
    pool indices of the launch's arguments (the kernel's constexprs among them, :func:`_positional`).
    A call runs all of it as one generated function (``source``, :func:`_straight_line`); :meth:`launches`
    builds the same pool step by step. ``out``: the pool index of the
    result; ``aliases``: (i, j) pairs of inputs that shared an address in the recorded call (a
    launch argument there is named by the first of them), which a replay needs to share one too
    (:meth:`serves`); ``kernels``: (kernel, grid) per launch (:meth:`launches`); ``descs``: (pool index
    of the base, the other fields) per host tensor descriptor (sm_90's TMA attention), made again on
    the new base after the views."""

    __slots__ = (
        "allocs",
        "consts",
        "views",
        "steps",
        "out",
        "aliases",
        "kernels",
        "descs",
        "derived",
        "source",
        "_call",
    )

    def __init__(self, n_inputs, allocs, consts, views, steps, out, aliases, kernels, descs=(), derived=()):
        self.allocs, self.consts, self.views, self.steps = allocs, consts, views, steps
        self.out, self.aliases, self.kernels, self.descs = out, aliases, kernels, descs
        self.derived = derived
        self.source, self._call = _straight_line(self, n_inputs)

    def serves(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        """False when inputs that shared an address in the recorded call do not now."""
        for i, j in self.aliases:
            if tensors[i].data_ptr() != tensors[j].data_ptr():
                return False
        return True

    def _pool(self, tensors: Sequence[Optional[Tensor]]) -> list:
        """The tensors, fresh allocations, constants and views the launches take their arguments from."""
        pool = list(tensors)
        for shape, stride, like in self.allocs:
            pool.append(like.new_empty_strided(shape, stride))
        pool += self.consts
        for fn, idx, _ in self.derived:
            pool += fn(*[pool[i] for i in idx])
        for base, size, stride, offset in self.views:
            pool.append(pool[base].as_strided(size, stride, offset))
        for base, fields in self.descs:
            pool.append(_descriptor(pool[base], fields))
        return pool

    def __call__(self, tensors: Sequence[Optional[Tensor]]) -> Tensor:
        return self._call(*tensors)

    def launches(self, tensors: Sequence[Optional[Tensor]]) -> List[tuple]:
        """What a replay with ``tensors`` launches, without launching: (kernel, grid, args, kwargs)
        per launch, as ``kernel[grid](*args, **kwargs)`` (for tests and diagnostics)."""
        pool = self._pool(tensors)
        out = []
        for (kernel, grid), (launcher, idx) in zip(self.kernels, self.steps):
            kwargs = {k: v for k, v in launcher.keywords.items() if k not in ("grid", "warmup")}
            out.append((kernel, grid, tuple(pool[i] for i in idx), kwargs))
        return out

    @staticmethod
    def build(rec: Recording, tensors: Sequence[Optional[Tensor]], out: Any) -> Union["Replay", str]:
        """The Replay of the recorded call whose inputs were ``tensors`` and result ``out``, or why
        it cannot be replayed exactly (a sentence)."""
        if not rec.whole:
            return "the launch was not recorded whole (an op was called inside it)"
        if not rec.launches:
            return "no Triton launch was recorded"
        allocs = rec.allocs
        n, A = len(tensors), len(allocs)
        if not any(a is out for a in allocs):
            return "the result is not an allocation of the launcher"
        consts: List[Any] = []
        views: List[tuple] = []
        aliases = set()

        outputs = [o for _, _, outs in rec.derived for o in (outs if isinstance(outs, tuple) else ())]

        def source(t: Tensor) -> Union[tuple, str]:
            """Where launch argument ``t`` comes from: ("in", i), ("alloc", k), ("const", t),
            ("derived", k), ("view", v)."""
            for k, o in enumerate(outputs):
                if o is t:
                    return ("derived", k)
            same = [i for i, x in enumerate(tensors) if x is t]
            if not same:
                same = [i for i, x in enumerate(tensors) if x is not None and x.data_ptr() == t.data_ptr()]
                same = [i for i in same if tensors[i].dtype == t.dtype]
            if same:
                aliases.update((same[0], j) for j in same[1:])
                return ("in", same[0])
            for k, a in enumerate(allocs):
                if a is t or (a.data_ptr() == t.data_ptr() and a.dtype == t.dtype):
                    return ("alloc", k)
            if id(t) in _PERSISTENT:
                return ("const", t)
            for k, a in enumerate(allocs):
                if a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    if a.dtype != t.dtype:
                        return f"a view of an allocation as {t.dtype}"
                    return ("view", (n + k, tuple(t.shape), tuple(t.stride()), t.storage_offset()))
            return (
                f"a tensor argument ({t.dtype} {tuple(t.shape)}) is neither an input, an allocation nor a placeholder"
            )

        derived_refs = []  # per derived() call: its arguments' sources
        seen = 0  # outputs of the derived() calls before this one
        for fn, args, outs in rec.derived:
            if not isinstance(outs, tuple) or any(o is not None and not isinstance(o, Tensor) for o in outs):
                return f"{getattr(fn, '__name__', fn)} (derived) did not return a tuple of tensors"
            row = []
            for a in args:
                r = source(a) if isinstance(a, Tensor) else ("const", a) if isinstance(a, _PLAIN_TYPES) else None
                if r is None:
                    return f"an argument of type {type(a).__name__} of {fn.__name__} (derived) is not replayed"
                if isinstance(r, str):
                    return r
                if r[0] == "view" or (r[0] == "derived" and r[1] >= seen):
                    return f"an argument of {fn.__name__} (derived) is a view or a later result"
                row.append(r)
            derived_refs.append((fn, row))
            seen += len(outs)

        refs = []  # per launch: its arguments' sources
        options = []  # per launch: the keyword arguments left as keywords
        from triton.runtime.jit import KernelInterface

        for kernel, grid, args, kwargs in rec.launches:
            if not isinstance(kernel, KernelInterface):
                return f"a launch of {type(kernel).__name__}, not a Triton kernel"
            if any(not isinstance(v, _PLAIN_TYPES) for v in kwargs.values()):
                return "a keyword argument of a launch is not a plain number or string"
            if len(args) < 2:
                return "a launch with fewer than two arguments"
            args, kwargs = _positional(kernel, args, kwargs)
            options.append(kwargs)
            row = []
            for a in args:
                if isinstance(a, Tensor):
                    r = source(a)
                    if isinstance(r, str):
                        return r
                elif isinstance(a, _PLAIN_TYPES):
                    r = ("const", a)
                elif isinstance(a, TensorDescriptor):  # sm_90's host descriptors: made again on its new base
                    r = source(a.base) if isinstance(a.base, Tensor) else "a tensor descriptor without a tensor"
                    if isinstance(r, str):
                        return r
                    r = ("desc", (r, {k: v for k, v in vars(a).items() if k != "base"}))
                else:
                    return f"a launch argument of type {type(a).__name__} is not replayed"
                row.append(r)
            refs.append(row)

        descs: List[tuple] = []  # (base index, the descriptor's other fields)

        def index(r: tuple) -> Union[int, tuple]:
            """The pool index of source ``r``; ("view", k) / ("desc", k) until the constants are counted."""
            kind, v = r
            if kind == "in":
                return v
            if kind == "alloc":
                return n + v
            if kind == "const":
                for c, x in enumerate(consts):  # by identity and type: 1, 1.0 and True stay apart
                    if x is v or (type(x) is type(v) and not isinstance(v, Tensor) and x == v):
                        return n + A + c
                consts.append(v)
                return n + A + len(consts) - 1
            if kind == "derived":
                return ("derived", v)
            if kind == "view":
                if v not in views:
                    views.append(v)
                return ("view", views.index(v))
            d = (index(v[0]), v[1])
            if d not in descs:
                descs.append(d)
            return ("desc", descs.index(d))

        rows = [[index(r) for r in row] for row in refs]
        derived_rows = [(fn, [index(r) for r in row]) for fn, row in derived_refs]
        D = n + A + len(consts)  # the first derived result's pool index
        first = {"derived": D, "view": D + len(outputs), "desc": D + len(outputs) + len(views)}

        def final(j: Union[int, tuple]) -> int:
            return j if isinstance(j, int) else first[j[0]] + j[1]

        steps = []
        for (kernel, grid, _, _), kwargs, row in zip(rec.launches, options, rows):
            steps.append((_bound(kernel, grid, kwargs), tuple(map(final, row))))
        out_j = n + next(k for k, a in enumerate(allocs) if a is out)
        # contiguous as empty() made them; like: an empty tensor of the dtype and device (new_empty_strided
        # takes them from it, a little cheaper than torch.empty_strided's keyword arguments)
        shapes = tuple((tuple(a.shape), a.stride(), a.new_empty(0)) for a in allocs)
        kernels = tuple((kernel, grid) for kernel, grid, _, _ in rec.launches)
        descs = tuple((final(base), fields) for base, fields in descs)
        counts = [len(outs) for _, _, outs in rec.derived]
        derived = tuple((fn, tuple(map(final, row)), c) for (fn, row), c in zip(derived_rows, counts))
        return Replay(
            n, shapes, tuple(consts), tuple(views), tuple(steps), out_j, tuple(sorted(aliases)), kernels, descs, derived
        )


def _straight_line(r: "Replay", n: int) -> Tuple[str, Any]:
    """``r``'s launches as one generated Python function of the call's tensors, and its source: what
    :meth:`Replay._pool` and the steps do, written out (``p<i>`` is pool entry i: the first ``n``
    the arguments, then the allocations, the derived results, the views and the descriptors as
    locals; the constants as globals of the function), so a replay runs no loop, list or
    ``itemgetter`` of its own (about 2 us of a 4-launch call's host time)."""
    names: dict = {"_object_new": object.__new__, "_TensorDescriptor": TensorDescriptor}
    lines = [f"def replay({''.join(f'p{i}, ' for i in range(n))}):"]
    j = n
    for k, (shape, stride, like) in enumerate(r.allocs):
        names[f"_new{k}"], names[f"_shape{k}"], names[f"_stride{k}"] = like.new_empty_strided, shape, stride
        lines.append(f"    p{j} = _new{k}(_shape{k}, _stride{k})")
        j += 1
    for c in r.consts:
        names[f"p{j}"] = c
        j += 1
    for k, (fn, idx, count) in enumerate(r.derived):
        names[f"_derived{k}"] = fn
        outs = "".join(f"p{j + i}, " for i in range(count))
        lines.append(f"    {f'({outs}) = ' if count else ''}_derived{k}({', '.join(f'p{i}' for i in idx)})")
        j += count
    for k, (base, size, stride, offset) in enumerate(r.views):
        names[f"_view{k}"] = (size, stride, offset)
        lines.append(f"    p{j} = p{base}.as_strided(*_view{k})")
        j += 1
    for k, (base, fields) in enumerate(r.descs):  # as _descriptor makes them, written out (no call)
        names[f"_fields{k}"] = {"base": None, **fields}
        lines.append(f"    p{j} = _object_new(_TensorDescriptor)")
        lines.append(f"    p{j}.__dict__ = _d = _fields{k}.copy()")
        lines.append(f"    _d['base'] = p{base}")
        j += 1
    for k, (launcher, idx) in enumerate(r.steps):
        names[f"_launch{k}"] = launcher
        lines.append(f"    _launch{k}({', '.join(f'p{i}' for i in idx)})")
    lines.append(f"    return p{r.out}")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<vit_kernels.replay>", "exec"), names)
    return source, names["replay"]


def _descriptor(base: Tensor, fields: dict):
    """A TensorDescriptor on ``base`` with the recorded one's other fields (shape, strides, block
    shape, padding). Not validated again: what its checks read (the shape, the strides, the base's
    16-byte alignment) is part of the plan's signature."""
    d = object.__new__(TensorDescriptor)
    d.__dict__ = {"base": base, **fields}
    return d


def _positional(kernel, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The launch ``kernel[grid](*args, **kwargs)`` with the keyword arguments that name the kernel's
    next parameters (its constexprs: tiles, flags) moved after ``args``, in the kernel's parameter
    order, up to the first parameter not given; the rest (num_warps, num_stages, ...) stay keywords.
    The same launch (Triton binds arguments by name either way), with less packing per call: a
    GEMM's 14 constexprs as keywords cost about 0.7 us more per launch."""
    args, kwargs = list(args), dict(kwargs)
    for name in kernel.arg_names[len(args) :]:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    return tuple(args), kwargs


def _bound(kernel, grid, kwargs: dict):
    """``kernel[grid](*args, **kwargs)`` as a callable of ``*args``. For Triton's kernels
    (``KernelInterface``: JITFunction, the interpreter's InterpretedFunction; :meth:`Replay.build`
    replays no other) ``kernel[grid]`` is a lambda that calls ``kernel.run(*args, grid=grid,
    warmup=False, **kwargs)``; binding ``run`` itself skips that frame and a second packing of the
    keyword arguments. Bound when the plan is made: a ``run`` replaced later on the class
    (vit_kernels.triton.aot.record_launches) records only the launches of plans made inside it."""
    return functools.partial(kernel.run, grid=grid, warmup=False, **kwargs)


def signature(tensors: Sequence[Optional[Tensor]]) -> Tuple[Optional[tuple], ...]:
    """What a replay of a call with ``tensors`` depends on: each tensor's shape, strides, dtype,
    device and 16-byte alignment class (Triton specializes pointers on it; some checks read it), and
    whether it is a negative view or a zero tensor (the checks refuse both: a call of them must reach them).
    Which tensors share an address is checked by :meth:`Replay.serves` instead."""
    return tuple(
        [
            None
            if t is None
            else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15, t.is_neg(), t._is_zerotensor())
            for t in tensors
        ]
    )


try:  # torch.compile's own C++ check of tensors' metadata (the guards of its compiled frames)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - a PyTorch without it: plans are found by their key only
    _TensorGuards = None

_MATCHED_TYPES = (int, float, bool, str, type(None))


def _tensor_guard(tensors: Sequence[Tensor]):
    """``check(*tensors2)``: True only when each of ``tensors2`` has the Python type, shape, strides,
    dtype, device (its dispatch keys, under the thread's dispatch state at both times) and requires_grad
    of the tensor at its place in ``tensors``, and no two of them are one object; PyTorch's C++ guard
    (``torch._C._dynamo.guards.TensorGuards``), about 0.1 us a tensor against 0.5 us for the
    accessors of :func:`signature`. None where this PyTorch has none, or one that does not behave so
    (checked on small tensors)."""
    if _GUARD_WORKS[0] is None:
        _GUARD_WORKS[0] = _probe_guard()
    return _make_guard(tensors) if _GUARD_WORKS[0] else None


_GUARD_WORKS: List[Optional[bool]] = [None]  # whether this PyTorch's TensorGuards behaves as _tensor_guard says


def _make_guard(tensors: Sequence[Tensor]):
    return _TensorGuards(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    ).check


def _probe_guard() -> bool:
    """True when TensorGuards exists, takes these arguments and tells shapes, strides and dtypes apart."""
    if _TensorGuards is None:
        return False
    try:
        a, b = torch.empty(2, 3), torch.empty(3, 2)
        probe = _make_guard([a, b])
        return bool(
            probe(torch.empty(2, 3), b) and not (probe(b.t(), b) or probe(a, a.double().t()) or probe(a, b[:, :1]))
        )
    except (TypeError, RuntimeError):  # pragma: no cover - another signature of the private guard
        return False


def matcher(args: Sequence, n: int):
    """``match(*args2)``: a quick test that an op call with schema arguments ``args2`` has the plan key of
    the call with ``args`` (``n`` tensors first; vit_kernels.library keys a launch plan by the op, the
    tuner's state, the numbers and strings with their types, and :func:`signature`). True only when
    the same arguments are None; the others are tensors whose Python type, shape, strides, dtype,
    device, dispatch keys (a negative view or a zero tensor has its own) and requires_grad are those
    here (one C++ check, :func:`_tensor_guard`, after a check that none is nested) and whose 16-byte
    alignment class is; arguments that were one tensor object here still are, and those that were not
    are not; every number or string is of the same type and equal. So it is True only where the key
    is equal (it may say False where the key is equal: another thread dispatch state, inputs that now
    share one tensor object; the plan is then found by its key). Written as one generated function of
    the call's arguments (about 2 us for the MLP's 8 tensors, against 6.6 us for its key and the
    dict look-up). None when it cannot be made: no usable guard, or an argument that is not a tensor,
    a plain number, a string, None or a list / tuple of plain numbers."""
    tensors = args[:n]
    present: List[int] = []  # the tensor arguments, each object once
    same: List[Tuple[int, int]] = []  # (i, j): argument i is the object argument j is
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            return None
        j = next((j for j in present if tensors[j] is t), None)
        present.append(i) if j is None else same.append((i, j))
    for a in args[n:]:
        if not isinstance(a, _MATCHED_TYPES) and not (
            type(a) in (list, tuple) and all(type(v) in (int, float, bool) for v in a)
        ):
            return None
    guard = _tensor_guard([tensors[i] for i in present])
    if guard is None:
        return None
    names: dict = {"_guard": guard}
    tests = [f"a{i} is None" for i, t in enumerate(tensors) if t is None]
    tests += [f"a{i} is a{j}" for i, j in same]
    # (an old-style nested tensor makes the guard abort the process: refused before it)
    tests.append(f"not ({' or '.join(f'a{i}.is_nested' for i in present)})")
    tests.append(f"_guard({', '.join(f'a{i}' for i in present)})")
    aligned = [i for i in present if tensors[i].data_ptr() & 15 == 0]
    if aligned:  # one bitwise or of their addresses
        tests.append(f"not (({' | '.join(f'a{i}.data_ptr()' for i in aligned)}) & 15)")
    tests += [f"a{i}.data_ptr() & 15 == {tensors[i].data_ptr() & 15}" for i in present if i not in aligned]
    for i in range(n, len(args)):
        if args[i] is None or type(args[i]) is bool:  # (None, True, False: one object each)
            tests.append(f"a{i} is {args[i]!r}")
            continue
        names[f"_type{i}"], names[f"_value{i}"] = type(args[i]), list(args[i]) if type(args[i]) is list else args[i]
        tests.append(f"a{i}.__class__ is _type{i} and a{i} == _value{i}")
    source = f"def match({', '.join(f'a{i}' for i in range(len(args)))}):\n    try:\n        return (\n            "
    source += "\n            and ".join(tests) + "\n        )\n"
    # None where a tensor was (no is_nested), a tensor without memory (data_ptr), a subclass whose
    # __torch_function__ answers is_nested its own way: not this signature (the key path says what it is)
    source += "    except Exception:\n        return False\n"
    exec(compile(source, "<vit_kernels.replay.matcher>", "exec"), names)
    return names["match"]
