"""The GEMM of both backends, side by side: the Triton GEMM (vit_kernels.triton.gemm: linear_forward,
qkv_projection_forward; vit_kernels.triton.layernorm.row_stats) and the CUDA C++ GEMM (every loader and
epilogue, csrc/gemm, through vit_kernels.cuda.ops; the host emulator on CPU tensors, the GPU build on CUDA
tensors) with its row statistics kernel (csrc/layernorm).

Every result is checked against the float64 oracle (vit_kernels.reference) under the tolerance rule
(vit_kernels.testing.assert_close; baseline: plain PyTorch at the same dtype: F.* or the oracle's code run
at that dtype, never the torch path under test). Outputs start as NaN (tests/poison.py; the Triton
launchers also get a NaN-filled `out`), so an element a kernel does not write fails. Shared inputs,
oracles and the per-backend adapters: tests/gemm_cases.py. Each backend keeps its own default case list
(the CUDA emulator is slow; the lists cover the same features); `-m slow` runs the full sweeps.
"""

import itertools
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.testing import assert_close

import gemm_cases as G
from gemm_cases import BACKENDS, DTYPES, d64, nan_like, rand
from poison import poison_empty


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


def ids(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


# ------------------------------------------------------------------------------------- row statistics
# (rows, dim, mean offset): a large offset mean would lose digits in a one-pass variance
ROW_STATS_CASES = {
    "triton": [(1, 192, 100.0), (197, 200, 100.0), (3 * 257, 384, 100.0), (50, 1000, 100.0)],
    "cuda": [(1, 72, 1.5), (197, 192, 1.5), (50, 1000, 1.5)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in ROW_STATS_CASES[b]], ids=str)
def test_row_stats(backend, case, dtype):
    G.require(backend)
    rows, dim, offset = case
    x = (rand(rows, dim, dtype=torch.float32) * 3 + offset).to(dtype)
    mean, rstd = G.row_stats(backend, x, 1e-6)
    x64 = x.double()
    m64 = x64.mean(-1)
    r64 = 1 / torch.sqrt(((x64 - m64[:, None]) ** 2).mean(-1) + 1e-6)
    assert mean.dtype == rstd.dtype == torch.float32
    assert_close(mean, m64, floor=1e-6 * max(1.0, offset / 100))
    assert_close(rstd, r64, floor=1e-6 * r64.abs().max().item())


def huge_first_small_mean_rows(rows, dim, dtype):
    """(rows, dim) rows whose mean is ~1e-5 and whose first element is huge: half the channels +-L pairs
    (L = 129..255 * 2**8, up to 65280, exactly cancelling; the first channel +L), half multiples of 2**-18
    below 1e-3 (the mean's bits), shuffled. Every value is exact in float16, bfloat16 and float32."""
    half = dim // 2
    big = torch.randint(129, 256, (rows, half // 2)).double() * 2**8
    small = torch.randint(1, 256, (rows, half)).double() * 2**-18
    small = small * (torch.randint(0, 2, (rows, half)) * 2 - 1)
    rest = torch.cat([-big, big[:, 1:], small], 1)  # big[:, 0]'s +L is the first channel
    rest = torch.gather(rest, 1, torch.rand(rows, dim - 1).argsort(1))
    x = torch.cat([big[:, :1], rest], 1)
    assert torch.equal(x.to(dtype).double(), x)
    return x.to(dtype).to(G.DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("dim", [1024, 4096])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stats_mean_of_a_huge_first_element(backend, dim, dtype):
    """The mean is first + mean(x - first) summed in fp64 (csrc/layernorm/row_stats.cu; Triton's
    _row_stats_rows alike). Summed in fp32, each small channel's x - first rounds to -first (|x| < 1e-3,
    below half fp32's ulp at ~5e4: 2**-9 or more): every small channel's bits are lost and the mean comes
    out 0, an error of its own size, ~1e-5, against a floor of ~1e-12 (tests/mutations.py:
    cuda-rowstats-mean-fp32-sum; Triton's sum in fp32, row-stats-mean-fp32-sum, fails the same way). In
    fp64 every partial sum is exact (multiples of 2**-18 below 2**25: 43 bits) and dim, a power of two,
    makes the division exact, so the mean is rounded once, to fp32: within half an fp32 ulp of the float64
    mean (itself exact). Floor: 2 ulps at the largest |mean|."""
    G.require(backend)
    x = huge_first_small_mean_rows(6, dim, dtype)
    mean, _ = G.row_stats(backend, x, 1e-6)
    m64 = x.double().mean(-1)
    assert 1e-7 < m64.abs().max().item() < 1e-4  # the mean ~1e-5, the first element ~5e4
    ulp = 2.0 ** (math.floor(math.log2(m64.abs().max().item())) - 23)  # fp32's spacing at the largest |mean|
    assert_close(mean, m64, floor=2 * ulp)


# ------------------------------------------------------------------ linear: residual + layer_scale * (x W^T + b)
# (leading shape, in, out, bias, residual, layer_scale)
TRITON_LINEAR_SHAPES = [(1, 1, 192, 384), (3, 50, 72, 200), (1, 197, 384, 192), (3, 257, 200, 72), (1, 577, 192, 192)]
VARIANTS = [(False, False, False), (True, False, False), (True, True, False), (True, True, True), (False, True, True)]
CUDA_LINEAR_CASES = [
    ((1,), 64, 48, True, False, False),  # one token
    ((2, 50), 72, 40, True, True, True),  # out proj of a block: bias, layer scale, residual
    ((1, 197), 80, 96, False, True, False),  # no bias, residual only
    ((257,), 37, 29, True, False, False),  # odd dims: scalar (non-16-byte) loads, ragged tiles
    ((3, 5), 16, 200, True, True, True),  # N > one tile in both configs
]


def linear_params():
    """(backend, dtype, case): Triton tokens 1/50/197/257/577, batch 1 and 3, ViT and odd dims, the
    variant (bias / residual / layer scale) rotating with the dtype; CUDA's cases for its loaders."""
    out = []
    for i, (B, N, K, Nout) in enumerate(TRITON_LINEAR_SHAPES):
        for dtype in DTYPES:
            out.append(("triton", dtype, ((B, N), K, Nout, *VARIANTS[(i + DTYPES.index(dtype)) % len(VARIANTS)])))
    out += [("cuda", dtype, case) for case in CUDA_LINEAR_CASES for dtype in DTYPES]
    return out


def linear_case(dtype, lead, k, n, bias, residual, layer_scale):
    x = rand(*lead, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, scale=k**-0.5)
    b = rand(n, dtype=dtype) if bias else None
    r = rand(*lead, n, dtype=dtype) if residual else None
    ls = rand(n, dtype=dtype, scale=0.5) if layer_scale else None
    return x, w, b, r, ls


def check_linear(backend, dtype, case, config=None):
    x, w, b, r, ls = linear_case(dtype, *case)
    got = G.linear(backend, x, w, b, residual=r, layer_scale=ls, config=config)
    assert_close(got, G.linear_oracle(x, w, b, r, ls), G.linear_baseline(x, w, b, r, ls))


@pytest.mark.parametrize("backend,dtype,case", linear_params(), ids=ids)
def test_linear(backend, dtype, case):
    G.require(backend)
    check_linear(backend, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("shape", TRITON_LINEAR_SHAPES + [(3, 577, 384, 384), (3, 1025, 192, 768)], ids=str)
def test_linear_full_triton(shape, variant, dtype):
    G.require("triton")
    B, N, K, Nout = shape
    check_linear("triton", dtype, ((B, N), K, Nout, *variant))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("tokens", [1, 50, 197, 257, 577])
@pytest.mark.parametrize("config", [0, 1])
def test_linear_sweep_cuda(dtype, tokens, config):
    """Both CUDA tile configurations over the token counts of ViTs."""
    G.require("cuda")
    check_linear("cuda", dtype, ((2, tokens), 192, 200, True, True, True), config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_linear_large_tile_cuda(dtype):
    """The CUDA 128x128 configuration (chosen automatically for large problems) on a ragged shape."""
    G.require("cuda")
    check_linear("cuda", dtype, ((130,), 96, 136, True, True, True), config=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_strided_rows(backend):
    """x and residual read through their own row strides, in place (no copy): column slices of wider
    tensors (row stride 256 for Triton; 75, not a multiple of 8, for CUDA's element path) and a
    token-major (N, B, dim) residual seen as (B, N, dim); 2-D x works too."""
    G.require(backend)
    dtype = torch.float16
    if backend == "triton":
        x = rand(3, 50, 256, dtype=dtype)[:, :, 16 : 16 + 192]  # stride (12800, 256, 1)
        r = rand(50, 3, 96, dtype=dtype).transpose(0, 1)  # stride (96, 288, 1)
        w, b, ls = rand(96, 192, dtype=dtype, scale=0.07), rand(96, dtype=dtype), rand(96, dtype=dtype)
    else:
        x = rand(2, 33, 75, dtype=dtype)[..., 3:67]  # (2, 33, 64), row stride 75
        r = rand(2, 33, 30, dtype=dtype)[..., :24]
        w, b, ls = rand(24, 64, dtype=dtype, scale=0.125), None, None
    got = G.linear(backend, x, w, b, residual=r, layer_scale=ls)
    assert_close(got, G.linear_oracle(x, w, b, r, ls), G.linear_baseline(x, w, b, r, ls))
    x2, w2 = rand(37, 72, dtype=dtype), rand(40, 72, dtype=dtype, scale=0.1)
    assert_close(G.linear(backend, x2, w2), R.linear(d64(x2), d64(w2)), F.linear(x2, w2))


def test_linear_rejects_uncollapsible_rows_and_bad_out_triton():
    G.require("triton")
    from vit_kernels.triton import gemm

    x = rand(4, 6, 5, 32, dtype=torch.float32).transpose(0, 1)  # leading dims not viewable as (-1, 5)
    w = rand(16, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: shape \(6, 4, 5, 32\) .* cannot be addressed"):
        gemm.linear_forward(x, w)
    with pytest.raises(ValueError, match=r"out: expected a torch.float32 tensor of shape \(3, 16\)"):
        gemm.linear_forward(rand(3, 32, dtype=torch.float32), w, out=nan_like((3, 17), torch.float32))


def test_linear_rejects_what_it_would_have_to_copy_cuda():
    G.require("cuda")
    from vit_kernels.cuda import ops as cuda_ops

    x = rand(4, 8, 16, dtype=torch.float32).transpose(1, 2)  # last dim not unit-stride
    w = rand(8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: .*unit stride"):
        cuda_ops.linear_forward(x, w)
    with pytest.raises(TypeError, match=r"x: dtype torch.float64 is not supported"):
        cuda_ops.linear_forward(rand(2, 8, dtype=torch.float64), rand(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_linear_dispatches_to_the_backend(backend):
    G.require(backend)
    dtype = torch.float32 if backend == "triton" else torch.float16
    x, w, b, r, ls = linear_case(dtype, (2, 9), 32, 48, True, True, True)
    y = vk.linear(x, w, b, residual=r, layer_scale=ls, backend=backend)
    assert vk.last_decision("linear").backend == backend
    assert_close(y, G.linear_oracle(x, w, b, r, ls), G.linear_baseline(x, w, b, r, ls))


def test_float64_refused_before_launch_triton():
    """float64 passes the ops' checks but not the Triton GEMM: backend='triton' names the dtype."""
    G.require("triton")
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.linear(x, w, backend="triton")
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.layernorm_gelu_mlp(x, None, None, w, None, w.t().contiguous(), None, backend="triton")
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.patch_embed(
            torch.randn(1, 2, 4, 4, dtype=torch.float64),
            torch.randn(3, 2, 2, 2, dtype=torch.float64),
            patch_size=2,
            backend="triton",
        )


# ----------------------------------------------------------- QKV projection: [LayerNorm ->] QKV, head split
# (batch, tokens, dim, heads, head_dim, bias, norm); norm: "none" | "affine" | "weight"
TRITON_QKV_CASES = [
    (1, 1, 3, 64, "affine"),
    (3, 50, 2, 80, "none"),
    (1, 197, 3, 64, "weight"),
    (3, 257, 2, 72, "affine"),
    (1, 577, 2, 64, "affine"),
]
CUDA_QKV_CASES = [
    (2, 50, 64, 2, 32, True, "affine"),
    (1, 197, 48, 1, 80, True, "affine"),  # head_dim 80, dim != heads * head_dim
    (3, 1, 32, 2, 64, False, "none"),  # one token, no bias, no LayerNorm
    (1, 257, 24, 3, 8, True, "affine"),
]


def qkv_params():
    out = []
    for i, (B, N, H, hd, norm) in enumerate(TRITON_QKV_CASES):
        for dtype in DTYPES:
            out.append(("triton", dtype, (B, N, H * hd, H, hd, (i + DTYPES.index(dtype)) % 2 == 0, norm)))
    out += [("cuda", dtype, case) for case in CUDA_QKV_CASES for dtype in DTYPES]
    return out


def check_qkv(backend, dtype, case, x=None):
    B, N, dim, H, hd, has_bias, norm = case
    x = rand(B, N, dim, dtype=dtype) * 2 + 0.5 if x is None else x
    w = rand(3 * H * hd, dim, dtype=dtype, scale=dim**-0.5)
    b = rand(3 * H * hd, dtype=dtype) if has_bias else None
    nw = rand(dim, dtype=dtype) if norm != "none" else None
    nb = rand(dim, dtype=dtype) if norm == "affine" else None
    scale, eps = hd**-0.5, 1e-6
    got = G.qkv_projection(backend, x, w, b, num_heads=H, scale=scale, norm_weight=nw, norm_bias=nb, eps=eps)
    assert got.shape == (3, B, H, N, hd) and got.is_contiguous()
    assert_close(got, G.qkv_oracle(x, w, b, H, scale, nw, nb, eps), G.qkv_baseline(x, w, b, H, scale, nw, nb, eps))


@pytest.mark.parametrize("backend,dtype,case", qkv_params(), ids=ids)
def test_qkv_projection(backend, dtype, case):
    G.require(backend)
    check_qkv(backend, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("norm", ["none", "affine", "weight"])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 3, 64), (3, 50, 2, 80), (3, 197, 6, 64), (1, 257, 2, 72), (3, 577, 3, 64), (1, 1025, 2, 64)],
    ids=str,
)
def test_qkv_projection_full_triton(shape, norm, has_bias, dtype):
    G.require("triton")
    B, N, H, hd = shape
    check_qkv("triton", dtype, (B, N, H * hd, H, hd, has_bias, norm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_projection_layout_and_scaling(backend):
    """Each of q, k, v lands at [which, b, h, t, :] and only q is scaled: checked element by element
    against the unfused projection, with a scale far from 1."""
    G.require(backend)
    B, N, H, hd, dim = 2, 9, 3, 16, 40
    x, w, b = (
        rand(B, N, dim, dtype=torch.float32),
        rand(3 * H * hd, dim, dtype=torch.float32),
        rand(3 * H * hd, dtype=torch.float32),
    )
    got = G.qkv_projection(backend, x, w, b, num_heads=H, scale=0.125, norm_weight=None, norm_bias=None, eps=1e-6)
    y = R.linear(d64(x), d64(w), d64(b))  # (B, N, 3 * H * hd)
    for which, bb, h, t in itertools.product(range(3), range(B), range(H), range(N)):
        cols = y[bb, t, which * H * hd + h * hd : which * H * hd + (h + 1) * hd]
        expect = cols * (0.125 if which == 0 else 1.0)
        torch.testing.assert_close(got[which, bb, h, t].double(), expect, rtol=1e-5, atol=1e-5)


def test_qkv_projection_strided_x_triton():
    """x token-major in memory ((N, B, dim) transposed): read through its strides."""
    G.require("triton")
    x = (rand(197, 3, 192, dtype=torch.bfloat16) + 1).transpose(0, 1)
    check_qkv("triton", torch.bfloat16, (3, 197, 192, 3, 64, True, "affine"), x=x)


def test_qkv_projection_rejects_head_dim_not_multiple_of_8_triton():
    G.require("triton")
    from vit_kernels.triton import gemm

    x = rand(1, 4, 36, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head_dim = 36 // 3 = 12 is not a multiple of 8"):
        gemm.qkv_projection_forward(x, rand(108, 36, dtype=torch.float32), None, num_heads=3, scale=1.0)


# ------------------------------------------------------- CUDA: patch embedding and MLP at ViT-B shapes
# (Both backends at small shapes: tests/test_patch_embed.py, tests/test_mlp.py.)
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("config", [0, 1])
def test_vit_b_patch_embed_and_mlp_shapes_cuda(dtype, config):
    """ViT-B/16 widths on one image: patch embedding 224 px and one MLP (768 -> 3072 -> 768)."""
    G.require("cuda")
    from vit_kernels.cuda import ops as cuda_ops

    images = rand(1, 3, 224, 224, dtype=dtype)
    w = rand(768, 3, 16, 16, dtype=dtype, scale=768**-0.5)
    b, cls, pos = rand(768, dtype=dtype), rand(768, dtype=dtype), rand(197, 768, dtype=dtype)
    got = cuda_ops.patch_embed_forward(images, w, b, patch_size=16, pos_embed=pos, cls_token=cls, config=config)
    want = R.patch_embed(d64(images), d64(w), d64(b), patch_size=16, pos_embed=d64(pos), cls_token=d64(cls))
    assert_close(got, want, R.patch_embed(images, w, b, patch_size=16, pos_embed=pos, cls_token=cls))
    x = got
    nw, nb = rand(768, dtype=dtype), rand(768, dtype=dtype)
    w1, b1 = rand(3072, 768, dtype=dtype, scale=768**-0.5), rand(3072, dtype=dtype)
    w2, b2 = rand(768, 3072, dtype=dtype, scale=3072**-0.5), rand(768, dtype=dtype)
    y = cuda_ops.layernorm_gelu_mlp_forward(
        x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate="none", residual=x, config=config
    )
    want = R.layernorm_gelu_mlp(d64(x), d64(nw), d64(nb), d64(w1), d64(b1), d64(w2), d64(b2), eps=1e-6, residual=d64(x))
    base = R.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6, approximate="none", residual=x, layer_scale=None)
    assert_close(y, want, base)
    assert math.isfinite(y.float().abs().max().item())


# ------------------------------------------ Triton: int64 offsets in the compiled kernel (no interpreter)
_TTIR_SCRIPT = textwrap.dedent("""
    import re, sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vit_kernels.triton import gemm
    specs = [gemm.aot_spec("rows", torch.float16, norm=gemm.NORM_AFFINE, has_bias=True, has_res=True, has_ls=True),
             gemm.aot_spec("qkv", torch.bfloat16, norm=gemm.NORM_AFFINE, has_bias=True, out_mode=gemm.OUT_QKV)]
    from vit_kernels.triton import patch_embed
    specs += [s for s in patch_embed.aot_specs() if s.constexprs["PREFIX"] and s.constexprs["HAS_POS"]][:1]
    for s in specs:
        k = triton.compile(ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": s.num_warps, "num_stages": s.num_stages})
        for line in k.asm["ttir"].splitlines():
            if "tt.addptr" in line:
                offset = line.split("tt.addptr")[1].split(",")[1].strip()
                print(s.kernel, offset, line.split(" : ")[-1].split(" loc(")[0])
""")


@pytest.mark.skipif(sys.platform != "linux", reason="AOT compilation needs Triton's Linux build")
def test_offsets_are_int64_in_compiled_kernel_triton():
    """Every 2-D pointer tile (A rows, weight, residual, output) and every per-row offset is
    addressed with i64 offsets, so batch * tokens * dim past 2^31 does not wrap. Dropping a
    .to(tl.int64) from the kernel turns one of these into i32 and fails here."""
    G.require("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for name in ("rows", "qkv", "gemm_patch_embed"):
        tiles = [ln for ln in lines if ln.startswith(name) and re.search(r"tensor<\d+x\d+x!tt.ptr", ln)]  # 2-D
        assert len(tiles) >= 4, f"{name}: expected the A, W, output pointer tiles, got {tiles}"
        # The only 32-bit 2-D offsets allowed: the K loop's constant per-step advance (%cst).
        bad = [ln for ln in tiles if "xi64>" not in ln and not ln.split()[1].startswith("%cst")]
        assert not bad, f"{name}: pointer tiles with 32-bit offsets: {bad}"
        rows = [ln for ln in lines if ln.startswith(name) and "x1x!tt.ptr" in ln]  # per-row offsets
        assert rows and all("xi64>" in ln for ln in rows), rows


# The whole-model acceptance (2-layer ViT on backend="cuda") lives in tests/test_vit_backends.py.


def test_layernorm_stats_must_be_row_stats_rows():
    """The GEMM reads (mean, rstd) through one pointer, rstd M elements after mean, as row_stats lays
    them out: any other pair is refused before a launch (the output keeps its NaNs)."""
    from vit_kernels import testing
    from vit_kernels.triton.gemm import dense_forward
    from vit_kernels.triton.layernorm import row_stats

    x, w, nw = torch.randn(2, 5, 32), torch.randn(48, 32), torch.randn(32)
    mean, rstd = row_stats(x, 1e-6)
    out = torch.full((2, 5, 48), float("nan"))
    for bad in ((mean.clone(), rstd.clone()), (rstd, mean), (mean, rstd.double())):
        with pytest.raises(ValueError, match="stats: expected"):
            dense_forward(x, w, norm_weight=nw, stats=bad, out=out)
        assert out.isnan().all()
    dense_forward(x, w, norm_weight=nw, stats=(mean, rstd), out=out)
    oracle = F.linear(F.layer_norm(x.double(), (32,), nw.double(), eps=1e-6), w.double())
    testing.assert_close(out, oracle, F.linear(F.layer_norm(x, (32,), nw, eps=1e-6), w), name="out")
