"""Training mode of the fused modules: dropout and torch.autocast.

Dropout: the fused kernels apply none. With dropout active (training mode, p > 0) a module runs
its unfused PyTorch code and says so: a Decision with path "unfused" and the reason for each op it
bypassed (last_decision / record_decisions) and one INFO line; in eval mode, or with p = 0, the
fused ops run. Autocast: the fused ops run at the autocast dtype, on the backend asked for.
"""

import logging

import pytest
import torch

import vit_kernels as vk
from vit_kernels import training
from vit_kernels.nn import FusedAttention, FusedMlp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKEND = "auto" if DEVICE.type == "cuda" else "triton"


def _attention(attn_drop, proj_drop, backend="torch"):
    return FusedAttention(32, 2, attn_drop=attn_drop, proj_drop=proj_drop, backend=backend).to(DEVICE)


def _mlp(drop, backend="torch"):
    return FusedMlp(32, 64, drop=drop, backend=backend).to(DEVICE)


@pytest.mark.parametrize(
    "make, ops",
    [
        (lambda: _attention(0.25, 0.0), ("qkv_attention", "linear")),
        (lambda: _attention(0.0, 0.25), ("qkv_attention", "linear")),
        (lambda: _mlp(0.25), ("layernorm_gelu_mlp",)),
    ],
    ids=["attn_drop", "proj_drop", "mlp_drop"],
)
def test_dropout_in_training_is_reported_unfused(make, ops, caplog):
    m = make().train()
    x = torch.randn(2, 9, 32, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="vit_kernels"), vk.record_decisions() as calls:
        a = m(x)
    assert [d.op for d in calls] == list(ops)
    for d in calls:
        assert (d.backend, d.path, d.requested) == ("torch", "unfused", "torch"), d
        assert "dropout is active in training" in d.reasons["fused"], d
        assert vk.last_decision(d.op) == d
    assert any("unfused" in r.getMessage() and "dropout" in r.getMessage() for r in caplog.records), caplog.text
    b = m(x)  # dropout is applied: two calls draw different masks
    assert not torch.equal(a, b)
    m.eval()  # eval: dropout is identity, the fused ops run
    with vk.record_decisions() as calls:
        c = m(x)
    assert [d.op for d in calls] == list(ops) and all(d.path != "unfused" for d in calls), calls
    assert torch.equal(c, m(x))


def test_dropout_zero_in_training_runs_fused():
    m = _attention(0.0, 0.0).train()
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    with vk.record_decisions() as calls:
        m(x).sum().backward()
    assert [d.op for d in calls] == ["qkv_attention", "linear"]
    assert all(d.path != "unfused" for d in calls), calls


def test_dropout_keep_rate_of_unfused_path():
    """What runs in training applies dropout at the rate asked: with proj_drop = p the branch output
    is zero in a fraction p of its elements (binomial, 4-sigma bound)."""
    p, n = 0.3, 64 * 17 * 32
    m = _attention(0.0, p).train()
    with torch.no_grad():
        m.proj.bias.fill_(1.0)  # no element of the branch is zero before dropout
        x = torch.randn(64, 17, 32, device=DEVICE)
        branch = m(x) - x
    dropped = (branch == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, dropped


def test_swap_dropout_in_training_is_reported_unfused():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, depth=1, drop_rate=0.1, proj_drop_rate=0.1, num_classes=10
    ).to(DEVICE)
    vk.fuse(model, backend="torch")
    model.train()
    with vk.record_decisions() as calls:
        model(torch.randn(2, 3, 32, 32, device=DEVICE))
    unfused = {d.op: d for d in calls if d.path == "unfused"}
    assert set(unfused) == {"qkv_attention", "layernorm_gelu_mlp"}, calls  # one op names each part
    assert all(d.backend == "original" and "dropout is active" in d.reasons["fused"] for d in unfused.values())
    model.eval()
    with vk.record_decisions() as calls:
        model(torch.randn(2, 3, 32, 32, device=DEVICE))
    assert calls and all(d.path != "unfused" for d in calls), calls


def _cast_copy(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)


@pytest.mark.parametrize("backend", ["torch", FUSED_BACKEND])
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_autocast_runs_fused_at_autocast_dtype(kind, backend):
    """Under torch.autocast the module's ops run at the autocast dtype (float16 here) on the backend
    asked for: the same result, bit for bit, as the module cast to float16 run on the input cast to
    float16, returned in the input's dtype; gradients reach the float32 parameters."""
    dt = torch.float16
    m = (_attention(0.0, 0.0, backend) if kind == "attention" else _mlp(0.0, backend)).eval()
    x = torch.randn(2, 17, 32, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dt), vk.record_decisions() as calls:
        out = m(x)
    assert out.dtype == torch.float32
    expected_backend = "torch" if backend == "torch" else ("triton" if DEVICE.type == "cpu" else None)
    for d in calls:
        assert d.path != "unfused", d
        if expected_backend:
            assert d.backend == expected_backend, d
    with torch.no_grad():
        ref = _cast_copy(m, dt)(x.to(dt)).float()
    assert torch.equal(out, ref), (out - ref).abs().max()
    # it did run at float16: float32 gives another result
    with torch.no_grad():
        assert not torch.equal(out, m(x))
    m.train()
    with torch.autocast(DEVICE.type, dtype=dt):
        m(x).float().square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_train_step_under_autocast_on_the_tiny_vit():
    model = training.tiny_vit("torch", depth=1).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randn(4, 1, 8, 8, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    dt = torch.bfloat16
    with vk.record_decisions() as calls:
        loss = training.train_step(model, opt, images, labels, amp_dtype=dt)
    assert torch.isfinite(loss)
    assert {d.op for d in calls} == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}
    assert all(d.path != "unfused" for d in calls), calls
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad)
