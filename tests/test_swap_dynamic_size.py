"""Dynamic resolution through fuse (issue 13 item 4): one fused model serves several image sizes where
the family supports it (timm ``dynamic_img_size=True``, transformers ``interpolate_pos_encoding=True``),
each size against the unfused model run in float64 under the tolerance rule (the unfused model at
float32 as the baseline). The fused patch projection runs at every size (its decision is checked).
timm and transformers: the position embedding is resampled by the library's own function on every
call at another size (nothing cached, as the libraries do: a write through ``.data`` shows too), and
added by the patch_embed kernel with the class token (timm's register tokens and no_embed_class too:
the prefix rows concatenated in front). The reference ViT's own dynamic size is tested in
tests/test_models.py."""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels.testing import assert_close

from conftest import DEVICE
from swap_checks import check_grad

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


def timm_dynamic(depth=2, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=depth,
        num_heads=2,
        num_classes=10,
        dynamic_img_size=True,
        **kw,
    ).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_timm_dynamic_img_size(backend):
    model = timm_dynamic()
    check_sizes(model, backend)
    e = next(e for e in vk.fuse_report(model).fused if e.op == "patch_embed")
    assert e.path == "patch_embed" and any("written by the patch_embed kernel" in n for n in e.notes), str(e)


def test_timm_pos_embed_resampled_at_another_grid(monkeypatch):
    """The fused timm model resamples pos_embed with timm's own function on every call at another patch
    grid (none at the native grid) and never runs timm's _pos_embed; the logits follow a write through
    ``.data`` (no version bump). A direct model.patch_embed(images) call still returns timm's PatchEmbed output (the projection
    alone), and unfuse removes the root's instance attributes."""
    import timm.layers
    import timm.models.vision_transformer as tvit

    model = timm_dynamic(depth=1).eval()
    vk.fuse(model, backend="torch")
    calls, originals = [], []
    real = timm.layers.resample_abs_pos_embed
    monkeypatch.setattr(
        timm.layers,
        "resample_abs_pos_embed",
        lambda pe, new_size, **kw: calls.append(tuple(new_size)) or real(pe, new_size, **kw),
    )
    real_pos = tvit.VisionTransformer._pos_embed
    monkeypatch.setattr(tvit.VisionTransformer, "_pos_embed", lambda self, x: originals.append(1) or real_pos(self, x))
    with torch.no_grad():
        for size in [(48, 40), (32, 32), (48, 40), (64, 24), (48, 40)]:
            model(torch.randn(1, 3, *size, device=DEVICE))
        assert calls == [(6, 5), (6, 5), (8, 3), (6, 5)], calls
        assert not originals, "timm's _pos_embed ran: the kernel did not add the position embedding"
        model.pos_embed.data.add_(torch.randn_like(model.pos_embed))
        images = torch.randn(2, 3, 48, 40, device=DEVICE)
        got = model(images)
        oracle = copy.deepcopy(vk.unfuse(copy.deepcopy(model))).double()
        assert_close(got, oracle(images.double()), vk.unfuse(copy.deepcopy(model))(images), name="after the update")
        direct = model.patch_embed(images)  # not inside forward_features: timm's NHWC projection, no pos
        want = oracle.patch_embed(images.double())
        assert direct.shape == want.shape == (2, 6, 5, 64)
        assert_close(direct, want, vk.unfuse(copy.deepcopy(model)).patch_embed(images), name="patch_embed alone")
    vk.unfuse(model)
    assert "_pos_embed" not in model.__dict__ and "forward_features" not in model.__dict__
    assert type(model.patch_embed).__name__ == "PatchEmbed"


@pytest.mark.parametrize(
    "change", [dict(img_size=(48, 40)), dict(patch_size=(4, 4)), dict(img_size=(48, 40), patch_size=(4, 4))]
)
def test_timm_set_input_size_after_fuse(change):
    """model.set_input_size after fuse (timm resamples pos_embed; at another patch size PatchEmbed replaces
    its proj): another image size alone stays fused; a new projection makes calls run the original modules,
    saying so, never the old projection at the old patch size. The logits are the unfused model's (same
    set_input_size) in float64 under the tolerance rule; after unfuse bit for bit, fused again after fuse."""
    model = timm_dynamic(depth=1).eval()
    base = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    model.set_input_size(**change)
    base.set_input_size(**change)
    oracle = copy.deepcopy(base).double()
    images = torch.randn(2, 3, 48, 40, device=DEVICE)
    with torch.no_grad():
        want, baseline = oracle(images.double()), base(images)
        assert_close(model(images), want, baseline, name=f"logits after set_input_size({change})")
        ran = "original" if "patch_size" in change else "torch"
        assert vk.last_decision("patch_embed").backend == ran, vk.last_decision("patch_embed")
        if "patch_size" in change:
            assert model.patch_embed.last_fallback.startswith("patch_embed.proj was replaced"), model.patch_embed
        assert torch.equal(vk.unfuse(model)(images), baseline)
        vk.fuse(model, backend="torch")
        assert_close(model(images), want, baseline, name="fused again")
        assert vk.last_decision("patch_embed").backend == "torch"


def test_timm_hook_on_patch_embed_sees_timms_output():
    """A forward hook on the fused patch_embed (registered after fuse) sees what timm's PatchEmbed returns,
    the NHWC projection without the position embedding, and the logits stay the unfused model's."""
    model = timm_dynamic(depth=1).eval()
    oracle = copy.deepcopy(model).double()
    base = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    seen = []
    model.patch_embed.register_forward_hook(lambda m, args, out: seen.append(out))
    images = torch.randn(2, 3, 40, 48, device=DEVICE)
    with torch.no_grad():
        got = model(images)
        assert_close(got, oracle(images.double()), base(images), name="logits with a hook")
        assert_close(seen[0], oracle.patch_embed(images.double()), base.patch_embed(images), name="hooked output")


# The timm variants whose prefix rows the patch_embed kernel cannot write alone (it writes one class
# token at most, with pos_embed[0] added): registers with a class token (vit_small_patch16_224 built
# with reg_tokens=4), registers without one and no_embed_class (vit_base_patch16_reg4_gap_256's
# layout), no_embed_class with a class token (deit3's), and registers + class token + no_embed_class.
TIMM_PREFIX_VARIANTS = {
    "reg4": dict(reg_tokens=4),
    "reg4_gap": dict(reg_tokens=4, no_embed_class=True, class_token=False, global_pool="avg"),
    "no_embed_class": dict(no_embed_class=True),
    "reg2_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", sorted(TIMM_PREFIX_VARIANTS))
def test_timm_dynamic_img_size_prefix_variants(variant, backend):
    """Registers / no_embed_class: the whole patch_embed is fused (the resampled position embedding, the
    class and register rows) and the logits at three sizes match timm's own forward."""
    model = timm_dynamic(depth=1, **TIMM_PREFIX_VARIANTS[variant])
    check_sizes(model, backend)
    (e,) = [e for e in vk.fuse_report(model).fused if e.op == "patch_embed"]
    assert e.path == "patch_embed" and any("on every call at another patch grid" in n for n in e.notes), str(e)


@pytest.mark.parametrize("variant", sorted(TIMM_PREFIX_VARIANTS))
def test_timm_dynamic_img_size_prefix_variants_cuda(variant):
    """The same through the CUDA kernels (the host emulator), only the embedding fused (the emulator is
    slow on whole blocks): three sizes against timm's own forward in float64."""
    model = timm_dynamic(depth=1, **TIMM_PREFIX_VARIANTS[variant]).eval()
    oracle, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    vk.fuse(model, backend="cuda", ops=("patch_embed",))
    assert [e.path for e in vk.fuse_report(model).fused] == ["patch_embed"], str(vk.fuse_report(model))
    for size in SIZES:
        images = torch.randn(2, 3, *size, device=DEVICE)
        with torch.no_grad():
            got = model(images)
            assert vk.last_decision("patch_embed").backend == "cuda"
            assert_close(got, oracle(images.double()), base(images), name=f"logits at {size}")


@pytest.mark.parametrize("variant", ["reg4", "reg2_no_embed_class"])
def test_timm_prefix_variants_gradients(variant):
    """Under autograd at another size (the embedding rebuilt per call, not cached) the gradients of every
    parameter, pos_embed and the class / register tokens included, are the unfused model's."""
    check_grad(timm_dynamic(depth=1, **TIMM_PREFIX_VARIANTS[variant]), torch.randn(2, 3, 48, 40, device=DEVICE))


def _count_resamples(monkeypatch):
    """The grids timm's resample_abs_pos_embed is called for (the fused module imports it per call)."""
    import timm.layers

    calls = []
    real = timm.layers.resample_abs_pos_embed
    monkeypatch.setattr(
        timm.layers,
        "resample_abs_pos_embed",
        lambda pe, new_size, **kw: calls.append(tuple(new_size)) or real(pe, new_size, **kw),
    )
    return calls


@pytest.mark.parametrize("variant", sorted(TIMM_PREFIX_VARIANTS))
def test_timm_prefix_variants_resample_every_call_and_follow_parameter_writes(variant, monkeypatch):
    """Registers / no_embed_class: one resample per call, at the native grid too (the prefix rows are built;
    timm's own _pos_embed never runs), so the embedding follows every change of a tensor it is made of: an
    optimizer step, load_state_dict, a write through ``.data`` to the register or class token. After each
    change the logits are the unfused model's (in float64, under the tolerance rule)."""
    import timm.models.vision_transformer as tvit

    model = timm_dynamic(depth=1, **TIMM_PREFIX_VARIANTS[variant]).eval()
    vk.fuse(model, backend="torch")
    calls = _count_resamples(monkeypatch)
    originals = []
    real_pos = tvit.VisionTransformer._pos_embed
    monkeypatch.setattr(tvit.VisionTransformer, "_pos_embed", lambda self, x: originals.append(1) or real_pos(self, x))
    images = torch.randn(2, 3, 48, 40, device=DEVICE)

    def check(name):
        with torch.no_grad():
            got = model(images)
            assert not originals, "timm's _pos_embed ran: the fused patch_embed did not write the tokens"
            ref = vk.unfuse(copy.deepcopy(model))
            assert_close(got, copy.deepcopy(ref).double()(images.double()), ref(images), name=name)
        originals.clear()  # the unfused copies ran it

    with torch.no_grad():
        for size in [(48, 40), (32, 32), (48, 40), (64, 24), (48, 40), (32, 32)]:
            model(torch.randn(1, 3, *size, device=DEVICE))
    assert calls == [(6, 5), (4, 4), (6, 5), (8, 3), (6, 5), (4, 4)], calls  # the native grid too
    assert not originals, "timm's _pos_embed ran: the fused patch_embed did not write the tokens"
    check("first")

    # an optimizer step (under autograd gradients reach pos_embed through the resampling)
    opt = torch.optim.SGD([model.pos_embed], lr=10.0)
    model(images).square().sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    opt.step()
    check("after an optimizer step")

    other = timm_dynamic(depth=1, **TIMM_PREFIX_VARIANTS[variant])
    model.load_state_dict(other.state_dict())
    check("after load_state_dict")

    for name in ("reg_token", "cls_token", "pos_embed"):  # with registers, all three are in the prefix rows
        t = getattr(model, name)
        if t is not None:
            t.data.add_(torch.randn_like(t))  # no version bump
            check(f"after {name}.data.add_")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_timm_dynamic_img_size_uint8(backend):
    """uint8 NHWC images at three sizes through the fused dynamic-size embedding (the data config's
    mean/std applied on load, the resampled position embedding added by the kernel), against the unfused
    model in float64 fed the normalized images; only the embedding is fused (the emulator is slow)."""
    model = timm_dynamic(depth=1).eval()
    oracle, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    vk.fuse(model, backend=backend, ops=("patch_embed",))
    mean = torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float64, device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float64, device=DEVICE).view(1, 3, 1, 1)
    for size in SIZES:
        images = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, device=DEVICE).permute(0, 3, 1, 2)
        x64 = (images.double() / 255 - mean) / std
        with torch.no_grad():
            got = model(images)
            assert vk.last_decision("patch_embed").backend == backend
            assert_close(got, oracle(x64), base(x64.float()), name=f"uint8 logits at {size}")
    # a fall-back (global module hooks make the fused parts run the original modules) normalizes too
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    assert vk.last_decision("patch_embed").backend == "original"


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


def test_hf_pos_encoding_resampled_at_another_size(monkeypatch):
    """The fused ViTEmbeddings (one patch_embed launch with class token and position embedding) calls the
    module's own interpolate_pos_encoding on every call at another image size, and follows a write
    through ``.data`` (no version bump)."""
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
        assert calls == [(48, 40), (48, 40), (64, 24), (48, 40)], calls
        model.embeddings.position_embeddings.data.add_(torch.randn_like(model.embeddings.position_embeddings))
        images = torch.randn(2, 3, 48, 40)
        got = model(images, interpolate_pos_encoding=True).last_hidden_state
        assert vk.last_decision("patch_embed").backend == "torch"
        base = vk.unfuse(copy.deepcopy(model))
        want = copy.deepcopy(base).double()(images.double(), interpolate_pos_encoding=True).last_hidden_state
        assert_close(got, want, base(images, interpolate_pos_encoding=True).last_hidden_state, name="after .data")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("size", [(16, 64), (32, 32), (24, 40)])
def test_hf_non_square_image_size_pos_encoding(size, backend):
    """A ViT configured for a non-square image_size (16, 64): with interpolate_pos_encoding=True transformers
    keeps the position embedding as it is only for a square image of the same patch count ((32, 32) here)
    and resamples it otherwise, the configured size included (from its square-root grid); the fused
    embedding adds what transformers adds, against the unfused model in float64 under the tolerance rule."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=(16, 64),
        patch_size=8,
    )
    model = transformers.ViTModel(cfg).to(DEVICE).eval()
    oracle, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    vk.fuse(model, backend=backend, ops=("patch_embed",))
    images = torch.randn(2, 3, *size, device=DEVICE)
    with torch.no_grad():
        for interpolate in (True, False) if size == (16, 64) else (True,):
            got = model(images, interpolate_pos_encoding=interpolate).last_hidden_state
            assert vk.last_decision("patch_embed").backend == backend
            want = oracle(images.double(), interpolate_pos_encoding=interpolate).last_hidden_state
            baseline = base(images, interpolate_pos_encoding=interpolate).last_hidden_state
            assert_close(got, want, baseline, name=f"{size}, interpolate_pos_encoding={interpolate}")


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    return transformers.ViTForImageClassification(cfg)


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_model_built_under_inference_mode(family):
    """A model built (and fused) under torch.inference_mode has inference tensors, which keep no version
    counter: what the fused parts compute from parameters (timm's and transformers' resampled position
    embedding, transformers' concatenated q/k/v weights) follows an in-place update made there."""
    call_kw = dict(interpolate_pos_encoding=True) if family == "hf" else {}
    with torch.inference_mode():
        model = (timm_dynamic(depth=1) if family == "timm" else _hf_vit()).eval()
        vk.fuse(model, backend="torch")
        assert not vk.fuse_report(model).left, str(vk.fuse_report(model))
        images = torch.randn(2, 3, 48, 40, device=DEVICE)
        for step in range(2):
            got = _logits(model(images, **call_kw))
            base = vk.unfuse(copy.deepcopy(model))
            want = _logits(copy.deepcopy(base).double()(images.double(), **call_kw))
            assert_close(got, want, _logits(base(images, **call_kw)), name=f"{family} step {step}")
            for p in model.parameters():  # an in-place update where no version counter sees it
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["timm", "hf"])
def test_cuda_graph_of_a_fused_model_follows_in_place_updates(family):
    """A fused model captured in a CUDA graph at a resampled size (timm's and transformers' resampled
    position embedding, transformers' concatenated q/k/v weights), replayed after in-place updates of
    every parameter: each replay against the unfused model run eagerly on the parameters as they are."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    call_kw = dict(interpolate_pos_encoding=True) if family == "hf" else {}
    model = (timm_dynamic(depth=1) if family == "timm" else _hf_vit()).cuda().eval()
    vk.fuse(model, backend="torch")
    images = torch.randn(2, 3, 48, 40, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the caches filled outside the capture
            model(images, **call_kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _logits(model(images, **call_kw))
        for step in range(3):
            graph.replay()
            torch.cuda.synchronize()
            base = vk.unfuse(copy.deepcopy(model))
            want = _logits(copy.deepcopy(base).double()(images.double(), **call_kw))
            assert_close(out, want, _logits(base(images, **call_kw)), name=f"{family} replay {step}")
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
