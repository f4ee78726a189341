"""The reference ViT: the paper's sizes, its options, and its backends against the oracle."""

import pytest
import torch

from vit_kernels import last_decision
from vit_kernels.models import create_model, model_names, resample_pos_embed
from vit_kernels.nn import set_backend
from vit_kernels.testing import assert_close


def count_params(name, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kw).parameters())


@pytest.mark.parametrize(
    "name, paper", [("vit_base_patch16_224", 86e6), ("vit_large_patch16_224", 307e6), ("vit_huge_patch14_224", 632e6)]
)
def test_parameter_counts_match_the_paper(name, paper):
    n = count_params(name)
    assert abs(n - paper) / paper < 0.015, f"{name}: {n / 1e6:.1f}M parameters, paper {paper / 1e6:.0f}M"


def test_every_named_config_builds():
    names = model_names()
    assert len(names) == 15 and "vit_tiny_patch16_224" in names
    for name in names:
        assert count_params(name) > 5e6


def test_create_model_rejects_bad_names():
    with pytest.raises(ValueError, match="name: expected"):
        create_model("vit_gigantic_patch16_224")


def small(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7)
    cfg.update(kw)
    return create_model("vit_tiny_patch16_224", **cfg).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(pool="mean", class_token=False),
        dict(reg_tokens=4),
        dict(init_values=0.1, qkv_bias=False),
        dict(approximate="tanh"),
        dict(pool="mean", reg_tokens=2),
    ],
)
def test_torch_backend_matches_oracle(kw):
    model = small(**kw)
    images = torch.randn(3, 3, 32, 32)
    oracle = set_backend(small(**kw), "reference")
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        base = oracle(images)  # plain PyTorch: the oracle's code at the test dtype (float32)
        want = oracle.double()(images.double())
        got = set_backend(model, "torch")(images)
    assert got.shape == (3, 7)
    assert_close(got, want, base, name="logits")
    assert last_decision("qkv_attention").backend == "torch"


def test_dynamic_img_size_resamples_pos_embed():
    model = small(dynamic_img_size=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="images: expected 32x32"):
        small()(torch.randn(1, 3, 48, 48))


def test_resample_pos_embed_identity_and_shape():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), (4, 4)) is pe
    out = resample_pos_embed(pe, (6, 5), (4, 4))
    assert out.shape == (1, 31, 8) and torch.equal(out[:, :1], pe[:, :1])


def test_hybrid_patch1_on_feature_map():
    """The paper's hybrid: patch size 1 over a CNN feature map (here 14x14 with 32 channels)."""
    model = create_model(
        "vit_tiny_patch16_224",
        img_size=14,
        patch_size=1,
        in_chans=32,
        depth=1,
        embed_dim=64,
        num_heads=2,
        num_classes=3,
    ).eval()
    oracle = set_backend(
        create_model(
            "vit_tiny_patch16_224",
            img_size=14,
            patch_size=1,
            in_chans=32,
            depth=1,
            embed_dim=64,
            num_heads=2,
            num_classes=3,
        ),
        "reference",
    )
    oracle.load_state_dict(model.state_dict())
    fmap = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        base = oracle(fmap)  # the oracle's code at float32, not the path under test
        assert_close(model(fmap), oracle.double()(fmap.double()), base)


def test_dropout_is_identity_in_eval_and_active_in_training():
    model = small(drop_rate=0.5, attn_drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_model_rejects_bad_options():
    with pytest.raises(ValueError, match="pool"):
        small(pool="max")
    with pytest.raises(ValueError, match="backend"):
        small(backend="tpu")


def test_dynamic_img_size_resamples_at_another_grid_every_call(monkeypatch):
    """One model, several image sizes: the position embedding is resampled on every call at another patch
    grid (never at the native one, nothing cached, as timm does), so a write to it, through ``.data``
    too (no version bump), shows in the next call; each output against the float64 oracle."""
    import vit_kernels.models.vit as vit_mod

    calls = []
    real = vit_mod.resample_pos_embed
    monkeypatch.setattr(vit_mod, "resample_pos_embed", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = small(dynamic_img_size=True, backend="triton")
    with torch.no_grad():
        sizes = [(48, 40), (32, 32), (48, 40), (64, 64), (48, 40)]
        for step in range(2):
            # fresh oracle and baseline each step: one kept from the step before would share a kept copy's error
            oracle = set_backend(small(dynamic_img_size=True), "reference").double()
            oracle.load_state_dict(model.state_dict())
            torch_model = small(dynamic_img_size=True, backend="torch")
            torch_model.load_state_dict(model.state_dict())
            inputs = [torch.randn(2, 3, *size) for size in sizes]
            expected = [(oracle(x.double()), torch_model(x)) for x in inputs]
            calls.clear()
            for size, x, (want, base) in zip(sizes, inputs, expected):
                assert_close(model(x), want, base, name=f"{size} step {step}")
            assert calls == [(6, 5), (6, 5), (8, 8), (6, 5)], calls
            model.pos_embed.data.add_(0.5 * torch.randn_like(model.pos_embed))
    with pytest.raises(ValueError, match="images: expected a size that is a multiple of patch_size=8, got 44x40"):
        model(torch.randn(1, 3, 44, 40))


def test_resample_pos_embed_matches_timm():
    timm_pe = pytest.importorskip("timm.layers").resample_abs_pos_embed
    pe = torch.randn(1, 1 + 64, 16)
    for grid in [(4, 4), (12, 10)]:
        want = timm_pe(pe, list(grid), (8, 8), num_prefix_tokens=1)
        assert torch.allclose(resample_pos_embed(pe, grid, (8, 8)), want, atol=1e-6)


def test_dynamic_img_size_model_built_under_inference_mode():
    """Built under torch.inference_mode, the position embedding is an inference tensor (no version
    counter): resampled at another grid, and an in-place update there shows."""
    with torch.inference_mode():
        model = small(dynamic_img_size=True, backend="triton")
        images = torch.randn(2, 3, 48, 40)
        for step in range(2):
            # fresh models each step: their own resampling, none cached from the step before
            oracle = set_backend(small(dynamic_img_size=True), "reference").double()
            oracle.load_state_dict(model.state_dict())
            torch_model = small(dynamic_img_size=True, backend="torch")
            torch_model.load_state_dict(model.state_dict())
            assert_close(model(images), oracle(images.double()), torch_model(images), name=f"step {step}")
            model.pos_embed.add_(0.5 * torch.randn_like(model.pos_embed))
