"""The cost model (vit_kernels.bench.cost): FLOP counts against published figures and against
torch's own FLOP counter on the real model, the byte accounting of shared/DESIGN.md, and the
roofline arithmetic."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit_kernels.bench import cost, peaks
from vit_kernels.models import create_model


def test_vit_b16_224_is_17_6_gmacs_per_image():
    m = cost.model_cost(cost.ViTShape.vit("base", 16, 224, batch=1))
    assert m.flops / 2e9 == pytest.approx(17.6, rel=0.01)
    assert m.flops / 1e9 == pytest.approx(35.2, rel=0.01)


# GMACs per image as published (timm's model cards, from fvcore-style counts)
@pytest.mark.parametrize("size,patch,img,gmacs", [
    ("tiny", 16, 224, 1.3), ("small", 16, 224, 4.6), ("base", 32, 224, 4.4),
    ("base", 16, 384, 55.5), ("large", 16, 224, 61.6), ("huge", 14, 224, 167.4)])
def test_gmacs_match_published(size, patch, img, gmacs):
    m = cost.model_cost(cost.ViTShape.vit(size, patch, img, batch=1))
    assert m.flops / 2e9 == pytest.approx(gmacs, rel=0.04)


@pytest.mark.parametrize("batch,img,depth", [(1, 64, 2), (3, 96, 1)])
def test_flops_equal_torch_flop_counter_on_the_model(batch, img, depth):
    """An independent count: torch's FlopCounterMode on the reference model's forward (SDPA held
    to its math backend, whose matmuls the counter sees; it does not count the CPU flash kernel)."""
    model = create_model("vit_tiny_patch16_224", img_size=img, depth=depth, backend="torch").eval()
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x)
    tokens = (img // 16) ** 2 + 1
    shape = cost.ViTShape(batch, tokens, 192, 3, 768, depth, 4, 16, img=(img, img), num_classes=1000)
    assert cost.model_cost(shape).flops == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_design_accounting_vit_b16_batch256_bf16():
    """shared/DESIGN.md: A = 77.5 MB; eager ~40A; fused 16A-18A (one-kernel attention), 22A-24A split.
    The model's figures (activation bytes, weights apart): eager with SDPA 38A (SDPA writes o in
    (batch, tokens, heads, head_dim) order, so DESIGN's 2A merge copy does not happen), 40A when
    attention writes (batch, heads, tokens, head_dim) (the math path); fused 16A + 1A for LN2's
    row statistics (LN1's come free: the one-kernel attention reads whole rows); split 22A + 2A."""
    s = cost.ViTShape.vit("base", 16, 224, batch=256, dtype=torch.bfloat16)
    assert s.rows == 50432 and s.A == 50432 * 768 * 2
    assert s.A / 1e6 == pytest.approx(77.5, abs=0.05)

    def acts(steps, weights):  # bytes in units of A, weights taken out
        return (sum(x.bytes for x in steps) - weights) / s.A

    bc = cost.block_cost(s)
    w = bc.weight_bytes + (2 * 2 * 768 + 3 * 768 + 768 + 3072 + 768) * 2  # + LN and bias vectors
    assert acts(bc.eager, w) == pytest.approx(38.0)
    assert acts(cost.block_cost(s, eager_attention="math").eager, w) > 40  # scores go through memory
    qkv_math = cost.qkv_attention_cost(256, 197, 768, 12, 2, eager_attention="math")
    assert any(x.name == "merge heads (copy)" and x.bytes == 2 * s.A for x in qkv_math.eager)
    assert acts(bc.fused, w) == pytest.approx(17.0)
    assert acts(cost.block_cost(s, row_stats="fused").fused, w) == pytest.approx(16.0)
    assert acts(cost.block_cost(s, path="split").fused, w) == pytest.approx(24.0)
    assert acts(cost.block_cost(s, path="split", row_stats="fused").fused, w) == pytest.approx(22.0)
    # GEMMs of one block: 24*T*D^2 = 0.71 TFLOP (DESIGN's figure), 0.744 with attention
    assert (bc.flops - 4.0 * 256 * 197 ** 2 * 768) / 1e12 == pytest.approx(0.714, abs=0.001)
    assert bc.flops / 1e12 == pytest.approx(0.744, abs=0.001)
    # and the per-block bound is lower fused than eager on an H100
    h100 = peaks.by_key("h100")
    assert cost.bound_seconds(bc.fused, h100, torch.bfloat16) < cost.bound_seconds(bc.eager, h100, torch.bfloat16)


def test_kv_on_chip_rule_of_design():
    # 577 tokens x head_dim 64 in bf16: K and V take 148 KB, inside 227 KB; 1025 tokens do not
    assert 2 * 577 * 64 * 2 == 147712
    assert cost.kv_fits_on_chip(577, 64, 2) and not cost.kv_fits_on_chip(1025, 64, 2)
    assert [x.name for x in cost.qkv_attention_cost(1, 1025, 768, 12, 2).fused][-1] == "flash attention"


def test_op_minimum_bytes():
    B, N, D, H, e = 2, 50, 64, 4, 4
    x = B * N * D * e
    a = cost.attention_cost(B, H, N, D // H, e)
    assert a.min_bytes == 4 * x and a.flops == 4 * B * H * N * N * (D // H)
    lin = cost.linear_cost(B * N, D, D, e, residual=True)
    assert lin.min_bytes == 3 * x + (D * D + D) * e
    mlp = cost.mlp_cost(B * N, D, 4 * D, e, residual="input")
    assert mlp.min_bytes == 2 * x + (8 * D * D + 4 * D + D + 2 * D) * e
    assert mlp.min_bytes < mlp.fused_bytes < mlp.eager_bytes
    with pytest.raises(ValueError, match="residual"):
        cost.mlp_cost(4, 8, 32, 2, residual="bogus")
    with pytest.raises(ValueError, match="path"):
        cost.qkv_attention_cost(1, 4, 8, 2, 2, path="bogus")


def test_roofline_bound_is_sum_of_per_step_max():
    p = peaks.Peak("toy", "toy", "toy", 100.0, 100.0, 50.0, 10.0, 1000.0)
    steps = [cost.Step("gemm", 2e12, 1e9), cost.Step("add", 0, 3e9)]
    # gemm: max(2e12/100e12, 1e9/1e12) = 0.02 s; add: 3e9/1e12 = 0.003 s
    assert cost.bound_seconds(steps, p, torch.bfloat16) == pytest.approx(0.023)
    assert cost.bound_seconds(steps, p, torch.float32, tf32=False) == pytest.approx(0.2 + 0.003)
    v100 = peaks.by_key("v100")
    assert cost.bound_seconds(steps, v100, torch.bfloat16) is None  # no bf16 tensor cores


def test_block_report_text():
    s = cost.ViTShape.vit("base", 16, 224, batch=256)
    text = cost.block_report(cost.block_cost(s), peaks.by_key("h100"), torch.bfloat16)
    assert "38.18A" in text and "17.18A" in text and "H100 SXM" in text
    assert "ms (compute)" in text and "ms (memory)" in text
    text = cost.block_report(cost.block_cost(s), None, torch.bfloat16)
    assert "bound" not in text
