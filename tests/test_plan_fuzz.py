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
# one without is planned) and whether CPU autocast is on (backend torch: the PyTorch path follows it; the
# others: the op's tensors cast to bfloat16, autocast off: vit_kernels.library._autocast)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
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
    not require grad) or "grad" (one that does: under no_grad / inference_mode a call is planned all the
    same; with grad enabled it takes autograd's path, unplanned)."""

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
# knob -> its choices (repeated entries weigh a choice). A tensor argument's knob is a layout of _tensor,
# None (absent), "float64" (another dtype than x's: refused), "alone" (a LayerNorm bias without its weight,
# a layer scale without a residual: refused), or names another argument a: "=a" (the very tensor object of
# a), "@a" (another tensor object on a's data), "~a" (a fresh tensor with a's shape, strides, dtype and
# alignment: a's signature).
COMMON = {
    "dtype": DTYPES,
    "grad_mode": ("no_grad", "no_grad", "inference_mode", "enable_grad"),
    "autocast": (False, False, False, True),
    "tune": (None, None, None, "off"),
    "params": ("tensor", "tensor", "param", "grad"),  # the weights' and 1-D parameters' kind (_Maker)
    "store": ("module", "module", "module", "function"),  # the sequence's PlanStore, or library.FUNCTION_PLANS
}
VECTOR = ("contiguous", "contiguous", "offset", "misaligned", "strided", "expanded")  # strided, expanded: copied
WEIGHT = ("contiguous", "contiguous", "offset", "misaligned", "transposed", "strided", "expanded", "last_two")
X = LAYOUTS[:7]
KNOBS = {
    "linear": {
        "B": (2, 1, 0),  # 0: an empty result (never planned)
        "N": (5, 7, 1),
        "x_rank": (3, 3, 2, 4),
        "x_inference": (False, False, False, True),  # x made under inference_mode (an inference tensor)
        "out": (DIM, DIM, 48),
        "x": X,
        "weight": WEIGHT,
        "bias": (None,) + VECTOR + ("float64",),
        "residual": (None, "=x", "=x", "~x", "@x", "contiguous", "strided", "misaligned", "expanded", "float64"),
        "layer_scale": (None, "contiguous", "misaligned", "=bias", "~bias", "alone"),
    },
    "layernorm_gelu_mlp": {
        "B": (2, 1),
        "N": (5, 7, 1),
        "x_rank": (3, 3, 2),
        "x_inference": (False, False, False, True),
        "x": X,
        "norm_weight": (None,) + VECTOR,
        "norm_bias": (None, "contiguous", "misaligned", "=norm_weight", "~norm_weight", "alone"),
        "fc1_weight": WEIGHT,
        "fc1_bias": (None, "contiguous", "offset", "misaligned", "float64"),
        "fc2_weight": WEIGHT,
        "fc2_bias": (None, "contiguous", "misaligned"),
        "residual": (None, "=x", "=x", "~x", "@x", "contiguous", "strided", "misaligned", "float64"),
        "layer_scale": (None, "contiguous", "misaligned", "=fc2_bias", "~fc2_bias", "alone"),
        "eps": (1e-6, 1e-6, 1e-5, 0.0, 0, -1.0),  # 0: an int (another key); -1.0: refused
        "approximate": ("none", "none", "tanh", "tanh", "exact"),  # "exact": refused
    },
    "qkv_attention": {
        "B": (2, 1, 0),
        "N": (5, 7, 1),
        "x_inference": (False, False, False, True),
        "x": X,
        "qkv_weight": WEIGHT,
        "qkv_bias": (None, "contiguous", "misaligned", "strided", "float64"),
        "norm_weight": (None, "contiguous", "contiguous", "offset", "misaligned"),
        "norm_bias": (None, "contiguous", "=norm_weight", "~norm_weight", "alone"),
        "num_heads": (HEADS, HEADS, 1, 4, 3, 2.0),  # 4: head_dim 8 (Triton refuses); 3, 2.0: refused
        "scale": (None, None, 0.25, 1, 0.0),  # 1: an int; 0.0: refused
        "eps": (1e-6, 1e-6, 1e-5),
        "path": (None, "split", "single_kernel"),
    },
    "patch_embed": {
        "B": (2, 1, 3, 0),
        "patch_size": (4, 4, 2, 3, 4.0),  # 3 (8 x 8 images), 4.0: refused
        "uint8": (False, False, False, True),
        "pos_shape": ("batch", "batch", "flat"),  # (1, T, dim) or (T, dim)
        "cls_shape": ("1x1", "1x1", "flat"),  # (1, 1, dim) or (dim,)
        "images": ("contiguous", "contiguous", "channels_last", "strided", "offset", "misaligned", "expanded"),
        "weight": ("contiguous", "contiguous", "channels_last", "misaligned", "transposed", "strided"),
        "bias": (None, "contiguous", "misaligned", "strided", "float64"),
        "pos_embed": (None, "contiguous", "contiguous", "misaligned", "strided", "expanded"),
        "cls_token": (None, "contiguous", "contiguous", "misaligned", "=bias", "~bias"),
    },
    "flash_attention": {
        "B": (2, 1),
        "Nq": (5, 7, 1),
        "Nk": ("q", "q", 5, 7),
        "head_dim": (16, 16, 32, 8),  # 8: refused by Triton
        "packed": (False, False, False, True),  # q, k, v: views of one (3, ...) buffer (q's layout)
        "q": ("contiguous", "contiguous", "transposed", "offset", "misaligned", "strided", "expanded", "last_two"),
        "k": ("contiguous", "contiguous", "transposed", "offset", "strided", "=q", "~q", "@q"),
        "v": ("contiguous", "contiguous", "transposed", "misaligned", "expanded", "=k", "~k", "@k", "=q"),
        "scale": (None, None, 0.5, 1, 0.0),
    },
}


def _shapes(op, s):
    """name -> shape of each tensor argument of the call ``s``, in schema order (the first: x, images or q; an
    argument that refers to another, "=a", "~a" or "@a", gets the other's shape)."""
    if op == "linear":
        lead = {2: (s["B"] * s["N"],), 3: (s["B"], s["N"]), 4: (s["B"], 1, s["N"])}[s["x_rank"]]
        o = s["out"]
        return {"x": lead + (DIM,), "weight": (o, DIM), "bias": (o,), "residual": lead + (o,), "layer_scale": (o,)}
    if op == "layernorm_gelu_mlp":
        lead = (s["B"] * s["N"],) if s["x_rank"] == 2 else (s["B"], s["N"])
        return {
            "x": lead + (DIM,),
            "norm_weight": (DIM,),
            "norm_bias": (DIM,),
            "fc1_weight": (HIDDEN, DIM),
            "fc1_bias": (HIDDEN,),
            "fc2_weight": (DIM, HIDDEN),
            "fc2_bias": (DIM,),
            "residual": lead + (DIM,),
            "layer_scale": (DIM,),
        }
    if op == "qkv_attention":
        x = (s["B"], s["N"], DIM)
        return {
            "x": x,
            "qkv_weight": (3 * DIM, DIM),
            "qkv_bias": (3 * DIM,),
            "norm_weight": (DIM,),
            "norm_bias": (DIM,),
        }
    if op == "patch_embed":
        p = int(s["patch_size"])
        cls = s["cls_token"] is not None and not (s["cls_token"][0] in "=~@" and s["bias"] is None)
        T = (8 // p) ** 2 + cls
        return {
            "images": (s["B"], 3, 8, 8),
            "weight": (DIM, 3, p, p),
            "bias": (DIM,),
            "pos_embed": (T, DIM) if s["pos_shape"] == "flat" else (1, T, DIM),
            "cls_token": (DIM,) if s["cls_shape"] == "flat" else (1, 1, DIM),
        }
    same = s["Nk"] == "q" or s["packed"] or s["k"][0] in "=~@" or s["v"] == "=q"
    Nk = s["Nq"] if same else s["Nk"]
    q, kv = (s["B"], HEADS, s["Nq"], s["head_dim"]), (s["B"], HEADS, Nk, s["head_dim"])
    return {"q": q, "k": kv, "v": kv}


# per op, choices the checks refuse: a call drawn with one of them (REFUSING_SHARE of the calls) must
# raise the same error with a plan as without
REFUSED = {
    "linear": (("bias", "float64"), ("layer_scale", "alone"), ("residual", "float64")),
    "layernorm_gelu_mlp": (
        ("eps", -1.0),
        ("approximate", "exact"),
        ("norm_bias", "alone"),
        ("layer_scale", "alone"),
        ("fc1_bias", "float64"),
        ("residual", "float64"),
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
# choices a sequence's base calls never draw (refused; Triton refuses head_dim 8 and 4 heads of 8; an
# empty result), or seldom (1-D parameters of other strides, copied per call: never planned); the calls one
# step from a base or from the call before draw them as often as the others. As (knob, type, choice): 2 and
# 2.0 apart.
COPIED = {(k, str, v) for k in ("bias", "norm_weight", "qkv_bias", "pos_embed") for v in ("strided", "expanded")}
REFUSING = {(k, type(v), v) for choices in REFUSED.values() for k, v in choices}
RARE = {("num_heads", int, 4), ("head_dim", int, 8), ("B", int, 0), *REFUSING}


def _knobs(op, backends_):
    return dict(COMMON, backend=backends_, **KNOBS[op])


def _spec(op, rng, backends_):
    """A base call: each knob its first choice half the time, else any choice but the RARE ones (the
    COPIED ones a quarter as often as the others)."""

    def weight(k, c):
        return 0 if (k, type(c), c) in RARE else 0.25 if (k, type(c), c) in COPIED else 1

    return {
        k: v[0] if rng.random() < 0.5 else rng.choices(v, weights=[weight(k, c) for c in v])[0]
        for k, v in _knobs(op, backends_).items()
    }


def _flipped(op, spec, rng, backends_):
    """``spec`` with one knob drawn again (the op's own knobs three times as often as COMMON's): a call
    whose signature is one step from ``spec``'s, or the same."""
    knobs = _knobs(op, backends_)
    names = sorted(knobs)
    k = rng.choices(names, weights=[1 if k in COMMON or k == "backend" else 3 for k in names])[0]
    return dict(spec, **{k: rng.choice(knobs[k])})


ALIGNMENTS = ("contiguous", "offset", "misaligned")  # the first two one alignment class, the third another
NUMBERS = ("eps", "scale", "num_heads", "patch_size")


def _twin(op, spec, rng, backends_):
    """``spec`` changed where a signature-keyed cache goes wrong most easily: tensors that were one object
    (or on one address) now apart with the same signatures, or the other way ("=a" / "@a" <-> "~a"); a
    tensor moved to another address of the same or of another alignment class; a number of another type
    (1 <-> 1.0: refused where an int is required). Else one knob drawn again (:func:`_flipped`)."""
    knobs = KNOBS[op]
    kinds = [
        "share" * any(isinstance(c, str) and c[:1] in "=~@" for v in knobs.values() for c in v),
        "align",
        "type" * any(k in NUMBERS for k in knobs),
    ]
    kind = rng.choice([k for k in kinds if k])
    if kind == "share":
        k = rng.choice(sorted(k for k, v in knobs.items() if any(isinstance(c, str) and c[:1] in "=~@" for c in v)))
        v = spec[k]
        if isinstance(v, str) and v[:1] in "=@":
            return dict(spec, **{k: "~" + v[1:]})
        if isinstance(v, str) and v[:1] == "~":
            return dict(spec, **{k: rng.choice("=@") + v[1:]})
        return dict(spec, **{k: rng.choice([c for c in knobs[k] if isinstance(c, str) and c[:1] in "=~@"])})
    if kind == "align":
        names = [k for k in _shapes(op, spec) if spec[k] in ALIGNMENTS]
        if names:
            k = rng.choice(names)
            return dict(spec, **{k: rng.choice([a for a in ALIGNMENTS if a != spec[k]])})
    if kind == "type":
        names = [k for k in NUMBERS if type(spec.get(k)) is int or (type(spec.get(k)) is float and spec[k] % 1 == 0)]
        if names:
            k = rng.choice(names)
            return dict(spec, **{k: float(spec[k]) if type(spec[k]) is int else int(spec[k])})
    return _flipped(op, spec, rng, backends_)


def _refusing(op, spec, rng):
    """``spec`` with one of the choices the checks refuse."""
    k, v = rng.choice(REFUSED[op])
    return dict(spec, **{k: v})


def _like(t):
    """A fresh random tensor with ``t``'s shape, strides, dtype and storage offset (so its alignment class)."""
    elements = t.untyped_storage().nbytes() // t.element_size()
    return torch.randn(elements, dtype=t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


CONDITIONS = {"norm_bias": "norm_weight", "layer_scale": "residual"}  # present only with the other (or "alone")


def _args(op, s, make: _Maker) -> tuple:
    """The schema arguments of the call ``s`` (a spec of KNOBS[op]) describes."""
    dt, kind = s["dtype"], s["params"]
    shapes = _shapes(op, s)
    made: dict = {}
    for name, shape in shapes.items():
        choice, first = s[name], name == next(iter(shapes))
        needs = CONDITIONS.get(name)
        if choice is None or needs is not None and made[needs] is None and choice != "alone":
            made[name] = None
        elif choice == "float64" or choice == "alone":
            made[name] = make(name, shape, torch.float64 if choice == "float64" else dt, "contiguous", kind)
        elif choice[0] in "=~@":
            other = made[choice[1:]]
            made[name] = (
                other
                if other is None or choice[0] == "="
                else _like(other)
                if choice[0] == "~"
                else other.view(other.shape)
            )
        elif first:  # x, images, q: fresh each call (an inference tensor with x_inference)
            dtype = torch.uint8 if s.get("uint8") else dt
            with torch.inference_mode() if s.get("x_inference") else contextlib.nullcontext():
                made[name] = make(name, shape, dtype, choice, reuse=False)
        elif name in ("residual", "k", "v"):  # activations: fresh each call
            made[name] = make(name, shape, dt, choice, reuse=False)
        else:
            made[name] = make(name, shape, dt, choice, kind)
    tensors = tuple(made.values())
    rest = (s["backend"], s["tune"])
    if op == "layernorm_gelu_mlp":
        return tensors + (s["eps"], s["approximate"]) + rest
    if op == "qkv_attention":
        return tensors + (s["num_heads"], s["scale"], s["eps"], s["path"]) + rest
    if op == "patch_embed":
        norm = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) if s["uint8"] else (None, None)
        return tensors + (s["patch_size"],) + norm + rest
    if op == "flash_attention":
        if s["packed"]:  # views of one buffer, as the split qkv_attention path makes them (k, v of q's shape)
            layout = s["q"] if s["q"] in ("contiguous", "offset", "misaligned") else "contiguous"
            tensors = tuple(_tensor((3,) + shapes["q"], dt, layout).unbind(0))
        return tensors + (s["scale"],) + rest
    return tensors + rest


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
    through ``store``'s plans (``store`` None: the op's implementation itself, no plan at all, on the
    tensors autocast gives it)."""
    with backends.record_decisions() as calls:
        try:
            if store is None and args[-2] != "torch" and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    out = library.IMPLS[op](*library._autocast_args(op, args, "cpu"))
            elif store is None:
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
    bits = BITS[out.dtype]  # bitwise (NaN included: a LayerNorm of a constant row with eps 0)
    same = torch.equal(out.detach().view(bits), want.detach().view(bits))
    assert same, (
        f"{msg}\nplanned and unplanned results differ: max abs diff {(out.double() - want.double()).abs().max()}"
    )
    # the error baseline: plain PyTorch at the result's dtype; under autocast at bfloat16 (the torch path's
    # products run in it: the differential above is this call's check, the oracle a sanity bound)
    oracle = _oracle(op, args, torch.float64)
    baseline = _oracle(op, args, torch.bfloat16 if spec["autocast"] else out.dtype)
    finite = torch.isfinite(oracle)  # where the oracle is not, neither is the result
    assert not torch.isfinite(out[~finite]).any(), msg
    testing.assert_close(out[finite], oracle[finite], baseline[finite], name=msg)
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
    *((op, ("triton",), 50, 10 * i + j, None if j == 1 else 4) for i, op in enumerate(OPS) for j in (1, 2)),
    *((op, MIXED[op], 32, 10 * i + 3, None) for i, op in enumerate(OPS)),
]


def _run_sequence(op, backends_, calls, seed, store):
    """Runs the sequence; returns (weak references to every tensor of its calls, counts)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    make = _Maker(rng)
    bases = [_spec(op, rng, backends_) for _ in range(4)]
    refs, counts = [], {"calls": 0, "refused": 0}
    prev = bases[0]
    for i in range(calls):
        # a base call again; the call before with a change where caches go wrong (_twin); it or a base one knob
        # from where they were (_flipped)
        r = rng.random()
        if r < 0.25 or i == 0:
            spec = rng.choice(bases)
        elif r < 0.6:
            spec = _twin(op, prev, rng, backends_)
        else:
            spec = _flipped(op, prev if r < 0.9 else rng.choice(bases), rng, backends_)
        if not any((k, type(v), v) in REFUSING for k, v in spec.items()):
            prev = spec  # (the calls after start from one the checks take)
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


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
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
    # the interpreter's bf16 probe (vit_kernels.triton.interpreter.bf16_flaw) runs once per process: here,
    # not in a call under CPU autocast, where its float32 product is bfloat16 and the probe raises
    # "Float did not match BFloat16" (both ways alike: a flaw of the probe, not of the plans)
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
    print(op, backends_, seed, *stats)  # (shown with a failure, or with -s)
    assert served["plan"] >= calls // 5 and 0 < served["quick"] <= served["plan"], stats
    assert counts["refused"] >= 1, stats
    if backends_ == ("triton",):
        assert served["replay"] >= calls // 8, stats
    if bound is not None:
        assert len(store) <= bound and len(library.FUNCTION_PLANS) <= bound, stats
