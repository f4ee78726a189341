"""Bad input gets an error that names the argument, before any launch (every backend)."""

import pytest
import torch

import vit_kernels as vk

BACKENDS = ["torch", "triton"]


def mlp_args(dim=32, hidden=64, dtype=torch.float32):
    x = torch.randn(2, 5, dim, dtype=dtype)
    return [
        x,
        torch.randn(dim),
        torch.randn(dim),
        torch.randn(hidden, dim),
        torch.randn(hidden),
        torch.randn(dim, hidden),
        torch.randn(dim),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_bad_input(backend):
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        vk.flash_attention(q[0], q, q, backend=backend)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 2, \*, 16\)"):
        vk.flash_attention(q, torch.randn(1, 2, 5, 32), q, backend=backend)
    with pytest.raises(TypeError, match=r"v: expected dtype torch.float32"):
        vk.flash_attention(q, q, q.half(), backend=backend)


def test_unsupported_head_dim_names_it():
    q = torch.randn(1, 2, 5, 12)
    with pytest.raises(ValueError, match=r"head_dim=12 is not supported"):
        vk.flash_attention(q, q, q, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_attention_bad_input(backend):
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"num_heads: inner dim 32 .* not divisible by num_heads=3"):
        vk.qkv_attention(x, torch.randn(96, 32), num_heads=3, backend=backend)
    with pytest.raises(ValueError, match=r"qkv_weight: expected shape \(3\*inner, 32\)"):
        vk.qkv_attention(x, torch.randn(96, 16), num_heads=2, backend=backend)
    with pytest.raises(ValueError, match=r"x: expected a 3-D tensor"):
        vk.qkv_attention(x[0], torch.randn(96, 32), num_heads=2, backend=backend)
    with pytest.raises(TypeError, match=r"qkv_bias: expected dtype torch.float32"):
        vk.qkv_attention(x, torch.randn(96, 32), torch.randn(96).half(), num_heads=2, backend=backend)
    with pytest.raises(ValueError, match=r"num_heads: expected a positive int"):
        vk.qkv_attention(x, torch.randn(96, 32), num_heads=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_bad_input(backend):
    a = mlp_args()
    bad = list(a)
    bad[3] = torch.randn(64, 16)
    with pytest.raises(ValueError, match=r"fc1_weight: expected shape \(hidden, 32\)"):
        vk.layernorm_gelu_mlp(*bad, backend=backend)
    bad = list(a)
    bad[5] = bad[5].half()
    with pytest.raises(TypeError, match=r"fc2_weight: expected dtype torch.float32"):
        vk.layernorm_gelu_mlp(*bad, backend=backend)
    with pytest.raises(ValueError, match=r"approximate: expected one of"):
        vk.layernorm_gelu_mlp(*a, approximate="fast", backend=backend)
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 5, 32\)"):
        vk.layernorm_gelu_mlp(*a, residual=torch.randn(2, 4, 32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_bad_input(backend):
    img = torch.randn(2, 3, 32, 32)
    w = torch.randn(16, 3, 8, 8)
    with pytest.raises(ValueError, match=r"images: expected H and W divisible by patch_size=8"):
        vk.patch_embed(torch.randn(2, 3, 30, 32), w, patch_size=8, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected Conv2d layout \(dim, 3, 16, 16\)"):
        vk.patch_embed(img, w, patch_size=16, backend=backend)
    with pytest.raises(ValueError, match=r"pos_embed: expected shape \(1, 17, 16\)"):
        vk.patch_embed(
            img, w, patch_size=8, pos_embed=torch.randn(1, 16, 16), cls_token=torch.randn(16), backend=backend
        )
    with pytest.raises(ValueError, match=r"images: expected a 4-D tensor"):
        vk.patch_embed(img[0], w, patch_size=8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bad_input(backend):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"layer_scale: given without residual"):
        vk.linear(x, torch.randn(8, 8), layer_scale=torch.randn(8), backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected shape \(out_features, 8\)"):
        vk.linear(x, torch.randn(8, 4), backend=backend)
