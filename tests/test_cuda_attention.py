"""The CUDA C++ attention kernel (csrc/attention), through the host emulator on CPU tensors (or the
GPU build on CUDA tensors): against the float64 oracle under the tolerance rule, outputs poisoned
with NaN before every launch."""

import pytest
import torch
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.arch import shared_limits_by_name
from vit_kernels.cuda import ops as cuda_ops
from vit_kernels.testing import assert_close

from conftest import DEVICE
from poison import poison_empty

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def check_attention(out, q, k, v, scale, name="output"):
    """out vs the float64 oracle; baseline: plain PyTorch (SDPA) at the inputs' dtype."""
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), scale=scale)
    # fresh copies: PyTorch 2.11's memory-efficient SDPA reads a misaligned fp32 view with 16-byte loads
    # ("misaligned address" on an H200, compute-sanitizer: fmha_cutlassF_f32_aligned_64x128_rf_sm80)
    baseline = F.scaled_dot_product_attention(q.clone(), k.clone(), v.clone(), scale=scale)
    assert not torch.isnan(out).any(), f"{name}: NaN left in the output (an element was not written)"
    return assert_close(out, oracle, baseline, name=name)


# -------------------------------------------------------------------------------- flash_attention
# A covering subset by default: every token count x head dim x dtype once, batch alternating.
DEFAULT = [
    (1 if (i + j) % 2 else 3, n, d, dt)
    for i, n in enumerate([1, 50, 197, 257])
    for j, d in enumerate([64, 72, 80])
    for dt in DTYPES
]
SLOW = [(b, n, d, dt) for b in (1, 3) for n in (1, 50, 197, 257, 577) for d in (64, 72, 80) for dt in DTYPES]
SLOW = [c for c in SLOW if c not in DEFAULT]


def _id(c):
    return f"b{c[0]}-n{c[1]}-hd{c[2]}-{str(c[3]).split('.')[-1]}"


def run_flash(batch, tokens, head_dim, dtype, heads=2):
    q, k, v = (rand(batch, heads, tokens, head_dim, dtype=dtype) for _ in range(3))
    scale = head_dim**-0.5
    out = vk.flash_attention(q, k, v, backend="cuda")
    assert vk.last_decision("flash_attention").backend == "cuda"
    assert out.shape == q.shape and out.dtype == dtype
    check_attention(out, q, k, v, scale)


@pytest.mark.parametrize("case", DEFAULT, ids=_id)
def test_flash_attention(case):
    run_flash(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=_id)
def test_flash_attention_full(case):
    run_flash(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse(dtype):
    """The row log-sum-exp (B, H, N) fp32, natural log, kept for a backward pass."""
    B, H, N, D = 1, 3, 70, 64
    q, k, v = (rand(B, H, N, D, dtype=dtype) for _ in range(3))
    scale = D**-0.5
    lse = torch.full((B, H, N), float("nan"), device=DEVICE)
    out, lse_out = cuda_ops.flash_attention_forward(q, k, v, scale, lse=lse)
    assert lse_out is lse
    check_attention(out, q, k, v, scale)
    oracle = torch.logsumexp((q.double() @ k.double().transpose(-2, -1)) * scale, dim=-1)
    baseline = (
        torch.logsumexp((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
        if dtype != torch.float32
        else torch.logsumexp((q @ k.transpose(-2, -1)) * scale, dim=-1)
    )
    assert_close(lse, oracle, baseline, floor=1e-5, name="lse")


def layouts(B, H, N, D, dtype):
    """(name, q, k, v): the same attention read from different memory layouts, without copies."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_and_concatenated_output(dtype):
    """Strided inputs are read in place; the output goes straight into (B, N, H*hd)."""
    B, H, N, D = 3, 2, 45, 72
    scale = D**-0.5
    for name, q, k, v in layouts(B, H, N, D, dtype):
        out = vk.flash_attention(q, k, v, backend="cuda")
        check_attention(out, q, k, v, scale, name=name)
        o = torch.full((B, N, H * D), float("nan"), dtype=dtype, device=DEVICE)
        cuda_ops.flash_attention_forward(q, k, v, scale, out=o.view(B, N, H, D).transpose(1, 2))
        check_attention(o.view(B, N, H, D).transpose(1, 2), q, k, v, scale, name=name + "->(B,N,H*hd)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_attention_token_counts(dtype):
    """q_tokens != kv_tokens, a single key, and an explicit scale."""
    for nq, nk in [(33, 130), (65, 1), (1, 257)]:
        q = rand(1, 2, nq, 64, dtype=dtype)
        k, v = rand(1, 2, nk, 64, dtype=dtype), rand(1, 2, nk, 64, dtype=dtype)
        out = vk.flash_attention(q, k, v, scale=0.3, backend="cuda")
        check_attention(out, q, k, v, 0.3, name=f"nq={nq} nk={nk}")


@pytest.mark.parametrize("head_dim", [8, 16, 40, 104, 128])
def test_head_dims_run_padded_in_the_next_instantiation(head_dim):
    """Head dims not in the compiled list run in the next one, the extra columns masked."""
    for dtype in (torch.float16, torch.float32):
        q, k, v = (rand(1, 2, 97, head_dim, dtype=dtype) for _ in range(3))  # several key tiles
        out = cuda_ops.flash_attention(q, k, v, head_dim**-0.5)
        check_attention(out, q, k, v, head_dim**-0.5, name=f"head_dim={head_dim} {dtype}")


@pytest.mark.parametrize("magnitude", [1e-6, 3e4, 1e6])
def test_float32_split_scaling(magnitude):
    """fp32 runs as scaled fp16 hi/lo pairs: values far outside fp16's range stay accurate."""
    D = 64
    q = rand(1, 2, 50, D, dtype=torch.float32, scale=1.0 / 256)
    k = rand(1, 2, 50, D, dtype=torch.float32, scale=256.0)
    v = rand(1, 2, 50, D, dtype=torch.float32, scale=magnitude)
    out = vk.flash_attention(q, k, v, backend="cuda")
    check_attention(out, q, k, v, D**-0.5, name=f"|v|~{magnitude:g}")
    # and relative to the output's own size (the floor of assert_close is absolute)
    oracle = reference.flash_attention(q.double(), k.double(), v.double())
    assert (out.double() - oracle).abs().max() <= 1e-5 * oracle.abs().max()


def test_head_dim_list_agrees_with_python():
    dims = cuda_ops.module_for(DEVICE).flash_attention_head_dims()
    assert dims == sorted(dims) and dims[-1] == cuda_ops.MAX_HEAD_DIM
    assert {64, 72, 80} <= set(dims)


def test_bad_input_is_named_before_launch():
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


def test_no_query_tokens_launches_nothing():
    q = rand(2, 2, 0, 64, dtype=torch.float16)
    k = rand(2, 2, 7, 64, dtype=torch.float16)
    assert cuda_ops.flash_attention(q, k, k, 0.125).shape == (2, 2, 0, 64)


# ------------------------------------------------------------------ sm_80 / sm_90: no spills
# nvcc's report through vit_kernels.cuda.resource_usage (cached on disk, shared with
# tests/test_cuda_build.py, which checks every csrc kernel for spills).
SMEM_LIMIT = shared_limits_by_name()  # vit_kernels.arch


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_instantiation_compiles_without_spills(arch):
    from vit_kernels import cuda as vk_cuda

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


# -------------------------------------------------------------------------------- qkv_attention
# CUDA-core's QKV GEMM (LayerNorm on load, head-split epilogue, Q pre-scaled) writes
# (3, B, H, N, hd); the attention kernel reads it in place and writes (B, N, H*hd).
def run_qkv(batch, tokens, head_dim, dtype, norm, bias, heads=2):
    dim = heads * head_dim
    x = rand(batch, tokens, dim, dtype=dtype)
    w = rand(3 * dim, dim, dtype=dtype, scale=dim**-0.5)
    b = rand(3 * dim, dtype=dtype, scale=0.1) if bias else None
    nw = (1 + rand(dim, dtype=torch.float32, scale=0.1)).to(dtype) if norm else None
    nb = rand(dim, dtype=dtype, scale=0.1) if norm else None
    out = vk.qkv_attention(x, w, b, num_heads=heads, norm_weight=nw, norm_bias=nb, eps=1e-6, backend="cuda")
    d = vk.last_decision("qkv_attention")
    assert (d.backend, d.path) == ("cuda", "split")
    assert out.shape == (batch, tokens, dim) and out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN left in the output (an element was not written)"
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = reference.qkv_attention(
        x.double(), w.double(), dbl(b), num_heads=heads, norm_weight=dbl(nw), norm_bias=dbl(nb), eps=1e-6
    )
    baseline = reference.qkv_attention(x, w, b, num_heads=heads, norm_weight=nw, norm_bias=nb, eps=1e-6)
    assert_close(out, oracle, baseline)


QKV_DEFAULT = [
    (1, 50, 64, torch.float16, True, True),
    (3, 197, 80, torch.bfloat16, True, False),
    (3, 1, 72, torch.float32, False, True),
    (1, 257, 72, torch.float16, False, False),
    (1, 50, 80, torch.float32, True, True),
    (3, 50, 64, torch.bfloat16, False, True),
]
QKV_SLOW = [
    (b, n, d, dt, norm, True)
    for b in (1, 3)
    for n in (1, 50, 197, 257, 577)
    for d in (64, 72, 80)
    for dt in DTYPES
    for norm in (False, True)
]


def _qkv_id(c):
    return (
        f"b{c[0]}-n{c[1]}-hd{c[2]}-{str(c[3]).split('.')[-1]}-{'ln' if c[4] else 'noln'}-{'bias' if c[5] else 'nobias'}"
    )


@pytest.mark.parametrize("case", QKV_DEFAULT, ids=_qkv_id)
def test_qkv_attention(case):
    run_qkv(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", QKV_SLOW, ids=_qkv_id)
def test_qkv_attention_full(case):
    run_qkv(*case)
