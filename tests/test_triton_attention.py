"""The Triton flash attention kernel against the float64 oracle (interpreter on CPU, or a GPU)."""

import inspect
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.testing import assert_close

from conftest import DEVICE  # noqa: E402

attention = pytest.importorskip("vit_kernels.triton.attention")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (batch, heads, tokens, head_dim, dtype): every value of each axis at least once.
DEFAULT_CASES = [
    (1, 2, 1, 64, "fp32"),
    (3, 2, 50, 80, "bf16"),
    (1, 2, 197, 72, "fp16"),
    (3, 1, 257, 64, "bf16"),
    (1, 1, 577, 80, "fp16"),
    (3, 2, 50, 72, "fp32"),
    (1, 2, 197, 64, "fp32"),
]
SLOW_CASES = [
    (b, 2, n, d, dt)
    for b, n, d, dt in itertools.product((1, 3), (1, 50, 197, 257, 577, 1025), (16, 64, 72, 80, 128, 256), DTYPES)
]


def make_qkv(B, H, N, D, dtype, n_kv=None):
    n_kv = N if n_kv is None else n_kv
    q = torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, H, n_kv, D, dtype=torch.float64, device=DEVICE)
    v = torch.randn(B, H, n_kv, D, dtype=torch.float64, device=DEVICE)
    return [t.to(dtype) for t in (q, k, v)]


def check_attention(q, k, v, scale=None, out=None):
    """Run the launcher into a NaN-poisoned output and compare with the float64 oracle under the
    tolerance rule (baseline: the eager reference at the inputs' dtype)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    got, lse = attention.flash_attention_forward(q, k, v, scale, out=out, return_lse=True)
    assert got is out
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), scale=scale)
    baseline = reference.flash_attention(q, k, v, scale=scale)
    c = assert_close(got, oracle, baseline)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    assert_close(lse, torch.logsumexp(s, dim=-1), floor=1e-5, name="lse")
    if q.dtype == torch.float32:  # fp32 must be accurate to 1e-4 relative to float64
        assert c.max_abs_err <= 1e-4 * oracle.abs().max().item(), str(c)
    return got


@pytest.mark.parametrize("B,H,N,D,dtype", DEFAULT_CASES)
def test_flash_attention(B, H, N, D, dtype):
    check_attention(*make_qkv(B, H, N, D, DTYPES[dtype]))


@pytest.mark.slow
@pytest.mark.parametrize("B,H,N,D,dtype", SLOW_CASES)
def test_flash_attention_full(B, H, N, D, dtype):
    check_attention(*make_qkv(B, H, N, D, DTYPES[dtype]))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_flash_attention_kv_tokens_differ_and_custom_scale(dtype):
    q, k, v = make_qkv(2, 2, 50, 64, DTYPES[dtype], n_kv=197)
    check_attention(q, k, v, scale=0.3)
    q, k, v = make_qkv(1, 2, 197, 80, DTYPES[dtype], n_kv=33)
    check_attention(q, k, v, scale=-0.2)


def test_flash_attention_strided_inputs_and_output():
    """q, k, v as views of one (B, N, 3, H, D) qkv buffer; the output written straight into a
    (B, N, H*D) buffer viewed as (B, H, N, D)."""
    B, N, H, D = 3, 50, 2, 72
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float16, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    buf = torch.full((B, N, H * D), float("nan"), dtype=torch.float16, device=DEVICE)
    check_attention(q, k, v, out=buf.view(B, N, H, D).transpose(1, 2))
    oracle = reference.flash_attention(q.double(), k.double(), v.double())
    assert_close(
        buf,
        oracle.transpose(1, 2).reshape(B, N, H * D),
        reference.flash_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D),
    )


def test_flash_attention_op_dispatches_to_triton():
    q, k, v = make_qkv(1, 2, 50, 64, torch.float32)
    out = vk.flash_attention(q, k, v, backend="triton")
    assert vk.last_decision("flash_attention").backend == "triton"
    assert_close(out, reference.flash_attention(q.double(), k.double(), v.double()), reference.flash_attention(q, k, v))


def test_flash_attention_bad_input_before_launch():
    q = torch.randn(1, 2, 5, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim: expected a multiple of 8 from 16 to 256, got 12"):
        attention.flash_attention_forward(q, q, q, 1.0)
    q = torch.randn(1, 2, 5, 264, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim: .* got 264"):
        attention.flash_attention_forward(q, q, q, 1.0)
    q = torch.randn(1, 2, 5, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"k: expected at least one key/value token"):
        attention.flash_attention_forward(q, q[:, :, :0], q[:, :, :0], 1.0)
    storage = torch.randn(1 * 2 * 5 * 68, device=DEVICE)
    misaligned = storage.as_strided((1, 2, 5, 64), (2 * 5 * 68, 5 * 68, 68, 1), 4)
    with pytest.raises(
        ValueError,
        match=r"k: expected a 16-byte aligned data pointer and strides that are "
        r"multiples of 8",
    ):
        attention.flash_attention_forward(q, misaligned, q, 1.0)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 2, 5, 64\)"):
        attention.flash_attention_forward(q, q, q, 1.0, out=torch.empty(1, 2, 6, 64, device=DEVICE))
    with pytest.raises(TypeError, match=r"v: expected dtype torch.float32"):
        attention.flash_attention_forward(q, q, q.half(), 1.0)


def test_fp32_dot_precision_is_explicit():
    """The interpreter cannot tell tf32 from tf32x3: check the launcher passes the explicit
    precision, and the AOT tests below check it reaches the TTIR's tt.dot."""
    assert attention.FP32_DOT_PRECISION in ("tf32x3", "ieee")
    spec = attention.aot_spec(torch.float32, 64)
    assert spec.constexprs["INPUT_PRECISION"] == attention.FP32_DOT_PRECISION
    src = inspect.getsource(attention)
    assert src.count("input_precision=INPUT_PRECISION") == src.count("tl.dot(") == 4  # 2 products x 2 head-dim chunks


def compile_ttir(module: str, spec_expr: str, arch: int = 90) -> str:
    """Compile one AotSpec to TTIR for sm_<arch> in a fresh process without the interpreter."""
    code = textwrap.dedent(f"""
        import sys, torch, triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        import {module} as m
        spec = {spec_expr}
        c = triton.compile(ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
                           target=GPUTarget("cuda", {arch}, 32),
                           options={{"num_warps": spec.num_warps, "num_stages": spec.num_stages}})
        sys.stdout.write(c.asm["ttir"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def stride_args_widened(ttir: str, names) -> None:
    """Every use of each i32 stride argument in the TTIR must be a widening to i64, so that
    index * stride products cannot overflow (batch * heads * tokens * head_dim > 2**31)."""
    import re

    for name in names:
        uses = [line.strip() for line in ttir.splitlines() if re.search(rf"%{name}\b", line) and "tt.func" not in line]
        assert uses, f"{name} is never used in the TTIR"
        for use in uses:
            assert re.search(rf"arith.extsi %{name}\b.*: i32 to i64", use), (
                f"{name} is used without widening to i64: {use}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aot_ttir_int64_offsets_and_fp32_precision(dtype):
    ttir = compile_ttir("vit_kernels.triton.attention", f"m.aot_spec(torch.{str(dtype)[6:]}, 80, True)")
    stride_args_widened(ttir, [f"stride_{t}{s}" for t in "qkvo" for s in "bhn"])
    dots = [line for line in ttir.splitlines() if "tt.dot" in line]
    assert len(dots) == (2 if dtype == torch.float32 else 4)  # float16 at head_dim 80: 64 + 16, two dots each
    if dtype == torch.float32:
        assert all("inputPrecision = tf32x3" in line for line in dots), dots
