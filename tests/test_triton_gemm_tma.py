"""The sm_90 GEMM on tensor descriptors (vit_kernels.triton.gemm_tma).

In the interpreter (tensor descriptors zero-fill loads and clip stores past the edges, as TMA does):
every config and every epilogue against the float64 oracle under the tolerance rule, M not a multiple
of the tile (3 x 197 rows), the ViT (N, K) classes at small dims; LayerNorm folded into the weight on
ordinary rows and on rows that make the fold cancel. Ahead of time for sm_90: each config's machine
code has wgmma and bulk tensor copies, no spills, and fits its intended blocks per SM.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import arch
from vit_kernels import reference as R
from vit_kernels.testing import assert_close, compare

pytest.importorskip("triton")
from vit_kernels.triton import gemm_tma as G  # noqa: E402
from vit_kernels.triton.layernorm import row_stats  # noqa: E402

from conftest import DEVICE  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
ACTS = {"none": G.ACT_NONE, "erf": G.ACT_GELU_ERF, "tanh": G.ACT_GELU_TANH}


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale + shift).to(dtype)


def d64(t):
    return None if t is None else t.double()


def dense_reference(x, w, b, nw, nb, eps, act, res, ls):
    """(oracle in float64, plain PyTorch at x's dtype) of [LN ->] linear [-> GELU] [* ls] [+ res]."""
    outs = []
    for f in (d64, lambda t: t):
        h = (
            x
            if nw is None
            else (R.layer_norm(f(x), f(nw), f(nb), eps) if f is d64 else F.layer_norm(x, (x.shape[-1],), nw, nb, eps))
        )
        h = f(h)
        y = F.linear(h, f(w), f(b))
        if act != "none":
            y = F.gelu(y, approximate=act if act == "tanh" else "none")
        if ls is not None:
            y = y * f(ls)
        if res is not None:
            y = y + f(res)
        outs.append(y)
    return outs


# ---------------------------------------------------------------------------------------------
# dense_forward / linear_forward over the configs, the ViT classes and the epilogues

# (rows per batch T, batch, K, N): the four ViT classes at dim 64 (and 96 for odd tile coverage).
CLASS_SHAPES = {"qkv": (197, 3, 64, 192), "proj": (197, 3, 96, 96), "fc1": (197, 3, 64, 256), "fc2": (197, 3, 256, 64)}
# epilogue name -> (bias, act, residual, layer scale, LayerNorm)
EPILOGUES = {
    "plain": (False, "none", False, False, None),
    "bias": (True, "none", False, False, None),
    "bias+res": (True, "none", True, False, None),
    "bias+res+ls": (True, "none", True, True, None),
    "gelu_erf": (True, "erf", False, False, None),
    "gelu_tanh": (True, "tanh", False, False, None),
    "ln+gelu_erf": (True, "erf", False, False, "affine"),
    "ln_weight_only+gelu_tanh": (True, "tanh", False, False, "weight"),
    "ln_nobias": (False, "none", False, False, "affine"),
}


def check_dense(T, B, K, N, dtype, epilogue, config):
    has_bias, act, has_res, has_ls, norm = EPILOGUES[epilogue]
    x = randn(B, T, K, dtype=dtype, scale=1.5, shift=0.3)
    w = randn(N, K, dtype=dtype, scale=K**-0.5)
    b = randn(N, dtype=dtype) if has_bias else None
    res = randn(B, T, N, dtype=dtype) if has_res else None
    ls = randn(N, dtype=dtype, scale=0.5) if has_ls else None
    nw = randn(K, dtype=dtype, scale=0.5, shift=1.0) if norm else None
    nb = randn(K, dtype=dtype, scale=0.5) if norm == "affine" else None
    out = nan_like((B, T, N), dtype)
    got = G.dense_forward(
        x,
        w,
        b,
        norm_weight=nw,
        norm_bias=nb,
        eps=1e-6,
        act=ACTS[act],
        residual=res,
        layer_scale=ls,
        out=out,
        config=config,
    )
    assert got is out
    if norm:
        assert G.last_ln_route() == "epilogue"
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, act, res, ls)
    assert_close(got, oracle, base)


# Default matrix: every config once per dtype, each on a class that lists it, with rotating epilogues.
DEFAULT_CASES = [(ci, cls) for ci in range(len(G.CONFIGS)) for cls in G.CLASSES if ci in G.CLASSES[cls]][::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(DEFAULT_CASES)))
def test_dense_configs(case, dtype):
    ci, cls = DEFAULT_CASES[case]
    names = list(EPILOGUES)
    epilogue = names[(case * 2 + DTYPES.index(dtype)) % len(names)]
    check_dense(*CLASS_SHAPES[cls], dtype, epilogue, G.CONFIGS[ci])


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_dense_epilogues(epilogue):
    """Every epilogue, fp16, on the small-N config (the cheapest in the interpreter); M = 2 x 197."""
    check_dense(197, 2, 64, 64, torch.float16, epilogue, G.CONFIGS[4])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("config", G.CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("cls", list(CLASS_SHAPES))
def test_dense_full(cls, config, epilogue, dtype):
    check_dense(*CLASS_SHAPES[cls], dtype, epilogue, config)


def test_small_and_ragged_shapes():
    """One row, M < BLOCK_M, and N, K that are not multiples of the tile (edges zero-filled / clipped)."""
    for B, T, K, N in [(1, 1, 64, 192), (1, 50, 72, 200), (2, 7, 200, 40)]:
        x = randn(B, T, K, dtype=torch.float16)
        w = randn(N, K, dtype=torch.float16, scale=K**-0.5)
        b = randn(N, dtype=torch.float16)
        for config in (G.CONFIGS[0], G.CONFIGS[3]):
            got = G.linear_forward(x, w, b, out=nan_like((B, T, N), torch.float16), config=config)
            assert_close(got, R.linear(d64(x), d64(w), d64(b)), F.linear(x, w, b))


def test_strided_rows_and_residual():
    """x a column slice of a wider tensor (row stride 256, offset 64 elements: 128-byte aligned), a
    token-major residual read through its strides."""
    dtype = torch.bfloat16
    big = randn(3, 50, 256, dtype=dtype)
    x = big[:, :, 64 : 64 + 128]
    res = randn(50, 3, 96, dtype=dtype).transpose(0, 1)
    w, b, ls = randn(96, 128, dtype=dtype, scale=0.09), randn(96, dtype=dtype), randn(96, dtype=dtype)
    got = G.linear_forward(x, w, b, residual=res, layer_scale=ls, out=nan_like((3, 50, 96), dtype), config=G.CONFIGS[2])
    oracle, base = dense_reference(x, w, b, None, None, 0, "none", res, ls)
    assert_close(got, oracle, base)


# ---------------------------------------------------------------------------------------------
# qkv_projection_forward


def qkv_check(B, N, H, hd, dtype, has_bias, norm, config):
    dim = H * hd
    x = randn(B, N, dim, dtype=dtype, scale=2.0, shift=0.5)
    w = randn(3 * dim, dim, dtype=dtype, scale=dim**-0.5)
    b = randn(3 * dim, dtype=dtype) if has_bias else None
    nw = randn(dim, dtype=dtype, scale=0.5, shift=1.0) if norm else None
    nb = randn(dim, dtype=dtype) if norm == "affine" else None
    scale = hd**-0.5
    out = nan_like((3, B, H, N, hd), dtype)
    got = G.qkv_projection_forward(
        x, w, b, num_heads=H, scale=scale, norm_weight=nw, norm_bias=nb, eps=1e-6, out=out, config=config
    )
    assert got is out
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)

    def split(y):
        y = y.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        return torch.cat([y[:1] * scale, y[1:]])

    assert_close(got, split(oracle), split(base))


# (batch, tokens, heads, head_dim, norm, config index)
QKV_CASES = [
    (3, 197, 2, 32, None, 0),
    (2, 197, 1, 64, "affine", 1),
    (1, 50, 2, 40, "weight", 2),
    (3, 197, 2, 32, "affine", 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(QKV_CASES)))
def test_qkv_projection(case, dtype):
    B, N, H, hd, norm, ci = QKV_CASES[case]
    qkv_check(B, N, H, hd, dtype, (case + DTYPES.index(dtype)) % 2 == 0, norm, G.CONFIGS[ci])


# ---------------------------------------------------------------------------------------------
# LayerNorm folded: rows that cancel


def adversarial_rows(B, T, K, dtype):
    """Rows whose mean is large against their spread (|mean| * rstd up to ~1e6: a row whose values all
    round to the same number has rstd = 1/sqrt(eps)), some with outlier channels, mixed with ordinary rows."""
    g = torch.randn(B, T, K, device=DEVICE)
    r = torch.arange(B * T, device=DEVICE)
    mean = torch.tensor([0.0, 40.0, -300.0, 1000.0, 3000.0], device=DEVICE)[r % 5]
    spread = torch.tensor([1.0, 0.3, 0.02], device=DEVICE)[r % 3]  # 0.02 at 1000: a row of one or two values
    x = mean.view(B, T, 1) + spread.view(B, T, 1) * g
    x[:, ::5, 7] += 60.0 * spread.view(B, T)[:, ::5]  # outlier channels
    x[:, 1::7, -3] -= 90.0 * spread.view(B, T)[:, 1::7]
    return x.to(dtype)


def cancelling_case(dtype):
    B, T, K, N = 2, 60, 256, 128
    x = adversarial_rows(B, T, K, dtype)
    w = randn(N, K, dtype=dtype, scale=K**-0.5)
    b = randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "erf", None, None)
    return (x, w, b, nw, nb), (B, T, N), oracle, base


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_fold_exact_on_cancelling_rows(dtype):
    """The rows are detected (|mean| * rstd past ln_cancel_threshold), their row tiles take the exact route
    (LayerNorm in the K loop), and the result meets the tolerance rule."""
    (x, w, b, nw, nb), shape, oracle, base = cancelling_case(dtype)
    got = G.dense_forward(
        x, w, b, norm_weight=nw, norm_bias=nb, act=G.ACT_GELU_ERF, out=nan_like(shape, dtype), config=G.CONFIGS[4]
    )
    assert G.last_ln_route().startswith("exact:"), G.last_ln_route()
    assert_close(got, oracle, base)


def test_layernorm_fold_without_detection_is_wrong(monkeypatch):
    """The same float16 call with detection off: the fold's cancellation breaks the tolerance rule (so the
    test above can fail). (In bfloat16 the products of these rows are often exact in fp32, so the
    interpreter's fp32 sums do not always show it; float16 rows do.)"""
    (x, w, b, nw, nb), shape, oracle, base = cancelling_case(torch.float16)
    monkeypatch.setattr(G, "ln_cancel_threshold", lambda K, dtype: float("inf"))
    raw = G.dense_forward(
        x,
        w,
        b,
        norm_weight=nw,
        norm_bias=nb,
        act=G.ACT_GELU_ERF,
        out=nan_like(shape, torch.float16),
        config=G.CONFIGS[4],
    )
    assert G.last_ln_route() == "epilogue"
    assert not compare(raw, oracle, base).ok


def test_layernorm_fold_qkv_cancelling_rows():
    dtype = torch.float16
    B, T, H, hd = 2, 30, 2, 64
    dim = H * hd
    x = adversarial_rows(B, T, dim, dtype)
    w, b = randn(3 * dim, dim, dtype=dtype, scale=dim**-0.5), randn(3 * dim, dtype=dtype)
    nw, nb = randn(dim, dtype=dtype, shift=1.0), randn(dim, dtype=dtype)
    got = G.qkv_projection_forward(
        x,
        w,
        b,
        num_heads=H,
        scale=0.125,
        norm_weight=nw,
        norm_bias=nb,
        out=nan_like((3, B, H, T, hd), dtype),
        config=G.CONFIGS[1],
    )
    assert G.last_ln_route().startswith("exact:")
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)

    def split(y):
        y = y.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        return torch.cat([y[:1] * 0.125, y[1:]])

    assert_close(got, split(oracle), split(base))


def test_layernorm_forward_reads_nothing_back(monkeypatch):
    """No host sync in the LayerNorm forward (issue 10 item 6): the cancelling rows are found per row tile
    in the kernel, so the launcher never reads a tensor value on the host (every way to do so raises
    here); last_ln_route reads the kernel's counter afterwards, on request."""
    (x, w, b, nw, nb), shape, oracle, base = cancelling_case(torch.float16)
    out = nan_like(shape, torch.float16)

    def no_readback(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host during the forward")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"):
            m.setattr(torch.Tensor, name, no_readback)
        import vit_kernels.triton.interpreter  # noqa: F401  (its probes run once, before the check)

        G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, act=G.ACT_GELU_ERF, out=out, config=G.CONFIGS[4])
    assert G.last_ln_route().startswith("exact:")
    assert_close(out, oracle, base)


@pytest.mark.gpu
def test_layernorm_forward_no_sync_on_gpu():
    """The same on a GPU: CUDA's sync debug mode turns any synchronizing call in the forward into an error."""
    (x, w, b, nw, nb), shape, _, _ = cancelling_case(torch.float16)
    args = [t.cuda() for t in (x, w, b, nw, nb)]
    G.dense_forward(*args[:3], norm_weight=args[3], norm_bias=args[4], config=G.CONFIGS[4])  # compile, fold
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        G.dense_forward(*args[:3], norm_weight=args[3], norm_bias=args[4], config=G.CONFIGS[4])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert G.last_ln_route().startswith("exact:")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_fold_just_below_threshold(dtype):
    """Rows with |mean| * rstd at 0.9 x the threshold take the folded epilogue and still meet the rule."""
    B, T, K, N = 1, 64, 256, 128
    tau = G.ln_cancel_threshold(K, dtype)
    g = torch.randn(B, T, K, device=DEVICE)
    g = (g - g.mean(-1, keepdim=True)) / g.std(-1, unbiased=False, keepdim=True)
    sign = torch.where(torch.arange(T, device=DEVICE) % 2 == 0, 1.0, -1.0).view(1, T, 1)
    x = (sign * 0.9 * tau + g).to(dtype)
    w, b = randn(N, K, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    got = G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, out=nan_like((B, T, N), dtype), config=G.CONFIGS[4])
    assert G.last_ln_route() == "epilogue"
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)
    assert_close(got, oracle, base)


def test_threshold_values():
    assert 60 < G.ln_cancel_threshold(768, torch.float16) < 90
    assert 8 * G.ln_cancel_threshold(768, torch.float16) == pytest.approx(G.ln_cancel_threshold(768, torch.bfloat16))


@pytest.mark.parametrize(
    "N, K, bias, beta, layout",
    [
        (48, 32, True, True, "contiguous"),
        (50, 200, False, True, "contiguous"),  # ragged rows and a ragged second K block
        (17, 129, True, False, "strided"),  # W a transposed view, 1-D parameters strided
        (16, 128, False, False, "contiguous"),
        (5, 0, True, True, "contiguous"),  # K = 0: nothing read, colsum 0, b' = b
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_kernel(N, K, bias, beta, layout, dtype):
    """The LayerNorm prologue (one launch) against torch: W' = W * gamma rounded once to W's dtype (bitwise),
    colsum and b' from float64 sums (colsum of the rounded W'); x's row statistics bit for bit row_stats',
    in one workspace: mean, rstd, the room, then the fold's sums, gamma and beta, then W'."""
    w = randn(N, K, dtype=dtype)
    vec = lambda n: randn(n, dtype=dtype, shift=0.5)  # noqa: E731
    b, nw, nb = vec(N) if bias else None, vec(K), vec(K) if beta else None
    x = randn(2, 7, K, dtype=dtype, shift=3.0)
    if layout == "strided":
        w = randn(K, N, dtype=dtype).T
        nw = randn(2 * K, dtype=dtype, shift=0.5)[::2]
        b = randn(2 * N, dtype=dtype)[1::2] if bias else None
        x = randn(2, K, 7, dtype=dtype, shift=3.0).transpose(1, 2)
    room, M = 3, 14 if K else 0
    f, mean, rstd = G.layernorm_prologue(x, 1e-6, w, b, nw, nb, room=room)
    assert f.sums.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr()  # one workspace
    fold_off = -(-(2 * M + room) // 16) * 16  # the sums from the next multiple of 16 floats
    assert (mean.storage_offset(), rstd.storage_offset(), f.sums.storage_offset()) == (0, M, fold_off)
    assert f.weight.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr()  # W' in it too
    wf_off = -(-(fold_off + G.SUM_ROWS * N + 2 * K) // 64) * 64  # from the next multiple of 64 floats
    assert f.weight.storage_offset() * f.weight.element_size() == 4 * wf_off, f.weight.storage_offset()
    if K:
        want_mean, want_rstd = row_stats(x, 1e-6)
        assert torch.equal(mean, want_mean) and torch.equal(rstd, want_rstd)
        assert_close(mean, x.double().mean(-1).flatten(), x.float().mean(-1).flatten(), name="mean")
    assert torch.equal(f.weight, (w.float() * nw.float()).to(dtype)) and f.weight.is_contiguous()
    assert_close(f.colsum, f.weight.double().sum(1), f.weight.float().sum(1), name="colsum")
    assert torch.equal(f.unscale, torch.ones(N, device=DEVICE))  # nothing near float16's range: unscaled
    if not (bias or beta):
        assert f.bias is None and torch.equal(f.sums[2], torch.zeros(N, device=DEVICE))  # written: 0, never garbage
    else:
        want = (b.double() if bias else 0) + (w.double() @ nb.double() if beta else 0)
        assert_close(f.bias, want, (b.float() if bias else 0) + (w.float() @ nb.float() if beta else 0), name="bias")


def test_layernorm_folded_launch_takes_the_folds_own_weight():
    """With ``ln`` the GEMM reads W' at its offset in the prologue's workspace, not through ``weight``: a
    weight that is not the fold's own (a copy of W', W itself) raises before any launch, naming ln."""
    N, K, dtype = 32, 64, torch.float16
    x, w, nw = randn(2, 7, K, dtype=dtype), randn(N, K, dtype=dtype), randn(K, dtype=dtype, shift=0.5)
    f, mean, rstd = G.layernorm_prologue(x, 1e-6, w, None, nw, None, room=1)
    out = nan_like((2, 7, N), dtype)
    launch = lambda weight: G.launch_gemm_tma(  # noqa: E731
        x, weight, out, M=14, N=N, K=K, T=7, stride_am=K, config=G.default_config(N, K), ln=(f, mean, rstd)
    )
    for weight in (f.weight.clone(), w):
        with pytest.raises(ValueError, match="ln: expected .* W' .* as weight"):
            launch(weight)
    assert out.isnan().all()  # nothing launched
    launch(f.weight)
    want = F.layer_norm(x.double(), (K,), nw.double(), None, 1e-6) @ w.double().T
    assert_close(out, want, F.layer_norm(x.float(), (K,), nw.float(), None, 1e-6).to(dtype) @ w.T, name="out")


def zero_mean_rows(B, T, K, zeros, dtype):
    """(B, T, K) rows of mean exactly 0 with exact zeros in the channels ``zeros``: +-v pairs of multiples of
    1/64 up to 4 (exact in float16 and bfloat16, and their fp32 sums exact), shuffled per row. LayerNorm's
    z is then exactly 0 in those channels, for eager and for the kernels alike (no rounding luck)."""
    free = K - len(zeros)
    v = torch.randint(1, 257, (B, T, free // 2), device=DEVICE).float() / 64
    vals = torch.cat([v, -v, v[..., : free % 2] * 0], -1)  # an odd count: one more 0
    vals = torch.gather(vals, -1, torch.rand(B, T, free, device=DEVICE).argsort(-1))
    keep = [k for k in range(K) if k not in zeros]
    x = torch.zeros(B, T, K, device=DEVICE)
    x[..., keep] = vals
    return x.to(dtype)


BIG = [5, 6, 7, 8]  # overflowing_fold_case's large-gamma channels


def overflowing_fold_case(T=40, K=64, N=128):
    """float16 LayerNorm + Linear whose W * gamma passes float16's range in some rows (up to ~2e6, and one row
    just past 2**15), while eager's result stays finite: the large gamma's channels are 0 in every row of
    mean 0 (z = 0 there, exactly), so only the fold would form the large products. Four such channels with
    W's entries of one magnitude per row: no channel dominates a row (each carries half its norm), so the
    fold keeps them."""
    dtype = torch.float16
    x = zero_mean_rows(2, T, K, BIG, dtype)
    w, b = randn(N, K, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    nw[BIG] = 1500.0
    mag = w[:, BIG[0]].abs().float().clamp_min(2**-4)
    mag[:3] = torch.tensor([1400.0, 60.0, 22.0], device=DEVICE)  # W * gamma: 2.1e6, 9e4, 3.3e4 (just past 2**15)
    signs = torch.randint(0, 2, (N, len(BIG)), device=DEVICE).float() * 2 - 1
    w[:, BIG] = (mag[:, None] * signs).to(dtype)
    return x, w, b, nw, nb


def test_layernorm_fold_scales_rows_past_float16s_range():
    """float16 rows of W * gamma past 2**15 are folded scaled by 2**-e (exactly, W' finite) and scaled back in
    the epilogue; the other rows bitwise unscaled. Eager's result is finite; so is the fused one, within the
    tolerance rule, on both LayerNorm routes (a cancelling row's tile on the exact route) and for the QKV
    projection. (Unscaled, W' held inf and every row of those columns came out inf or NaN.)"""
    x, w, b, nw, nb = overflowing_fold_case()
    f, _, _ = G.layernorm_prologue(x, 1e-6, w, b, nw, nb)
    prod = w.float() * nw.float()
    want_u = torch.ones(w.shape[0], device=DEVICE)
    want_u[:3] = torch.tensor([2.0**7, 4.0, 2.0], device=DEVICE)  # 2.1e6 / 2**7, 9e4 / 4, 3.3e4 / 2 <= 2**15
    assert torch.equal(f.unscale, want_u), f.unscale[:4]
    assert torch.equal(f.weight, (prod / want_u[:, None]).to(torch.float16)) and f.weight.isfinite().all()
    assert not f.dominated.any()
    x_cancel = x.clone()
    # a cancelling row (its tile on the exact route): 1000 + steps of 0.5 that sum to 0, exact in float16, with
    # 1000 (its mean, exactly) in the large gammas' channels; z = 0 there, as eager rounds no x it reads
    d = 0.5 * torch.randint(1, 4, (30,), device=DEVICE).float()
    steps = torch.cat([d, -d])[torch.randperm(60, device=DEVICE)]
    row = torch.zeros(64, device=DEVICE)
    row[[k for k in range(64) if k not in BIG]] = steps
    x_cancel[1, 3] = (1000 + row).to(x.dtype)
    for xi, route in ((x, "epilogue"), (x_cancel, "exact: 1 of 2 row tiles")):
        oracle, base = dense_reference(xi, w, b, nw, nb, 1e-6, "erf", None, None)
        assert base.isfinite().all()
        got = G.dense_forward(
            xi, w, b, norm_weight=nw, norm_bias=nb, act=G.ACT_GELU_ERF, out=nan_like(base.shape, x.dtype),
            config=G.CONFIGS[3],
        )  # fmt: skip
        assert G.last_ln_route().startswith(route), G.last_ln_route()
        assert_close(got, oracle, base, name=route)
    B, T, dim = x.shape
    H, hd = 2, dim // 2
    wq, bq = randn(3 * dim, dim, dtype=x.dtype, scale=dim**-0.5), randn(3 * dim, dtype=x.dtype)
    wq[:, BIG] = w[:1, BIG]  # every row as W's first: 2.1e6 in each big channel, none dominating
    got = G.qkv_projection_forward(
        x, wq, bq, num_heads=H, scale=1.0, norm_weight=nw, norm_bias=nb, out=nan_like((3, B, H, T, hd), x.dtype),
        config=G.CONFIGS[1],
    )  # fmt: skip
    assert G.last_ln_route() == "epilogue", G.last_ln_route()
    oracle, base = dense_reference(x, wq, bq, nw, nb, 1e-6, "none", None, None)
    split = lambda y: y.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # noqa: E731
    assert_close(got, split(oracle), split(base), name="qkv")


def outlier_channel_case(dtype, T=40, K=64, N=128, k0=5):
    """One channel of gamma 1500 dominating the first 64 outputs' rows of W * gamma (W there +-100..400), 0
    in the others, and every row's x there where beta = -1 cancels z * gamma: LayerNorm's output ~1e-3 in
    that channel (eager's rounding tiny), while the fold rounds W * gamma ~ 4e5 (error ~eps * |W * beta|,
    ~0.2: a hundred times eager's)."""
    x = zero_mean_rows(2, T, K, [k0], torch.float32)
    std = x.pow(2).mean(-1).sqrt()
    x[..., k0] = std / 1500  # z ~ 1 / 1500 (the mean moves by ~1e-5; LayerNorm stays well conditioned)
    x = x.to(dtype)
    w, b = randn(N, K, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    nw[k0], nb[k0] = 1500.0, -1.0
    big = torch.randint(100, 401, (64,), device=DEVICE).float() * (torch.randint(0, 2, (64,), device=DEVICE) * 2 - 1)
    w[:64, k0], w[64:, k0] = big.to(dtype), 0.0
    return x, w, b, nw, nb


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_fold_outlier_channel_takes_the_exact_route(dtype):
    """Outputs one channel dominates are flagged by the fold and their column tiles apply LayerNorm in the K
    loop (eager's rounding); the other outputs keep the fold. Within the tolerance rule, where the fold alone
    misses it by ~100x (tests/mutations.py: gemm-tma-fold-dominance-ignored)."""
    x, w, b, nw, nb = outlier_channel_case(dtype)
    f, _, _ = G.layernorm_prologue(x, 1e-6, w, b, nw, nb)
    assert f.dominated[:64].all() and not f.dominated[64:].any()
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "erf", None, None)
    got = G.dense_forward(
        x, w, b, norm_weight=nw, norm_bias=nb, act=G.ACT_GELU_ERF, out=nan_like(base.shape, dtype), config=G.CONFIGS[4]
    )  # 64-output column tiles: the first on the exact route, the second folded
    assert G.last_ln_route().startswith("exact: 64 of 128 outputs have one channel"), G.last_ln_route()
    assert_close(got, oracle, base)
    # NaN in one token of sample 1: eager's NaN row there, on both routes; every other row as before
    x[1, 7, 20] = float("nan")
    nan_base = dense_reference(x, w, b, nw, nb, 1e-6, "erf", None, None)[1]
    got_nan = G.dense_forward(
        x, w, b, norm_weight=nw, norm_bias=nb, act=G.ACT_GELU_ERF, out=nan_like(base.shape, dtype), config=G.CONFIGS[4]
    )
    assert torch.equal(got_nan.isnan(), nan_base.isnan()) and nan_base[1, 7].isnan().all()
    keep = torch.ones(got.shape[:2], dtype=torch.bool, device=DEVICE)
    keep[1, 7] = False
    assert torch.equal(got_nan[keep], got[keep])


@pytest.mark.parametrize("bias,beta", [(True, False), (False, True), (False, False)], ids=str)
def test_layernorm_exact_route_edges(bias, beta):
    """The exact route with b or beta absent, W a view with a wider row stride (dim + 16), K = 80 (a partial
    K tile) and the QKV head split (Q scaled): every output dominated, so every tile takes it."""
    dtype, B, T, H, hd = torch.float16, 2, 33, 2, 40
    dim = H * hd
    x, _, _, nw, nb = outlier_channel_case(dtype, T=T, K=dim, N=3 * dim)
    w = randn(3 * dim, dim + 16, dtype=dtype, scale=dim**-0.5)[:, 8 : 8 + dim]  # strides (dim + 16, 1)
    w[:, 5] = (torch.randint(100, 401, (3 * dim,), device=DEVICE) * 1.0).to(dtype)
    b = randn(3 * dim, dtype=dtype) if bias else None
    nb = nb if beta else None
    f, _, _ = G.layernorm_prologue(x, 1e-6, w, b, nw, nb)
    assert f.dominated.all()
    got = G.qkv_projection_forward(
        x, w, b, num_heads=H, scale=0.25, norm_weight=nw, norm_bias=nb, out=nan_like((3, B, H, T, hd), dtype),
        config=G.CONFIGS[4],
    )  # fmt: skip
    assert G.last_ln_route().startswith(f"exact: {3 * dim} of {3 * dim} outputs"), G.last_ln_route()
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)

    def split(y):
        y = y.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        return torch.cat([y[:1] * 0.25, y[1:]])

    assert_close(got, split(oracle), split(base))


def eps_dominated_case(dtype, eps, exact, N, B=2, T=5, K=64, k0=5):
    """LayerNorm + Linear on rows of spread 0.1 * sqrt(eps) about means up to ~sqrt(eps): var ~ 0.01 * eps,
    so eps sets rstd (~1 / sqrt(eps): eps dropped would make it ~10x, eps added twice ~0.7x) and z ~ 0.1,
    while |mean| * rstd ~ 1 stays far below ln_cancel_threshold. exact: the first 64 outputs' rows of
    W * gamma dominated by channel k0 (W there +-8..16, gamma 1; the rest of a row ~1 in norm), so their
    column tile takes the exact route and the other outputs the folded epilogue; else every tile folds."""
    s = eps**0.5
    x = (randn(B, T, K, dtype=torch.float32, scale=0.1 * s) + randn(B, T, 1, dtype=torch.float32, scale=s)).to(dtype)
    w, b = randn(N, K, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    if exact:
        nw[k0] = 1.0
        sign = torch.randint(0, 2, (64,), device=DEVICE) * 2 - 1
        w[:64, k0] = (torch.randint(8, 17, (64,), device=DEVICE) * sign).to(dtype)
    return x, w, b, nw, nb


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1.0, 1e3])
@pytest.mark.parametrize("route", ["epilogue", "exact"])
@pytest.mark.parametrize("op", ["dense", "qkv"])
def test_layernorm_large_eps(op, route, eps, dtype):
    """eps far above the rows' variance, on both LayerNorm routes (route "exact": the first 64 outputs on the
    exact route, the others folded), for dense_forward and the QKV projection: each column group against the
    float64 oracle of this eps under the tolerance rule, and outside it for eps 1e-6 and 2 * eps (so an eps
    dropped or added twice is seen). Every other LayerNorm test here runs eps 1e-6, which the variance
    hides."""
    H, hd = 2, 32
    N = 3 * H * hd if op == "qkv" else 128
    x, w, b, nw, nb = eps_dominated_case(dtype, eps, route == "exact", N)
    B, T, K = x.shape
    if op == "qkv":
        got = G.qkv_projection_forward(
            x, w, b, num_heads=H, scale=1.0, norm_weight=nw, norm_bias=nb, eps=eps,
            out=nan_like((3, B, H, T, hd), dtype), config=G.CONFIGS[4],
        )  # fmt: skip
        got = got.permute(1, 3, 0, 2, 4).reshape(B, T, N)  # back to (B, T, [q; k; v]) (scale 1)
    else:
        got = G.dense_forward(
            x, w, b, norm_weight=nw, norm_bias=nb, eps=eps, out=nan_like((B, T, N), dtype), config=G.CONFIGS[4]
        )
    want = f"exact: 64 of {N} outputs have one channel" if route == "exact" else "epilogue"
    assert G.last_ln_route().startswith(want), G.last_ln_route()
    oracle, base = dense_reference(x, w, b, nw, nb, eps, "none", None, None)
    for name, cols in (("outputs 0-63", slice(0, 64)), ("outputs 64-", slice(64, N))):
        assert_close(got[..., cols], oracle[..., cols], base[..., cols], name=name)
        for wrong in (1e-6, 2 * eps):
            other = dense_reference(x, w, b, nw, nb, wrong, "none", None, None)[0]
            assert not compare(other[..., cols], oracle[..., cols], base[..., cols]).ok, (name, wrong)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1.0, 1e3])
def test_layernorm_large_eps_near_constant_rows_take_the_exact_route(eps, dtype):
    """Rows of spread far below sqrt(eps) (most round to one value) with |mean| * rstd at ~0.9 x
    ln_cancel_threshold, no beta, no b: LayerNorm's z ~ 0 and eager's output ~0 (0 exactly for a constant
    row), while the folded epilogue's x @ W'^T - mean * c still cancels ~|mean| * rstd * sum |W'| in fp32.
    Before the cancel test weighed z's scale (|mean| * rstd > tau alone, eps ignored) these rows kept the
    fold and, in 8 draws per case, erred by 4.9e-3 to 9.8e-3 in float16 (bound 1e-3 where every row is
    constant, eager exact) and 7.8e-3 to 3.1e-2 in bfloat16 (bound 8e-3 to 1.9e-2): the rule missed in 6,
    5, 7 and 2 of 8 (float16 eps 1, 1e3; bfloat16 eps 1, 1e3), the route check in all. Now ~0 (the exact
    route). W ~ N(0, 16) makes the fold's error (proportional to |W|) visible above the rule's floor."""
    B, T, K, N = 2, 5, 64, 128
    s, tau = eps**0.5, G.ln_cancel_threshold(K, dtype)
    sign = torch.randint(0, 2, (B, T, 1), device=DEVICE) * 2.0 - 1
    x = sign * 0.9 * tau * s * (1 + 0.05 * torch.rand(B, T, 1, device=DEVICE))  # |mean| * rstd ~ 0.9-0.95 tau
    x = (x + randn(B, T, K, dtype=torch.float32, scale=1e-3 * s)).to(dtype)
    w, nw = randn(N, K, dtype=dtype, scale=4.0), randn(K, dtype=dtype, scale=0.3, shift=1.0)
    got = G.dense_forward(x, w, None, norm_weight=nw, eps=eps, out=nan_like((B, T, N), dtype), config=G.CONFIGS[4])
    oracle, base = dense_reference(x, w, None, nw, None, eps, "none", None, None)
    assert_close(got, oracle, base)
    assert G.last_ln_route().startswith("exact: 1 of 1 row tiles"), G.last_ln_route()


def test_layernorm_fold_follows_writes_through_data():
    """Writes through ``.data`` keep the version counter (a DINO teacher's EMA update, PEFT's merge): the fold
    is made on every call, so the next call uses the parameters as they are (a launch plan's replay:
    tests/test_tuning.py)."""
    dtype = torch.float16
    (x, w, b, nw, nb), shape, _, _ = cancelling_case(dtype)
    for step in range(3):
        version = (nw._version, nb._version, w._version)
        got = G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, config=G.CONFIGS[4])
        oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)
        assert_close(got, oracle, base, name=f"step {step}")
        nw.data.mul_(1.5)
        nb.data.add_(0.5)
        w.data.mul_(-1)
        assert (nw._version, nb._version, w._version) == version  # unseen by the version counters


# ---------------------------------------------------------------------------------------------
# What TMA refuses, before any launch


def test_refusals():
    w = randn(64, 64, dtype=torch.float16)
    big = randn(4, 80, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"x: TMA needs a 16-byte aligned base address"):
        G.linear_forward(big[:, 1:65], w)
    with pytest.raises(ValueError, match=r"x: TMA needs a row stride that is a multiple of 16 bytes, got 36"):
        G.linear_forward(randn(4, 36, dtype=torch.float16), randn(8, 36, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x: TMA reads rows with one row stride"):
        G.linear_forward(randn(5, 4, 64, dtype=torch.float16).transpose(0, 1), w)
    with pytest.raises(ValueError, match=r"x: TMA cannot read broadcast rows"):
        G.linear_forward(randn(1, 64, dtype=torch.float16).expand(4, 64), w)
    with pytest.raises(ValueError, match=r"x: the TMA GEMM takes float16 or bfloat16, got torch.float32"):
        G.linear_forward(randn(4, 64, dtype=torch.float32), w.float())
    with pytest.raises(ValueError, match=r"config: expected one of gemm_tma.CONFIGS"):
        G.linear_forward(randn(4, 64, dtype=torch.float16), w, config=G.TmaConfig(32, 32, 32, 4, 3, 1, 1))


def test_class_configs():
    assert G.shape_class(2304, 768) == "qkv" and G.shape_class(768, 3072) == "fc2"
    for dim in (192, 384, 768, 1024, 1280):
        for N, K in ((3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)):
            assert G.configs_for(N, K) and all(c in G.CONFIGS for c in G.configs_for(N, K))


# ---------------------------------------------------------------------------------------------
# Ahead of time for sm_90: wgmma, bulk tensor copies, no spills, blocks per SM

_AOT_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vit_kernels.triton import gemm_tma as G
    from vit_kernels.triton.aot import cubin_facts
    every = sys.argv[1] == "all"
    if every:
        specs = G.aot_specs()
    else:   # each config with the heaviest epilogue of a class that lists it, bf16
        specs = []
        for i, c in enumerate(G.CONFIGS):
            cls = next(k for k, v in G.CLASSES.items() if i in v)
            specs.append(G.aot_spec(c, torch.bfloat16, "gemm_tma_" + cls, **G.EPILOGUES[cls][-1]))
    for s in specs:
        k = triton.compile(ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs,
                                     attrs=s.compile_attrs()),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": s.num_warps, "num_stages": s.num_stages})
        f = cubin_facts(k.asm["cubin"], s.kernel)
        ptx = k.asm["ptx"]
        bps = int(s.config.split("_b")[1].split(",")[0])
        print(json.dumps(dict(config=s.config, warps=s.num_warps, bps=bps, wgmma="wgmma.mma_async" in ptx,
                              tma_load=bool(re.search(r"cp\\.async\\.bulk\\.tensor\\.2d\\.shared::\\w+\\.global", ptx)),
                              tma_store=bool(re.search(r"cp\\.async\\.bulk\\.tensor\\.2d\\.global\\.shared", ptx)),
                              spill=f["spill_bytes"], regs=f["regs"], tc=f["tensor_core_instructions"],
                              shared=int(k.metadata.shared) + f["static_shared_bytes"])))
""")


def _aot(which):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, which], capture_output=True, text=True, env=env, timeout=3000
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert rows
    for row in rows:
        assert row["wgmma"] and row["tc"] == ["HGMMA"], row
        assert row["tma_load"], row
        assert row["tma_store"] == ("OUT_MODE=1" not in row["config"]), row  # the head split stores by pointers
        assert row["spill"] == 0, row
        # sm_90: shared memory per block and per SM (1 KB reserved per block), registers per SM (vit_kernels.arch)
        assert row["shared"] <= arch.SHARED_PER_BLOCK[90], row
        assert row["bps"] * (row["shared"] + arch.SHARED_RESERVED) <= arch.SHARED_PER_SM[90], row
        assert row["bps"] * row["regs"] * 32 * row["warps"] <= arch.REGS_PER_SM, row
    return rows


@pytest.mark.skipif(sys.platform != "linux", reason="AOT compilation needs Triton's Linux build")
def test_aot_sm90_every_config():
    assert len(_aot("configs")) == len(G.CONFIGS)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="AOT compilation needs Triton's Linux build")
def test_aot_sm90_every_spec():
    assert len(_aot("all")) == len(G.aot_specs())


def test_single_token_rows_with_odd_strides():
    """x and out of shape (B, 1, dim) cut from wider tensors: the row stride comes from the batch dim."""
    dtype = torch.float16
    x = randn(4, 5, 64, dtype=dtype)[:, 2:3]  # strides (320, 64, 1)
    out_big = nan_like((4, 3, 48), dtype)
    out = out_big[:, 1:2]  # strides (144, 48, 1), offset 48 elements
    w, b = randn(48, 64, dtype=dtype, scale=0.125), randn(48, dtype=dtype)
    got = G.linear_forward(x, w, b, out=out, config=G.CONFIGS[4])
    assert got is out
    assert_close(got, R.linear(d64(x), d64(w), d64(b)), F.linear(x, w, b))
    assert out_big[:, 0].isnan().all() and out_big[:, 2].isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or torch.cuda.get_device_capability(0)[0] != 9, reason="needs two sm_90 devices"
)
def test_tma_gemm_on_two_devices():
    """The tensor-descriptor scratch comes from the current device (the launch's), not the first launch's:
    the same launcher on cuda:0, then on cuda:1."""
    for dev in ("cuda:0", "cuda:1"):
        x = torch.randn(300, 256, device=dev, dtype=torch.float16)
        w = torch.randn(512, 256, device=dev, dtype=torch.float16) * 256**-0.5
        with torch.cuda.device(dev):
            out = G.linear_forward(x, w, config=G.CONFIGS[0])
            torch.cuda.synchronize()
        assert out.device == x.device
        assert_close(out, x.double() @ w.double().T, F.linear(x, w), name=f"TMA GEMM on {dev}")


def test_layernorm_fold_of_inference_tensors_follows_in_place_updates():
    """Parameters made under torch.inference_mode (no version counter): an in-place update there shows in
    the next call."""
    dtype = torch.float16
    with torch.inference_mode():
        (x, w, b, nw, nb), shape, _, _ = cancelling_case(dtype)
        for step in range(2):
            got = G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, config=G.CONFIGS[4])
            oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)
            assert_close(got, oracle, base, name=f"step {step}")
            nw.mul_(1.5)
            nb.add_(0.5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_layernorm_fold_nan_row_shares_a_tile_with_a_cancelling_row(value):
    """A NaN/Inf in one sample's row leaves the route of its row tile to the other rows: the cancelling row
    of the other sample in that tile still takes the exact route, and that sample is bitwise the clean run's."""
    dtype = torch.float16
    B, T, K, N = 2, 40, 64, 128
    x = torch.randn(B, T, K, device=DEVICE)
    x[0, 5] = 1000 + 0.5 * torch.randn(K, device=DEVICE)  # |mean| * rstd ~ 2000: the exact route
    x = x.to(dtype)
    w, b = randn(N, K, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    nw, nb = randn(K, dtype=dtype, scale=0.3, shift=1.0), randn(K, dtype=dtype)
    config = G.CONFIGS[3]  # 64-row tiles: rows 0-63 hold sample 0 and the first 24 rows of sample 1
    clean = G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, config=config)
    bad = x.clone()
    bad[1, 3, 7] = value  # row 43: the cancelling row's tile
    got = G.dense_forward(bad, w, b, norm_weight=nw, norm_bias=nb, config=config)
    assert G.last_ln_route().startswith("exact: 1 of 2 row tiles"), G.last_ln_route()
    assert torch.equal(got[0], clean[0])
    oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)
    assert_close(got[0], oracle[0], base[0])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 device"
)
def test_layernorm_fold_in_a_cuda_graph_follows_in_place_updates():
    """A CUDA graph of the LayerNorm-folded GEMM, replayed after in-place updates of the LayerNorm's
    parameters: each replay against the oracle of the parameters as they are then."""
    (x, w, b, nw, nb), shape, _, _ = cancelling_case(torch.float16)
    x, w, b, nw, nb = (t.cuda() for t in (x, w, b, nw, nb))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture, as warm-up
        G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, config=G.CONFIGS[4])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.dense_forward(x, w, b, norm_weight=nw, norm_bias=nb, config=G.CONFIGS[4])
    for step in range(3):
        graph.replay()
        torch.cuda.synchronize()
        oracle, base = dense_reference(x, w, b, nw, nb, 1e-6, "none", None, None)
        assert_close(out, oracle, base, name=f"replay {step}")
        with torch.no_grad():
            nw.mul_(1.5)
            nb.add_(0.5)
