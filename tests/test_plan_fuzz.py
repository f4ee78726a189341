"""A differential fuzz of the launch plans (vit_kernels.library.run, vit_kernels.replay): seeded random
sequences of op calls through one PlanStore, each call's arguments drawn from a small pool of variations
(layouts of every tensor, optional tensors present or None, tensors shared between arguments, Parameters,
dtypes, batch and token counts, grad modes, the numbers and strings), so that signatures repeat (a plan
serves them: found by its quick test or by its key, its launches replayed) and also differ (a new plan, or
an old one that must not serve). Each call must give, bitwise, what the same call gives with no plan at
all (the op's implementation, ``library.IMPLS[op]``, which a first call of a signature runs), record the
same Decisions, and meet the float64 oracle; a call the checks refuse must raise the same error both
ways. After a sequence no plan may keep a call's tensor alive.

A failure names the test's seed and the call: ``VK_PLAN_FUZZ_SEED=<seed>`` replays that sequence,
``VK_PLAN_FUZZ_CALLS=<n>`` makes every sequence n calls long (a longer hunt)."""

import contextlib
import gc
import math
import os
import random
import weakref

import pytest
import torch

from vit_kernels import backends, library, reference, replay, testing

DIM, HEADS, HIDDEN = 32, 2, 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# every layout of _tensor; the pools below repeat some entries to weigh them
LAYOUTS = ("contiguous", "strided", "offset", "misaligned", "expanded", "transposed", "last_two", "channels_last")
# the grad mode of a call (with grad enabled, a call with a tensor that requires grad takes autograd's path,
# one without is planned) and whether CPU autocast is on (the torch path follows it, Triton's kernels do not)
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}
AUTOCAST = {False: contextlib.nullcontext, True: lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


# ------------------------------------------------------------------------------------------ tensors
def _tensor(shape, dtype, layout, std=1.0):
    """A fresh random tensor of ``shape`` and ``dtype`` (uint8: pixels) laid out as ``layout``:
    "contiguous"; "strided" (a row gap: a slice of a wider last dim; 1-D: every second element);
    "offset" (contiguous, 32 elements into its buffer: 16-byte aligned); "misaligned" (one element into
    its buffer); "expanded" (stride 0 along the first dim of size > 1); "transposed" (dims 0 and 1
    swapped, dims 1 and 2 of a 4-D tensor: unit last-dim stride kept); "last_two" (the last two dims
    swapped); "channels_last" (4-D). Layouts a shape cannot take fall back to "strided"."""
    shape = tuple(shape)
    n = len(shape)

    def rnd(*s):
        if dtype == torch.uint8:
            return torch.randint(0, 256, s, dtype=torch.uint8)
        return torch.randn(*s, dtype=dtype) if std == 1.0 else (torch.randn(*s) * std).to(dtype)

    if layout in ("transposed", "last_two") and n < 2 or layout == "channels_last" and n != 4:
        layout = "strided"
    if layout == "contiguous" or math.prod(shape) == 0:
        return rnd(*shape)
    if layout == "strided":
        return rnd(2 * shape[0])[::2] if n == 1 else rnd(*shape[:-1], shape[-1] + 8)[..., : shape[-1]]
    if layout == "offset":
        return rnd(math.prod(shape) + 32)[32:].view(shape)
    if layout == "misaligned":
        return rnd(math.prod(shape) + 1)[1:].view(shape)
    if layout == "expanded":
        d = next((i for i, s in enumerate(shape) if s > 1), None)
        return rnd(*shape) if d is None else rnd(*shape[:d], 1, *shape[d + 1 :]).expand(shape)
    if layout == "channels_last":
        return rnd(*shape).contiguous(memory_format=torch.channels_last)
    a, b = (n - 2, n - 1) if layout == "last_two" else (1, 2) if n == 4 else (0, 1)
    swapped = list(shape)
    swapped[a], swapped[b] = shape[b], shape[a]
    return rnd(*swapped).transpose(a, b)


class _Maker:
    """Makes a call's tensors: fresh ones, or (half the time, for the parameters) the very tensor
    objects an earlier call of the sequence got for the same name, shape, dtype, layout and kind, as a
    module's parameters come back call after call. ``kind``: "tensor", "param" (an nn.Parameter that does
    not require grad) or "grad" (one that does: the calls run under no_grad / inference_mode)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.cache: dict = {}

    def __call__(self, name, shape, dtype, layout, kind="tensor", reuse=True):
        key = (name, tuple(shape), dtype, layout, kind)
        if reuse and key in self.cache and self.rng.random() < 0.5:
            return self.cache[key]
        # weights as nn.Linear / nn.Conv2d scale them (fan_in ** -0.5): bf16 softmax of unscaled projections
        # is too ill-conditioned for the oracle's tolerance
        t = _tensor(shape, dtype, layout, math.prod(shape[1:]) ** -0.5 if "weight" in name and len(shape) > 1 else 1.0)
        if kind != "tensor":
            t = torch.nn.Parameter(t, requires_grad=kind == "grad")
        if reuse:
            self.cache[key] = t
        return t


# --------------------------------------------------------------------------- each op's variations
# knob -> its choices (repeated entries weigh a choice). A sequence draws a few base calls from these and
# makes each call from one of them, often with a knob or two drawn again.
COMMON = {
    "dtype": DTYPES,
    "grad_mode": ("no_grad", "no_grad", "inference_mode", "enable_grad"),
    "autocast": (False, False, False, True),
    "tune": (None, None, None, "off"),
    "params": ("tensor", "tensor", "param", "grad"),  # the weights' and 1-D parameters' kind (_Maker)
    "store": ("module", "module", "module", "function"),  # the sequence's PlanStore, or library.FUNCTION_PLANS
}
PARAM_1D = ("contiguous", "contiguous", "offset", "misaligned", "strided", "expanded")  # strided, expanded: copied
KNOBS = {
    "linear": {
        "B": (1, 2, 0),  # 0: an empty result (never planned)
        "N": (1, 5, 7),
        "x_rank": (3, 3, 2, 4),
        "x_inference": (False, False, False, True),  # x made under inference_mode (an inference tensor)
        "x": LAYOUTS[:7],
        "out": (DIM, DIM, 48),
        "weight": ("contiguous", "contiguous", "offset", "misaligned", "transposed", "strided", "expanded"),
        "bias": (None,) + PARAM_1D + ("float64",),  # float64: refused (another dtype than x's)
        "residual": (None, "x", "x", "contiguous", "strided", "misaligned", "expanded", "transposed"),
        "layer_scale": (None, None, "contiguous", "misaligned", "bias", "alone"),  # alone: without residual, refused
    },
    "layernorm_gelu_mlp": {
        "B": (1, 2),
        "N": (1, 5, 7),
        "x_rank": (3, 3, 2),
        "x_inference": (False, False, False, True),
        "x": LAYOUTS[:7],
        "norm_weight": (None,) + PARAM_1D,
        "norm_bias": (None, "contiguous", "misaligned", "norm_weight", "alone"),  # alone: refused
        "fc1_weight": ("contiguous", "contiguous", "misaligned", "transposed", "strided"),
        "fc1_bias": (None, "contiguous", "offset", "misaligned", "float64"),
        "fc2_weight": ("contiguous", "contiguous", "offset", "transposed", "expanded"),
        "fc2_bias": (None, "contiguous", "misaligned"),
        "residual": (None, "x", "x", "contiguous", "strided", "misaligned"),
        "layer_scale": (None, None, "contiguous", "misaligned", "fc2_bias", "alone"),
        "eps": (1e-6, 1e-6, 1e-5, 0.0, 0, -1.0),  # 0: an int (another key); -1.0: refused
        "approximate": ("none", "none", "tanh", "tanh", "exact"),  # "exact": refused
    },
    "qkv_attention": {
        "B": (1, 2, 0),
        "N": (1, 5, 7),
        "x_inference": (False, False, False, True),
        "x": LAYOUTS[:7],
        "qkv_weight": ("contiguous", "contiguous", "offset", "misaligned", "transposed", "strided", "last_two"),
        "qkv_bias": (None, "contiguous", "misaligned", "strided", "float64"),
        "norm_weight": (None, "contiguous", "contiguous", "offset", "misaligned"),
        "norm_bias": (None, "contiguous", "norm_weight", "alone"),
        "num_heads": (HEADS, HEADS, 1, 4, 3, 2.0),  # 4: head_dim 8 (Triton refuses); 3, 2.0: refused
        "scale": (None, None, 0.25, 1, 0.0),  # 1: an int; 0.0: refused
        "eps": (1e-6, 1e-6, 1e-5),
        "path": (None, "split", "single_kernel"),
    },
    "patch_embed": {
        "B": (1, 2, 3, 0),
        "patch_size": (4, 4, 2, 3, 4.0),  # 3 (8 x 8 images), 4.0: refused
        "uint8": (False, False, False, True),
        "images": ("contiguous", "contiguous", "channels_last", "strided", "offset", "misaligned", "expanded"),
        "weight": ("contiguous", "contiguous", "channels_last", "misaligned", "transposed"),
        "bias": (None, "contiguous", "misaligned", "strided", "float64"),
        "pos_embed": (None, "batch", "batch", "flat", "misaligned", "strided"),
        "cls_token": (None, "1x1", "1x1", "flat", "misaligned"),
    },
    "flash_attention": {
        "B": (1, 2),
        "Nq": (1, 5, 7),
        "Nk": ("q", "q", 5, 7),
        "head_dim": (16, 16, 32, 8),  # 8: refused by Triton
        "q": ("contiguous", "contiguous", "transposed", "offset", "misaligned", "strided", "expanded", "last_two"),
        "k": ("contiguous", "contiguous", "transposed", "offset", "strided"),
        "v": ("contiguous", "contiguous", "transposed", "misaligned", "expanded"),
        "sharing": ("apart", "apart", "packed", "k_is_v", "one"),  # packed: views of one (3, ...) buffer
        "scale": (None, None, 0.5, 1, 0.0),
    },
}


# per op, choices the checks refuse: a call drawn with one of them (REFUSING_SHARE of the calls) must
# raise the same error with a plan as without
REFUSED = {
    "linear": (("bias", "float64"), ("layer_scale", "alone")),
    "layernorm_gelu_mlp": (
        ("eps", -1.0),
        ("approximate", "exact"),
        ("norm_bias", "alone"),
        ("layer_scale", "alone"),
        ("fc1_bias", "float64"),
    ),
    "qkv_attention": (
        ("num_heads", 3),
        ("num_heads", 2.0),
        ("scale", 0.0),
        ("norm_bias", "alone"),
        ("qkv_bias", "float64"),
    ),
    "patch_embed": (("patch_size", 3), ("patch_size", 4.0), ("bias", "float64")),
    "flash_attention": (("scale", 0.0),),
}
REFUSING_SHARE = 0.12
# choices a sequence's base calls never draw (refused, or copied per call: never planned; Triton refuses
# head_dim 8); a call drawn again from a base may
RARE = {
    ("bias", "strided"),
    ("bias", "expanded"),
    ("norm_weight", "strided"),
    ("norm_weight", "expanded"),
    ("qkv_bias", "strided"),
    ("pos_embed", "strided"),
    ("num_heads", 4),
    ("head_dim", 8),
    ("B", 0),
    *(c for choices in REFUSED.values() for c in choices),
}


def _spec(op, rng, backends_):
    """A base call: each knob its first choice half the time, else any choice but the RARE ones."""
    knobs = dict(COMMON, backend=backends_, **KNOBS[op])
    return {
        k: v[0] if rng.random() < 0.5 else rng.choice([c for c in v if (k, c) not in RARE]) for k, v in knobs.items()
    }


def _refusing(op, spec, rng):
    """``spec`` with one of the choices the checks refuse."""
    k, v = rng.choice(REFUSED[op])
    return dict(spec, **{k: v})


def _mutated(op, spec, rng, backends_):
    knobs = dict(COMMON, backend=backends_, **KNOBS[op])
    spec = dict(spec)
    for k in rng.sample(sorted(knobs), rng.choice((1, 1, 2))):
        spec[k] = rng.choice(knobs[k])
    return spec


def _norm_bias(s, nw, param):
    """The LayerNorm bias of call ``s``: only with a LayerNorm weight, but for "alone" (refused)."""
    if s["norm_bias"] == "alone":
        return param("norm_bias", (DIM,), "contiguous")
    if nw is None:
        return None
    return nw if s["norm_bias"] == "norm_weight" else param("norm_bias", (DIM,), s["norm_bias"])


def _layer_scale(s, residual, bias, param, shape):
    """The layer scale of call ``s``: only with a residual, but for "alone" (refused); "bias", "fc2_bias": the
    bias tensor itself."""
    if s["layer_scale"] == "alone":
        return param("layer_scale", shape, "contiguous")
    if residual is None:
        return None
    return bias if s["layer_scale"] in ("bias", "fc2_bias") else param("layer_scale", shape, s["layer_scale"])


_PARAM_LAYOUT = {"batch": "contiguous", "flat": "contiguous", "1x1": "contiguous"}


def _args(op, s, make: _Maker) -> tuple:
    """The schema arguments of the call ``s`` (a spec of KNOBS[op]) describes."""
    dt, kind = s["dtype"], s["params"]

    def param(name, shape, layout):
        if layout == "float64":
            return make(name, shape, torch.float64, "contiguous", kind)
        return None if layout is None else make(name, shape, dt, layout, kind)

    def x_tensor(shape):
        with torch.inference_mode() if s["x_inference"] else contextlib.nullcontext():
            return make("x", shape, dt, s["x"], reuse=False)

    rest = (s["backend"], s["tune"])
    if op == "linear":
        lead = {2: (s["B"] * s["N"],), 3: (s["B"], s["N"]), 4: (s["B"], 1, s["N"])}[s["x_rank"]]
        x = x_tensor(lead + (DIM,))
        out = s["out"]
        bias = param("bias", (out,), s["bias"])
        residual = x if s["residual"] == "x" else None
        if s["residual"] not in (None, "x"):
            residual = make("residual", lead + (out,), dt, s["residual"], reuse=False)
        ls = _layer_scale(s, residual, bias, param, (out,))
        return (x, param("weight", (out, DIM), s["weight"]), bias, residual, ls) + rest
    if op == "layernorm_gelu_mlp":
        lead = (s["B"] * s["N"],) if s["x_rank"] == 2 else (s["B"], s["N"])
        x = x_tensor(lead + (DIM,))
        nw = param("norm_weight", (DIM,), s["norm_weight"])
        nb = _norm_bias(s, nw, param)
        b2 = param("fc2_bias", (DIM,), s["fc2_bias"])
        residual = x if s["residual"] == "x" else None
        if s["residual"] not in (None, "x"):
            residual = make("residual", lead + (DIM,), dt, s["residual"], reuse=False)
        ls = _layer_scale(s, residual, b2, param, (DIM,))
        w1 = param("fc1_weight", (HIDDEN, DIM), s["fc1_weight"])
        b1 = param("fc1_bias", (HIDDEN,), s["fc1_bias"])
        w2 = param("fc2_weight", (DIM, HIDDEN), s["fc2_weight"])
        return (x, nw, nb, w1, b1, w2, b2, residual, ls, s["eps"], s["approximate"]) + rest
    if op == "qkv_attention":
        x = x_tensor((s["B"], s["N"], DIM))
        nw = param("norm_weight", (DIM,), s["norm_weight"])
        nb = _norm_bias(s, nw, param)
        w = param("qkv_weight", (3 * DIM, DIM), s["qkv_weight"])
        b = param("qkv_bias", (3 * DIM,), s["qkv_bias"])
        return (x, w, b, nw, nb, s["num_heads"], s["scale"], s["eps"], s["path"]) + rest
    if op == "patch_embed":
        p, B = s["patch_size"], s["B"]
        T = (8 // int(p)) ** 2 + (s["cls_token"] is not None)
        images = make("images", (B, 3, 8, 8), torch.uint8 if s["uint8"] else dt, s["images"], reuse=False)
        pos, cls = s["pos_embed"], s["cls_token"]  # "batch", "flat", "1x1": contiguous (1, T, dim), (T, dim), ...
        pos = param("pos_embed", (T, DIM) if pos == "flat" else (1, T, DIM), _PARAM_LAYOUT.get(pos, pos))
        cls = param("cls_token", (DIM,) if cls == "flat" else (1, 1, DIM), _PARAM_LAYOUT.get(cls, cls))
        norm = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) if s["uint8"] else (None, None)
        weight = param("weight", (DIM, 3, int(p), int(p)), s["weight"])
        return (images, weight, param("bias", (DIM,), s["bias"]), pos, cls, p) + norm + rest
    assert op == "flash_attention"
    B, Nq, D = s["B"], s["Nq"], s["head_dim"]
    Nk = Nq if s["Nk"] == "q" or s["sharing"] in ("packed", "one") else s["Nk"]
    if s["sharing"] == "packed":  # views of one buffer, as the split qkv_attention path makes them
        qkv = _tensor(
            (3, B, HEADS, Nq, D), dt, s["q"] if s["q"] in ("contiguous", "offset", "misaligned") else "contiguous"
        )
        q, k, v = qkv.unbind(0)
    else:
        q = make("q", (B, HEADS, Nq, D), dt, s["q"], reuse=False)
        k = q if s["sharing"] == "one" else make("k", (B, HEADS, Nk, D), dt, s["k"], reuse=False)
        v = k if s["sharing"] in ("one", "k_is_v") else make("v", (B, HEADS, Nk, D), dt, s["v"], reuse=False)
    return (q, k, v, s["scale"]) + rest


def _oracle(op, args, dtype):
    """The op's float64 oracle (vit_kernels.reference) on ``args`` converted to ``dtype``."""

    def c(t):
        return t if t is None or t.dtype == torch.uint8 else t.detach().to(dtype)

    if op == "linear":
        x, w, b, res, ls = map(c, args[:5])
        return reference.linear(x, w, b, residual=res, layer_scale=ls)
    if op == "layernorm_gelu_mlp":
        x, nw, nb, w1, b1, w2, b2, res, ls = map(c, args[:9])
        return reference.layernorm_gelu_mlp(
            x, nw, nb, w1, b1, w2, b2, eps=args[9], approximate=args[10], residual=res, layer_scale=ls
        )
    if op == "qkv_attention":
        x, w, b, nw, nb = map(c, args[:5])
        kw = dict(num_heads=args[5], scale=args[6], eps=args[7])
        return reference.qkv_attention(x, w, b, norm_weight=nw, norm_bias=nb, **kw)
    if op == "patch_embed":
        images, w, b, pos, cls = map(c, args[:5])
        kw = dict(patch_size=args[5], pos_embed=pos, cls_token=cls, image_mean=args[6], image_std=args[7])
        return reference.patch_embed(images, w, b, **kw)
    q, k, v = map(c, args[:3])
    return reference.flash_attention(q, k, v, scale=args[3])


# ------------------------------------------------------------------------------------------ a call
def _outcome(op, args, store):
    """(result or None, (error type, message) or None, the Decisions recorded) of one call of ``op``:
    through ``store``'s plans (``store`` None: the op's implementation itself, no plan at all)."""
    with backends.record_decisions() as calls:
        try:
            if store is None:
                out = library.IMPLS[op](*args)
            else:
                with library.plans(store) if store is not library.FUNCTION_PLANS else contextlib.nullcontext():
                    out = library.run(op, args)
            return out, None, list(calls)
        except Exception as e:  # noqa: BLE001  (compared with the other way's, never kept: its frames hold tensors)
            return None, (type(e), str(e)), list(calls)


def _describe(args):
    def one(a):
        if isinstance(a, torch.Tensor):
            return (
                f"{type(a).__name__}{tuple(a.shape)} {a.dtype} strides {a.stride()} "
                f"align {a.data_ptr() % 16} rg {a.requires_grad} inf {a.is_inference()}"
            )
        return repr(a)

    shared = [(i, j) for i, a in enumerate(args) for j, b in enumerate(args[:i]) if a is b and a is not None]
    return "\n    ".join(map(one, args)) + f"\n    one object: {shared}"


def _check_call(op, args, spec, store, where):
    with GRAD_MODES[spec["grad_mode"]](), AUTOCAST[spec["autocast"]]():
        out, err, decisions = _outcome(op, args, store)
        want, want_err, want_decisions = _outcome(op, args, None)
    msg = f"{where}: {spec}\n    {_describe(args)}"
    assert err == want_err, f"{msg}\nplanned: {err}\nno plan: {want_err}"
    assert decisions == want_decisions, f"{msg}\nplanned: {decisions}\nno plan: {want_decisions}"
    if err is not None:
        return "refused"
    assert out.dtype == want.dtype and out.shape == want.shape and out.stride() == want.stride(), msg
    assert torch.equal(out, want), f"{msg}\nplanned and unplanned results differ: max abs diff " + str(
        (out.double() - want.double()).abs().max().item()
    )
    # the error baseline: plain PyTorch at the result's dtype; under autocast at bfloat16 (the torch path's
    # products run in it: the differential above is this call's check, the oracle a sanity bound)
    baseline = _oracle(op, args, torch.bfloat16 if spec["autocast"] else out.dtype)
    testing.assert_close(out, _oracle(op, args, torch.float64), baseline, name=msg)
    return out


# -------------------------------------------------------------------------------------- sequences
OPS = ("linear", "layernorm_gelu_mlp", "qkv_attention", "patch_embed", "flash_attention")
MIXED = {  # the backends the calls of an op's mixed sequence draw
    "linear": ("torch", "torch", "triton"),
    "layernorm_gelu_mlp": ("auto", "auto", "triton"),
    "qkv_attention": ("auto", "torch", "triton"),
    "patch_embed": ("auto", "torch", "triton"),
    "flash_attention": ("torch", "auto", "triton"),
}
SEQUENCES = [  # (op, the backends its calls draw, calls, seed, the stores' bound): two sequences per op on
    # Triton (the second with stores that keep at most 4 plans: emptied and refilled), one mixed
    *((op, ("triton",), 40, 10 * i + j, None if j == 1 else 4) for i, op in enumerate(OPS) for j in (1, 2)),
    *((op, MIXED[op], 24, 10 * i + 3, None) for i, op in enumerate(OPS)),
]


def _run_sequence(op, backends_, calls, seed, store):
    """Runs the sequence; returns (weak references to every tensor of its calls, counts)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    make = _Maker(rng)
    bases = [_spec(op, rng, backends_) for _ in range(4)]
    refs, counts = [], {"calls": 0, "refused": 0}
    for i in range(calls):
        spec = rng.choice(bases)
        if rng.random() < 0.4:
            spec = _mutated(op, spec, rng, backends_)
        if rng.random() < REFUSING_SHARE:
            spec = _refusing(op, spec, rng)
        args = _args(op, spec, make)
        target = library.FUNCTION_PLANS if spec["store"] == "function" else store
        out = _check_call(op, args, spec, target, f"seed {seed}, call {i}")
        counts["calls"] += 1
        counts["refused"] += out == "refused"
        refs += [weakref.ref(t) for t in args if isinstance(t, torch.Tensor)]
        if isinstance(out, torch.Tensor):
            refs.append(weakref.ref(out))
        del args, out
    make.cache.clear()
    return refs, counts


@pytest.mark.parametrize(
    "op,backends_,calls,seed,bound",
    SEQUENCES,
    ids=[f"{s[0]}-{'+'.join(dict.fromkeys(s[1]))}-{s[3]}" for s in SEQUENCES],
)
def test_planned_calls_give_what_unplanned_calls_give(op, backends_, calls, seed, bound, monkeypatch):
    """One seeded sequence of ``op`` calls through one PlanStore (and the process's, for the calls a
    public function would make): every result bitwise what the call gives without a plan, and right; every
    refusal the same error; plans served (by their quick test and by their key) and replayed along the
    way, so the sequence did test them; afterwards no plan holds a call's tensor."""
    default = "VK_PLAN_FUZZ_SEED" not in os.environ and "VK_PLAN_FUZZ_CALLS" not in os.environ
    seed = int(os.environ.get("VK_PLAN_FUZZ_SEED", seed))
    calls = int(os.environ.get("VK_PLAN_FUZZ_CALLS", calls))
    # the interpreter's bf16 probe runs once per process, here rather than inside a call under autocast
    # (there its float32 reference product is bfloat16 and the probe raises: see the report of this file)
    backends.triton_unavailable(torch.device("cpu"), [torch.bfloat16])
    if bound is not None:
        monkeypatch.setattr(library, "MAX_PLANS", bound)
        monkeypatch.setattr(library, "MAX_FUNCTION_PLANS", bound)
    served = {"plan": 0, "quick": 0, "replay": 0}
    real_serve, real_recent, real_call = library._serve, library._recent_plan, replay.Replay.__call__

    def serve(p, tensors):
        served["plan"] += 1
        return real_serve(p, tensors)

    def recent(*a):
        p = real_recent(*a)
        served["quick"] += p is not None
        return p

    def call(self, tensors):
        served["replay"] += 1
        return real_call(self, tensors)

    monkeypatch.setattr(library, "_serve", serve)
    monkeypatch.setattr(library, "_recent_plan", recent)
    monkeypatch.setattr(replay.Replay, "__call__", call)
    store = library.PlanStore()
    refs, counts = _run_sequence(op, backends_, calls, seed, store)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"seed {seed}: {len(alive)} tensors of the calls are still referenced: " + "; ".join(
        f"{tuple(t.shape)} {t.dtype}" for t in alive[:5]
    )
    if not default:
        return
    # the sequence exercised the plans: calls served by a plan (found by its quick test, or by its key),
    # replayed where Triton ran, and calls refused by the checks
    stats = (served, counts, len(store), len(library.FUNCTION_PLANS))
    assert served["plan"] >= calls // 5 and 0 < served["quick"] <= served["plan"], stats
    assert counts["refused"] >= 1, stats
    if backends_ == ("triton",):
        assert served["replay"] >= calls // 8, stats
    if bound is not None:
        assert len(store) <= bound and len(library.FUNCTION_PLANS) <= bound, stats
