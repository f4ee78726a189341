"""Backend selection: one place, visible reasons, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

from vit_kernels import flash_attention, last_decision, qkv_attention


def test_auto_on_cpu_takes_torch_and_says_why():
    q = torch.randn(1, 2, 5, 16)
    flash_attention(q, q, q)
    d = last_decision("flash_attention")
    assert d.backend == "torch" and d.requested == "auto"
    assert "CPU" in d.reasons["triton"] and "CPU" in d.reasons["cuda"]
    assert "triton not taken" in str(d)


def test_unknown_backend_is_rejected_naming_the_argument():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'tpu'"):
        flash_attention(q, q, q, backend="tpu")


def test_gradients_route_to_torch_under_auto_and_the_decision_says_so():
    x = torch.randn(1, 5, 32, requires_grad=True)
    w = torch.randn(96, 32)
    out = qkv_attention(x, w, num_heads=2, backend="auto")
    out.sum().backward()
    d = last_decision("qkv_attention")
    assert d.backend == "torch" and "gradients are required" in d.reasons["triton"]
    assert x.grad is not None


def test_gradients_with_explicit_triton_run_its_backward_kernels():
    x = torch.randn(1, 5, 32, requires_grad=True)
    w = torch.randn(96, 32)
    out = qkv_attention(x, w, num_heads=2, backend="triton")
    assert type(out.grad_fn).__name__ == "QkvAttentionBackward"
    out.sum().backward()
    assert last_decision("qkv_attention").backend == "triton" and x.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; a GPU runs Triton natively")
def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    code = (
        "import torch, vit_kernels as vk\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    vk.flash_attention(q, q, q, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


# the bf16 probe is the CPU interpreter's: on a CUDA machine the tests run Triton's compiled kernels
INTERPRETER_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the interpreter's bf16 probe; a GPU runs Triton natively"
)


@INTERPRETER_ONLY
def test_bf16_on_an_unpatched_interpreter_is_refused_with_the_reason():
    """Without the test-only patch of tests/conftest.py, Triton 3.8's interpreter gets bf16 wrong:
    the probe sees it and a bf16 triton call says so instead of returning garbage."""
    code = (
        "import torch, vit_kernels as vk\n"
        "q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)\n"
        "print(vk.flash_attention(q.float(), q.float(), q.float(), backend='triton').shape)\n"
        "try:\n"
        "    vk.flash_attention(q, q, q, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "torch.Size([1, 1, 4, 16])" in out.stdout, out.stdout + out.stderr
    assert "interpreter mishandles bf16" in out.stdout, out.stdout + out.stderr


@INTERPRETER_ONLY
def test_the_patched_interpreter_passes_the_bf16_probe():
    from vit_kernels.triton.interpreter import bf16_flaw

    assert bf16_flaw() is None


@INTERPRETER_ONLY
def test_the_bf16_probe_under_cpu_autocast():
    """The probe's fp32 reference is computed outside autocast: the first bf16 call of a process may come
    under torch.autocast("cpu", dtype=bfloat16) (it raised "Float did not match BFloat16" there)."""
    from vit_kernels.triton import interpreter

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert interpreter._bf16_probe.__wrapped__() is None
