"""The torch paths of the attention ops against the float64 oracle, with arguments the model tests
leave at their defaults (a scale other than head_dim ** -0.5). The baseline is the oracle's own code
run at the input dtype, never the path under test."""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.testing import assert_close


@pytest.mark.parametrize("scale", [None, 0.3])
def test_flash_attention_torch_path(scale):
    q, k, v = (torch.randn(2, 3, 13, 16) for _ in range(3))
    got = vk.flash_attention(q, k, v, scale=scale, backend="torch")
    want = reference.flash_attention(q.double(), k.double(), v.double(), scale=scale)
    assert_close(got, want, reference.flash_attention(q, k, v, scale=scale))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_attention_torch_path(scale, norm):
    x = torch.randn(2, 11, 32)
    w = torch.randn(96, 32) * 32**-0.5
    b = torch.randn(96) * 0.1
    nw = 1 + 0.1 * torch.randn(32) if norm else None
    nb = 0.1 * torch.randn(32) if norm else None
    kw = dict(num_heads=2, scale=scale, norm_weight=nw, norm_bias=nb, eps=1e-6)
    got = vk.qkv_attention(x, w, b, backend="torch", **kw)
    as64 = {k: (t.double() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    want = reference.qkv_attention(x.double(), w.double(), b.double(), **as64)
    assert_close(got, want, reference.qkv_attention(x, w, b, **kw))
