"""Shared acceptance checks for the swap adapters, used by tests/test_swap_*.py (a helper module, not a
test file: pytest collects nothing here)."""

import copy
import io

import torch

import vit_kernels as vk
from vit_kernels.swap import SwapWrapper
from vit_kernels.testing import assert_close


def _logits(y):
    if isinstance(y, torch.Tensor):
        return y
    for attr in ("logits", "last_hidden_state"):
        if hasattr(y, attr):
            return getattr(y, attr)
    raise TypeError(f"no tensor output in {type(y)}")


def snapshot(model):
    """state_dict keys, data_ptrs and values (cloned) and the Parameter objects."""
    sd = model.state_dict()
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in sd.items()}, [id(p) for p in model.parameters()]


def assert_same_state(model, snap):
    sd_before, params_before = snap
    sd = model.state_dict()
    assert list(sd) == list(sd_before), "state_dict keys changed"
    for k, (ptr, val) in sd_before.items():
        assert sd[k].data_ptr() == ptr, f"{k}: data_ptr changed (a copy)"
        assert torch.equal(sd[k], val), f"{k}: value changed"
    assert [id(p) for p in model.parameters()] == params_before, "the Parameter objects changed"


def check_fuse(model, images, *, backend, dtype=torch.float32, expect_fused=None, expect_left=(), **call_kw):
    """The acceptance rule for one model: fused output within tolerance of the float64 original,
    parameters shared, state_dict identical before fuse / after fuse / after unfuse, the report
    lists what was fused and what was left. Returns the fuse report."""
    model = model.eval()
    oracle = copy.deepcopy(model).to(torch.float64)
    model = model.to(dtype)
    images = images.to(dtype)
    with torch.no_grad():
        want = _logits(oracle(images.to(torch.float64), **call_kw))
        base = _logits(model(images, **call_kw))
    snap = snapshot(model)

    assert vk.fuse(model, backend=backend) is model
    assert_same_state(model, snap)
    report = vk.fuse_report(model)
    fused_ops = sorted(e.op for e in report.fused)
    if expect_fused is not None:
        assert fused_ops == sorted(expect_fused), str(report)
    for needle in expect_left:
        assert any(needle in e.reason for e in report.left), f"no left entry says {needle!r}:\n{report}"
    assert any(isinstance(m, SwapWrapper) for m in model.modules()) == bool(report.fused) or any(
        e.family == "vit_kernels" for e in report.fused
    )

    with torch.no_grad():
        got = _logits(model(torch.full_like(images, float("nan")), **call_kw))  # every element is written
        assert torch.isnan(got).all()
        got = _logits(model(images, **call_kw))
    assert_close(got, want, base, name=f"fused {type(model).__name__} ({backend}, {dtype})")

    vk.unfuse(model)
    assert not any(isinstance(m, SwapWrapper) for m in model.modules())
    assert_same_state(model, snap)
    with torch.no_grad():
        again = _logits(model(images, **call_kw))
    assert torch.equal(again, base), "unfuse did not restore the original computation"
    return report


def check_load_state_dict(model, images, **call_kw):
    """load_state_dict on the fused model reaches the parameters the fused path uses."""
    model = model.eval()
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.data.normal_(0, 0.05)
    vk.fuse(model, backend="torch")
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        got = _logits(model(images, **call_kw))
        want = _logits(other(images, **call_kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def check_checkpoint_round_trip(make, images, *, backend, **call_kw):
    """Checkpoints between fused and unfused models of ``make()``: an unfused model's state_dict (through
    torch.save / torch.load) loaded into a fused one, in place and with assign=True, runs fused with the
    loaded weights (the source model in float64 under the tolerance rule, baseline: the source at float32);
    the fused model's state_dict loaded into an unfused one gives the source's output bit for bit."""
    torch.manual_seed(1)
    source = make().eval()
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    with torch.no_grad():
        want = _logits(copy.deepcopy(source).double()(images.double(), **call_kw))
        base = _logits(source(images, **call_kw))
    for assign in (False, True):
        torch.manual_seed(2)
        fused = vk.fuse(make().eval(), backend=backend)
        buf.seek(0)
        fused.load_state_dict(torch.load(buf), assign=assign)
        with torch.no_grad():
            got = _logits(fused(images, **call_kw))
        assert vk.last_decision("qkv_attention").backend == backend, vk.last_decision("qkv_attention")
        assert_close(got, want, base, name=f"unfused checkpoint into fused {type(source).__name__} (assign={assign})")
    torch.manual_seed(3)
    plain = make().eval()
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.equal(_logits(plain(images, **call_kw)), base), "fused checkpoint into an unfused model"


def check_grad(model, images, **call_kw):
    """Under autograd a fused model asked for backend='triton' runs the Triton forward and backward
    kernels (vit_kernels.autograd) and its gradients match the original's."""
    model = model.train()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="triton")
    out = _logits(model(images, **call_kw)).square().sum()
    out.backward()
    d = vk.last_decision("qkv_attention")
    assert d.backend == "triton", d
    _logits(ref(images, **call_kw)).square().sum().backward()
    named = dict(ref.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if p.grad is None and named[name].grad is None:
            continue
        ref_grad = named[name].grad  # fp32 sums in another order: elementwise bound scaled to the gradient's size
        atol = 1e-6 + 1e-5 * ref_grad.abs().max().item()
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=atol, msg=name)
        n += 1
    assert n > 0
    report = vk.fuse_report(model)
    assert any("require grad" in note for e in report.fused for note in e.notes), str(report)


def check_dropout_runs_original(model, images):
    """With dropout active in training, a fused model runs the original modules: bit-identical
    outputs for the same seed. Returns the fuse report."""
    ref = copy.deepcopy(model).train()
    vk.fuse(model.train(), backend="torch")
    with torch.no_grad():
        torch.manual_seed(1)
        got = _logits(model(images))
        torch.manual_seed(1)
        want = _logits(ref(images))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    return vk.fuse_report(model)
