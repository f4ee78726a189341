"""The reference ViT on each fused backend gives the oracle's logits within tolerance.

oracle: the same model with backend="reference" in float64; baseline: backend="reference" at the
test dtype (plain PyTorch; not the project's torch path, which other tests check). Triton runs in the interpreter without a GPU; CUDA in the host
emulator on CPU tensors.
"""

import copy

import pytest
import torch

from vit_kernels import last_decision
from vit_kernels.dtypes import KERNEL_DTYPES
from vit_kernels.models import create_model
from vit_kernels.nn import set_backend
from vit_kernels.testing import assert_close, compare

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_OPS = ("qkv_attention", "linear", "layernorm_gelu_mlp", "patch_embed")


def logits(model, images, backend, dtype):
    m = set_backend(copy.deepcopy(model), backend).to(dtype).to(DEVICE).eval()
    with torch.no_grad():
        out = m(images.to(dtype).to(DEVICE))
    if backend not in ("reference", "torch"):
        for op in FUSED_OPS:  # every fused op really ran on the requested backend
            assert last_decision(op).backend == backend, str(last_decision(op))
    return out


def odd_two_layer():
    """2 layers at odd sizes: 70 px, patch 14 -> 25 patches + cls + 1 register = 27 tokens,
    head_dim 80, LayerScale, mean pooling, tanh GELU."""
    return create_model(
        "vit_tiny_patch16_224",
        img_size=70,
        patch_size=14,
        embed_dim=160,
        depth=2,
        num_heads=2,
        mlp_ratio=3.0,
        reg_tokens=1,
        init_values=0.5,
        pool="mean",
        approximate="tanh",
        num_classes=10,
    )


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_two_layer_odd_config(backend, dtype):
    model, images = odd_two_layer(), torch.randn(3, 3, 70, 70)
    want = logits(model, images, "reference", torch.float64)
    base = logits(model, images, "reference", dtype)
    assert_close(logits(model, images, backend, dtype), want, base, name=f"logits ({backend}, {dtype})")


def test_vit_tiny_patch16_224_triton():
    model, images = create_model("vit_tiny_patch16_224"), torch.randn(1, 3, 224, 224)
    want = logits(model, images, "reference", torch.float64)
    base = logits(model, images, "reference", torch.float32)
    assert_close(logits(model, images, "triton", torch.float32), want, base, name="logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_and_cuda_backends_agree(dtype):
    """Same inputs through both backends: each within tolerance of the oracle, and the two within
    one tolerance bound of each other (each alone could be a bound away in opposite directions)."""
    model, images = odd_two_layer(), torch.randn(2, 3, 70, 70)
    want = logits(model, images, "reference", torch.float64)
    base = logits(model, images, "reference", dtype)
    tri, cu = logits(model, images, "triton", dtype), logits(model, images, "cuda", dtype)
    bound = compare(tri, want, base).bound
    diff = (tri.double() - cu.double()).abs().max().item()
    assert diff <= bound, f"triton and cuda differ by {diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_fused_ops_at_the_autocast_dtype(backend):
    model, images = odd_two_layer(), torch.randn(2, 3, 70, 70)
    want = logits(model, images, "reference", torch.float64)
    m = set_backend(copy.deepcopy(model), backend).eval()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = m(images.to(DEVICE))
        assert last_decision("layernorm_gelu_mlp").backend == backend
    with torch.no_grad():
        base = logits(model, images, "reference", torch.bfloat16)  # plain PyTorch (the oracle), pure bf16
    assert_close(got, want, base, name=f"logits under autocast ({backend})")
