"""Backward kernels (vit_kernels/triton/*_bwd.py through vit_kernels/autograd.py): every gradient of
every fused op on backend="triton" against torch.autograd on the float64 oracle
(vit_kernels.reference), under the 3x gradient rule of vit_kernels.testing with plain PyTorch (the
oracle's code at the same dtype) as the baseline; torch.autograd.gradcheck in float64 of each
backward function on tiny shapes; a NaN or Inf in one sample (every gradient keeps eager's non-finite
pattern, the other samples untouched); and the dispatch rules under autograd.

Inputs are fresh random values, the incoming gradient too; every tensor the launchers allocate
starts as NaN (torch.empty / empty_like patched), so an element a kernel fails to write fails.
The default run takes small shapes; the forward's full matrix (tokens 1, 50, 197, 257; head dims
64, 72, 80; batch 1 and 3; fp32/fp16/bf16) runs with -m slow.
"""

import math

import pytest
import torch

import vit_kernels as vk
from vit_kernels import autograd as vk_autograd
from vit_kernels import reference as R
from vit_kernels.testing import assert_close
from vit_kernels.dtypes import KERNEL_DTYPES

pytest.importorskip("triton")

from conftest import DEVICE  # noqa: E402
from test_hard_inputs import assert_nonfinite_like  # noqa: E402

DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes
_empty, _empty_like = torch.empty, torch.empty_like


def _nan(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan(_empty_like(*a, **k)))


def rnd(*shape, dtype=torch.float64, scale=1.0):
    """Fresh normal values (never zeros) rounded to dtype."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _id(v):
    return str(v).split(".")[-1] if isinstance(v, torch.dtype) else str(v)


def run_grads(op, oracle, tensors, kw, dtype, trainable=None, g=None):
    """Every gradient of ``op`` (backend="triton") and of ``oracle`` in float64 and at dtype.

    tensors: name -> float64 master or None; each becomes a dtype leaf, requiring grad when its name
    is in ``trainable`` (None: every one; the others are frozen, as a frozen model's parameters).
    g: the incoming gradient (None: fresh random values). Returns (grads, g), grads[label][name] for
    label "triton", "oracle" (float64: the reference) and "baseline" (the oracle's code at dtype:
    plain PyTorch's own error), name over the tensors that require grad.
    """
    names = [n for n, t in tensors.items() if t is not None and (trainable is None or n in trainable)]
    leaves = {n: (t.to(dtype).requires_grad_(n in names) if t is not None else None) for n, t in tensors.items()}
    out = op(**leaves, **kw, backend="triton")
    d = vk.last_decision(op.__name__)
    assert d.backend == "triton" and d.backward == "triton", str(d)
    g = rnd(*out.shape, dtype=dtype) if g is None else g
    out.backward(g)
    grads = {"triton": {n: leaves[n].grad for n in names}}
    for label, cast in (("oracle", torch.float64), ("baseline", dtype)):
        ts = {
            n: (leaves[n].detach().to(cast).requires_grad_(n in names) if leaves[n] is not None else None)
            for n in tensors
        }
        oracle(**ts, **kw).backward(g.to(cast))
        grads[label] = {n: ts[n].grad for n in names}
    for n in names:
        got = grads["triton"][n]
        assert got is not None, f"d{n}: no gradient"
        assert got.dtype == dtype and got.shape == leaves[n].shape, f"d{n}: {got.dtype} {tuple(got.shape)}"
    for n in set(tensors) - set(names):
        assert leaves[n] is None or leaves[n].grad is None, f"d{n}: a frozen tensor got a gradient"
    return grads, g


def check_grads(op, oracle, tensors, kw, dtype, trainable=None):
    """Run ``op`` (backend="triton") and ``oracle`` on the same values (:func:`run_grads`) and compare
    every gradient under the 3x rule."""
    grads, _ = run_grads(op, oracle, tensors, kw, dtype, trainable)
    for n, got in grads["triton"].items():
        assert_close(got, grads["oracle"][n], grads["baseline"][n], factor=3.0, name=f"d{n}")


# ---------------------------------------------------------------------------------------------
# flash_attention: dq, dk, dv

ATTN_SHAPES = [(1, 2, 50, 64), (3, 1, 1, 72), (1, 1, 197, 80)]  # (batch, heads, tokens, head_dim)
ATTN_FULL = [(b, 2, n, hd) for b in (1, 3) for n in (1, 50, 197, 257) for hd in (64, 72, 80)]


def _attention_case(shape, kv_tokens=None):
    """(op, oracle, tensors, kw) of check_grads / run_grads; so are the other _*_case."""
    B, H, N, D = shape
    M = N if kv_tokens is None else kv_tokens
    tensors = dict(q=rnd(B, H, N, D), k=rnd(B, H, M, D), v=rnd(B, H, M, D))
    return vk.flash_attention, R.flash_attention, tensors, dict(scale=D**-0.5)


def _attention(shape, dtype, kv_tokens=None, trainable=None):
    check_grads(*_attention_case(shape, kv_tokens), dtype, trainable)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=_id)
def test_flash_attention_grads(shape, dtype):
    _attention(shape, dtype)


def test_flash_attention_grads_cross_lengths():
    """q and k/v token counts differ (partial tiles on both sides)."""
    _attention((2, 1, 17, 64), torch.float32, kv_tokens=41)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", ATTN_FULL, ids=_id)
def test_flash_attention_grads_full(shape, dtype):
    _attention(shape, dtype)


HARD_CASES = [
    ("rising", torch.float32),
    ("alternating", torch.float32),
    ("rising", torch.float16),
    ("alternating", torch.float16),
    ("last", torch.float32),
    ("last", torch.float16),
    ("rising", torch.bfloat16),
    ("alternating", torch.bfloat16),
    ("last", torch.bfloat16),
]


def _scores_hundreds_apart(pattern, dtype, D=64):
    B, H, N = 1, 2, 70
    j = torch.arange(N, dtype=torch.float64)
    offsets = {
        "rising": -300 + 600 * torch.div(j, 16, rounding_mode="floor") / ((N - 1) // 16),
        "alternating": 300 * (1 - 2 * (torch.div(j, 16, rounding_mode="floor") % 2)),
        "last": torch.where(j == N - 1, 100.0, 0.0),
    }[pattern]
    q, k = rnd(B, H, N, D), rnd(B, H, N, D)
    q[..., 0], k[..., 0] = 1 / D**-0.5, offsets
    check_grads(vk.flash_attention, R.flash_attention, dict(q=q, k=k, v=rnd(B, H, N, D)), dict(scale=D**-0.5), dtype)


@pytest.mark.parametrize("pattern, dtype", HARD_CASES, ids=_id)
def test_flash_attention_grads_scores_hundreds_apart(pattern, dtype):
    """Scores that differ by hundreds between key tiles (and one dominant last key): the backward
    recomputes P = exp(S - LSE) per tile from the saved LSE, which must hold whatever the tiling.
    "last" makes P one-hot, so plain PyTorch's dq is exactly 0 (bound: the floor) and dS = P * (dP - delta)
    must cancel exactly; "rising" and "alternating" give LSE ~300, whose rounding scales a row of P."""
    _scores_hundreds_apart(pattern, dtype)


@pytest.mark.parametrize("head_dim", [16, 32, 80, 128, 256])
def test_flash_attention_grads_one_dominant_key_every_fp32_tile(head_dim):
    """("last", float32) with each fp32 tile configuration (one per padded head dim; 64 is above): dS must
    cancel exactly in the dQ kernel and in the dK/dV kernel, whatever the tiles. (delta = rowsum(dO * O)
    missed dq's bound 2.1-4.3x at every one of these head dims.)"""
    _scores_hundreds_apart("last", torch.float32, D=head_dim)


def test_flash_attention_backward_fp32_kernels_share_tiles():
    from vit_kernels.triton.attention_bwd import kernel_config

    for hd in (16, 32, 64, 128, 256):
        dq, dkdv = (kernel_config(torch.float32, hd, kernel)[:2] for kernel in ("dq", "dkdv"))
        assert dq == dkdv, f"head_dim {hd}: float32 dQ tiles {dq} != dK/dV tiles {dkdv}"


def test_flash_attention_backward_rejects_fp32_configs_with_other_tiles():
    """Before any launch: dq keeps its NaNs."""
    from vit_kernels.triton.attention_bwd import flash_attention_backward

    q = rnd(1, 1, 5, 16, dtype=torch.float32)
    lse, dq = rnd(1, 1, 5, dtype=torch.float32), torch.empty_like(q)
    with pytest.raises(ValueError, match=r"configs: float32 needs the same \(BLOCK_M, BLOCK_N\) for 'dq' and 'dkdv'"):
        flash_attention_backward(q, q, q, q, q, lse, 1.0, dq=dq, configs={"dq": (16, 16, 4, 1), "dkdv": (32, 16, 4, 1)})
    assert dq.isnan().all()


# ---------------------------------------------------------------------------------------------
# qkv_attention (split path): LayerNorm, QKV projection, attention

QKV_CASES = [(1, 50, 2, 64, True), (3, 1, 1, 72, False), (1, 17, 1, 80, True)]  # (B, N, heads, head_dim, LayerNorm)
QKV_FULL = [(b, n, 2, hd, True) for b in (1, 3) for n in (1, 50, 197, 257) for hd in (64, 72, 80)]


def _qkv_case(case):
    B, N, H, hd, norm = case
    dim = H * hd
    tensors = dict(
        x=rnd(B, N, dim),
        qkv_weight=rnd(3 * dim, dim, scale=dim**-0.5),
        qkv_bias=rnd(3 * dim),
        norm_weight=rnd(dim) if norm else None,
        norm_bias=rnd(dim) if norm else None,
    )
    return vk.qkv_attention, R.qkv_attention, tensors, dict(num_heads=H, eps=1e-5)


def _qkv(case, dtype, trainable=None):
    check_grads(*_qkv_case(case), dtype, trainable)
    assert vk.last_decision("qkv_attention").path == "split"


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", QKV_CASES, ids=_id)
def test_qkv_attention_grads(case, dtype):
    _qkv(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", QKV_FULL, ids=_id)
def test_qkv_attention_grads_full(case, dtype):
    _qkv(case, dtype)


# ---------------------------------------------------------------------------------------------
# linear: x, weight, bias, residual, layer scale

LINEAR_CASES = [(1, 50, 72, 200, "bias+res+ls"), (3, 1, 64, 96, "plain"), (2, 17, 80, 64, "bias")]


def _linear_case(case):
    B, N, K, O, variant = case
    tensors = dict(
        x=rnd(B, N, K),
        weight=rnd(O, K, scale=K**-0.5),
        bias=rnd(O) if "bias" in variant else None,
        residual=rnd(B, N, O) if "res" in variant else None,
        layer_scale=rnd(O, scale=0.5) if "ls" in variant else None,
    )
    return vk.linear, R.linear, tensors, {}


def _linear(case, dtype, trainable=None):
    check_grads(*_linear_case(case), dtype, trainable)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=_id)
def test_linear_grads(case, dtype):
    _linear(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", [(b, n, 192, 192, "bias+res+ls") for b in (1, 3) for n in (1, 50, 197, 257)], ids=_id)
def test_linear_grads_full(case, dtype):
    _linear(case, dtype)


# ---------------------------------------------------------------------------------------------
# layernorm_gelu_mlp: LayerNorm, fc1 + GELU, fc2, residual, layer scale

MLP_CASES = [(1, 50, 64, 128, "norm+res+ls", "none"), (3, 1, 72, 96, "norm", "tanh"), (1, 17, 48, 80, "plain", "none")]


def _mlp_case(case):
    B, N, dim, hidden, variant, approximate = case
    norm = "norm" in variant
    tensors = dict(
        x=rnd(B, N, dim),
        norm_weight=rnd(dim) if norm else None,
        norm_bias=rnd(dim) if norm else None,
        fc1_weight=rnd(hidden, dim, scale=dim**-0.5),
        fc1_bias=rnd(hidden),
        fc2_weight=rnd(dim, hidden, scale=hidden**-0.5),
        fc2_bias=rnd(dim),
        residual=rnd(B, N, dim) if "res" in variant else None,
        layer_scale=rnd(dim, scale=0.5) if "ls" in variant else None,
    )
    return vk.layernorm_gelu_mlp, R.layernorm_gelu_mlp, tensors, dict(eps=1e-5, approximate=approximate)


def _mlp(case, dtype, trainable=None):
    check_grads(*_mlp_case(case), dtype, trainable)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", MLP_CASES, ids=_id)
def test_layernorm_gelu_mlp_grads(case, dtype):
    _mlp(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    "case",
    [(b, n, 128, 512, "norm+res+ls", a) for b in (1, 3) for n in (1, 50, 197, 257) for a in ("none", "tanh")],
    ids=_id,
)
def test_layernorm_gelu_mlp_grads_full(case, dtype):
    _mlp(case, dtype)


# ---------------------------------------------------------------------------------------------
# patch_embed: images, weight, bias, position embedding, class token

PATCH_CASES = [(1, 3, 32, 32, 16, 64, True), (3, 3, 24, 16, 8, 72, False), (2, 1, 14, 14, 7, 80, True)]
# (batch, channels, H, W, patch, dim, class token)


def _patch_case(case, pos_shape="1td"):
    B, C, H, W, p, dim, cls = case
    T = (1 if cls else 0) + (H // p) * (W // p)
    tensors = dict(
        images=rnd(B, C, H, W),
        weight=rnd(dim, C, p, p, scale=(C * p * p) ** -0.5),
        bias=rnd(dim),
        pos_embed=rnd(1, T, dim) if pos_shape == "1td" else rnd(T, dim),
        cls_token=rnd(1, 1, dim) if cls else None,
    )
    return vk.patch_embed, R.patch_embed, tensors, dict(patch_size=p)


def _patch(case, dtype, pos_shape="1td", trainable=None):
    check_grads(*_patch_case(case, pos_shape), dtype, trainable)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", PATCH_CASES, ids=_id)
def test_patch_embed_grads(case, dtype):
    _patch(case, dtype)


def test_patch_embed_grads_2d_pos_embed():
    _patch((2, 3, 16, 16, 8, 64, True), torch.float32, pos_shape="td")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    "case",
    [(b, 3, 224, 224, 16, 192, True) for b in (1, 3)]
    + [(b, 3, 112, 112, 16, 192, c) for b in (1, 3) for c in (False, True)],
    ids=_id,
)
def test_patch_embed_grads_full(case, dtype):
    _patch(case, dtype)


# ---------------------------------------------------------------------------------------------
# a frozen model: only the activation input requires grad (saliency maps, attribution, adversarial
# inputs on a frozen fused ViT); its gradient still flows, through the backward kernels

FROZEN = {
    "flash_attention": lambda: _attention(ATTN_SHAPES[0], torch.float32, trainable=("q",)),
    "qkv_attention": lambda: _qkv(QKV_CASES[0], torch.float32, trainable=("x",)),
    "linear": lambda: _linear(LINEAR_CASES[0], torch.float32, trainable=("x",)),
    "layernorm_gelu_mlp": lambda: _mlp(MLP_CASES[0], torch.float32, trainable=("x",)),
    "patch_embed": lambda: _patch(PATCH_CASES[0], torch.float32, trainable=("images",)),
}


@pytest.mark.parametrize("op", list(FROZEN))
def test_input_gradient_through_frozen_parameters(op):
    FROZEN[op]()


# ---------------------------------------------------------------------------------------------
# NaN / Inf in one sample: the backward keeps eager's non-finite pattern in every gradient and leaves
# the other samples alone (the forward's counterpart: test_hard_inputs.py
# test_nan_and_inf_stay_where_eager_puts_them)

# name -> (case, the poisoned activation input, where in it: sample 1, for attention head 0)
POISON_CASES = {
    **{f"flash_attention-{t}": (lambda: _attention_case((3, 2, 20, 32)), t, (1, 0, 10, 3)) for t in ("q", "k", "v")},
    "qkv_attention": (lambda: _qkv_case((3, 20, 2, 32, True)), "x", (1, 10, 3)),
    "linear": (lambda: _linear_case((3, 20, 64, 48, "bias+res+ls")), "x", (1, 10, 3)),
    "layernorm_gelu_mlp": (lambda: _mlp_case((3, 20, 64, 96, "norm+res+ls", "none")), "x", (1, 10, 3)),
    # no LayerNorm: an Inf reaches fc1's output, GELU and its derivative with its sign (the norm makes it NaN)
    **{
        f"layernorm_gelu_mlp-plain-{a}": (lambda a=a: _mlp_case((3, 20, 64, 96, "res+ls", a)), "x", (1, 10, 3))
        for a in ("none", "tanh")
    },
    "patch_embed": (lambda: _patch_case((3, 3, 16, 24, 8, 64, True)), "images", (1, 2, 5, 11)),
}
PER_SAMPLE = ("q", "k", "v", "x", "images", "residual")  # activation inputs: dim 0 is the sample
POISON_PARAMS = [
    pytest.param(
        case,
        dtype,
        value,
        id=f"{case}-{_id(dtype)}-{'nan' if math.isnan(value) else f'{value:+}'}",
    )
    for case in POISON_CASES
    for dtype in (torch.float32, torch.float16)
    for value in (math.nan, math.inf, -math.inf)
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("case, dtype, value", POISON_PARAMS)
def test_nan_and_inf_in_one_sample_stay_where_eager_puts_them(case, dtype, value):
    """A NaN, +Inf or -Inf in one element of one activation input of sample 1 of 3 (flash_attention: q,
    k or v, head 0), every gradient from the backward kernels under autograd, the incoming gradient
    fresh random values (finite where the output is not):

    - every gradient (activation inputs and parameters) has the float64 oracle's NaN/+Inf/-Inf pattern,
      element by element: a kernel must neither drop a NaN (a weight gradient sums over every sample, so
      it is NaN where eager's is) nor spread it beyond eager's;
    - the activation inputs' gradients (q, k, v, x, images, the residual) of samples 0 and 2 are finite,
      within the 3x rule, and bitwise the same as from a run without the poison (each sample's own
      rows, tiles and programs). The parameter gradients sum over the samples (and the attention ones
      over tokens), so for them only the pattern and the bound below apply;
    - every element where the oracle's gradient is finite is within the 3x rule (with k poisoned, the
      rows whose score for that key is -Inf keep a finite dq except channel 3, where eager's 0 * Inf
      is NaN).

    The bound's baseline is the oracle's code at dtype (plain PyTorch), restricted to the elements where
    it is finite too: a baseline that overflows where the oracle does not would make the bound Inf.
    """
    make, poisoned, where = POISON_CASES[case]
    op, oracle, tensors, kw = make()
    clean, g = run_grads(op, oracle, tensors, kw, dtype)
    tensors[poisoned] = tensors[poisoned].clone()
    tensors[poisoned][where] = value
    grads, _ = run_grads(op, oracle, tensors, kw, dtype, g=g)
    for n, got in grads["triton"].items():
        want, base = grads["oracle"][n], grads["baseline"][n]
        name = f"{case} {_id(dtype)}: {value} in {poisoned}{list(where)}: d{n}"
        assert_nonfinite_like(got, want, want, base, name, dtype)
        if n in PER_SAMPLE:
            others = [0, 2]
            assert torch.isfinite(got[others]).all(), f"{name}: non-finite gradients in samples 0 and 2"
            assert torch.equal(got[others], clean["triton"][n][others]), f"{name}: samples 0 and 2 changed"
        finite = torch.isfinite(want) & torch.isfinite(base)
        assert_close(got[finite], want[finite], base[finite], factor=3.0, name=name)


# ---------------------------------------------------------------------------------------------
# gradcheck in float64: each backward function of vit_kernels.autograd (backend="triton") against
# finite differences of the float64 oracle. The kernels take float64 (fp64 accumulators, "ieee"
# dots); the forward kernels do not, so the forward here is the oracle and the saved tensors (row
# log-sum-exp, LayerNorm statistics, hidden activations) are computed from it in float64.


def _gradcheck(forward, backward, inputs):
    """forward(*inputs) -> (out, saved); backward(grad, inputs, saved, needs) -> input gradients."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ts):
            out, ctx.saved = forward(*ts)
            ctx.ts = ts
            return out

        @staticmethod
        def backward(ctx, grad):
            return tuple(backward(grad, ctx.ts, ctx.saved, ctx.needs_input_grad))

    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    assert torch.autograd.gradcheck(Fn.apply, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def _stats(x, eps):
    mean = x.mean(-1)
    return mean.contiguous(), (1.0 / torch.sqrt(((x - mean[:, None]) ** 2).mean(-1) + eps)).contiguous()


def test_gradcheck_flash_attention():
    scale = 0.3

    def forward(q, k, v):
        s = (q @ k.transpose(-2, -1)) * scale
        return R.flash_attention(q, k, v, scale=scale), torch.logsumexp(s, -1).contiguous()

    def backward(g, ts, lse, needs):
        return vk_autograd.flash_attention_backward(g, *ts, R.flash_attention(*ts, scale=scale), lse, scale=scale)

    _gradcheck(forward, backward, [rnd(1, 2, 5, 16), rnd(1, 2, 7, 16), rnd(1, 2, 7, 16)])


def test_gradcheck_layernorm():
    eps = 1e-5

    def forward(x, w, b):
        return R.layer_norm(x, w, b, eps), _stats(x.detach(), eps)

    def backward(g, ts, stats, needs):
        return vk_autograd.layernorm_backward(g, ts[0], *stats, ts[1], ts[2], needs=needs)

    _gradcheck(forward, backward, [rnd(6, 24), rnd(24), rnd(24)])


def test_gradcheck_linear():
    def forward(x, w, b, res, ls):
        return R.linear(x, w, b, residual=res, layer_scale=ls), None

    def backward(g, ts, saved, needs):
        x, w, b, res, ls = ts
        return vk_autograd.linear_backward(g, x, w, b, ls, needs=needs)

    _gradcheck(forward, backward, [rnd(2, 5, 16), rnd(24, 16), rnd(24), rnd(2, 5, 24), rnd(24)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_layernorm_gelu_mlp(approximate):
    eps = 1e-5

    def forward(x, nw, nb, w1, b1, w2, b2, res, ls):
        x2 = x.detach().reshape(-1, x.shape[-1])
        hidden = R.gelu(
            R.linear(R.layer_norm(x2, nw.detach(), nb.detach(), eps), w1.detach(), b1.detach()), approximate
        )
        out = R.layernorm_gelu_mlp(
            x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate, residual=res, layer_scale=ls
        )
        return out, (hidden.contiguous(), _stats(x2, eps))

    def backward(g, ts, saved, needs):
        x, nw, nb, w1, b1, w2, b2, res, ls = ts
        return vk_autograd.layernorm_gelu_mlp_backward(
            g,
            x,
            nw,
            nb,
            w1,
            b1,
            w2,
            b2,
            ls,
            hidden=saved[0],
            stats=saved[1],
            eps=eps,
            approximate=approximate,
            needs=needs,
        )

    _gradcheck(
        forward,
        backward,
        [rnd(1, 5, 16), rnd(16), rnd(16), rnd(24, 16), rnd(24), rnd(16, 24), rnd(16), rnd(1, 5, 16), rnd(16)],
    )


def test_gradcheck_qkv_attention():
    eps, H, hd, B, N = 1e-5, 2, 16, 1, 5
    dim = H * hd
    scale = hd**-0.5

    def forward(x, w, b, nw, nb):
        xd = [t.detach() for t in (x, w, b, nw, nb)]
        h = R.layer_norm(xd[0], xd[3], xd[4], eps)
        qkv = R.linear(h, xd[1], xd[2]).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).contiguous()
        qkv[0] *= scale
        s = qkv[0] @ qkv[1].transpose(-2, -1)
        out = R.qkv_attention(x, w, b, num_heads=H, norm_weight=nw, norm_bias=nb, eps=eps)
        saved = (
            qkv,
            out.detach().contiguous(),
            torch.logsumexp(s, -1).contiguous(),
            _stats(xd[0].reshape(-1, dim), eps),
        )
        return out, saved

    def backward(g, ts, saved, needs):
        qkv, out, lse, stats = saved
        return vk_autograd.qkv_attention_backward(
            g, *ts, num_heads=H, scale=scale, eps=eps, qkv=qkv, out=out, lse=lse, stats=stats, needs=needs
        )

    _gradcheck(forward, backward, [rnd(B, N, dim), rnd(3 * dim, dim, scale=0.2), rnd(3 * dim), rnd(dim), rnd(dim)])


def test_gradcheck_patch_embed():
    p = 4

    def forward(images, w, b, pos, cls):
        return R.patch_embed(images, w, b, patch_size=p, pos_embed=pos, cls_token=cls), None

    def backward(g, ts, saved, needs):
        return vk_autograd.patch_embed_backward(g, *ts, patch_size=p, needs=needs)

    _gradcheck(forward, backward, [rnd(2, 2, 8, 4), rnd(16, 2, p, p), rnd(16), rnd(1, 3, 16), rnd(1, 1, 16)])


# ---------------------------------------------------------------------------------------------
# torch backend of the gradient functions: the same gradients from the torch path


def _strided(t):
    """t's values with stride 2 (a view of every other element of a longer tensor)."""
    return t.repeat_interleave(2)[::2]


STRIDED_PARAM_CALLS = {
    "linear_backward-bias": lambda g, x: vk_autograd.linear_backward(g, x, rnd(24, 16), _strided(rnd(24)), None),
    "linear_backward-layer_scale": lambda g, x: vk_autograd.linear_backward(
        g, x, rnd(24, 16), rnd(24), _strided(rnd(24))
    ),
    "layernorm_backward-norm_weight": lambda g, x: vk_autograd.layernorm_backward(
        rnd(10, 16), x.reshape(10, 16), *_stats(x.reshape(10, 16), 1e-5), _strided(rnd(16)), rnd(16)
    ),
}


@pytest.mark.parametrize("case", list(STRIDED_PARAM_CALLS))
def test_gradient_functions_refuse_strided_parameters(case, monkeypatch):
    """The gradient functions (vit_kernels.autograd, usable without the ops) on backend triton refuse a
    1-D parameter the kernels read with unit stride but of another stride, naming it, before any launch
    (the ops and the registered backward pass contiguous copies). Before: linear_backward read a
    layer_scale[::2] as contiguous and returned wrong dx, dweight, dbias, silently."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []
    for cls in (JITFunction, InterpretedFunction):  # compiled kernels, and the interpreter's
        real = cls.run
        monkeypatch.setattr(cls, "run", lambda self, *a, real=real, **k: launched.append(self) or real(self, *a, **k))
    name = case.split("-")[1]
    with pytest.raises(ValueError, match=rf"^{name}: the kernel reads it with unit stride, got strides \(2,\)"):
        STRIDED_PARAM_CALLS[case](rnd(2, 5, 24), rnd(2, 5, 16))
    assert launched == []
    vk_autograd.linear_backward(rnd(2, 5, 24), rnd(2, 5, 16), rnd(24, 16), rnd(24), rnd(24))  # contiguous: runs
    assert launched  # (the spy sees launches)


def _gradient_calls():
    """Each gradient function's name and a call of it with the tensor arguments ``t`` (a dict) can replace."""
    f32 = dict(dtype=torch.float32)
    t = dict(
        linear=dict(grad=rnd(2, 5, 24), x=rnd(2, 5, 16), weight=rnd(24, 16), bias=rnd(24), layer_scale=rnd(24)),
        flash_attention=dict(
            grad_out=rnd(1, 2, 5, 8), q=rnd(1, 2, 5, 8), k=rnd(1, 2, 5, 8), v=rnd(1, 2, 5, 8), out=rnd(1, 2, 5, 8),
            lse=rnd(1, 2, 5, **f32),
        ),
        layernorm=dict(grad=rnd(10, 16), x=rnd(10, 16), mean=rnd(10, **f32), rstd=rnd(10, **f32),
                       norm_weight=rnd(16), norm_bias=rnd(16)),
        layernorm_gelu_mlp=dict(
            grad=rnd(2, 5, 16), x=rnd(2, 5, 16), norm_weight=rnd(16), norm_bias=rnd(16), fc1_weight=rnd(32, 16),
            fc1_bias=rnd(32), fc2_weight=rnd(16, 32), fc2_bias=rnd(16), layer_scale=rnd(16), hidden=rnd(10, 32),
        ),
        qkv_attention=dict(grad=rnd(2, 5, 16), x=rnd(2, 5, 16), qkv_weight=rnd(48, 16), qkv_bias=rnd(48),
                           norm_weight=rnd(16), norm_bias=rnd(16)),
        patch_embed=dict(grad=rnd(2, 5, 16), images=rnd(2, 3, 8, 8), weight=rnd(16, 3, 4, 4), bias=rnd(16),
                         pos_embed=rnd(1, 5, 16), cls_token=rnd(1, 1, 16)),
    )  # fmt: skip
    extra = dict(
        flash_attention=dict(scale=0.5),
        qkv_attention=dict(num_heads=2, scale=0.5, eps=1e-6),
        patch_embed=dict(patch_size=4),
    )
    return {op: (getattr(vk_autograd, f"{op}_backward"), kw, extra.get(op, {})) for op, kw in t.items()}


@pytest.mark.parametrize("op", list(_gradient_calls()))
def test_gradient_functions_refuse_tensors_whose_memory_does_not_hold_their_values(op, monkeypatch):
    """A negative view (memory holds -t), or an efficient zero tensor (no memory), in any tensor argument of
    a gradient function: a TypeError naming it before any launch (the kernels would read memory as it is)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []
    for cls in (JITFunction, InterpretedFunction):
        real = cls.run
        monkeypatch.setattr(cls, "run", lambda self, *a, real=real, **k: launched.append(self) or real(self, *a, **k))
    fn, tensors, extra = _gradient_calls()[op]
    for name, t in tensors.items():
        for bad in (torch._neg_view(t), torch._efficientzerotensor(t.shape, dtype=t.dtype)):
            with pytest.raises(TypeError, match=rf"^{name}: expected a tensor"):
                fn(**{**tensors, name: bad}, **extra)
    assert launched == []


def test_torch_backend_of_the_gradient_functions_matches_the_oracle():
    x, w, b, ls = rnd(2, 5, 16), rnd(24, 16), rnd(24), rnd(24)
    g = rnd(2, 5, 24)
    got = vk_autograd.linear_backward(g, x, w, b, ls, backend="torch")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, ls)]
    R.linear(leaves[0], leaves[1], leaves[2], layer_scale=leaves[3]).backward(g)
    for name, a, leaf in zip(("x", "weight", "bias", "layer_scale"), (got[0], got[1], got[2], got[4]), leaves):
        assert_close(a, leaf.grad, name=f"d{name}")
    assert got[3] is g
    with pytest.raises(ValueError, match="backend: expected one of .* got 'cuda'"):
        vk_autograd.linear_backward(g, x, w, b, ls, backend="cuda")


# ---------------------------------------------------------------------------------------------
# dispatch under autograd


def _qkv_inputs():
    x = rnd(1, 5, 32, dtype=torch.float32).requires_grad_()
    return x, rnd(96, 32, dtype=torch.float32)


def test_auto_keeps_torch_for_gradients_and_says_why():
    x, w = _qkv_inputs()
    vk.qkv_attention(x, w, num_heads=2).sum().backward()
    d = vk.last_decision("qkv_attention")
    assert d.backend == "torch" and d.requested == "auto" and d.backward == "torch"
    assert "backward=torch" in str(d)
    assert "gradients are required" in d.reasons["triton"] and "backend='triton'" in d.reasons["triton"]
    assert "forward-only" in d.reasons["cuda"]
    assert x.grad is not None


def test_explicit_cuda_under_autograd_raises_before_any_launch():
    x, w = _qkv_inputs()
    with pytest.raises(
        RuntimeError,
        match=r"qkv_attention: backend='cuda' cannot serve this call: gradients are "
        r"required .* use backend='triton' or 'torch'",
    ):
        vk.qkv_attention(x, w, num_heads=2, backend="cuda")


class _Attend(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v):
        return vk.flash_attention(q, k, v, backend=self.backend)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "cuda"])
def test_a_traced_graph_under_autograd_says_which_backend_computes_the_gradients(backend):
    """A torch.fx graph holds the custom op: autograd records the op itself, whose forward runs with
    gradients off, so its dispatch cannot see them. Right after that forward the op's decision gains
    the backend of the backward (the Triton kernels for "triton", else PyTorch's path), and the
    forward-only "cuda" raises before any backward (an eager call raises before its launch)."""
    gm = torch.fx.symbolic_trace(_Attend(backend))
    assert any("vit_kernels.flash_attention" in str(n.target) for n in gm.graph.nodes)
    q, k, v = (rnd(1, 2, 5, 16, dtype=torch.float32).requires_grad_() for _ in range(3))
    if backend == "cuda":
        with pytest.raises(RuntimeError, match=r"backend='cuda' cannot serve this call: gradients are required"):
            gm(q, k, v)
        return
    out = gm(q, k, v)
    d = vk.last_decision("flash_attention")
    assert d.backward == ("triton" if backend == "triton" else "torch"), str(d)
    g = rnd(*out.shape, dtype=torch.float32)
    out.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    R.flash_attention(*leaves, scale=16**-0.5).backward(g.double())
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, ref.grad, name=f"d{name}")


def test_a_forward_without_gradients_names_no_backward():
    with torch.no_grad():
        vk.flash_attention(*(rnd(1, 1, 3, 16, dtype=torch.float32) for _ in range(3)), backend="triton")
    d = vk.last_decision("flash_attention")
    assert d.backend == "triton" and d.backward == "" and "backward=" not in str(d)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_fuse_report_says_which_backend_computes_the_gradients(backend):
    """vit_kernels' own fused modules (the reference ViT) and swapped models alike: with parameters
    that require grad, each fused part's notes say what runs under autograd."""
    model = vk.models.create_model("vit_tiny_patch16_224", depth=1, img_size=32, backend=backend)
    notes = [n for e in vk.fuse_report(model).entries if e.fused for n in e.notes]
    want = {"auto": "take the torch path, forward and backward", "triton": "Triton forward and backward kernels"}
    want["cuda"] = "the cuda backend raises"
    assert notes and sum(want[backend] in n for n in notes) == 3, notes
    for p in model.parameters():
        p.requires_grad_(False)
    notes = [n for e in vk.fuse_report(model).entries if e.fused for n in e.notes]
    assert not any("require grad" in n for n in notes), notes


def test_single_kernel_path_under_autograd_is_refused():
    x, w = _qkv_inputs()
    with pytest.raises(ValueError, match="path: 'single_kernel' keeps neither"):
        vk.qkv_attention(x, w, num_heads=2, backend="triton", path="single_kernel")


@pytest.mark.parametrize("op", ["linear", "patch_embed"])
def test_triton_without_grad_runs_the_forward_kernel_only(op):
    """No tensor requires grad: no autograd Function (the output has no grad_fn)."""
    if op == "linear":
        out = vk.linear(rnd(2, 3, 16, dtype=torch.float32), rnd(8, 16, dtype=torch.float32), backend="triton")
    else:
        out = vk.patch_embed(
            rnd(1, 3, 8, 8, dtype=torch.float32), rnd(16, 3, 4, 4, dtype=torch.float32), patch_size=4, backend="triton"
        )
    assert out.grad_fn is None and vk.last_decision(op).backend == "triton"


def test_only_the_needed_gradients_are_computed():
    """A frozen weight (requires_grad False) gets no gradient; the rest match the oracle."""
    x, w, b = rnd(2, 5, 16), rnd(24, 16), rnd(24)
    xs = x.float().requires_grad_()
    bs = b.float().requires_grad_()
    ws = w.float()
    vk.linear(xs, ws, bs, backend="triton").backward(torch.ones(2, 5, 24))
    assert ws.grad is None
    leaves = [t.clone().requires_grad_() for t in (x, b)]
    R.linear(leaves[0], w, leaves[1]).backward(torch.ones(2, 5, 24, dtype=torch.float64))
    assert_close(xs.grad, leaves[0].grad, name="dx")
    assert_close(bs.grad, leaves[1].grad, name="dbias")


@pytest.mark.parametrize(
    "op", ["linear", "layernorm_gelu_mlp", "qkv_attention", "flash_attention", "flash_attention_no_keys", "patch_embed"]
)
def test_empty_inputs_under_autograd_get_gradients_without_a_launch(op):
    """Zero rows (or no keys): nothing launches, the result still has a graph, gradients are zeros."""
    f = dict(dtype=torch.float32)
    if op == "linear":
        leaf = rnd(0, 5, 16, **f).requires_grad_()
        out = vk.linear(leaf, rnd(8, 16, **f), backend="triton")
    elif op == "layernorm_gelu_mlp":
        leaf = rnd(0, 5, 16, **f).requires_grad_()
        out = vk.layernorm_gelu_mlp(
            leaf, rnd(16, **f), None, rnd(8, 16, **f), None, rnd(16, 8, **f), None, backend="triton"
        )
    elif op == "qkv_attention":
        leaf = rnd(0, 5, 32, **f).requires_grad_()
        out = vk.qkv_attention(leaf, rnd(96, 32, **f), num_heads=2, backend="triton")
    elif op.startswith("flash_attention"):
        leaf = rnd(1, 1, 3, 16, **f).requires_grad_()
        kv = rnd(1, 1, 0 if op.endswith("no_keys") else 3, 16, **f)
        q = leaf if op.endswith("no_keys") else leaf[:, :, :0]
        out = vk.flash_attention(q, kv, kv, backend="triton")
    else:
        leaf = rnd(0, 3, 8, 8, **f).requires_grad_()
        out = vk.patch_embed(leaf, rnd(16, 3, 4, 4, **f), patch_size=4, backend="triton")
    out.sum().backward()
    d = vk.last_decision(op.replace("_no_keys", ""))
    assert d.backend == "triton" and d.path in ("empty", "no_keys"), str(d)
    assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_qkv_forward_under_autograd_takes_the_tuned_tma_configs(dtype, monkeypatch):
    """The backward's forward (autograd.qkv_attention_forward) runs the split path with the configs it
    is given, the sm_90 TMA GEMM and TMA attention included (the launcher's own split path, not a
    copy that drops them), and keeps q, k, v and the LSE: out against the float64 oracle, LSE against
    the pointer kernel's."""
    import dataclasses

    from vit_kernels.triton import attention_tma, gemm_tma

    launched = []
    real_attn, real_gemm = attention_tma.launch, gemm_tma.launch_gemm_tma
    monkeypatch.setattr(
        attention_tma, "launch", lambda *a, **kw: launched.append("attention_tma") or real_attn(*a, **kw)
    )
    monkeypatch.setattr(gemm_tma, "launch_gemm_tma", lambda *a, **k: launched.append("gemm_tma") or real_gemm(*a, **k))
    x = rnd(2, 50, 128).to(dtype)
    w = (rnd(384, 128) * 128**-0.5).to(dtype)
    kw = dict(num_heads=2, scale=64**-0.5, eps=1e-6)
    cfg = (
        ("tma_config", dataclasses.astuple(gemm_tma.configs_for(384, 128)[-1])),
        ("attention_tma_config", attention_tma.CONFIGS[3]),
    )
    out, qkv, lse = vk_autograd.qkv_attention_forward(x, w, None, None, None, **kw, config=cfg)
    assert launched == ["gemm_tma", "attention_tma"]
    _, _, lse_ptr = vk_autograd.qkv_attention_forward(x, w, None, None, None, **kw)
    assert qkv.shape == (3, 2, 2, 50, 64) and torch.allclose(lse, lse_ptr, atol=1e-2, rtol=0)
    oracle = R.qkv_attention(x.double(), w.double(), num_heads=2, scale=64**-0.5)
    assert_close(out, oracle, R.qkv_attention(x, w, num_heads=2, scale=64**-0.5), name="split forward (TMA)")
