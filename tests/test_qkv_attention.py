"""qkv_attention ([LayerNorm ->] QKV projection -> attention, heads concatenated) on every fused backend
against the float64 oracle under the tolerance rule, outputs NaN-filled (tests/poison.py; the Triton launcher
also gets a NaN-filled `out` it must return): the Triton launcher (vit_kernels.triton.qkv_attention, both
paths: the single kernel and the split path; the interpreter on CPU tensors) and the CUDA wrapper
(vit_kernels.cuda.ops: the QKV GEMM with LayerNorm on load and a head-split epilogue writes (3, B, H, N, hd),
Q pre-scaled; the attention kernel reads it in place and writes (B, N, H*hd); the host emulator on CPU tensors).

One test body per behaviour, parametrized over the backends; what only one backend has ends in _triton /
_cuda.
"""

import itertools

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.testing import assert_close
from vit_kernels.triton.aot import ptr_type
from vit_kernels.dtypes import SHORT_NAMES

from conftest import DEVICE  # noqa: E402
from attention_cases import compile_ttir, require, stride_args_widened  # noqa: E402
from poison import poison_empty  # noqa: E402

qkv_mod = pytest.importorskip("vit_kernels.triton.qkv_attention")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


DTYPES = SHORT_NAMES  # vit_kernels.dtypes: fp32, fp16, bf16

# (batch, tokens, head_dim, dtype, layernorm, bias, path); heads = 2, dim = 80 (not a multiple
# of the kernel's 32-wide reduction chunk). Triton: every value of each axis appears at least once.
TRITON_CASES = [
    (1, 1, 64, "fp32", True, True, "single_kernel"),
    (3, 50, 80, "bf16", False, True, "single_kernel"),
    (1, 197, 72, "fp16", True, False, "single_kernel"),
    (3, 197, 64, "bf16", True, True, "single_kernel"),
    (1, 197, 32, "bf16", True, True, "single_kernel"),  # admitted once compiled as launched (no spills)
    (1, 257, 80, "fp32", True, True, "split"),
    (1, 577, 64, "fp16", False, False, "split"),
    # Beyond 256 tokens the single kernel holds K and V as a main plus a tail tile.
    (1, 257, 64, "fp16", True, True, "single_kernel"),  # 256 + 64 rows
    (3, 257, 80, "bf16", False, True, "single_kernel"),  # 256 + 64 rows, head_dim padded to 128
    (1, 577, 64, "bf16", True, True, "single_kernel"),  # 512 + 128 rows
    (1, 257, 32, "fp32", True, True, "single_kernel"),  # 256 + 64 rows in fp32
    (3, 50, 72, "fp32", True, False, "split"),
    (3, 1, 80, "bf16", False, True, "split"),
]
# CUDA (the emulator is slow): fewer cases, the split path (its only one).
CUDA_CASES = [
    (1, 50, 64, "fp16", True, True, "split"),
    (3, 197, 80, "bf16", True, False, "split"),
    (3, 1, 72, "fp32", False, True, "split"),
    (1, 257, 72, "fp16", False, False, "split"),
    (1, 50, 80, "fp32", True, True, "split"),
    (3, 50, 64, "bf16", False, True, "split"),
]
DEFAULT_CASES = [("triton", *c) for c in TRITON_CASES] + [("cuda", *c) for c in CUDA_CASES]
SLOW_CASES = [
    ("triton", *c)
    for c in itertools.product(
        (1, 3),
        (1, 50, 197, 257, 385, 512, 577, 768),
        (64, 72, 80),
        DTYPES,
        (False, True),
        (False, True),
        ("single_kernel", "split"),
    )
    if c[-1] == "split" or qkv_mod.single_kernel_fits(DTYPES[c[3]], c[1], c[2], 90)
] + [
    ("cuda", *c, True, "split")
    for c in itertools.product((1, 3), (1, 50, 197, 257, 577), (64, 72, 80), DTYPES, (False, True))
]


def make_args(B, N, head_dim, dtype, norm, bias, heads=2, dim=80):
    inner = heads * head_dim
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(B, N, dim, **f64) * 2 + 0.5
    w = torch.randn(3 * inner, dim, **f64) * dim**-0.5
    args = dict(
        qkv_bias=torch.randn(3 * inner, **f64) * 0.5 if bias else None,
        norm_weight=1 + 0.3 * torch.randn(dim, **f64) if norm else None,
        norm_bias=0.2 * torch.randn(dim, **f64) if norm else None,
    )
    cast = {k: (v.to(DTYPES[dtype]) if v is not None else None) for k, v in args.items()}
    return x.to(DTYPES[dtype]), w.to(DTYPES[dtype]), cast


def check_qkv(backend, B, N, head_dim, dtype, norm, bias, path, heads=2):
    require(backend)
    x, w, kw = make_args(B, N, head_dim, dtype, norm, bias, heads)
    scale = head_dim**-0.5
    args = dict(num_heads=heads, scale=scale, norm_weight=kw["norm_weight"], norm_bias=kw["norm_bias"], eps=1e-6)
    if backend == "triton":
        out = torch.full((B, N, heads * head_dim), float("nan"), dtype=x.dtype, device=x.device)
        got = qkv_mod.qkv_attention_forward(x, w, kw["qkv_bias"], **args, path=path, out=out)
        assert got is out
    else:
        from vit_kernels.cuda import ops as cuda_ops

        assert path == "split"  # the CUDA wrapper's one path
        got = cuda_ops.qkv_attention_forward(x, w, kw["qkv_bias"], **args)
    d64 = {k: (v.double() if v is not None else None) for k, v in kw.items()}
    oracle = reference.qkv_attention(
        x.double(),
        w.double(),
        d64["qkv_bias"],
        num_heads=heads,
        scale=scale,
        norm_weight=d64["norm_weight"],
        norm_bias=d64["norm_bias"],
        eps=1e-6,
    )
    baseline = reference.qkv_attention(
        x,
        w,
        kw["qkv_bias"],
        num_heads=heads,
        scale=scale,
        norm_weight=kw["norm_weight"],
        norm_bias=kw["norm_bias"],
        eps=1e-6,
    )
    c = assert_close(got, oracle, baseline)
    if x.dtype == torch.float32:  # fp32 must be accurate to 1e-4 relative to float64
        assert c.max_abs_err <= 1e-4 * oracle.abs().max().item(), str(c)


@pytest.mark.parametrize("backend,B,N,head_dim,dtype,norm,bias,path", DEFAULT_CASES)
def test_qkv_attention(backend, B, N, head_dim, dtype, norm, bias, path):
    check_qkv(backend, B, N, head_dim, dtype, norm, bias, path)


@pytest.mark.slow
@pytest.mark.parametrize("backend,B,N,head_dim,dtype,norm,bias,path", SLOW_CASES)
def test_qkv_attention_full(backend, B, N, head_dim, dtype, norm, bias, path):
    check_qkv(backend, B, N, head_dim, dtype, norm, bias, path)


def test_public_op_runs_the_split_path_cuda():
    """vk.qkv_attention(backend="cuda"): the decision is ("cuda", "split") and the result the oracle's."""
    require("cuda")
    x, w, kw = make_args(1, 50, 64, "fp16", True, True)
    out = vk.qkv_attention(x, w, **kw, num_heads=2, eps=1e-6, backend="cuda")
    d = vk.last_decision("qkv_attention")
    assert (d.backend, d.path) == ("cuda", "split")
    d64 = {k: v.double() for k, v in kw.items()}
    oracle = reference.qkv_attention(x.double(), w.double(), **d64, num_heads=2, eps=1e-6)
    assert_close(out, oracle, reference.qkv_attention(x, w, **kw, num_heads=2, eps=1e-6))


def test_op_records_the_path_it_chose_triton():
    """Untimed (CPU tensors), the op takes the split path even where the single kernel fits;
    path="single_kernel" runs the single kernel."""
    for N, dtype, path, expected in (
        (50, "fp16", None, "split"),
        (577, "fp16", None, "split"),
        (257, "fp32", None, "split"),
        (50, "fp16", "single_kernel", "single_kernel"),
    ):
        x, w, kw = make_args(1, N, 64, dtype, True, True)
        out = vk.qkv_attention(
            x,
            w,
            kw["qkv_bias"],
            num_heads=2,
            norm_weight=kw["norm_weight"],
            norm_bias=kw["norm_bias"],
            backend="triton",
            path=path,
        )
        d = vk.last_decision("qkv_attention")
        assert (d.backend, d.path) == ("triton", expected)
        assert_close(
            out,
            reference.qkv_attention(
                x.double(),
                w.double(),
                kw["qkv_bias"].double(),
                num_heads=2,
                norm_weight=kw["norm_weight"].double(),
                norm_bias=kw["norm_bias"].double(),
            ),
            reference.qkv_attention(
                x,
                w,
                kw["qkv_bias"],
                num_heads=2,
                scale=64**-0.5,
                norm_weight=kw["norm_weight"],
                norm_bias=kw["norm_bias"],
                eps=1e-6,
            ),
        )
    x, w, kw = make_args(1, 50, 64, "fp16", False, False)
    vk.qkv_attention(x, w, num_heads=2, backend="triton", path="split")
    assert vk.last_decision("qkv_attention").path == "split"


def test_choose_path_is_split_untimed_triton():
    """choose_path is the untimed default: split, also where the single kernel fits."""
    for N, hd, dtype in (
        (50, 64, torch.float16),
        (197, 64, torch.bfloat16),
        (577, 64, torch.float16),
        (1025, 64, torch.float16),
        (197, 64, torch.float32),
    ):
        assert qkv_mod.choose_path(torch.empty(1, N, 8, dtype=dtype), 2, hd) == "split"


def test_single_kernel_fits_rule_triton():
    def fits(N, hd, dtype, arch=90):
        return qkv_mod.single_kernel_fits(dtype, N, hd, arch)

    assert fits(197, 64, torch.float16)  # K + V: 2 * 256 * 64 * 2 = 64 KB
    assert fits(197, 80, torch.bfloat16)  # 2 * 256 * 128 * 2 = 128 KB
    assert fits(257, 64, torch.float16)  # 2 * (256 + 64) * 64 * 2 = 80 KB
    assert fits(577, 64, torch.bfloat16)  # 2 * (512 + 128) * 64 * 2 = 160 KB
    assert fits(768, 64, torch.float16)  # 512 + 256 rows: 192 KB
    assert not fits(769, 64, torch.float16)  # 512 + 512 rows: 256 KB
    assert fits(384, 80, torch.float16)  # 2 * (256 + 128) * 128 * 2 = 192 KB
    assert not fits(385, 80, torch.float16)
    assert not fits(257, 16, torch.float16)  # BLOCK_D 16 spilled beyond 256 tokens
    assert not fits(197, 64, torch.float32)  # fp32 counts twice: 256 KB
    assert not fits(197, 16, torch.float32)  # SPILLING: spills as launched
    assert fits(197, 32, torch.bfloat16)  # no spills as launched (it did unspecialized)
    assert fits(50, 64, torch.float32)
    assert not fits(197, 256, torch.float16)
    assert not fits(1025, 64, torch.float16)
    assert fits(197, 64, torch.float16, 80)
    assert fits(512, 64, torch.float16, 80)  # 128 KB within sm_80's 163 KB
    assert not fits(577, 64, torch.float16, 80)  # 160 KB + headroom: too much
    assert not fits(197, 64, torch.float16, 75)
    assert [qkv_mod.kv_layout(t) for t in (1, 197, 256, 257, 320, 321, 385, 512, 513, 577, 768)] == [
        (64, 0),
        (256, 0),
        (256, 0),
        (256, 64),
        (256, 64),
        (256, 128),
        (256, 256),
        (512, 0),
        (512, 64),
        (512, 128),
        (512, 256),
    ]


def test_aot_specs_cover_every_admitted_layout_triton():
    """Every (dtype, BLOCK_D, kv_layout, block config, arch) single_kernel_fits admits is compiled by
    `inspect` (aot_specs), so its zero-spill check covers whatever the single kernel can launch."""
    from vit_kernels.triton.attention import block_d

    compiled = {
        (
            s.signature["x_ptr"],
            s.constexprs["BLOCK_D"],
            s.constexprs["N_MAIN"],
            s.constexprs["N_TAIL"],
            s.constexprs["BLOCK_K"],
            s.num_warps,
            arch,
        )
        for s in qkv_mod.aot_specs()
        for arch in s.archs
    }
    admitted = set()
    for dtype in qkv_mod.DTYPES:
        for hd in range(16, 257, 8):
            for tokens in range(1, 1100):
                for arch in (80, 90):
                    if qkv_mod.single_kernel_fits(dtype, tokens, hd, arch):
                        _, bk, nw, _ = qkv_mod.kernel_config(tokens)
                        admitted.add((ptr_type(dtype), block_d(hd), *qkv_mod.kv_layout(tokens), bk, nw, arch))
    assert admitted - compiled == set()
    assert {a[2:4] for a in admitted} >= {(256, 64), (512, 128)}


def test_bad_input_before_launch_triton():
    x, w, kw = make_args(1, 1025, 64, "fp16", False, False)
    with pytest.raises(ValueError, match=r"path: expected one of"):
        vk.qkv_attention(x, w, num_heads=2, backend="triton", path="fused")
    with pytest.raises(ValueError, match=r"path: 'single_kernel' cannot hold K and V of 1025 tokens"):
        vk.qkv_attention(x, w, num_heads=2, backend="triton", path="single_kernel")
    x = torch.randn(1, 5, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim=12 is not supported"):
        vk.qkv_attention(x, torch.randn(72, 24, device=DEVICE), num_heads=2, backend="triton")
    with pytest.raises(ValueError, match=r"head_dim=12 is not supported by the Triton attention kernels"):
        qkv_mod.qkv_attention_forward(x, torch.randn(72, 24, device=DEVICE), None, num_heads=2, scale=1.0)
    with pytest.raises(ValueError, match=r"x: expected a 16-byte aligned data pointer"):
        x_odd = torch.randn(1, 5, 27, device=DEVICE)[..., :24]
        qkv_mod.qkv_attention_forward(
            x_odd, torch.randn(96, 24, device=DEVICE), None, num_heads=2, scale=1.0, path="single_kernel"
        )


@pytest.mark.parametrize(
    "dtype,head_dim,tokens,n_dots",
    [
        (torch.float32, 80, 64, 5),  # Q, K, V projections, q k^T, p v (128 tokens do not fit in fp32)
        (torch.bfloat16, 80, 128, 5),
        (torch.float32, 32, 257, 9),  # with a tail tile: its K and V projections, q k_t^T, p_t v_t
    ],
)
def test_aot_ttir_int64_offsets_and_fp32_precision_triton(dtype, head_dim, tokens, n_dots):
    ttir = compile_ttir("vit_kernels.triton.qkv_attention", f"m.aot_spec(torch.{str(dtype)[6:]}, {head_dim}, {tokens})")
    stride_args_widened(ttir, ["stride_xb", "stride_xn", "stride_wn", "stride_ob", "stride_on"])
    dots = [line for line in ttir.splitlines() if "tt.dot" in line]
    assert len(dots) == n_dots
    if dtype == torch.float32:
        assert all("inputPrecision = tf32x3" in line for line in dots), dots


@pytest.mark.parametrize("path", ["single_kernel", "split"])
def test_dominant_key_in_the_tail_tile_triton(path):
    """A key ~150 logits above the rest, in the single kernel's tail tile (257 tokens = 256 + 64
    rows; key 256 is the tail's first row): the softmax's max must include the tail tile or exp
    overflows. Q = K = V = x (identity projections), every row sharing a unit component, row 256
    60x larger."""
    torch.manual_seed(0)
    N, dim = 257, 64
    x = torch.randn(1, N, dim, dtype=torch.float64) * 0.05
    x[..., 0] += 1.0
    x[0, 256, 0] = 60.0  # the tail tile's first row
    x = x.to(device=DEVICE, dtype=torch.float16)
    w = torch.cat([torch.eye(dim)] * 3).to(device=DEVICE, dtype=torch.float16)
    scale = 2.5  # scores: ~2.5 for ordinary keys, ~150 for key 256
    out = vk.qkv_attention(x, w, None, num_heads=1, scale=scale, backend="triton", path=path)
    assert vk.last_decision("qkv_attention").path == path
    oracle = reference.qkv_attention(x.double(), w.double(), None, num_heads=1, scale=scale)
    baseline = reference.qkv_attention(x, w, None, num_heads=1, scale=scale)
    assert torch.isfinite(out).all(), "the tail tile's max was not taken: exp overflowed"
    assert_close(out, oracle, baseline, name=f"dominant tail key, {path}")


@pytest.mark.parametrize("path", ["single_kernel", "split"])
def test_layernorm_large_eps_and_near_constant_rows_triton(path):
    """LayerNorm inside the QKV projection with eps = 1 (eps matters: it must sit under the square
    root) and rows of tiny spread around a large mean, on both paths, against the float64 oracle."""
    torch.manual_seed(1)
    N, dim, heads = 50, 64, 2
    x = torch.randn(1, N, dim, dtype=torch.float64)
    x[0, :10] = 300.0 + 1e-3 * x[0, :10]  # near-constant rows
    x = x.to(device=DEVICE, dtype=torch.float32)
    w = (torch.randn(3 * dim, dim, dtype=torch.float64) * dim**-0.5).to(device=DEVICE, dtype=torch.float32)
    nw = (1 + 0.1 * torch.randn(dim, dtype=torch.float64)).to(device=DEVICE, dtype=torch.float32)
    nb = (0.1 * torch.randn(dim, dtype=torch.float64)).to(device=DEVICE, dtype=torch.float32)
    for eps in (1.0, 1e-6):
        out = vk.qkv_attention(
            x, w, None, num_heads=heads, norm_weight=nw, norm_bias=nb, eps=eps, backend="triton", path=path
        )
        oracle = reference.qkv_attention(
            x.double(), w.double(), None, num_heads=heads, norm_weight=nw.double(), norm_bias=nb.double(), eps=eps
        )
        baseline = reference.qkv_attention(x, w, None, num_heads=heads, norm_weight=nw, norm_bias=nb, eps=eps)
        assert_close(out, oracle, baseline, name=f"{path} eps={eps}")
