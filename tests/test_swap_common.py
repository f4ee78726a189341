"""The family-independent parts of fuse / unfuse / fuse_report (the per-family adapters: tests/test_swap_*.py,
with the shared checks of tests/swap_checks.py)."""

import pytest
from torch import nn

import vit_kernels as vk
from vit_kernels.swap import SwapWrapper

from swap_checks import assert_same_state, snapshot


def test_bad_arguments_are_named():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backend"):
        vk.fuse(m, backend="fast")
    with pytest.raises(ValueError, match="ops"):
        vk.fuse(m, ops=("attention", "softmax"))
    with pytest.raises(TypeError, match="ops"):
        vk.fuse(m, ops="attention")


def test_unknown_model_is_refused_reported_and_untouched():
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    snap = snapshot(m)
    with pytest.raises(ValueError, match="model: expected a ViT .* got Sequential, which holds none"):
        vk.fuse(m)
    assert_same_state(m, snap)
    assert not any(isinstance(x, SwapWrapper) for x in m.modules())
    report = vk.fuse_report(m)
    assert not report.fused and "no ViT part" in report.left[0].reason


def test_vit_kernels_models_fuse_by_backend():
    m = vk.models.create_model("vit_tiny_patch16_224", depth=1, img_size=32, embed_dim=64, num_heads=2).eval()
    vk.fuse(m, backend="torch", ops=("attention", "mlp"))
    assert m.blocks[0].attn.backend == "torch" and m.patch_embed.backend == "torch"
    report = vk.fuse_report(m)
    assert sorted(e.op for e in report.fused) == ["attention", "mlp"]
    assert [e.op for e in report.left] == ["patch_embed"]
