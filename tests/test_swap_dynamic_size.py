"""Dynamic resolution through fuse (issue 13 item 4): one fused model serves several image sizes where
the family supports it (timm ``dynamic_img_size=True``, transformers ``interpolate_pos_encoding=True``),
each size against the unfused model run in float64 under the tolerance rule (the unfused model at
float32 as the baseline). The fused patch projection runs at every size (its decision is checked);
the position-embedding resampling stays in the library's own code. The reference ViT's own dynamic
size (resampled once per grid, cached) is tested in tests/test_models.py."""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels.testing import assert_close

SIZES = [(32, 32), (48, 40), (64, 24)]


def _logits(y):
    return y if isinstance(y, torch.Tensor) else y.logits


def check_sizes(model, backend, **call_kw):
    model = model.eval()
    oracle = copy.deepcopy(model).double()
    base = copy.deepcopy(model)
    vk.fuse(model, backend=backend)
    assert not vk.fuse_report(model).left, str(vk.fuse_report(model))
    for size in SIZES:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            got = _logits(model(images, **call_kw))
            want = _logits(oracle(images.double(), **call_kw))
            baseline = _logits(base(images, **call_kw))
        assert vk.last_decision("patch_embed").backend == backend
        assert vk.last_decision("qkv_attention").backend == backend
        assert_close(got, want, baseline, name=f"logits at {size}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_timm_dynamic_img_size(backend):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        dynamic_img_size=True,
    )
    check_sizes(model, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hf_interpolate_pos_encoding(backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    check_sizes(transformers.ViTForImageClassification(cfg), backend, interpolate_pos_encoding=True)


def test_hf_pos_encoding_resampled_once_per_size_until_it_changes(monkeypatch):
    """The fused ViTEmbeddings (one patch_embed launch with class token and position embedding) calls
    the module's own interpolate_pos_encoding once per image size, again after an in-place update."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit.modeling_vit import ViTEmbeddings
    from vit_kernels.swap.hf import FusedHFEmbeddings

    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    model = transformers.ViTModel(cfg).eval()
    vk.fuse(model, backend="torch")
    assert isinstance(model.embeddings, FusedHFEmbeddings)
    calls = []
    real = ViTEmbeddings.interpolate_pos_encoding
    monkeypatch.setattr(
        ViTEmbeddings, "interpolate_pos_encoding", lambda self, e, h, w: calls.append((h, w)) or real(self, e, h, w)
    )
    with torch.no_grad():
        for size in [(48, 40), (32, 32), (48, 40), (64, 24), (48, 40)]:
            model(torch.randn(1, 3, *size), interpolate_pos_encoding=True)
        assert calls == [(48, 40), (64, 24)], calls
        model.embeddings.position_embeddings.add_(0.1)
        model(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True)
    assert calls.count((48, 40)) == 2
    assert vk.last_decision("patch_embed").backend == "torch"
