"""Numerically hard inputs, every op x backend (torch; triton in the interpreter; cuda in the emulator) x
dtype: LayerNorm with a large eps and near-constant rows; attention whose scores jump by hundreds between
key tiles (both signs), a dominant key in the last (partial) tile, one-token and all-equal rows;
activations near the fp16 range; NaN and Inf in one sample, one head, one token.

Each result is compared with the float64 oracle (vit_kernels.reference) under the tolerance rule, with
plain PyTorch at the same dtype (torch.nn.functional, written out below: never the project's own torch
path) as the baseline. With a NaN or Inf in the input, the output must have eager PyTorch's NaN/Inf
pattern element by element, and every element eager leaves finite (the other samples, the other heads)
must be finite and within the tolerance. Outputs start as NaN (torch.empty is NaN-filled here), so an
element a kernel does not write shows up.

Shapes are small: the default run covers every (op, backend, dtype) once per kind of hard input; the long
token counts run on one dtype; sweeps are behind @pytest.mark.slow.

The attention tests also run "triton_tma": the Triton launchers with sm_90's tensor-descriptor attention
kernel (vit_kernels.triton.attention_tma, a tuning candidate; float16/bfloat16), called directly
(flash_attention: the launcher, the keys past the last full tile in 16-key tiles; qkv_attention: the
split path, every key tile masked in one loop). The LayerNorm, large-activation and NaN/Inf tests also
run "triton_tma_gemm" for linear, the MLP and qkv_attention: the launchers with sm_90's TMA GEMM
(vit_kernels.triton.gemm_tma, a tuning candidate; float16/bfloat16; LayerNorm folded into the weight,
its cancelling row tiles on the exact route, LayerNorm in the K loop), 64-row tiles so that rows of two
samples share one.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.testing import assert_close
from vit_kernels.dtypes import KERNEL_DTYPES

from conftest import DEVICE
from poison import poison_empty
from attention_cases import score_range_factor

BACKENDS = ["torch", "triton", "cuda"]
DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes
TMA = "triton_tma"
# attention_tma.CONFIGS[0] for flash_attention (the keys past the last full tile in 16-key tiles),
# CONFIGS[3] for qkv_attention (every key tile masked in one loop)
TMA_CONFIGS = {"flash_attention": (128, 64, 4, 3, 16), "qkv_attention": (128, 64, 8, 3, 0)}
TMA_GEMM = "triton_tma_gemm"
TMA_GEMM_CONFIG = (64, 128, 64, 4, 3, 2, 2)  # gemm_tma.CONFIGS[3]: 64-row tiles


def attention_backends(dtypes=DTYPES):
    """(backend, dtype) pairs of the attention tests: every backend x dtype, and the TMA kernel's
    float16 / bfloat16."""
    return [(b, d) for b in BACKENDS + [TMA] for d in dtypes if not (b == TMA and d == torch.float32)]


def with_op(op_list, pairs):
    return [(op, b, d) for op in op_list for b, d in pairs]


TMA_HALF = [(TMA, torch.float16), (TMA, torch.bfloat16)]
TMA_GEMM_HALF = [(TMA_GEMM, torch.float16), (TMA_GEMM, torch.bfloat16)]
ATTENTION_OPS = ["flash_attention", "qkv_attention"]
LAYERNORM_OPS = ["layernorm_gelu_mlp", "qkv_attention"]
OPS = ["flash_attention", "qkv_attention", "layernorm_gelu_mlp", "patch_embed", "linear"]
GEMM_OPS = ["qkv_attention", "layernorm_gelu_mlp", "linear"]  # those with a TMA GEMM path
HEADS, HEAD_DIM = 2, 32
DIM = HEADS * HEAD_DIM


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output the launchers allocate starts as NaN."""
    poison_empty(monkeypatch)


def _dt(dtype):
    return str(dtype).split(".")[-1]


def rnd(*shape, dtype, scale=1.0):
    """Fresh normal values (never zeros) rounded to dtype."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------ plain PyTorch: the baseline
# Eager PyTorch at the inputs' dtype, from torch.nn.functional, written here and not taken from
# vit_kernels.ops (whose torch paths are under test). Signatures as vit_kernels.ops.


def _epilogue(y, residual, layer_scale):
    if layer_scale is not None:
        y = y * layer_scale
    return y if residual is None else residual + y


def plain_flash_attention(q, k, v, *, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def plain_qkv_attention(
    x, qkv_weight, qkv_bias=None, *, num_heads, scale=None, norm_weight=None, norm_bias=None, eps=1e-6
):
    if norm_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    qkv = F.linear(x, qkv_weight, qkv_bias).unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=scale)
    return o.transpose(1, 2).flatten(2)


def plain_layernorm_gelu_mlp(
    x,
    norm_weight,
    norm_bias,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    *,
    eps=1e-6,
    approximate="none",
    residual=None,
    layer_scale=None,
):
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps) if norm_weight is not None else x
    y = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
    return _epilogue(y, residual, layer_scale)


def plain_patch_embed(images, weight, bias=None, *, patch_size, pos_embed=None, cls_token=None):
    t = F.conv2d(images, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if cls_token is not None:
        t = torch.cat([cls_token.reshape(1, 1, -1).expand(t.shape[0], 1, -1), t], dim=1)
    if pos_embed is not None:
        t = t + pos_embed.reshape(-1, t.shape[1], t.shape[2])
    return t


def plain_linear(x, weight, bias=None, *, residual=None, layer_scale=None):
    return _epilogue(F.linear(x, weight, bias), residual, layer_scale)


PLAIN = {
    "flash_attention": plain_flash_attention,
    "qkv_attention": plain_qkv_attention,
    "layernorm_gelu_mlp": plain_layernorm_gelu_mlp,
    "patch_embed": plain_patch_embed,
    "linear": plain_linear,
}


def _f64(a):
    return a.double() if isinstance(a, torch.Tensor) else a


def run_tma(op, args, kw, backend=TMA):
    """An attention op through the Triton launchers with the TMA kernel (TMA_CONFIGS[op]); with
    backend TMA_GEMM, qkv_attention, the MLP or linear with the TMA GEMM (TMA_GEMM_CONFIG)."""
    if backend == TMA_GEMM:
        from vit_kernels.triton import gemm_tma, mlp
        from vit_kernels.triton import qkv_attention as triton_qkv

        if op == "linear":
            return gemm_tma.linear_forward(*args, **kw, config=TMA_GEMM_CONFIG)
        if op == "layernorm_gelu_mlp":
            return mlp.layernorm_gelu_mlp_forward(*args, **kw, tma_config=TMA_GEMM_CONFIG)
        head_dim = args[1].shape[0] // 3 // kw["num_heads"]
        kw = {"scale": head_dim**-0.5, **kw}
        return triton_qkv.qkv_attention_forward(*args, path="split", tma_config=TMA_GEMM_CONFIG, **kw)
    if op == "flash_attention":
        from vit_kernels.triton import attention

        q = args[0]
        scale = kw.get("scale") or q.shape[-1] ** -0.5
        return attention.flash_attention_forward(*args, scale, attention_tma_config=TMA_CONFIGS[op])
    from vit_kernels.triton import qkv_attention as triton_qkv

    head_dim = args[1].shape[0] // 3 // kw["num_heads"]
    kw = {"scale": head_dim**-0.5, **kw}
    return triton_qkv.qkv_attention_forward(*args, path="split", attention_tma_config=TMA_CONFIGS[op], **kw)


def run(op, backend, args, kw):
    """The op on `backend` (asserting it ran there), the float64 oracle and the plain baseline."""
    if backend in (TMA, TMA_GEMM):
        out = run_tma(op, args, kw, backend)
    else:
        out = getattr(vk, op)(*args, **kw, backend=backend)
        assert vk.last_decision(op).backend == backend, vk.last_decision(op)
    oracle = getattr(reference, op)(*map(_f64, args), **{k: _f64(v) for k, v in kw.items()})
    return out, oracle, PLAIN[op](*args, **kw)


def check(op, backend, args, kw, name, factor=2.0):
    out, oracle, base = run(op, backend, args, kw)
    assert torch.isfinite(oracle).all(), f"{name}: the test's inputs overflow the oracle"
    assert torch.isfinite(out).all(), f"{name}: {(~torch.isfinite(out)).sum().item()} non-finite outputs"
    assert_close(out, oracle, base, factor=factor, name=f"{op} {backend} {name}")


# ------------------------------------------------------------------------------- input makers
def mlp_args(x, dtype, *, hidden=2 * DIM, eps=1e-6, w_scale=1.0, residual=True):
    dim = x.shape[-1]
    nw, nb = 1.0 + rnd(dim, dtype=dtype, scale=0.1), rnd(dim, dtype=dtype, scale=0.1)
    w1, b1 = rnd(hidden, dim, dtype=dtype, scale=dim**-0.5), rnd(hidden, dtype=dtype, scale=0.1)
    w2, b2 = rnd(dim, hidden, dtype=dtype, scale=w_scale * hidden**-0.5), rnd(dim, dtype=dtype, scale=0.1)
    kw = dict(eps=eps)
    if residual:
        kw.update(residual=rnd(*x.shape, dtype=dtype), layer_scale=rnd(dim, dtype=dtype, scale=0.5))
    return (x, nw, nb, w1, b1, w2, b2), kw


def qkv_args(x, dtype, *, eps=1e-6, norm=True):
    dim = x.shape[-1]
    w, b = rnd(3 * DIM, dim, dtype=dtype, scale=dim**-0.5), rnd(3 * DIM, dtype=dtype, scale=0.1)
    kw = dict(num_heads=HEADS)
    if norm:
        kw.update(
            norm_weight=1.0 + rnd(dim, dtype=dtype, scale=0.1), norm_bias=rnd(dim, dtype=dtype, scale=0.1), eps=eps
        )
    return (x, w, b), kw


def near_constant_rows(B, N, dim, dtype):
    """Rows mean + spread * noise with |mean| >> spread (spread a few units of the dtype's resolution at
    mean), signs mixed across rows, and one row exactly constant: a one-pass E[x^2] - E[x]^2 cancels to
    nothing (or below zero) here."""
    mean, spread = {torch.float32: (3e4, 0.05), torch.float16: (1e3, 2.0), torch.bfloat16: (1e3, 16.0)}[dtype]
    signs = torch.where(torch.rand(B, N, 1, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x = signs * mean * (1 + 0.1 * torch.rand(B, N, 1, dtype=torch.float64)) + spread * torch.randn(
        B, N, dim, dtype=torch.float64
    )
    x[0, N // 2] = x[0, N // 2, 0]
    return x.to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------ LayerNorm
LAYERNORM_CASES = with_op(LAYERNORM_OPS, [(b, d) for b in BACKENDS for d in DTYPES] + TMA_GEMM_HALF)


@pytest.mark.parametrize("op,backend,dtype", LAYERNORM_CASES, ids=_dt)
def test_layernorm_large_eps(op, backend, dtype):
    """eps comparable to (and far above) the variance: 1/sqrt(var + eps), not 1/(sqrt(var) + eps)."""
    for eps in (1.0, 30.0):
        x = rnd(2, 37, DIM, dtype=dtype)
        args, kw = (mlp_args if op == "layernorm_gelu_mlp" else qkv_args)(x, dtype, eps=eps)
        check(op, backend, args, kw, f"eps={eps}")


@pytest.mark.parametrize("op,backend,dtype", LAYERNORM_CASES, ids=_dt)
def test_layernorm_near_constant_rows(op, backend, dtype):
    """Large mean, tiny spread, one exactly constant row; the default eps (1e-6) and a tiny one."""
    for eps in (1e-6, 1e-12):
        x = near_constant_rows(2, 21, 96, dtype)  # 96: 3 elements per lane of a 32-wide reduction
        args, kw = (mlp_args if op == "layernorm_gelu_mlp" else qkv_args)(x, dtype, eps=eps)
        check(op, backend, args, kw, f"near-constant rows eps={eps}")


# ------------------------------------------------------------------------------------ attention
def score_offsets(pattern, N, big=300.0):
    """(N,) float64: what each key adds to every query's scaled score.

    rising/falling: -big .. +big (or back) in steps every 16 keys, so consecutive key tiles of any
    tiling (16..128 keys) differ by hundreds; alternating: +-big every 16 keys; last: 0 except the last
    key, 100 above the rest (exp(100) overflows fp32: a kernel that misses its max overflows); equal:
    every key scores the same (k's rows are all equal)."""
    j = torch.arange(N, dtype=torch.float64)
    steps = max(1, (N - 1) // 16)
    if pattern == "rising":
        return -big + 2 * big * torch.div(j, 16, rounding_mode="floor") / steps
    if pattern == "falling":
        return big - 2 * big * torch.div(j, 16, rounding_mode="floor") / steps
    if pattern == "alternating":
        return big * (1 - 2 * (torch.div(j, 16, rounding_mode="floor") % 2))
    if pattern == "last":
        off = torch.zeros(N, dtype=torch.float64)
        off[-1] = 100.0
        return off
    raise ValueError(pattern)


def attention_case(op, pattern, B, N, dtype):
    """(args, kw) of `op` whose scores are the noise of random q, k plus score_offsets(pattern) per key.

    flash_attention: channel 0 of q is 1/scale, channel 0 of k the offset. qkv_attention (no LayerNorm):
    x carries the offset in channel 0 and a 1 in channel 1, and only head channel 0 of Q (from x[1]) and
    of K (from x[0]) read them."""
    scale = HEAD_DIM**-0.5
    if op == "flash_attention":
        q, k = rnd(B, HEADS, N, HEAD_DIM, dtype=torch.float32), rnd(B, HEADS, N, HEAD_DIM, dtype=torch.float32)
        v = rnd(B, HEADS, N, HEAD_DIM, dtype=dtype)
        if pattern == "equal":
            k = k[:, :, :1].expand_as(k).clone()
        else:
            q[..., 0] = 1 / scale
            k[..., 0] = score_offsets(pattern, N).float()
        return (q.to(dtype), k.to(dtype), v), {}
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    w = torch.randn(3 * DIM, DIM, dtype=torch.float64) * DIM**-0.5
    b = torch.randn(3 * DIM, dtype=torch.float64) * 0.1
    if pattern == "equal":
        w[DIM : 2 * DIM] = 0.0  # K = the bias: every key the same
    else:
        x[..., 0], x[..., 1] = score_offsets(pattern, N), 1.0
        w[:, :2] = 0.0
        for h in range(HEADS):
            q0, k0 = h * HEAD_DIM, DIM + h * HEAD_DIM
            w[q0], w[k0] = 0.0, 0.0
            w[q0, 1], w[k0, 0], b[q0], b[k0] = 1 / scale, 1.0, 0.0, 0.0
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (x, w, b)), dict(num_heads=HEADS)


PATTERNS = ["rising", "falling", "alternating", "last", "equal"]


@pytest.mark.parametrize("op,backend,dtype", with_op(ATTENTION_OPS, attention_backends()), ids=_dt)
def test_attention_score_ranges(op, backend, dtype):
    """Scores hundreds apart between key tiles (both ways), a dominant last key in a partial tile, all
    keys equal; 65 and 129 tokens (a last tile of one key in every power-of-two tiling)."""
    for N in (65, 129):
        for pattern in PATTERNS:
            args, kw = attention_case(op, pattern, 2, N, dtype)
            check(op, backend, args, kw, f"{pattern} N={N}", score_range_factor(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS + [TMA])
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_attention_long_token_counts(op, backend):
    """The same at ViT token counts with a partial last tile (197, 257 = 256 + 1, 577), in fp16; for
    qkv_attention on triton 257 and 577 are the single kernel's main + tail tiles."""
    for N in (197, 257, 577):
        for pattern in ("falling", "last"):
            args, kw = attention_case(op, pattern, 1, N, torch.float16)
            check(op, backend, args, kw, f"{pattern} N={N}")


def structure_configs():
    """attention_tma.CONFIGS with structure fields (the head's query tiles adjacent, the next tile's q k^T
    before this tile's p v with the row max taken of the unscaled scores, warp specialization)."""
    from vit_kernels.triton import attention_tma

    return [c for c in attention_tma.CONFIGS if len(c) > 5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("config", structure_configs(), ids=_dt)
def test_attention_score_ranges_structure_configs(config, dtype, monkeypatch):
    """The score patterns on each structure config of the TMA kernel (flash_attention; 65 tokens, a last
    key tile of one key, and 197, ViT-B's): their online softmax rescales as the other configs' does."""
    monkeypatch.setitem(TMA_CONFIGS, "flash_attention", config)
    for N in (65, 197):
        for pattern in PATTERNS:
            args, kw = attention_case("flash_attention", pattern, 2, N, dtype)
            check("flash_attention", TMA, args, kw, f"{config} {pattern} N={N}")


@pytest.mark.slow
@pytest.mark.parametrize("op,backend,dtype", with_op(ATTENTION_OPS, attention_backends()), ids=_dt)
def test_attention_score_ranges_sweep(op, backend, dtype):
    for N in (1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 197, 255, 256, 257, 577):
        for pattern in PATTERNS:
            args, kw = attention_case(op, pattern, 2, N, dtype)
            check(op, backend, args, kw, f"{pattern} N={N}", score_range_factor(backend, dtype))


@pytest.mark.parametrize("op,backend,dtype", with_op(ATTENTION_OPS, attention_backends()), ids=_dt)
def test_attention_one_token(op, backend, dtype):
    """One query and one key: softmax of a single score is 1, the output is v."""
    args, kw = attention_case(op, "equal", 3, 1, dtype)
    check(op, backend, args, kw, "one token")


# ------------------------------------------------------------------- activations near fp16's range
def large_case(op, dtype, B=2, N=37):
    """(args, kw) whose outputs (and fused intermediates) reach ~2.5e4 of fp16's 65504."""

    def fit(t, got, target):  # t scaled so that max |got| becomes target, rounded to dtype
        return (t.double() * (target / got.abs().max().item())).to(dtype)

    if op == "flash_attention":
        q, k = rnd(B, HEADS, N, HEAD_DIM, dtype=dtype, scale=2.0), rnd(B, HEADS, N, HEAD_DIM, dtype=dtype, scale=2.0)
        return (q, k, rnd(B, HEADS, N, HEAD_DIM, dtype=dtype, scale=8e3)), {}
    if op == "linear":
        x, w = rnd(B, N, DIM, dtype=dtype, scale=64.0), rnd(3 * DIM, DIM, dtype=dtype)
        w = fit(w, reference.linear(x.double(), w.double()), 2.5e4)
        return (x, w, rnd(3 * DIM, dtype=dtype, scale=1e3)), dict(
            residual=rnd(B, N, 3 * DIM, dtype=dtype, scale=4e3), layer_scale=rnd(3 * DIM, dtype=dtype, scale=0.5)
        )
    if op == "layernorm_gelu_mlp":
        args, kw = mlp_args(rnd(B, N, DIM, dtype=dtype, scale=1e4), dtype)
        x, nw, nb, w1, b1, w2, b2 = args
        h = reference.layer_norm(x.double(), nw.double(), nb.double(), 1e-6) @ w1.double().t()
        w1 = fit(w1, h, 1.5e4)
        h = reference.gelu(
            reference.linear(reference.layer_norm(x.double(), nw.double(), nb.double(), 1e-6), w1.double(), b1.double())
        )
        w2 = fit(w2, h @ w2.double().t(), 2e4)
        kw.update(residual=rnd(B, N, DIM, dtype=dtype, scale=3e3))
        return (x, nw, nb, w1, b1, w2, b2), kw
    if op == "qkv_attention":
        (x, w, b), kw = qkv_args(rnd(B, N, DIM, dtype=dtype, scale=1e4), dtype)
        w = w.double()
        w[2 * DIM :] *= 1e4  # V large; Q and K moderate
        out = reference.qkv_attention(x.double(), w, b.double(), **{k: _f64(v) for k, v in kw.items()})
        # the output (linear in V's rows) fitted to 1.3e4, not left to the draw (one in a few hundred fell
        # below 1e4): V stays under ~5.5e4 (max |V| / max |out| was 1.7-4.2 over 300 draws)
        w[2 * DIM :] *= 1.3e4 / out.abs().max().item()
        return (x, w.to(dtype), b), kw
    if op == "patch_embed":
        images, weight = rnd(B, 3, 32, 48, dtype=dtype, scale=100.0), rnd(DIM, 3, 16, 16, dtype=dtype)
        weight = fit(weight, F.conv2d(images.double(), weight.double(), stride=16), 2.5e4)
        return (images, weight, rnd(DIM, dtype=dtype, scale=1e3)), dict(
            patch_size=16, pos_embed=rnd(1, 7, DIM, dtype=dtype, scale=1e3), cls_token=rnd(DIM, dtype=dtype, scale=1e3)
        )
    raise ValueError(op)


@pytest.mark.parametrize(
    "op,backend,dtype",
    with_op(OPS, [(b, d) for b in BACKENDS for d in DTYPES])
    + with_op(ATTENTION_OPS, TMA_HALF)
    + with_op(GEMM_OPS, TMA_GEMM_HALF),
    ids=_dt,
)
def test_large_activations(op, backend, dtype):
    args, kw = large_case(op, dtype)
    out, oracle, base = run(op, backend, args, kw)
    assert 1e4 < oracle.abs().max() < 6e4, f"the test's inputs miss their range: max |oracle| {oracle.abs().max()}"
    assert torch.isfinite(out).all()
    assert_close(out, oracle, base, name=f"{op} {backend} large activations")


# ------------------------------------------------------------------------------- NaN and Inf
# Where one NaN/Inf goes: (argument index, index) in sample 1 of 3, for flash_attention in head 0.
def poison_sites(op, args):
    if op == "flash_attention":
        N = args[0].shape[2]
        return [(i, (1, 0, N // 2, 3)) for i in range(3)]
    if op == "patch_embed":
        return [(0, (1, 2, 17, 20))]
    return [(0, (1, args[0].shape[1] // 2, 3))]


def poisoned_inputs(op, dtype):
    """Inputs of three samples with large values (|v| ~ 1e5 in fp32 and bf16, 2e4 in fp16)."""
    big = 2e4 if dtype == torch.float16 else 1e5
    N = 45
    if op == "flash_attention":
        q, k = rnd(3, HEADS, N, HEAD_DIM, dtype=dtype), rnd(3, HEADS, N, HEAD_DIM, dtype=dtype)
        return (q, k, rnd(3, HEADS, N, HEAD_DIM, dtype=dtype, scale=big / 4)), {}
    if op == "qkv_attention":
        (x, w, b), kw = qkv_args(rnd(3, N, DIM, dtype=dtype), dtype)
        w = w.double()
        w[2 * DIM :] *= big / 8
        return (x, w.to(dtype), b), kw
    if op == "layernorm_gelu_mlp":
        return mlp_args(rnd(3, N, DIM, dtype=dtype, scale=big / 4), dtype)
    if op == "linear":
        x = rnd(3, N, DIM, dtype=dtype, scale=big / 40)
        return (x, rnd(DIM, DIM, dtype=dtype, scale=DIM**-0.5), rnd(DIM, dtype=dtype)), dict(
            residual=rnd(3, N, DIM, dtype=dtype), layer_scale=rnd(DIM, dtype=dtype)
        )
    if op == "patch_embed":
        return (
            rnd(3, 3, 32, 32, dtype=dtype, scale=big / 1e3),
            rnd(DIM, 3, 16, 16, dtype=dtype, scale=0.05),
            rnd(DIM, dtype=dtype),
        ), dict(patch_size=16, pos_embed=rnd(5, DIM, dtype=dtype), cls_token=rnd(DIM, dtype=dtype))
    raise ValueError(op)


def nonfinite_pattern(t):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, element by element."""
    return torch.where(torch.isnan(t), 1, torch.where(t == math.inf, 2, torch.where(t == -math.inf, 3, 0)))


def assert_nonfinite_like(got, want, oracle, eager, name, dtype):
    """``got`` has ``want``'s NaN/+Inf/-Inf pattern (the oracle's or eager's), element by element; the first
    difference is reported with the float64 oracle's and eager's (at ``dtype``) values there."""
    pattern, want_pattern = nonfinite_pattern(got), nonfinite_pattern(want)
    if not torch.equal(pattern, want_pattern):
        diff = (pattern != want_pattern).nonzero()
        at = tuple(diff[0].tolist())
        raise AssertionError(
            f"{name}: {len(diff)} of {got.numel()} elements differ from eager's NaN/Inf pattern, first at {at}: "
            f"got {got[at].item()}, eager (float64) {oracle[at].item()}, eager ({_dt(dtype)}) {eager[at].item()}"
        )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize(
    "op,backend,dtype,config",
    [
        (*c, None)
        for c in with_op(OPS, [(b, d) for b in BACKENDS for d in DTYPES])
        + with_op(ATTENTION_OPS, TMA_HALF)
        + with_op(GEMM_OPS, TMA_GEMM_HALF)
    ]
    + [("flash_attention", TMA, torch.float16, c) for c in structure_configs()],
    ids=lambda v: "" if v is None else _dt(v),
)
def test_nan_and_inf_stay_where_eager_puts_them(op, backend, dtype, config, monkeypatch):
    """A NaN, +Inf or -Inf in one token of one sample (one head): eager's NaN/Inf pattern, element by
    element; the other samples all finite and within tolerance, bitwise the same as without the
    poison; the finite outputs of the poisoned sample within tolerance too. config: a TMA attention
    structure config run instead of TMA_CONFIGS' (None: theirs)."""
    if config is not None:
        monkeypatch.setitem(TMA_CONFIGS, "flash_attention", config)
    args, kw = poisoned_inputs(op, dtype)
    tma = backend in (TMA, TMA_GEMM)
    clean_out = run_tma(op, args, kw, backend) if tma else getattr(vk, op)(*args, **kw, backend=backend)
    for value in (math.nan, math.inf, -math.inf):
        for i, where in poison_sites(op, args):
            bad = list(args)
            bad[i] = args[i].clone()
            bad[i][where] = value
            name = f"{op} {backend} {_dt(dtype)}: {value} in argument {i} at {where}"
            out, oracle, eager = run(op, backend, bad, kw)
            # The fused kernels: IEEE's pattern, the float64 oracle's. The torch path is eager PyTorch at
            # the dtype (SDPA on CPU in fp16/bf16 returns 0, not NaN, for a row with a +Inf score).
            pattern_of = eager if backend == "torch" else oracle
            assert_nonfinite_like(out, pattern_of, oracle, eager, name, dtype)
            others = [0, 2]
            assert torch.isfinite(out[others]).all(), f"{name}: non-finite outputs in the other samples"
            assert torch.equal(out[others], clean_out[others]), f"{name}: the other samples changed"
            # The baseline of the bound: the oracle at the dtype (on a GPU, SDPA's fp32 kernels return NaN
            # for some rows the oracle keeps finite, which would make the bound NaN).
            lowp = getattr(reference, op)(*bad, **kw)
            finite = torch.isfinite(pattern_of) & torch.isfinite(oracle) & torch.isfinite(lowp)
            assert_close(out[finite], oracle[finite], lowp[finite], name=name)


# ---------------------------------------------------------------------------------------------
# GELU of infinite and huge pre-activations (fc1's epilogue, no LayerNorm in front to turn them into NaN)
GELU_EDGES = [-math.inf, math.inf, math.nan, -1e30, 1e30, -30.0, 30.0, -3.0]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "kernel, dtype", [("gemm", torch.float32), ("gemm", torch.bfloat16), ("gemm_tma", torch.bfloat16)]
)
def test_gelu_epilogue_of_infinite_and_huge_values(kernel, dtype, approximate):
    """fc1 + GELU (the Triton GEMM's epilogue, and sm_90's TMA GEMM's) on pre-activations of -Inf, +Inf,
    NaN, +-1e30 and moderate values, one per row in channel 0 (W the identity, so fc1's output is x; the
    other channels of a non-finite row are 0 * Inf = NaN, as in eager): eager GELU's value element by
    element, NaN where eager's is (-Inf * 0 for -Inf: the tanh form once gave -Inf; and -1.8e-5 for -1e30,
    where eager gives -0), the finite ones within the rule."""
    from vit_kernels.triton import gemm, gemm_tma

    K = 64
    x = rnd(len(GELU_EDGES), K, dtype=torch.float32, scale=0.5)
    x[:, 0] = torch.tensor(GELU_EDGES)
    x = x.to(dtype)
    w = torch.eye(K, dtype=dtype, device=DEVICE)
    act = gemm.ACTIVATIONS[approximate]
    got = gemm.dense_forward(x, w, act=act) if kernel == "gemm" else gemm_tma.dense_forward(x, w, act=act)
    want = F.gelu(F.linear(x.double(), w.double()), approximate=approximate)
    base = F.gelu(F.linear(x.float(), w.float()), approximate=approximate).to(dtype)
    assert_nonfinite_like(got, want, want, base, f"{kernel} GELU ({approximate})", dtype)
    finite = torch.isfinite(want)
    assert_close(got[finite], want[finite], base[finite], name=f"{kernel} GELU ({approximate}) {dtype}")
    assert got[3, 0] == 0 and got[4, 0] == want[4, 0].to(dtype)  # -1e30 -> -0, 1e30 -> itself
