"""attn_implementation="vit_kernels" on a small random-weight HF ViT, against eager attention in
float64 under the tolerance rule; output_attentions served by the P-from-LSE kernel."""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels import hf_attention
from vit_kernels.testing import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("vit_kernels.triton.attention_stats")


def tiny_config(**kw):
    cfg = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        qkv_bias=True,
    )
    cfg.update(kw)
    return transformers.ViTConfig(**cfg)


def models(cfg):
    """(vit_kernels model, eager fp32 twin, eager float64 twin), same random weights, eval mode."""
    name = hf_attention.register(backend="triton")
    torch.manual_seed(0)
    fused = transformers.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
    eager = transformers.AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    eager.load_state_dict(fused.state_dict())
    return fused, eager, copy.deepcopy(eager).double()


def test_attn_implementation_vit_kernels():
    fused, eager, eager64 = models(tiny_config())
    assert fused.config._attn_implementation == "vit_kernels"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vk.record_decisions() as decisions:
        got = fused(x, output_attentions=True)
        plain = fused(x)
    with torch.no_grad():
        want = eager64(x.double(), output_attentions=True)
        base = eager(x, output_attentions=True)
    paths = [d.path for d in decisions if d.op == "flash_attention"]
    assert paths == ["stats", "stats", "", ""], paths  # weights from the stats kernel, then the fast path
    assert all(d.backend == "triton" for d in decisions if d.op == "flash_attention")
    assert len(got.attentions) == 2 and plain.attentions is None
    for layer, (a, a64, a32) in enumerate(zip(got.attentions, want.attentions, base.attentions)):
        assert a.shape == (2, 2, 17, 17)
        assert_close(a, a64, a32, name=f"attentions[{layer}]")
    assert_close(got.last_hidden_state, want.last_hidden_state, base.last_hidden_state)
    assert_close(plain.last_hidden_state, want.last_hidden_state, base.last_hidden_state)


def test_output_attentions_from_config():
    fused, _, eager64 = models(tiny_config(output_attentions=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, want = fused(x), eager64(x.double())
    assert len(got.attentions) == 2
    assert_close(got.attentions[1], want.attentions[1], name="attentions[1]")


def test_refuses_what_it_cannot_serve():
    fused, _, _ = models(tiny_config(attention_probs_dropout_prob=0.1))
    fused.train()
    with pytest.raises(ValueError, match="dropout: the vit_kernels attention has no attention dropout"):
        fused(torch.randn(1, 3, 32, 32))
    attn = hf_attention.make_attention("torch")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="attention_mask: the vit_kernels attention takes no mask"):
        attn(fused.eval(), q, q, q, torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="backend"):
        hf_attention.make_attention("gpu")


def test_fuse_with_the_attention_interface():
    """fuse() fuses whole layers; a call asking for output_attentions stays on the fused layer, whose
    qkv_attention gives the weights from the stats kernel (the attention interface is not called)."""
    fused, _, eager64 = models(tiny_config())
    vk.fuse(fused, backend="triton")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vk.record_decisions() as decisions:
        got = fused(x, output_attentions=True)
        want = eager64(x.double(), output_attentions=True)
    assert not [d for d in decisions if d.op == "flash_attention"]
    assert [(d.backend, d.path) for d in decisions if d.op == "qkv_attention"] == [("triton", "split+stats")] * 2
    for layer, (a, a64) in enumerate(zip(got.attentions, want.attentions)):
        assert_close(a, a64, name=f"attentions[{layer}]")
    assert_close(got.last_hidden_state, want.last_hidden_state, name="last_hidden_state", floor=1e-4)
