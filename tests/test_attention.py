"""Flash attention on every fused backend against the float64 oracle under the tolerance rule, outputs
NaN-filled before every launch: the Triton kernel (vit_kernels/triton/attention.py, the interpreter on
CPU), sm_90's tensor-descriptor Triton kernel (vit_kernels/triton/attention_tma.py, variant "triton_tma",
the interpreter on CPU: Triton 3.8 runs tensor descriptors there, clipped at the edges as TMA does) and
the CUDA C++ kernel (csrc/attention, the host emulator on CPU tensors, or the GPU build on CUDA
tensors). qkv_attention (both backends): tests/test_qkv_attention.py (the TMA kernel in its split path:
here). Helpers: tests/attention_cases.py.

One test body per behaviour, parametrized over the backends; what only one backend has (its argument
messages, its compiled code, the CUDA kernel's padded head dims and fp32 split) ends in _triton / _cuda.
"""

import inspect

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.arch import shared_limits_by_name
from vit_kernels.triton.aot import spec_key
from vit_kernels.testing import assert_close

from attention_cases import (
    BACKENDS,
    DTYPES,
    TMA_CONFIG,
    VARIANTS,
    backend_of,
    check_attention,
    check_lse,
    compile_ttir,
    flash_forward,
    make_qkv,
    rand,
    require,
    stride_args_widened,
    variant_dtypes,
)
from conftest import DEVICE
from poison import poison_empty
from layouts import Launches


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


def ids(v):
    if isinstance(v, torch.dtype):
        return str(v).split(".")[-1]
    if isinstance(v, tuple):
        return "-".join(ids(x) for x in v)
    return str(v)


# -------------------------------------------------------------------------------- flash_attention
# (batch, heads, tokens, head_dim, dtype). Triton: every value of each axis at least once; CUDA: every
# token count x head dim x dtype once, batch alternating; triton_tma (+ its config): every token count x
# head dim x dtype once, batch alternating, the configs in turn (each meets 3 or 4 of the token counts).
# attention_tma.CONFIGS, asserted below: (BLOCK_M, BLOCK_N, num_warps, num_stages, TAIL_N)
TMA_CONFIGS = [(128, 64, 4, 3, 16), (128, 64, 8, 3, 16), (128, 128, 8, 2, 16), (128, 64, 8, 3, 0), (128, 128, 8, 2, 0)]
# the configs with structure fields (ORDER, OVERLAP, WARP_SPEC), issue 11's study of tutorial 06 and FA3
TMA_STRUCTURE_CONFIGS = [(128, 64, 8, 3, 16, 1, 0, 0), (128, 64, 8, 3, 16, 1, 1, 0), (128, 64, 4, 3, 0, 1, 0, 1)]
TMA_STRUCTURE_CONFIGS += [(128, 128, 4, 2, 0, 1, 0, 1)]
DEFAULT_CASES = {
    "triton": [
        (1, 2, 1, 64, torch.float32),
        (3, 2, 50, 80, torch.bfloat16),
        (1, 2, 197, 72, torch.float16),
        (3, 1, 257, 64, torch.bfloat16),
        (1, 1, 577, 80, torch.float16),
        (3, 2, 50, 72, torch.float32),
        (1, 2, 197, 64, torch.float32),
    ],
    "cuda": [
        (1 if (i + j) % 2 else 3, 2, n, d, dt)
        for i, n in enumerate([1, 50, 197, 257])
        for j, d in enumerate([64, 72, 80])
        for dt in DTYPES
    ],
    "triton_tma": [
        (1 if (i + j + k) % 2 else 3, 2, n, d, dt, TMA_CONFIGS[(2 * i + j + k) % 5])
        for i, n in enumerate([1, 50, 197, 257])
        for j, d in enumerate([64, 72, 80])
        for k, dt in enumerate([torch.float16, torch.bfloat16])
    ],
}
SLOW_CASES = {
    "triton": [
        (b, 2, n, d, dt)
        for b in (1, 3)
        for n in (1, 50, 197, 257, 577, 1025)
        for d in (16, 64, 72, 80, 128, 256)
        for dt in DTYPES
    ],
    "cuda": [
        (b, 2, n, d, dt)
        for b in (1, 3)
        for n in (1, 50, 197, 257, 577)
        for d in (64, 72, 80)
        for dt in DTYPES
        if (b, 2, n, d, dt) not in DEFAULT_CASES["cuda"]
    ],
    "triton_tma": [  # the configs in turn: each meets every token count and head dim
        (b, 2, n, d, dt, TMA_CONFIGS[(b + i + j) % 5])
        for b in (1, 3)
        for i, n in enumerate((1, 50, 197, 257, 577, 1025))
        for j, d in enumerate((16, 48, 64, 72, 80, 128))
        for dt in (torch.float16, torch.bfloat16)
    ],
}


def run_flash(backend, B, H, N, D, dtype, tma_config=None):
    """The launcher / wrapper into NaN-filled out and lse; out and lse against float64; fp32 output
    within 1e-4 of the output's size."""
    require(backend)
    q, k, v = make_qkv(B, H, N, D, dtype)
    scale = D**-0.5
    out, lse = flash_forward(backend, q, k, v, scale, tma_config=tma_config)
    c = check_attention(out, q, k, v, scale)
    check_lse(lse, q, k, scale)
    if dtype == torch.float32:  # fp32 must be accurate to 1e-4 relative to float64
        oracle = reference.flash_attention(q.double(), k.double(), v.double(), scale=scale)
        assert c.max_abs_err <= 1e-4 * oracle.abs().max().item(), str(c)


@pytest.mark.parametrize("backend,case", [(b, c) for b in VARIANTS for c in DEFAULT_CASES[b]], ids=ids)
def test_flash_attention(backend, case):
    run_flash(backend, *case)


@pytest.mark.slow
@pytest.mark.parametrize("backend,case", [(b, c) for b in VARIANTS for c in SLOW_CASES[b]], ids=ids)
def test_flash_attention_full(backend, case):
    run_flash(backend, *case)


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in VARIANTS for d in variant_dtypes(b)], ids=ids)
def test_lse(backend, dtype):
    """The row log-sum-exp (B, H, N) fp32, natural log, kept for a backward pass, over several key tiles."""
    require(backend)
    q, k, v = make_qkv(1, 3, 70, 64, dtype)
    out, lse = flash_forward(backend, q, k, v, 64**-0.5)
    check_attention(out, q, k, v, 64**-0.5)
    check_lse(lse, q, k, 64**-0.5)


# (q_tokens, kv_tokens, head_dim, scale): fewer or more keys than queries, a single key, a negative scale
CROSS_CASES = [(50, 197, 64, 0.3), (197, 33, 80, -0.2), (33, 130, 64, 0.3), (65, 1, 64, 0.3), (1, 257, 64, 0.3)]


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in VARIANTS for d in variant_dtypes(b)], ids=ids)
def test_cross_attention_token_counts_and_scale(backend, dtype):
    """q_tokens != kv_tokens, a single key, and an explicit scale."""
    require(backend)
    for nq, nk, d, scale in CROSS_CASES:
        q, k, v = make_qkv(2 if nq == 50 else 1, 2, nq, d, dtype, n_kv=nk)
        out, lse = flash_forward(backend, q, k, v, scale)
        check_attention(out, q, k, v, scale, name=f"nq={nq} nk={nk} scale={scale}")
        check_lse(lse, q, k, scale)


@pytest.mark.parametrize("backend", VARIANTS)
def test_strided_inputs_and_output(backend):
    """q, k, v as views of one (B, N, 3, H, D) qkv buffer; the output written straight into a
    (B, N, H*D) buffer viewed as (B, H, N, D)."""
    require(backend)
    B, N, H, D = 3, 50, 2, 72
    qkv = rand(B, N, 3, H, D, dtype=torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    buf = torch.full((B, N, H * D), float("nan"), dtype=torch.float16, device=DEVICE)
    out, _ = flash_forward(backend, q, k, v, D**-0.5, out=buf.view(B, N, H, D).transpose(1, 2))
    check_attention(out, q, k, v, D**-0.5)
    oracle = reference.flash_attention(q.double(), k.double(), v.double())
    assert_close(
        buf,
        oracle.transpose(1, 2).reshape(B, N, H * D),
        reference.flash_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_dispatches_to_the_backend(backend):
    require(backend)
    q, k, v = make_qkv(1, 2, 50, 64, torch.float32)
    out = vk.flash_attention(q, k, v, backend=backend)
    assert vk.last_decision("flash_attention").backend == backend
    assert out.shape == q.shape and out.dtype == q.dtype
    check_attention(out, q, k, v, 64**-0.5)


@pytest.mark.parametrize("backend", VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 72])
def test_offset_views_and_untouched_neighbours(backend, head_dim):
    """q, k, v as views that start inside a larger buffer (a nonzero 16-byte aligned offset, token
    stride > head_dim) whose columns next to the view are NaN; the output a view of the same kind inside a
    NaN buffer: those columns are neither read (the result stays finite) nor written (they stay NaN). For
    the TMA kernel at head_dim 72 its 16-column chunk runs past the view: clipped, not read."""
    require(backend)
    B, H, N, D = 2, 2, 70, head_dim

    def view(t):  # (B, H, N + 3, D + 16) -> tokens 2 .. N + 2, columns 8 .. 8 + D
        return t[:, :, 2 : N + 2, 8 : 8 + D]

    bufs = []
    for _ in range(3):
        buf = torch.full((B, H, N + 3, D + 16), float("nan"), dtype=torch.float16, device=DEVICE)
        view(buf).copy_(rand(B, H, N, D, dtype=torch.float16))
        bufs.append(buf)
    q, k, v = (view(b) for b in bufs)
    assert q.storage_offset() > 0 and q.data_ptr() % 16 == 0 and q.stride(2) > D
    obuf = torch.full((B, H, N + 3, D + 16), float("nan"), dtype=torch.float16, device=DEVICE)
    out, _ = flash_forward(backend, q, k, v, D**-0.5, out=view(obuf))
    check_attention(out, q, k, v, D**-0.5)
    outside = torch.ones_like(obuf, dtype=torch.bool)
    view(outside).fill_(False)
    assert torch.isnan(obuf[outside]).all(), "an element outside the output view was written"


@pytest.mark.parametrize("backend", VARIANTS)
def test_no_query_tokens_launches_nothing(backend):
    require(backend)
    q = rand(2, 2, 0, 64, dtype=torch.float16)
    k = rand(2, 2, 7, 64, dtype=torch.float16)
    assert vk.flash_attention(q, k, k, scale=0.125, backend=backend_of(backend)).shape == (2, 2, 0, 64)
    out, _ = flash_forward(backend, q, k, k, 0.125)
    assert out.shape == (2, 2, 0, 64)


# -------------------------------------------------------------------------------- Triton only
def test_bad_input_before_launch_triton():
    require("triton")
    from vit_kernels.triton import attention

    q = torch.randn(1, 2, 5, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim=12 is not supported .*\(expected a multiple of 8 from 16 to 256\)"):
        attention.flash_attention_forward(q, q, q, 1.0)
    q = torch.randn(1, 2, 5, 264, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim=264 is not supported by the Triton attention kernels"):
        attention.flash_attention_forward(q, q, q, 1.0)
    q = torch.randn(1, 2, 5, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"k: expected at least one key/value token"):
        attention.flash_attention_forward(q, q[:, :, :0], q[:, :, :0], 1.0)
    storage = torch.randn(1 * 2 * 5 * 68, device=DEVICE)
    misaligned = storage.as_strided((1, 2, 5, 64), (2 * 5 * 68, 5 * 68, 68, 1), 4)
    with pytest.raises(
        ValueError,
        match=r"k: expected a 16-byte aligned data pointer and strides that are multiples of 8",
    ):
        attention.flash_attention_forward(q, misaligned, q, 1.0)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 2, 5, 64\)"):
        attention.flash_attention_forward(q, q, q, 1.0, out=torch.empty(1, 2, 6, 64, device=DEVICE))
    with pytest.raises(TypeError, match=r"v: expected dtype torch.float32"):
        attention.flash_attention_forward(q, q, q.half(), 1.0)


def test_fp32_dot_precision_is_explicit_triton():
    """The interpreter cannot tell tf32 from tf32x3: check the launcher passes the explicit
    precision, and the AOT test below checks it reaches the TTIR's tt.dot."""
    require("triton")
    from vit_kernels.triton import attention

    assert attention.FP32_DOT_PRECISION in ("tf32x3", "ieee")
    spec = attention.aot_spec(torch.float32, 64)
    assert spec.constexprs["INPUT_PRECISION"] == attention.FP32_DOT_PRECISION
    src = inspect.getsource(attention)
    assert src.count("input_precision=INPUT_PRECISION") == src.count("tl.dot(") == 4  # 2 products x 2 head-dim chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=ids)
def test_aot_ttir_int64_offsets_and_fp32_precision_triton(dtype):
    require("triton")
    ttir = compile_ttir("vit_kernels.triton.attention", f"m.aot_spec(torch.{str(dtype)[6:]}, 80, True)")
    stride_args_widened(ttir, [f"stride_{t}{s}" for t in "qkvo" for s in "bhn"])
    dots = [line for line in ttir.splitlines() if "tt.dot" in line]
    assert len(dots) == (2 if dtype == torch.float32 else 4)  # float16 at head_dim 80: 64 + 16, two dots each
    if dtype == torch.float32:
        assert all("inputPrecision = tf32x3" in line for line in dots), dots


# -------------------------------------------------------------------------------- Triton TMA only
def test_tma_config_list_tuned_on_sm90_half_only_and_compiled():
    """The configs the tuner times are attention_tma.CONFIGS on sm_90 for float16/bfloat16 at head_dim <= 128,
    none elsewhere; inspect compiles each of them (sm_90, both dtypes, the LSE kept or not)."""
    from vit_kernels.triton import attention_tma

    assert list(attention_tma.CONFIGS) == TMA_CONFIGS + TMA_STRUCTURE_CONFIGS and TMA_CONFIG == TMA_CONFIGS[0]
    for dt in (torch.float16, torch.bfloat16):
        for hd in (16, 64, 72, 80, 128):
            assert attention_tma.tune_configs(dt, hd, 90) == attention_tma.CONFIGS
    assert attention_tma.tune_configs(torch.float16, 64, 80) == ()
    assert attention_tma.tune_configs(torch.float32, 64, 90) == ()
    assert attention_tma.tune_configs(torch.float16, 256, 90) == ()
    specs = attention_tma.aot_specs()
    # (q's descriptor element type, lse kept, label)
    # (the warp-specialized kernel takes q as a pointer and makes its descriptors: its k's element type)
    compiled = {(s.signature["k_desc"].split("[")[0], s.constexprs["STORE_LSE"], s.config) for s in specs}
    assert all(s.archs == (90,) for s in specs)
    for cfg in attention_tma.CONFIGS:
        label = "BLOCK_M={},BLOCK_N={},num_warps={},num_stages={},TAIL_N={},".format(*cfg)
        label += "ORDER={},OVERLAP={},WARP_SPEC={},".format(*cfg[5:]) if len(cfg) > 5 else ""
        mine = [c for c in compiled if label in c[2] and (len(cfg) > 5 or "ORDER=" not in c[2])]
        for ty in ("tensordesc<fp16", "tensordesc<bf16"):
            for lse in (False, True):
                assert any(c[:2] == (ty, lse) and "head_dim=64," in c[2] for c in mine), (cfg, ty)
        for hd in (80, 128):
            assert any(c[0] == "tensordesc<fp16" and f"head_dim={hd}," in c[2] for c in mine)
    # one spec per config x dtype x LSE at head_dim 64, per config at 80 and 128
    assert len(specs) == len(attention_tma.CONFIGS) * 6
    # head_dim is in the descriptors, not the kernel: 72 launches what 80 compiles (the same chunks)
    same = [attention_tma.aot_spec(torch.float16, hd, TMA_CONFIG) for hd in (72, 80)]
    assert spec_key(same[0]) == spec_key(same[1])


def test_bad_input_before_launch_triton_tma():
    """What the TMA kernel cannot run is refused with the reason, before any launch (out stays NaN)."""
    require("triton")
    from vit_kernels.triton import attention

    def refused(q, k, v, match, **kw):
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
        kw.setdefault("attention_tma_config", TMA_CONFIG)
        with pytest.raises(ValueError, match=match):
            attention.flash_attention_forward(q, k, v, 0.125, out=out, **kw)
        assert torch.isnan(out).all(), "launched before refusing"

    q = rand(1, 2, 5, 64, dtype=torch.float32)
    refused(q, q, q, r"q: the TMA attention kernel takes float16 or bfloat16, got torch.float32 \(float32 runs on")
    q = rand(1, 2, 5, 136, dtype=torch.float16)
    refused(
        q,
        q,
        q,
        r"head_dim=136 is not supported by the sm_90 tensor-descriptor Triton attention kernels \(expected a multiple of 8 from 16 to 128\); larger",
    )
    q = rand(1, 2, 5, 64, dtype=torch.float16)
    refused(
        q, q, q, r"attention_tma_config: expected one of attention_tma.CONFIGS", attention_tma_config=(64, 64, 4, 3, 0)
    )
    refused(q, q, q, r"give it or attention_config", attention_config=(64, 64, 4, 3))
    k = rand(1, 2, 1, 64, dtype=torch.float16).expand(1, 2, 5, 64)  # token stride 0
    refused(q, k, k, r"k: TMA reads \(tokens, head_dim\) rows with a token stride >= head_dim, got strides")
    v = rand(1, 1, 5, 64, dtype=torch.float16).expand(1, 2, 5, 64)  # head stride 0
    refused(q, q, v, r"v: a tensor descriptor cannot address a broadcast heads dim \(stride 0\)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
def test_single_token_rows_any_stride_triton_tma(dtype):
    """One query / one key token: its token stride can be anything (here 8, less than head_dim); the
    descriptor takes a valid one instead."""
    require("triton")
    buf = rand(1, 2, 1, 8 + 64, dtype=dtype)
    q = buf[..., 8:].as_strided((1, 2, 1, 64), (2 * 72, 72, 8, 1), buf.storage_offset() + 8)
    k, v = rand(1, 2, 9, 64, dtype=dtype), rand(1, 2, 9, 64, dtype=dtype)
    out, lse = flash_forward("triton_tma", q, k, v, 0.125)
    check_attention(out, q, k, v, 0.125)
    check_lse(lse, q, k, 0.125)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
@pytest.mark.parametrize("shape", [(1, 2, 50, 64), (3, 1, 197, 80)], ids=ids)
def test_backward_reads_the_tma_forwards_lse(shape, dtype):
    """flash_attention under autograd with the TMA forward (the tuner's config reaches
    vit_kernels.autograd.FlashAttention): the pointer kernels' backward reads its out and LSE; dq, dk, dv
    against the float64 oracle under the 3x gradient rule."""
    require("triton")
    from vit_kernels.autograd import FlashAttention

    B, H, N, D = shape
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, N, D, dtype))
    out = FlashAttention.apply(q, k, v, D**-0.5, (("attention_tma_config", TMA_CONFIGS[3]),))
    g = rand(*out.shape, dtype=dtype)
    out.backward(g)
    grads = {}
    for cast in (torch.float64, dtype):
        ts = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        reference.flash_attention(*ts, scale=D**-0.5).backward(g.to(cast))
        grads[cast] = [t.grad for t in ts]
    check_attention(out.detach(), q.detach(), k.detach(), v.detach(), D**-0.5)
    for name, got, want, base in zip("qkv", (q.grad, k.grad, v.grad), grads[torch.float64], grads[dtype]):
        assert_close(got, want, base, factor=3.0, name=f"d{name}")


@pytest.mark.parametrize("case", [(3, 197, 64, torch.float16, True), (1, 257, 80, torch.bfloat16, False)], ids=ids)
def test_qkv_attention_split_path_on_tma_triton(case):
    """qkv_attention's split path with its attention on the TMA kernel (the tuner's attention_tma_config):
    the head-split (3, B, H, N, hd) buffer read in place, the output written as (B, N, H * hd)."""
    require("triton")
    from vit_kernels.triton import qkv_attention as triton_qkv

    B, N, hd, dtype, norm = case
    heads = 2
    dim = heads * hd
    x = rand(B, N, dim, dtype=dtype)
    w = rand(3 * dim, dim, dtype=dtype, scale=dim**-0.5)
    b = rand(3 * dim, dtype=dtype, scale=0.1)
    nw = (1 + rand(dim, dtype=torch.float32, scale=0.1)).to(dtype) if norm else None
    nb = rand(dim, dtype=dtype, scale=0.1) if norm else None
    kw = dict(num_heads=heads, norm_weight=nw, norm_bias=nb, eps=1e-6)
    out = triton_qkv.qkv_attention_forward(
        x, w, b, scale=hd**-0.5, path="split", attention_tma_config=TMA_CONFIGS[2], **kw
    )
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = reference.qkv_attention(
        x.double(), w.double(), b.double(), num_heads=heads, norm_weight=dbl(nw), norm_bias=dbl(nb), eps=1e-6
    )
    assert not torch.isnan(out).any()
    assert_close(out, oracle, reference.qkv_attention(x, w, b, **kw))
    with pytest.raises(ValueError, match=r"attention_tma_config: the TMA attention runs the split path's"):
        triton_qkv.qkv_attention_forward(
            x, w, b, scale=hd**-0.5, path="single_kernel", attention_tma_config=TMA_CONFIG, **kw
        )


@pytest.mark.parametrize("shape", [(3, 2, 197, 64), (1, 3, 50, 80)], ids=ids)
@pytest.mark.parametrize("tma_config", [TMA_CONFIGS[0], TMA_CONFIGS[3]], ids=ids)
def test_planes_of_one_buffer_read_as_one_descriptor_triton_tma(shape, tma_config):
    """q, k, v given as the planes of the split path's (3, B, H, N, D) buffer (``qkv=``): one descriptor
    over 3 * B images, k's from image B on and v's from 2 * B; the result and LSE equal, bit for bit, the
    launch on q, k, v as separate tensors (the same tiles of the same values), and match the oracle. A
    buffer whose planes are not q, k, v is refused before any launch."""
    require("triton")
    from vit_kernels.triton.attention import flash_attention_forward

    dtype = torch.bfloat16
    qkv = rand(3, *shape, dtype=dtype)
    q, k, v = qkv.unbind(0)
    scale = shape[-1] ** -0.5
    kw = dict(return_lse=True, attention_tma_config=tma_config)
    out, lse = flash_attention_forward(q, k, v, scale, out=torch.full_like(q, float("nan")), qkv=qkv, **kw)
    apart = [t.clone() for t in (q, k, v)]
    want, want_lse = flash_attention_forward(*apart, scale, out=torch.full_like(q, float("nan")), **kw)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    check_attention(out, q, k, v, scale)
    with pytest.raises(ValueError, match=r"qkv: expected the contiguous .* buffer whose planes are q, k and v"):
        flash_attention_forward(q, v, k, scale, qkv=qkv, **kw)  # k and v swapped: plane 1 is not k


# (batch, heads, tokens, kv_tokens, head_dim, dtype): every config with structure fields meets each (one key
# tile and less, 197 = 3 x 64 + 5 and 1 x 128 + 69, several tiles, cross attention; every head-dim shape)
STRUCTURE_CASES = [
    (1, 2, 1, 1, 64, torch.float16),
    (1, 2, 50, 50, 72, torch.bfloat16),
    (3, 2, 197, 197, 64, torch.bfloat16),
    (1, 3, 197, 197, 80, torch.float16),
    (1, 1, 257, 257, 128, torch.bfloat16),
    (2, 1, 130, 300, 16, torch.float16),
]


@pytest.mark.parametrize("case", STRUCTURE_CASES, ids=ids)
@pytest.mark.parametrize("tma_config", TMA_STRUCTURE_CONFIGS, ids=ids)
def test_structure_configs_triton_tma(tma_config, case):
    """The configs with structure fields (the head's query tiles adjacent; the next tile's q k^T before this
    tile's p v; Triton's warp specialization with device-made q / out descriptors) against the float64
    oracle, output and LSE, on separate q, k, v and on the split path's planes of one buffer (bit for bit
    the same), into a merged-head out."""
    require("triton")
    from vit_kernels.triton.attention import flash_attention_forward

    B, H, N, NKV, D, dtype = case
    q, k, v = make_qkv(B, H, N, D, dtype, n_kv=NKV)
    scale = D**-0.5
    out, lse = flash_forward("triton_tma", q, k, v, scale, tma_config=tma_config)
    check_attention(out, q, k, v, scale)
    check_lse(lse, q, k, scale)
    # the same read from (batch, tokens, heads, head_dim) buffers (timm's layout before its permute): strided views
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert qt.is_contiguous() == (H == 1 or N == 1)  # strided unless a dim of size 1 makes it contiguous
    got, _ = flash_forward("triton_tma", qt, kt, vt, scale, tma_config=tma_config)
    assert torch.equal(got, out)
    if N == NKV:
        qkv = torch.stack([q, k, v])
        merged = torch.full((B, N, H * D), float("nan"), dtype=dtype, device=q.device)
        o2 = merged.view(B, N, H, D).transpose(1, 2)
        kw = dict(return_lse=True, attention_tma_config=tma_config)
        got, lse2 = flash_attention_forward(qkv[0], qkv[1], qkv[2], scale, out=o2, qkv=qkv, **kw)
        assert torch.equal(got, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("tma_config", TMA_CONFIGS + TMA_STRUCTURE_CONFIGS, ids=ids)
def test_negative_scale_triton_tma(tma_config, monkeypatch):
    """A scale <= 0 through the launcher (the ops refuse it): the configs that scale every score serve it
    (against the oracle); those that take the row max of the unscaled scores (OVERLAP, WARP_SPEC: the max
    times a negative scale is the min) refuse it, naming scale, before any launch."""
    require("triton")
    q, k, v = make_qkv(1, 2, 70, 64, torch.float16)
    structured = len(tma_config) > 5 and (tma_config[6] or tma_config[7])
    if structured:
        launches = Launches().install(monkeypatch)
        with pytest.raises(ValueError, match=r"^scale: .*scale > 0; got -0.125"):
            flash_forward("triton_tma", q, k, v, -0.125, tma_config=tma_config)
        assert launches.calls == []
        return
    out, lse = flash_forward("triton_tma", q, k, v, -0.125, tma_config=tma_config)
    check_attention(out, q, k, v, -0.125)
    check_lse(lse, q, k, -0.125)


# -------------------------------------------------------------------------------- CUDA only
def cuda_layouts(B, H, N, D, dtype):
    """(name, q, k, v): the same attention read from different memory layouts, without copies (the
    Triton kernel refuses the last two: it loads rows as 16-byte vectors)."""
    packed = rand(3, B, H, N, D, dtype=dtype)  # the QKV projection's output
    yield "packed_3bhnd", packed[0], packed[1], packed[2]
    bnhd = rand(B, N, 3, H, D, dtype=dtype)  # timm's reshape before permute
    yield (
        "bn3hd_transposed",
        bnhd[:, :, 0].transpose(1, 2),
        bnhd[:, :, 1].transpose(1, 2),
        bnhd[:, :, 2].transpose(1, 2),
    )
    wide = rand(B, H, N, 2 * D, dtype=dtype)  # channel stride 2: element-wise loads
    yield "channel_stride_2", wide[..., ::2], wide[..., 1::2], rand(B, H, N, D, dtype=dtype)
    flat = rand(B * H * N * D + 1, dtype=dtype)  # rows not 16-byte aligned
    shifted = flat[1:].view(B, H, N, D)
    yield "unaligned", shifted, rand(B, H, N, D, dtype=dtype), rand(B, H, N, D, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_layouts_and_concatenated_output_cuda(dtype):
    """Strided inputs are read in place; the output goes straight into (B, N, H*hd)."""
    require("cuda")
    from vit_kernels.cuda import ops as cuda_ops

    B, H, N, D = 3, 2, 45, 72
    scale = D**-0.5
    for name, q, k, v in cuda_layouts(B, H, N, D, dtype):
        out = vk.flash_attention(q, k, v, backend="cuda")
        check_attention(out, q, k, v, scale, name=name)
        o = torch.full((B, N, H * D), float("nan"), dtype=dtype, device=DEVICE)
        cuda_ops.flash_attention_forward(q, k, v, scale, out=o.view(B, N, H, D).transpose(1, 2))
        check_attention(o.view(B, N, H, D).transpose(1, 2), q, k, v, scale, name=name + "->(B,N,H*hd)")


@pytest.mark.parametrize("head_dim", [16, 40, 104, 128])
def test_head_dims_run_padded_in_the_next_instantiation_cuda(head_dim):
    """Head dims not in the compiled list run in the next one, the extra columns masked."""
    require("cuda")
    from vit_kernels.cuda import ops as cuda_ops

    for dtype in (torch.float16, torch.float32):
        q, k, v = make_qkv(1, 2, 97, head_dim, dtype)  # several key tiles
        out = cuda_ops.flash_attention_forward(q, k, v, head_dim**-0.5)
        check_attention(out, q, k, v, head_dim**-0.5, name=f"head_dim={head_dim} {dtype}")


@pytest.mark.parametrize("magnitude", [1e-6, 3e4, 1e6])
def test_float32_split_scaling_cuda(magnitude):
    """fp32 runs as scaled fp16 hi/lo pairs: values far outside fp16's range stay accurate."""
    require("cuda")
    D = 64
    q = rand(1, 2, 50, D, dtype=torch.float32, scale=1.0 / 256)
    k = rand(1, 2, 50, D, dtype=torch.float32, scale=256.0)
    v = rand(1, 2, 50, D, dtype=torch.float32, scale=magnitude)
    out = vk.flash_attention(q, k, v, backend="cuda")
    check_attention(out, q, k, v, D**-0.5, name=f"|v|~{magnitude:g}")
    # and relative to the output's own size (the floor of assert_close is absolute)
    oracle = reference.flash_attention(q.double(), k.double(), v.double())
    assert (out.double() - oracle).abs().max() <= 1e-5 * oracle.abs().max()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=ids)
def test_head_dim_rule_agrees_with_the_build_cuda(dtype):
    """The Python rule the ops ask before they choose the CUDA kernel (checks.head_dim_unsupported through
    cuda.ops.attention_unsupported) takes exactly the head dims the C++ rule takes (vk::attn::head_dim_instance,
    which the binding applies before any launch): every head_dim 1..256. q has no tokens, so nothing launches."""
    require("cuda")
    from vit_kernels import checks
    from vit_kernels.cuda import ops as cuda_ops

    mod = cuda_ops.module_for(DEVICE)
    dims = mod.flash_attention_head_dims()
    assert dims == sorted(dims) and dims[-1] == checks.HEAD_DIM_RANGE["cuda"][1]
    assert {64, 72, 80} <= set(dims)
    python, cpp = [], []
    for head_dim in range(1, 257):
        if cuda_ops.attention_unsupported(head_dim, dtype) is None:
            python.append(head_dim)
        q = torch.empty(1, 1, 0, head_dim, dtype=dtype, device=DEVICE)
        k = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=DEVICE)
        try:
            mod.flash_attention_forward(q, k, k, torch.empty_like(q), None, cuda_ops.attention_amax(q, k, k), 1.0)
            cpp.append(head_dim)
        except RuntimeError as e:  # refused for the head dim, or (float64) for the dtype
            assert ("q: expected dtype" if dtype == torch.float64 else "head_dim: expected") in str(e), e
    assert python == cpp
    if dtype != torch.float64:
        assert python == list(range(16, 129, 8))


def test_bad_input_is_named_before_launch_cuda():
    require("cuda")
    from vit_kernels.cuda import ops as cuda_ops

    q = rand(1, 2, 5, 136, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"head_dim=136 is not supported by the CUDA attention kernel"):
        vk.flash_attention(q, q, q, backend="cuda")
    q64 = rand(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64 is not supported by the CUDA attention kernel"):
        vk.flash_attention(q64, q64, q64, backend="cuda")
    mod = cuda_ops.module_for(DEVICE)
    q = rand(1, 2, 5, 12, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"head_dim: expected a multiple of 8 .*compiled: 32, 64.*got 12"):
        mod.flash_attention_forward(q, q, q, torch.empty_like(q), None, None, 1.0)
    q = rand(1, 2, 5, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"out: expected shape \(1, 2, 5, 16\)"):
        mod.flash_attention_forward(q, q, q, torch.empty(1, 2, 4, 16, dtype=q.dtype), None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"k: kv_tokens must be at least 1"):
        mod.flash_attention_forward(q, q[:, :, :0], q[:, :, :0], torch.empty_like(q), None, None, 1.0)
    qf = q.float()
    with pytest.raises(RuntimeError, match=r"amax: required for float32"):
        mod.flash_attention_forward(qf, qf, qf, torch.empty_like(qf), None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"lse: expected shape \(1, 2, 5\)"):
        mod.flash_attention_forward(q, q, q, torch.empty_like(q), torch.empty(1, 2, 4, device=DEVICE), None, 1.0)


# sm_80 / sm_90: no spills. nvcc's report through vit_kernels.cuda.resource_usage (cached on disk, shared
# with tests/test_cuda_build.py, which checks every csrc kernel for spills).
SMEM_LIMIT = shared_limits_by_name()  # vit_kernels.arch


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_instantiation_compiles_without_spills_cuda(arch):
    from vit_kernels import cuda as vk_cuda
    from vit_kernels.cuda import ops as cuda_ops

    root, how = vk_cuda.toolkit_root()
    if root is None:
        pytest.skip(f"no CUDA toolkit on this machine: {how}")
    rows = [r for r in vk_cuda.resource_usage(arch) if r["kernel"].endswith("flash_fwd_kernel")]
    mod = cuda_ops.module_for(DEVICE)
    dims = mod.flash_attention_head_dims()
    expected = {f"{dt}, {d}" for dt in ("fp16", "bf16", "fp32") for d in dims}
    assert {r["config"] for r in rows} == expected, sorted(r["config"] for r in rows)
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["regs"] <= 255 and r["tensor_core_instructions"], r
        assert 0 < r["shared_bytes"] <= SMEM_LIMIT[arch], r
    for dt in DTYPES:
        for d in dims:
            assert 0 < mod.flash_attention_smem_bytes(dt, d) <= SMEM_LIMIT[arch]
