"""The CUDA C++ GEMM (every loader and epilogue) and the LayerNorm statistics kernel, run through the
host emulator on CPU tensors (the GPU build on CUDA tensors, marked gpu), against the float64 oracle
under the tolerance rule (vit_kernels.testing.assert_close; baseline: plain PyTorch at the same dtype: F.* or the oracle run at that dtype, never the torch path).
Outputs start as NaN (ops._poison), so an element a kernel does not write fails.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vit_kernels import cuda as vk_cuda
from vit_kernels import reference as R
from vit_kernels.cuda import ops as cuda_ops
from vit_kernels.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_poison", True)
    try:
        vk_cuda.module_for(DEVICE)
    except vk_cuda.BuildError as e:
        pytest.fail(f"the CUDA extension for {DEVICE} failed to build: {e}")


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def d64(t):
    return None if t is None else t.double().cpu()


# --------------------------------------------------------------------------- LayerNorm statistics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 72), (197, 192), (50, 1000)])
def test_layernorm_stats(dtype, rows, dim):
    x = rand(rows, dim, dtype=dtype) * 3 + 1.5  # an offset mean: a one-pass variance would lose digits
    mean, rstd = cuda_ops.layernorm_stats(x, 1e-6)
    x64 = d64(x)
    want_mean = x64.mean(-1)
    want_rstd = 1 / torch.sqrt(((x64 - want_mean[:, None]) ** 2).mean(-1) + 1e-6)
    torch.testing.assert_close(mean.cpu().double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.cpu().double(), want_rstd, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- linear (dense loader)
LINEAR_CASES = [
    # (leading shape, in, out, bias, residual, layer_scale)
    ((1,), 64, 48, True, False, False),         # one token
    ((2, 50), 72, 40, True, True, True),        # out proj of a block: bias, layer scale, residual
    ((1, 197), 80, 96, False, True, False),     # no bias, residual only
    ((257,), 37, 29, True, False, False),       # odd dims: scalar (non-16-byte) loads, ragged tiles
    ((3, 5), 16, 200, True, True, True),        # N > one tile in both configs
]


def linear_case(dtype, lead, k, n, bias, residual, layer_scale):
    x = rand(*lead, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, scale=k ** -0.5)
    b = rand(n, dtype=dtype) if bias else None
    r = rand(*lead, n, dtype=dtype) if residual else None
    ls = rand(n, dtype=dtype) if layer_scale else None
    return x, w, b, r, ls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear(dtype, case):
    x, w, b, r, ls = linear_case(dtype, *case)
    got = cuda_ops.linear(x, w, b, residual=r, layer_scale=ls)
    want = R.linear(d64(x), d64(w), d64(b), residual=d64(r), layer_scale=d64(ls))
    base = F.linear(x, w, b)
    base = (base * ls if ls is not None else base)
    base = r + base if r is not None else base
    assert_close(got, want, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_large_tile(dtype):
    """The 128x128 configuration (chosen automatically for large problems) on a ragged shape."""
    x, w, b, r, ls = linear_case(dtype, (130,), 96, 136, True, True, True)
    got = cuda_ops.linear(x, w, b, residual=r, layer_scale=ls, config=1)
    want = R.linear(d64(x), d64(w), d64(b), residual=d64(r), layer_scale=d64(ls))
    assert_close(got, want, r + F.linear(x, w, b) * ls)


def test_linear_strided_rows():
    """x and residual as column slices of wider tensors: rows read in place with their row stride
    (the stride is not a multiple of 8, so the loader takes its element path)."""
    dtype = torch.float16
    big = rand(2, 33, 75, dtype=dtype)
    x = big[..., 3:67]                       # (2, 33, 64), row stride 75
    w = rand(24, 64, dtype=dtype, scale=0.125)
    rbig = rand(2, 33, 30, dtype=dtype)
    r = rbig[..., :24]
    got = cuda_ops.linear(x, w, None, residual=r)
    assert_close(got, R.linear(d64(x), d64(w), residual=d64(r)), r + F.linear(x, w))


def test_linear_rejects_what_it_would_have_to_copy():
    x = rand(4, 8, 16, dtype=torch.float32).transpose(1, 2)  # last dim not unit-stride
    w = rand(8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: .*unit stride"):
        cuda_ops.linear(x, w)
    with pytest.raises(TypeError, match=r"x: dtype torch.float64 is not supported"):
        cuda_ops.linear(rand(2, 8, dtype=torch.float64), rand(3, 8, dtype=torch.float64))


# --------------------------------------------------------------------------- MLP (layernorm loader, GELU)
MLP_CASES = [
    # (leading shape, dim, hidden, out, approximate, layernorm, residual + layer scale)
    ((2, 50), 64, 256, 64, "none", True, True),
    ((1, 197), 40, 120, 40, "tanh", True, False),
    ((257,), 24, 72, 24, "none", False, True),   # norm_weight None: no LayerNorm
    ((1,), 33, 47, 19, "tanh", True, True),      # odd dims everywhere
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLP_CASES)
def test_layernorm_gelu_mlp(dtype, case):
    lead, dim, hidden, out, approximate, layernorm, res = case
    x = rand(*lead, dim, dtype=dtype) * 2 + 0.5
    nw = rand(dim, dtype=dtype) if layernorm else None
    nb = rand(dim, dtype=dtype) if layernorm else None
    w1, b1 = rand(hidden, dim, dtype=dtype, scale=dim ** -0.5), rand(hidden, dtype=dtype)
    w2, b2 = rand(out, hidden, dtype=dtype, scale=hidden ** -0.5), rand(out, dtype=dtype)
    r = rand(*lead, out, dtype=dtype) if res else None
    ls = rand(out, dtype=dtype) if res else None
    got = cuda_ops.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate=approximate,
                                      residual=r, layer_scale=ls)
    if layernorm:
        want = R.layernorm_gelu_mlp(d64(x), d64(nw), d64(nb), d64(w1), d64(b1), d64(w2), d64(b2), eps=1e-6,
                                    approximate=approximate, residual=d64(r), layer_scale=d64(ls))
    else:
        h = R.gelu(R.linear(d64(x), d64(w1), d64(b1)), approximate)
        want = R.linear(h, d64(w2), d64(b2), residual=d64(r), layer_scale=d64(ls))
    base = R.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate=approximate,
                                residual=r, layer_scale=ls)
    assert_close(got, want, base)


# --------------------------------------------------------------------------- QKV projection (head split)
QKV_CASES = [
    # (batch, tokens, dim, heads, head_dim, bias, layernorm)
    (2, 50, 64, 2, 32, True, True),
    (1, 197, 48, 1, 80, True, True),     # head_dim 80
    (3, 1, 32, 2, 64, False, False),     # one token, no bias, no LayerNorm
    (1, 257, 24, 3, 8, True, True),
]


def qkv_baseline(x, w, b, nw, nb, heads, scale, eps):
    B, N, dim = x.shape
    h = F.layer_norm(x, (dim,), nw, nb, eps) if nw is not None else x
    qkv = F.linear(h, w, b).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return torch.stack([qkv[0] * scale, qkv[1], qkv[2]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QKV_CASES)
def test_qkv_projection(dtype, case):
    B, N, dim, heads, hd, bias, layernorm = case
    inner = heads * hd
    x = rand(B, N, dim, dtype=dtype)
    w = rand(3 * inner, dim, dtype=dtype, scale=dim ** -0.5)
    b = rand(3 * inner, dtype=dtype) if bias else None
    nw = rand(dim, dtype=dtype) if layernorm else None
    nb = rand(dim, dtype=dtype) if layernorm else None
    scale = hd ** -0.5
    got = cuda_ops.qkv_projection(x, w, b, num_heads=heads, scale=scale, norm_weight=nw, norm_bias=nb, eps=1e-5)
    assert got.shape == (3, B, heads, N, hd) and got.is_contiguous()
    want = qkv_baseline(d64(x), d64(w), d64(b), d64(nw), d64(nb), heads, scale, 1e-5) if not layernorm else None
    if layernorm:
        h = R.layer_norm(d64(x), d64(nw), d64(nb), 1e-5)
        q = R.linear(h, d64(w), d64(b)).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        want = torch.stack([q[0] * scale, q[1], q[2]])
    assert_close(got, want, qkv_baseline(x, w, b, nw, nb, heads, scale, 1e-5))


# --------------------------------------------------------------------------- patch embedding (gather loader)
PATCH_CASES = [
    # (batch, channels, H, W, patch, dim, cls, pos, channels_last)
    (2, 3, 32, 48, 16, 64, True, True, False),   # NCHW, 16-wide patches: 16-byte gathers
    (1, 3, 28, 21, 7, 40, True, True, False),    # odd patch: element gathers, 12 patches
    (3, 2, 14, 14, 7, 24, False, True, False),   # no class token
    (2, 3, 32, 32, 8, 32, True, False, True),    # channels_last, read through strides, no pos
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_patch_embed(dtype, case):
    B, C, H, W, p, dim, cls, pos, channels_last = case
    images = rand(B, C, H, W, dtype=dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    w = rand(dim, C, p, p, dtype=dtype, scale=(C * p * p) ** -0.5)
    b = rand(dim, dtype=dtype)
    tokens = (1 if cls else 0) + (H // p) * (W // p)
    cls_token = rand(1, 1, dim, dtype=dtype) if cls else None
    pos_embed = rand(1, tokens, dim, dtype=dtype) if pos else None
    got = cuda_ops.patch_embed(images, w, b, patch_size=p, pos_embed=pos_embed, cls_token=cls_token)
    want = R.patch_embed(d64(images), d64(w), d64(b), patch_size=p, pos_embed=d64(pos_embed),
                         cls_token=d64(cls_token))
    base = R.patch_embed(images, w, b, patch_size=p, pos_embed=pos_embed, cls_token=cls_token)
    assert_close(got, want, base)


# --------------------------------------------------------------------------- the public ops dispatch here
def test_public_ops_dispatch_to_cuda():
    from vit_kernels import last_decision
    from vit_kernels.ops import linear
    x, w, b, r, ls = linear_case(torch.float16, (2, 9), 32, 16, True, True, True)
    got = linear(x, w, b, residual=r, layer_scale=ls, backend="cuda")
    assert last_decision("linear").backend == "cuda"
    assert_close(got, R.linear(d64(x), d64(w), d64(b), residual=d64(r), layer_scale=d64(ls)),
                 r + F.linear(x, w, b) * ls)


# --------------------------------------------------------------------------- heavier sweep
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 50, 197, 257, 577])
@pytest.mark.parametrize("config", [0, 1])
def test_linear_sweep(dtype, tokens, config):
    x, w, b, r, ls = linear_case(dtype, (2, tokens), 192, 200, True, True, True)
    got = cuda_ops.linear(x, w, b, residual=r, layer_scale=ls, config=config)
    want = R.linear(d64(x), d64(w), d64(b), residual=d64(r), layer_scale=d64(ls))
    assert_close(got, want, r + F.linear(x, w, b) * ls)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [0, 1])
def test_vit_b_patch_embed_and_mlp_shapes(dtype, config):
    """ViT-B/16 widths on one image: patch embedding 224 px and one MLP (768 -> 3072 -> 768)."""
    images = rand(1, 3, 224, 224, dtype=dtype)
    w = rand(768, 3, 16, 16, dtype=dtype, scale=768 ** -0.5)
    b, cls, pos = rand(768, dtype=dtype), rand(768, dtype=dtype), rand(197, 768, dtype=dtype)
    got = cuda_ops.patch_embed(images, w, b, patch_size=16, pos_embed=pos, cls_token=cls, config=config)
    want = R.patch_embed(d64(images), d64(w), d64(b), patch_size=16, pos_embed=d64(pos), cls_token=d64(cls))
    assert_close(got, want, R.patch_embed(images, w, b, patch_size=16, pos_embed=pos, cls_token=cls))
    x = got
    nw, nb = rand(768, dtype=dtype), rand(768, dtype=dtype)
    w1, b1 = rand(3072, 768, dtype=dtype, scale=768 ** -0.5), rand(3072, dtype=dtype)
    w2, b2 = rand(768, 3072, dtype=dtype, scale=3072 ** -0.5), rand(768, dtype=dtype)
    y = cuda_ops.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate="none", residual=x,
                                    config=config)
    want = R.layernorm_gelu_mlp(d64(x), d64(nw), d64(nb), d64(w1), d64(b1), d64(w2), d64(b2), eps=1e-6,
                                residual=d64(x))
    base = R.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate="none", residual=x,
                                layer_scale=None)
    assert_close(y, want, base)
    assert math.isfinite(y.float().abs().max().item())

# The whole-model acceptance (2-layer ViT on backend="cuda") lives in tests/test_vit_backends.py.
