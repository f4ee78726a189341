"""fuse / unfuse on timm VisionTransformer variants (small configs)."""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels.testing import assert_close
from swap_checks import (
    check_dropout_runs_original,
    check_fuse,
    check_grad,
    check_load_state_dict,
    snapshot,
    assert_same_state,
)

timm = pytest.importorskip("timm")

BACKENDS = ["torch", "triton"]
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
ALL = ["attention", "attention", "mlp", "mlp", "patch_embed"]


def make(**kw):
    cfg = dict(SMALL)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)


VARIANTS = {
    "default": dict(),
    "no_qkv_bias_layerscale": dict(qkv_bias=False, init_values=0.1),
    "registers": dict(reg_tokens=4, init_values=0.5),
    "no_embed_class_avg_fc_norm": dict(no_embed_class=True, global_pool="avg", fc_norm=True),
    "no_pos_embed_no_class_token": dict(pos_embed="none", class_token=False, global_pool="avg"),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match(variant, backend):
    model = make(**VARIANTS[variant])
    check_fuse(model, torch.randn(3, 3, 32, 32), backend=backend, expect_fused=ALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, backend):
    check_fuse(make(init_values=0.1), torch.randn(2, 3, 32, 32), backend=backend, dtype=dtype, expect_fused=ALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_img_size_resamples_pos_embed(backend):
    model = make(dynamic_img_size=True)
    check_fuse(model, torch.randn(2, 3, 48, 40), backend=backend, expect_fused=ALL)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dynamic_img_size_variants(variant):
    """dynamic_img_size with each variant at a size other than the native one: the whole patch_embed
    is fused with the cached position embedding (registers and no_embed_class included), except
    without a position embedding, where the projection alone is fused; the report says which."""
    model = make(dynamic_img_size=True, **VARIANTS[variant])
    report = check_fuse(model, torch.randn(2, 3, 48, 40), backend="torch", expect_fused=ALL)
    (e,) = [e for e in report.fused if e.op == "patch_embed"]
    whole = variant != "no_pos_embed_no_class_token"
    assert e.path == ("patch_embed" if whole else "patch_embed.proj"), str(report)
    assert any("written by the patch_embed kernel" in n for n in e.notes) == whole, str(report)


def test_dynamic_img_size_no_class_token_pos_embed():
    """No class token (global average pooling) with a position embedding: the kernel writes the patch
    tokens with the resampled position embedding, no prefix row."""
    model = make(dynamic_img_size=True, class_token=False, global_pool="avg")
    report = check_fuse(model, torch.randn(2, 3, 40, 48), backend="triton", expect_fused=ALL)
    assert [e.path for e in report.fused if e.op == "patch_embed"] == ["patch_embed"], str(report)


def test_head_dim_80_and_deit():
    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=16,
        embed_dim=160,
        depth=1,
        num_heads=2,
        num_classes=5,
    )
    check_fuse(model, torch.randn(1, 3, 32, 32), backend="torch", expect_fused=["attention", "mlp", "patch_embed"])


def test_qk_norm_is_left_and_model_still_matches():
    model = make(qk_norm=True)
    report = check_fuse(
        model,
        torch.randn(2, 3, 32, 32),
        backend="torch",
        expect_fused=["mlp", "mlp", "patch_embed"],
        expect_left=["qk_norm"],
    )
    assert len(report.left) == 2


def test_non_gelu_activation_is_left():
    check_fuse(
        make(act_layer="relu"),
        torch.randn(2, 3, 32, 32),
        backend="torch",
        expect_fused=["attention", "attention", "patch_embed"],
        expect_left=["not GELU"],
    )


# timm ViTs whose blocks are not timm's Block: model name -> block class
OTHER_BLOCKS = {
    "vit_small_patch16_18x2_224": "ParallelThingsBlock",
    "vit_base_patch16_xp_224": "ParallelScalingBlock",
    "vit_base_patch16_rope_reg1_gap_256": "EvaBlock",  # timm's Eva, not a VisionTransformer
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OTHER_BLOCKS))
def test_blocks_of_another_class_are_reported_left(name, backend):
    """Blocks of another class than timm's Block run as they are (the model still matches); the report
    lists the attention and the MLP of each as left, naming the class, before and after fuse."""
    cls = OTHER_BLOCKS[name]
    model = timm.create_model(name, pretrained=False, **SMALL)
    assert {type(b).__name__ for b in model.blocks} == {cls}
    for report in (vk.fuse_report(model), None):
        if report is None:
            report = check_fuse(model, torch.randn(2, 3, 32, 32), backend=backend, expect_fused=["patch_embed"])
        left = [e for e in report.left if e.path.startswith("blocks.")]
        assert sorted((e.path.split(".")[1], e.op) for e in left) == [
            (i, op) for i in ("0", "1") for op in ("attention", "mlp")
        ], str(report)
        assert all(f"is {cls}, not timm's Block" in e.reason for e in left), str(report)


# hierarchical timm ViTs, whose blocks sit in a blocks list per stage: name -> (small config, block class, block paths)
HIERARCHICAL = {
    "swin_tiny_patch4_window7_224": (
        dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 1), num_heads=(1, 2)),
        "SwinTransformerBlock",
        ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"],
    ),
    "pvt_v2_b0": (  # its class is named Block too: the report names its module
        dict(depths=(2, 1), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1)),
        "timm.models.pvt_v2.Block",
        ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"],
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(HIERARCHICAL))
def test_blocks_of_hierarchical_models_are_reported_left(name, backend):
    """Blocks kept per stage (Swin's layers.N.blocks, PVTv2's stages.N.blocks) run as they are; the
    report lists the attention and the MLP of every one as left, naming the class, before and after
    fuse (not "0 left" beside a fused patch embedding), and the fused model still matches."""
    cfg, cls, paths = HIERARCHICAL[name]
    model = timm.create_model(name, pretrained=False, num_classes=5, **cfg)
    for report in (vk.fuse_report(model), None):
        if report is None:
            report = check_fuse(model, torch.randn(2, 3, 32, 32), backend=backend)
        left = sorted((e.path, e.op) for e in report.left if e.op in ("attention", "mlp"))
        assert left == sorted((f"{p}.{c}", op) for p in paths for op, c in (("attention", "attn"), ("mlp", "mlp")))
        assert all(
            f"{e.path.rpartition('.')[0]} is {cls}, not timm's Block" in e.reason
            for e in report.left
            if e.op != "patch_embed"
        ), str(report)


def test_ops_selection():
    model = make().eval()
    vk.fuse(model, backend="torch", ops=("mlp",))
    report = vk.fuse_report(model)
    assert sorted(e.op for e in report.fused) == ["mlp", "mlp"]
    assert all(e.reason == "not requested (ops)" for e in report.left)


def test_unsupported_head_dim_for_an_explicit_triton_request_is_left():
    model = make(embed_dim=48, num_heads=4).eval()  # head_dim 12
    report = vk.fuse_report(model, backend="triton")
    left = [e for e in report.left if e.op == "attention"]
    assert len(left) == 2 and all("head_dim=12" in e.reason for e in left)
    auto = vk.fuse_report(model, backend="auto")
    assert not [e for e in auto.left if "head_dim" in e.reason]


def test_head_dim_only_triton_takes_is_left_for_an_explicit_cuda_request():
    """The swap asks the rule of the backend requested (checks.head_dim_unsupported): head_dim 160 is a
    Triton head dim but not a CUDA one, so backend="cuda" leaves the attention instead of failing at forward."""
    model = make(embed_dim=320, num_heads=2).eval()  # head_dim 160
    left = [e for e in vk.fuse_report(model, backend="cuda").left if e.op == "attention"]
    assert len(left) == 2 and all("head_dim=160" in e.reason and "CUDA" in e.reason for e in left), left
    assert not [e for e in vk.fuse_report(model, backend="triton").left if "head_dim" in e.reason]


def test_attn_mask_runs_the_original_block():
    model = make().eval()
    block = copy.deepcopy(model.blocks[0])
    vk.fuse(model, backend="torch")
    x = torch.randn(2, 17, 64)
    mask = torch.randn(2, 1, 17, 17)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](x, attn_mask=mask), block(x, attn_mask=mask), rtol=0, atol=0)
        assert not torch.allclose(model.blocks[0](x), block(x, attn_mask=mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_scale_set_after_fuse_as_timm_applies_it(fused_attn, backend):
    """attn.scale set after fuse (an attention temperature): timm applies it on its eager path only
    (fused_attn=False); its SDPA path (the default) takes SDPA's 1/sqrt(head_dim). The fused blocks do the
    same, against the unfused model in float64 under the tolerance rule."""
    model = make().eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend=backend)
    for m in (model, ref):
        for b in m.blocks:
            b.attn.fused_attn = fused_attn
            b.attn.scale = 0.5
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(images)
        assert vk.last_decision("qkv_attention").backend == backend
        assert_close(got, copy.deepcopy(ref).double()(images.double()), ref(images), name=f"fused_attn={fused_attn}")


def test_dropout_in_training_runs_the_original_modules():
    report = check_dropout_runs_original(make(proj_drop_rate=0.2, drop_path_rate=0.1), torch.randn(2, 3, 32, 32))
    assert any("active now" in n for e in report.fused for n in e.notes), str(report)


def test_gradients_take_the_torch_path():
    check_grad(make(init_values=0.1), torch.randn(2, 3, 32, 32))


def test_load_state_dict_after_fuse():
    check_load_state_dict(make(init_values=0.1), torch.randn(2, 3, 32, 32))


def test_optimizer_built_before_fuse_keeps_working():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(x).square().sum().backward()
    ref_opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


def test_hooks():
    model = make().eval()
    calls = []
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append("block"))
    model.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: calls.append("qkv"))
    vk.fuse(model, backend="torch")
    report = vk.fuse_report(model)
    left = [e for e in report.left if e.path == "blocks.1.attn"]
    assert left and "hooks" in left[0].reason
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls.count("block") == 1 and calls.count("qkv") == 1


def test_fuse_twice_and_report_before_fuse():
    model = make().eval()
    dry = vk.fuse_report(model)
    assert not dry.fused and all("fuse() would" in e.reason for e in dry.left)
    snap = snapshot(model)
    vk.fuse(model, backend="torch")
    vk.fuse(model, backend="auto")
    assert {e.op for e in vk.fuse_report(model).fused} == {"attention", "mlp", "patch_embed"}
    assert all(m.backend == "auto" for m in model.modules() if isinstance(m, vk.swap.SwapWrapper))
    assert_same_state(model, snap)


def test_autocast_with_layer_scale_runs_fused():
    """LayerScale under torch.autocast: the fused ops at bfloat16, layer scale and residual add in the
    stream's float32 as eager: within the tolerance rule of the float64 model, the unfused model under
    the same autocast being plain PyTorch (tests/test_swap_autocast.py: every family, no LayerScale)."""
    model = make(init_values=0.1).eval()
    ref, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    vk.fuse(model, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, base = model(x), ref(x)
    with torch.no_grad():
        want = oracle(x.double())
    assert got.dtype == base.dtype == torch.bfloat16
    assert all(b.last_fallback is None for b in model.blocks)
    assert vk.last_decision("layernorm_gelu_mlp").backend == "torch"
    assert_close(got, want, base, name="timm with LayerScale under autocast")
