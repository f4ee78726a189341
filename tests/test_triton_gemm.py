"""The Triton GEMM (vit_kernels.triton.gemm): linear_forward, qkv_projection_forward, row_stats.

Every result is checked against vit_kernels.reference in float64 under the tolerance rule, with
the oracle at the same dtype (plain PyTorch, not the torch path under test) as the baseline. Outputs start as NaN so unwritten elements fail.
"""
import itertools
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

pytest.importorskip("triton")
from vit_kernels.triton import gemm  # noqa: E402
from vit_kernels.triton.layernorm import row_stats  # noqa: E402

from conftest import DEVICE  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def d64(t):
    return None if t is None else t.double()


# ---------------------------------------------------------------------------------------------
# linear_forward: residual + layer_scale * (x W^T + b)

# (batch, tokens, in, out); the default list covers tokens 1/50/197/257/577, batch 1 and 3,
# ViT dims and odd ones (masks on M, N and K).
LINEAR_SHAPES = [(1, 1, 192, 384), (3, 50, 72, 200), (1, 197, 384, 192), (3, 257, 200, 72), (1, 577, 192, 192)]
VARIANTS = ["plain", "bias", "bias+res", "bias+res+ls", "res+ls"]


def linear_case(B, N, K, Nout, dtype, variant):
    x = randn(B, N, K, dtype=dtype)
    w = randn(Nout, K, dtype=dtype, scale=K ** -0.5)
    bias = randn(Nout, dtype=dtype) if "bias" in variant else None
    res = randn(B, N, Nout, dtype=dtype) if "res" in variant else None
    ls = randn(Nout, dtype=dtype, scale=0.5) if "ls" in variant else None
    return x, w, bias, res, ls


def check_linear(B, N, K, Nout, dtype, variant):
    x, w, bias, res, ls = linear_case(B, N, K, Nout, dtype, variant)
    out = nan_like((B, N, Nout), dtype)
    got = gemm.linear_forward(x, w, bias, residual=res, layer_scale=ls, out=out)
    assert got is out
    oracle = R.linear(d64(x), d64(w), d64(bias), residual=d64(res), layer_scale=d64(ls))
    assert_close(got, oracle, R.linear(x, w, bias, residual=res, layer_scale=ls))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(LINEAR_SHAPES)))
def test_linear(case, dtype):
    B, N, K, Nout = LINEAR_SHAPES[case]
    check_linear(B, N, K, Nout, dtype, VARIANTS[(case + DTYPES.index(dtype)) % len(VARIANTS)])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES + [(3, 577, 384, 384), (3, 1025, 192, 768)], ids=str)
def test_linear_full(shape, variant, dtype):
    check_linear(*shape, dtype, variant)


def test_linear_strided_inputs_and_2d():
    """x and residual read through their own strides (no copy): a slice of a wider tensor, and a
    token-major (N, B, dim) tensor seen as (B, N, dim); 2-D x works too."""
    dtype = torch.float16
    big = randn(3, 50, 256, dtype=dtype)
    x = big[:, :, 16:16 + 192]                            # stride (12800, 256, 1)
    res = randn(50, 3, 96, dtype=dtype).transpose(0, 1)    # stride (96, 288, 1)
    w, b, ls = randn(96, 192, dtype=dtype, scale=0.07), randn(96, dtype=dtype), randn(96, dtype=dtype)
    got = gemm.linear_forward(x, w, b, residual=res, layer_scale=ls, out=nan_like((3, 50, 96), dtype))
    oracle = R.linear(d64(x), d64(w), d64(b), residual=d64(res), layer_scale=d64(ls))
    assert_close(got, oracle, R.linear(x, w, b, residual=res, layer_scale=ls))
    x2 = randn(37, 72, dtype=dtype)
    w2 = randn(40, 72, dtype=dtype, scale=0.1)
    got = gemm.linear_forward(x2, w2, out=nan_like((37, 40), dtype))
    assert_close(got, R.linear(d64(x2), d64(w2)), F.linear(x2, w2))


def test_linear_op_dispatches_to_triton():
    x, w = randn(2, 5, 32, dtype=torch.float32), randn(48, 32, dtype=torch.float32)
    y = vk.linear(x, w, backend="triton")
    assert vk.last_decision("linear").backend == "triton"
    assert_close(y, R.linear(d64(x), d64(w)), F.linear(x, w))


def test_linear_rejects_uncollapsible_rows_and_bad_out():
    x = randn(4, 6, 5, 32, dtype=torch.float32).transpose(0, 1)   # leading dims not viewable as (-1, 5)
    w = randn(16, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: shape \(6, 4, 5, 32\) .* cannot be addressed"):
        gemm.linear_forward(x, w)
    with pytest.raises(ValueError, match=r"out: expected a torch.float32 tensor of shape \(3, 16\)"):
        gemm.linear_forward(randn(3, 32, dtype=torch.float32), w, out=nan_like((3, 17), torch.float32))


# ---------------------------------------------------------------------------------------------
# qkv_projection_forward: [LayerNorm ->] QKV -> (3, B, H, N, head_dim), Q scaled

def qkv_oracle(x, w, b, num_heads, scale, nw, nb, eps):
    B, N, _ = x.shape
    h = R.layer_norm(d64(x), d64(nw), d64(nb), eps) if nw is not None else d64(x)
    qkv = R.linear(h, d64(w), d64(b)).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return torch.cat([qkv[:1] * scale, qkv[1:]])


def qkv_baseline(x, w, b, num_heads, scale, nw, nb, eps):
    B, N, dim = x.shape
    h = F.layer_norm(x, (dim,), nw, nb, eps) if nw is not None else x
    qkv = F.linear(h, w, b).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return torch.cat([qkv[:1] * scale, qkv[1:]])


# (batch, tokens, heads, head_dim, norm); norm: "none" | "affine" | "weight"
QKV_CASES = [(1, 1, 3, 64, "affine"), (3, 50, 2, 80, "none"), (1, 197, 3, 64, "weight"),
             (3, 257, 2, 72, "affine"), (1, 577, 2, 64, "affine")]


def check_qkv(B, N, H, hd, norm, dtype, has_bias, x=None):
    dim = H * hd if x is None else x.shape[-1]
    x = randn(B, N, dim, dtype=dtype) * 2 + 0.5 if x is None else x
    w = randn(3 * H * hd, dim, dtype=dtype, scale=dim ** -0.5)
    b = randn(3 * H * hd, dtype=dtype) if has_bias else None
    nw = randn(dim, dtype=dtype) if norm != "none" else None
    nb = randn(dim, dtype=dtype) if norm == "affine" else None
    scale, eps = hd ** -0.5, 1e-6
    out = nan_like((3, B, H, N, hd), dtype)
    got = gemm.qkv_projection_forward(x, w, b, num_heads=H, scale=scale, norm_weight=nw, norm_bias=nb,
                                      eps=eps, out=out)
    assert got is out and got.shape == (3, B, H, N, hd)
    assert_close(got, qkv_oracle(x, w, b, H, scale, nw, nb, eps), qkv_baseline(x, w, b, H, scale, nw, nb, eps))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(QKV_CASES)))
def test_qkv_projection(case, dtype):
    check_qkv(*QKV_CASES[case], dtype, has_bias=(case + DTYPES.index(dtype)) % 2 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("norm", ["none", "affine", "weight"])
@pytest.mark.parametrize("shape", [(1, 1, 3, 64), (3, 50, 2, 80), (3, 197, 6, 64), (1, 257, 2, 72),
                                   (3, 577, 3, 64), (1, 1025, 2, 64)], ids=str)
def test_qkv_projection_full(shape, norm, has_bias, dtype):
    check_qkv(*shape, norm, dtype, has_bias)


def test_qkv_projection_layout_and_scaling():
    """Each of q, k, v lands at [which, b, h, t, :] and only q is scaled: checked element by
    element against the unfused projection, with a scale far from 1."""
    B, N, H, hd, dim = 2, 9, 3, 16, 40
    x, w, b = randn(B, N, dim, dtype=torch.float32), randn(3 * H * hd, dim, dtype=torch.float32), \
        randn(3 * H * hd, dtype=torch.float32)
    got = gemm.qkv_projection_forward(x, w, b, num_heads=H, scale=0.125, out=nan_like((3, B, H, N, hd),
                                                                                       torch.float32))
    y = R.linear(d64(x), d64(w), d64(b))                   # (B, N, 3 * H * hd)
    for which, bb, h, t in itertools.product(range(3), range(B), range(H), range(N)):
        cols = y[bb, t, which * H * hd + h * hd: which * H * hd + (h + 1) * hd]
        expect = cols * (0.125 if which == 0 else 1.0)
        torch.testing.assert_close(got[which, bb, h, t].double(), expect, rtol=1e-5, atol=1e-5)


def test_qkv_projection_strided_x():
    """x token-major in memory ((N, B, dim) transposed): read through its strides."""
    x = (randn(197, 3, 192, dtype=torch.bfloat16) + 1).transpose(0, 1)
    check_qkv(3, 197, 3, 64, "affine", torch.bfloat16, True, x=x)


def test_qkv_projection_rejects_head_dim_not_multiple_of_8():
    x = randn(1, 4, 36, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head_dim = 36 // 3 = 12 is not a multiple of 8"):
        gemm.qkv_projection_forward(x, randn(108, 36, dtype=torch.float32), None, num_heads=3, scale=1.0)


# ---------------------------------------------------------------------------------------------
# row_stats

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", [(1, 192), (197, 200), (3 * 257, 384), (50, 1000)])
def test_row_stats(rows, dim, dtype):
    x = (randn(rows, dim, dtype=torch.float32) * 3 + 100).to(dtype)   # a large mean: no cancellation
    mean, rstd = row_stats(x, 1e-6)
    x64 = x.double()
    m64 = x64.mean(-1)
    r64 = 1 / torch.sqrt(((x64 - m64[:, None]) ** 2).mean(-1) + 1e-6)
    assert mean.dtype == rstd.dtype == torch.float32
    assert_close(mean, m64, floor=1e-6)
    assert_close(rstd, r64, floor=1e-6 * r64.abs().max().item())


# ---------------------------------------------------------------------------------------------
# int64 offsets: compile the kernel ahead of time (no interpreter) and read its TTIR

_TTIR_SCRIPT = textwrap.dedent("""
    import re, sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vit_kernels.triton import gemm
    specs = [gemm.aot_spec("rows", torch.float16, norm=1, has_bias=True, has_res=True, has_ls=True),
             gemm.aot_spec("qkv", torch.bfloat16, norm=1, has_bias=True, out_mode=gemm.OUT_QKV)]
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
def test_offsets_are_int64_in_compiled_kernel():
    """Every 2-D pointer tile (A rows, weight, residual, output) and every per-row offset is
    addressed with i64 offsets, so batch * tokens * dim past 2^31 does not wrap. Dropping a
    .to(tl.int64) from the kernel turns one of these into i32 and fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for name in ("rows", "qkv", "gemm_patch_embed"):
        tiles = [ln for ln in lines if ln.startswith(name) and re.search(r"tensor<\d+x\d+x!tt.ptr", ln)]  # 2-D
        assert len(tiles) >= 4, f"{name}: expected the A, W, output pointer tiles, got {tiles}"
        # The only 32-bit 2-D offsets allowed: the K loop's constant per-step advance (%cst).
        bad = [ln for ln in tiles if "xi64>" not in ln and not ln.split()[1].startswith("%cst")]
        assert not bad, f"{name}: pointer tiles with 32-bit offsets: {bad}"
        rows = [ln for ln in lines if ln.startswith(name) and "x1x!tt.ptr" in ln]   # per-row offsets
        assert rows and all("xi64>" in ln for ln in rows), rows


def test_float64_refused_before_launch():
    """float64 passes the ops' checks but not the Triton GEMM: backend='triton' names the dtype."""
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.linear(x, w, backend="triton")
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.layernorm_gelu_mlp(x, None, None, w, None, w.t().contiguous(), None, backend="triton")
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the Triton GEMM"):
        vk.patch_embed(torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64),
                       patch_size=2, backend="triton")
