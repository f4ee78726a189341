"""fuse / unfuse on torchvision's VisionTransformer (small configs built with its class)."""

import pytest
import torch

import vit_kernels as vk
from swap_checks import check_dropout_runs_original, check_fuse, check_grad, check_load_state_dict

tv = pytest.importorskip("torchvision.models.vision_transformer")

BACKENDS = ["torch", "triton"]


def make(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, **kw):
    m = tv.VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=10,
        **kw,
    )
    torch.nn.init.normal_(m.heads.head.weight, std=0.05)  # torchvision zero-initialises the head
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_vit_matches(dtype, backend):
    check_fuse(
        make(),
        torch.randn(3, 3, 32, 32),
        backend=backend,
        dtype=dtype,
        expect_fused=["attention", "attention", "mlp", "mlp", "patch_embed"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_80_like_vit_h_14(backend):
    m = make(image_size=28, patch_size=14, num_layers=1, num_heads=2, hidden_dim=160, mlp_dim=320)
    check_fuse(m, torch.randn(2, 3, 28, 28), backend=backend, expect_fused=["attention", "mlp", "patch_embed"])


def test_named_builders_are_recognised():
    m = tv.vit_b_32(weights=None, image_size=64)  # 12 layers: only the report, no forward
    report = vk.fuse_report(m)
    assert len(report.left) == 25 and all("fuse() would" in e.reason for e in report.left)


def test_conv_stem_is_left():
    from torchvision.models.vision_transformer import ConvStemConfig

    m = make(
        conv_stem_configs=[ConvStemConfig(out_channels=16, kernel_size=3, stride=2)] * 2, patch_size=4, image_size=16
    )
    report = check_fuse(
        m, torch.randn(2, 3, 16, 16), backend="torch", expect_fused=["attention", "attention", "mlp", "mlp"]
    )
    assert [e.op for e in report.left] == ["patch_embed"]


def test_dropout_in_training_runs_the_original():
    check_dropout_runs_original(make(dropout=0.1, attention_dropout=0.1), torch.randn(2, 3, 32, 32))


def test_gradients_take_the_torch_path():
    check_grad(make(), torch.randn(2, 3, 32, 32))


def test_load_state_dict_after_fuse():
    check_load_state_dict(make(), torch.randn(2, 3, 32, 32))
