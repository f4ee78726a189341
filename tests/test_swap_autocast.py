"""Mixed precision through fuse() (issue 12 item 4): under torch.autocast the fused parts of a swapped
model run the fused ops at the autocast dtype (kernel backends: inputs and parameters cast as autocast
casts a matmul's operands; backend torch: the ops' PyTorch path under autocast itself), never the
original modules, and each part returns the dtype the unfused part returns
under the same autocast. Per family, backend torch and triton (the interpreter on a CPU), CPU
autocast to bfloat16: every fused part's output and the logits against the float64 model under
the tolerance rule at bfloat16, plain PyTorch being the unfused model under the same autocast."""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels import backends
from vit_kernels.swap import SwapWrapper
from vit_kernels.testing import assert_close

from test_swap_fallbacks import FAMILIES as BASE_FAMILIES, logits


def _timm_dynamic():
    """timm with dynamic_img_size: its whole patch embedding (projection, position embedding, class token) is
    one fused op call (vit_kernels.swap.timm.FusedTimmPatchEmbed)."""
    timm = pytest.importorskip("timm")
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **kw)


FAMILIES = {**BASE_FAMILIES, "timm_dynamic": _timm_dynamic}

DT = torch.bfloat16
TRITON = pytest.mark.skipif(backends.triton_unavailable(torch.device("cpu"), [DT]) is not None, reason="no Triton")
OPS = ("qkv_attention", "linear", "layernorm_gelu_mlp", "patch_embed")


def _model(family):
    """The family's small model in eval mode, every all-zero parameter (torchvision's zero-initialised
    head, zero biases) made random so that no output is zero whatever the error."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def _outputs(model, paths, run):
    """run(model)'s result and {path: output} of the modules at ``paths``."""
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, o)) for p in paths]
    try:
        out = run(model)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_parts_run_fused_at_the_autocast_dtype(family, backend, monkeypatch):
    model = _model(family)
    oracle = copy.deepcopy(model).double()
    fused = vk.fuse(copy.deepcopy(model), backend=backend)
    paths = [n for n, m in fused.named_modules() if isinstance(m, SwapWrapper)]
    assert paths, vk.fuse_report(fused)
    images = torch.randn(2, 3, 32, 32)

    def autocast(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=DT):
            return logits(m(images))

    calls = []
    for op in OPS:  # every fused op call: its input's dtype, and whether autocast is on inside

        def spy(x, *a, _real=getattr(vk.ops, op), _op=op, **kw):
            calls.append((_op, x.dtype, torch.is_autocast_enabled("cpu")))
            return _real(x, *a, **kw)

        monkeypatch.setattr(vk.ops, op, spy)
    with vk.record_decisions() as decisions:
        got, got_parts = _outputs(fused, paths, autocast)
    base, base_parts = _outputs(model, paths, autocast)  # plain PyTorch: the unfused model, same autocast
    with torch.no_grad():
        want, want_parts = _outputs(oracle, paths, lambda m: logits(m(images.double())))

    assert {op for op, _, _ in calls} >= {"qkv_attention", "layernorm_gelu_mlp"}, calls
    if backend == "torch":  # autocast casts the op's PyTorch path as it casts the unfused modules
        assert all(on for _, _, on in calls), calls
    else:  # the kernels get every tensor at the autocast dtype
        assert all(dt == DT and not on for _, dt, on in calls), calls
    assert decisions and all(d.backend == backend for d in decisions), [str(d) for d in decisions]
    assert all(fused.get_submodule(p).last_fallback is None for p in paths)
    for p in paths:
        g, b = got_parts[p], base_parts[p]
        assert g.dtype == b.dtype, f"{p}: fused part returned {g.dtype}, the unfused part {b.dtype}"
        assert_close(g, want_parts[p], b, name=f"{family} {p} under autocast ({backend})")
    assert got.dtype == base.dtype
    assert_close(got, want, base, name=f"{family} logits under autocast ({backend})")
    calls.clear()
    unhooked = autocast(fused)  # without the hooks (a hooked timm patch_embed returns timm's own output)
    assert all(dt == DT and not on for _, dt, on in calls) if backend != "torch" else calls, calls
    assert unhooked.dtype == base.dtype
    assert_close(unhooked, want, base, name=f"{family} logits under autocast, no hooks ({backend})")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_under_autocast(family, backend):
    """A training step's backward under autocast: the fused ops' backward (Triton's kernels for backend
    triton) at bfloat16; every parameter's gradient (float32, as autocast gives) against the float64
    model's under the 3x rule, plain PyTorch being the unfused model's under the same autocast."""
    model = _model(family)
    oracle = copy.deepcopy(model).double()
    fused = vk.fuse(copy.deepcopy(model), backend=backend)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=DT), vk.record_decisions() as decisions:
        logits(fused(images)).float().square().mean().backward()
    with torch.autocast("cpu", dtype=DT):
        logits(model(images)).float().square().mean().backward()
    logits(oracle(images.double())).square().mean().backward()
    assert decisions and all(d.backend == backend for d in decisions), [str(d) for d in decisions]
    got = dict(fused.named_parameters())
    for (name, w), b in zip(oracle.named_parameters(), model.parameters()):
        g = got[name].grad
        assert g is not None and g.dtype == b.grad.dtype == torch.float32, name
        assert_close(g, w.grad, b.grad, factor=3.0, name=f"{family} grad {name} under autocast ({backend})")
