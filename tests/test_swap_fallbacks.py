"""No silent fallback (issue 13 item 6), per family: whenever a fused part runs the original modules
(a forward hook registered after fuse on a module the fused path bypasses, a global module hook,
an attention mask, HF's output_attentions under autograd) the call still gives the original's
result and the user sees why: an INFO line on the ``vit_kernels`` logger, ``last_fallback`` on the
wrapper, a note in fuse_report and ``last_decision(op).backend == "original"`` with the reason.
Hooks registered before fuse leave the part unfused, with the reason in the report."""

import copy
import functools
import logging

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels.swap import SwapWrapper
from vit_kernels.testing import assert_close, compare


def _timm():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
    )


def _torchvision():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    model = tv.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts it at zero: every logit 0
    return model


def _hf():
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
    cfg._attn_implementation = "eager"  # SDPA returns no attention weights (output_attentions)
    return transformers.ViTForImageClassification(cfg)


def _vit_pytorch():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    return vit_pytorch.ViT(
        image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128
    )


FAMILIES = {"timm": _timm, "torchvision": _torchvision, "transformers": _hf, "vit_pytorch": _vit_pytorch}


def logits(y):
    return y if isinstance(y, torch.Tensor) else y.logits


def block_wrapper(model):
    """The last fused wrapper that fuses attention (its ops' decisions are the last ones of a forward),
    and the LayerNorm before its attention, a module its fused path bypasses (every family's original
    calls it as a module, unlike MultiheadAttention's out_proj)."""
    w = [m for m in model.modules() if isinstance(m, SwapWrapper) and m.fused_ops.get("attention")][-1]
    for name, child in w.bypassed().items():
        norm = next((m for m in child.modules() if isinstance(m, nn.LayerNorm)), None)
        if norm is not None:
            return w, norm
    raise AssertionError(f"no LayerNorm among {list(w.bypassed())}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hook_registered_after_fuse_fires_and_is_reported(family, caplog):
    model = FAMILIES[family]().eval()
    ref = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32)
    vk.fuse(model, backend="torch")
    w, lin = block_wrapper(model)
    assert w.hook_reason() is None and w.last_fallback is None and w.fallbacks == {}
    calls = []
    handle = lin.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vit_kernels"):
        got = logits(model(images))
        logits(model(images))
    assert len(calls) == 2, "the hook did not fire once per call"
    with torch.no_grad():  # the other blocks ran fused: the tolerance rule against the float64 original
        assert_close(got, logits(copy.deepcopy(ref).double()(images.double())), logits(ref(images)))
    assert "forward hooks are registered on" in w.last_fallback and w.vk_path in w.last_fallback
    lines = [r.getMessage() for r in caplog.records if "running the original module" in r.getMessage()]
    assert len([m for m in lines if w.vk_path in m]) == 1, lines  # once per reason, not per call
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and "forward hooks are registered on" in d.reasons["fused"]
    report = str(vk.fuse_report(model))
    assert "forward hooks are registered on" in report and "time(s) since fuse" in report

    handle.remove()  # the fused path again
    with torch.no_grad():
        model(images)
    assert vk.last_decision("qkv_attention").backend == "torch"
    assert len(calls) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hook_registered_before_fuse_leaves_the_part(family):
    model = FAMILIES[family]().eval()
    probe = copy.deepcopy(model)
    vk.fuse(probe, backend="torch")
    w, lin = block_wrapper(probe)
    path = next(n for n, m in probe.named_modules() if m is lin)
    calls = []
    model.get_submodule(path).register_forward_hook(lambda m, i, o: calls.append(1))
    vk.fuse(model, backend="torch")
    left = [e for e in vk.fuse_report(model).left if "forward hooks are registered on" in e.reason]
    assert left, str(vk.fuse_report(model))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_global_module_hooks_fall_back_visibly(family):
    model = FAMILIES[family]().eval()
    vk.fuse(model, backend="torch")
    w, _ = block_wrapper(model)
    images = torch.randn(1, 3, 32, 32)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    assert "global module forward hooks" in w.last_fallback
    assert any(name in seen for name in ("Linear", "NonDynamicallyQuantizableLinear"))
    assert "global module forward hooks" in vk.last_decision("qkv_attention").reasons["fused"]


def test_timm_attention_mask_falls_back_visibly():
    model = _timm().eval()
    vk.fuse(model, backend="torch")
    block = model.blocks[0]
    x = torch.randn(1, 17, 64)
    with torch.no_grad():
        block(x, attn_mask=torch.zeros(1, 1, 17, 17, dtype=torch.bool))
    assert block.last_fallback.startswith("attn_mask / is_causal given")


def test_hf_output_attentions_served_fused_falls_back_visibly_under_autograd():
    """output_attentions is served by the fused layer (tests/test_swap_hf.py checks the weights); under
    autograd, where the weights kernel has no backward, the call runs the original layers, visibly."""
    model = _hf().eval()
    vk.fuse(model, backend="torch")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    d = vk.last_decision("qkv_attention")
    assert d.backend == "torch" and d.path == "torch+stats", d
    out = model(torch.randn(1, 3, 32, 32), output_attentions=True)
    assert len(out.attentions) == 2 and out.logits.requires_grad
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and "output_attentions" in d.reasons["fused"]
    report = str(vk.fuse_report(model))
    assert "served fused 1 time(s)" in report and "under autograd" in report, report


class _Doubled(nn.Linear):
    """A Linear whose forward differs from nn.Linear's (as PEFT's LoRA layers and quantized Linears do)."""

    def forward(self, t):
        return super().forward(t) * 2


def _doubled(linear, t):  # an instance forward (a partial: deepcopy gives the copy its own)
    return nn.Linear.forward(linear, t) * 2


class _Halved(nn.Module):
    def forward(self, w):
        return w * 0.5


def _replace(model, path: str) -> None:
    old = model.get_submodule(path)
    new = _Doubled(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


CHANGES = {
    "replaced": (_replace, "was replaced (Linear -> _Doubled) after fuse"),
    "parametrized": (
        lambda model, path: torch.nn.utils.parametrize.register_parametrization(
            model.get_submodule(path), "weight", _Halved()
        ),
        "changed class (Linear -> ParametrizedLinear) after fuse",
    ),
    "forward set": (
        lambda model, path: setattr(
            model.get_submodule(path), "forward", functools.partial(_doubled, model.get_submodule(path))
        ),
        ".forward was set on the instance after fuse",
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_module_changed_after_fuse_runs_the_original(family, change, caplog):
    """A Linear the fused path bypasses (it reads its weight, never calls its forward), changed after
    fuse: replaced by a module with another forward, parametrized, or given an instance forward. The
    part runs the original modules, which call it (never the stale fused path), and says why; unfuse
    and fuse again fuse what can be (the changed Linear's part is left, with its reason)."""
    model = FAMILIES[family]().eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    w, _ = block_wrapper(model)
    (name, lin) = [(n, m) for n, m in w.named_modules() if type(m) is nn.Linear][-1]  # the MLP's last
    path = f"{w.vk_path}.{name}"
    unchanged = copy.deepcopy(ref)
    apply, expected = CHANGES[change]
    apply(model, path)
    apply(ref, path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vit_kernels"):
        got = logits(model(images))
        assert_close(got, logits(copy.deepcopy(ref).double()(images.double())), logits(ref(images)))
        assert (logits(ref(images)) - logits(unchanged(images))).abs().max() > 1e-3  # the change matters
    assert expected in w.last_fallback and path in w.last_fallback, w.last_fallback
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and expected in d.reasons["fused"], d
    assert any(expected in r.getMessage() for r in caplog.records)
    assert expected in str(vk.fuse_report(model))

    vk.unfuse(model)
    vk.fuse(model, backend="torch")
    with torch.no_grad():
        again = logits(model(images))
    assert_close(again, logits(copy.deepcopy(ref).double()(images.double())), logits(ref(images)))
    assert all(
        m.structure_reason() is None and m.last_fallback is None for m in model.modules() if isinstance(m, SwapWrapper)
    )
    left = [e.reason for e in vk.fuse_report(model).left if "_Doubled" in e.reason or "on the instance" in e.reason]
    # a ParametrizedLinear is an nn.Linear whose weight (a property) the fused path reads parametrized
    assert len(left) == (change != "parametrized"), str(vk.fuse_report(model))


@pytest.mark.parametrize("removed", ["weight", "weight and bias"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layernorm_weight_set_to_none_after_fuse_runs_the_original(family, removed):
    """The LayerNorm before a fused attention loses its affine weight after fuse (``norm.weight = None``,
    as elementwise_affine=False leaves it; the bias too or not). The fused ops read a None norm weight as
    no LayerNorm at all (or refuse a bias without it), so the part runs the original modules, which still
    normalize, and says why; unfuse and fuse again leave the part (the report's reason)."""
    model = FAMILIES[family]().eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    w, norm = block_wrapper(model)
    path = next(f"{w.vk_path}.{n}" for n, m in w.named_modules() if m is norm)
    for m in (model, ref):
        m.get_submodule(path).weight = None
        if removed == "weight and bias":
            m.get_submodule(path).bias = None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = logits(model(images))
        assert_close(got, logits(copy.deepcopy(ref).double()(images.double())), logits(ref(images)))
    expected = f"{path}.weight was set to None"
    assert w.last_fallback.startswith(expected), w.last_fallback
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and expected in d.reasons["fused"], d
    vk.unfuse(model)
    vk.fuse(model, backend="torch")
    assert any("no affine weight" in e.reason for e in vk.fuse_report(model).left), str(vk.fuse_report(model))


class _Packed(torch.Tensor):
    """A weight stored apart from its value, as torchao's quantized weights are: its value is twice the
    stored tensor, and it serves PyTorch's own (aten) ops only: another op (vit_kernels' fused ops)
    raises NotImplementedError, as torchao's subclasses do for an op they do not implement."""

    @staticmethod
    def __new__(cls, stored):
        return torch.Tensor._make_wrapper_subclass(cls, stored.shape, dtype=stored.dtype, device=stored.device)

    def __init__(self, stored):
        self.stored = stored

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace != "aten":
            raise NotImplementedError(f"_Packed does not implement {func}")
        if func is torch.ops.aten.detach.default:
            return _Packed(args[0].stored)
        value = functools.partial(torch.utils._pytree.tree_map, lambda t: t.stored * 2 if isinstance(t, _Packed) else t)
        return func(*value(args), **value(kwargs or {}))


def _pack(model, path: str) -> None:
    lin = model.get_submodule(path)
    lin.weight = nn.Parameter(_Packed(lin.weight.detach().clone()), requires_grad=False)


@pytest.mark.parametrize("when", ["before fuse", "after fuse"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tensor_subclass_weight_runs_the_original(family, when, caplog):
    """A weight the fused path reads, a tensor subclass that serves PyTorch's ops but not vit_kernels'
    (torchao's quantized weights): set before or after fuse, the part runs the original modules, which
    dispatch to it, and says why (before: a fused op raised NotImplementedError)."""
    model = FAMILIES[family]().eval()
    ref, unchanged = copy.deepcopy(model), copy.deepcopy(model)
    w, _ = block_wrapper(vk.fuse(copy.deepcopy(model), backend="torch"))
    (name, _) = [(n, m) for n, m in w.named_modules() if type(m) is nn.Linear][-1]  # the MLP's last
    path = f"{w.vk_path}.{name}"
    oracle = copy.deepcopy(model).double()
    for m in (ref, oracle) + ((model,) if when == "before fuse" else ()):
        _pack(m, path)
    vk.fuse(model, backend="torch")
    if when == "after fuse":
        _pack(model, path)
    w, _ = block_wrapper(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vit_kernels"):
        got = logits(model(images))
        assert_close(got, logits(oracle(images.double())), logits(ref(images)))
        assert (logits(ref(images)) - logits(unchanged(images))).abs().max() > 1e-3  # the subclass's value matters
    expected = f"{path}.weight is a _Packed (a tensor subclass)"
    assert w.last_fallback.startswith(expected), w.last_fallback
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and expected in d.reasons["fused"], d
    assert any(expected in r.getMessage() for r in caplog.records)
    assert expected in str(vk.fuse_report(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_func_transforms_run_the_original(family):
    """torch.func.vmap (per-sample logits) and torch.func.grad (of the logits' sum by the images) of a
    fused model (its parameters requiring grad), and forward-mode AD (the logits' tangent): the fused
    parts run the original modules, which serve them, and say why; the results against the float64
    oracle (before: a data-pointer error from inside a fused op's checks under torch.func; under forward
    AD a kernel backend returned no tangent, silently)."""
    model = FAMILIES[family]().eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    w, _ = block_wrapper(model)
    images, tangent = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)

    def forward_ad(m, x):  # the logits' tangent along ``tangent`` (forward-mode AD, no torch.func)
        with torch.no_grad(), torch.autograd.forward_ad.dual_level():
            out = logits(m(torch.autograd.forward_ad.make_dual(x, tangent.to(x.dtype))))
            return torch.autograd.forward_ad.unpack_dual(out).tangent

    for name, transform, why in (
        ("vmap", lambda m, x: torch.func.vmap(lambda i: logits(m(i[None]))[0])(x), "torch.func transform"),
        ("grad", lambda m, x: torch.func.grad(lambda i: logits(m(i)).sum())(x), "torch.func transform"),
        ("forward AD", forward_ad, "forward-mode AD"),
    ):
        try:
            want = transform(ref, images)
        except NotImplementedError as e:  # the original itself cannot (SDPA and MHA have no forward-AD formula)
            with pytest.raises(NotImplementedError, match="forward AD"):
                transform(model, images)
            assert name == "forward AD" and "forward AD" in str(e), e
            first = next(m for m in model.modules() if isinstance(m, SwapWrapper) and m.fused_ops.get("attention"))
            assert why in first.last_fallback, first.last_fallback  # it ran the original, which raised
            continue
        got = transform(model, images)
        assert_close(got, transform(copy.deepcopy(ref).double(), images.double()), want, name=name)
        assert why in w.last_fallback, w.last_fallback
        d = vk.last_decision("qkv_attention")
        assert d.backend == "original" and why in d.reasons["fused"], d
    with torch.no_grad():
        logits(model(images))
    assert vk.last_decision("qkv_attention").backend == "torch"  # outside torch.func: fused again


@pytest.mark.parametrize("family", ["timm", "torchvision", "vit_pytorch"])  # HF's GELU is no nn.GELU
def test_gelu_approximate_set_after_fuse_is_followed(family):
    """An nn.GELU's ``approximate`` set after fuse ("none" -> "tanh"): the fused MLP computes the GELU the
    module now computes, not the one it found at fuse (a fused block's output, its MLP weights drawn so that
    GELU's inputs are of order 1, where tanh and erf differ, and its output of order 3)."""
    model = FAMILIES[family]().eval()
    for lin in model.modules():
        if isinstance(lin, nn.Linear) and lin.out_features in (128, 256):  # the MLPs' first Linear
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        elif isinstance(lin, nn.Linear) and lin.in_features in (128, 256):  # and their second
            nn.init.normal_(lin.weight, std=3 * lin.in_features**-0.5)
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    w, _ = block_wrapper(model)
    block, erf = ref.get_submodule(w.vk_path), copy.deepcopy(ref.get_submodule(w.vk_path))
    for m in (w, block):
        acts = [a for a in m.modules() if isinstance(a, nn.GELU)]
        assert acts and all(a.approximate == "none" for a in acts)
        for a in acts:
            a.approximate = "tanh"
    x = 3 * torch.randn(2, 17, 64)
    with torch.no_grad():
        got = w(x)
        assert vk.last_decision("layernorm_gelu_mlp").backend == "torch"
        oracle = copy.deepcopy(block).double()(x.double())
        assert_close(got, oracle, block(x))
        assert not compare(erf(x), oracle, block(x)).ok  # the GELU of fuse time would fail the check


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_monte_carlo_dropout_in_an_eval_model_runs_the_original(family):
    """Monte-Carlo dropout: an eval model whose dropout modules alone are set to training (p = 0.3). The
    fused parts run the original modules, which drop: with one seed the fused model is bitwise the
    unfused one, and two calls differ."""
    model = FAMILIES[family]().eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    for m in (model, ref):
        drops = [d for d in m.modules() if isinstance(d, nn.Dropout)]
        assert drops
        for d in drops:
            d.p = 0.3
            d.train()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        got = logits(model(images))
        torch.manual_seed(1)
        want = logits(ref(images))
        again = logits(model(images))
    assert torch.equal(got, want)
    assert not torch.equal(got, again)
    d = vk.last_decision("qkv_attention")
    assert d.backend == "original" and "dropout is active" in d.reasons["fused"], d
    notes = [n for e in vk.fuse_report(model).fused for n in e.notes if n.startswith("dropout ")]
    assert notes and all("active now: a module under it is" in n for n in notes), notes
