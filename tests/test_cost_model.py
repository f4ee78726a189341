"""The cost model (vit_kernels.bench.cost): FLOP counts against published figures and against
torch's own FLOP counter on the real model, the byte accounting of shared/DESIGN.md, and the
roofline arithmetic."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit_kernels.bench import cost, cost_kernels as ck, cost_text, peaks
from vit_kernels.models import create_model


def test_vit_b16_224_is_17_6_gmacs_per_image():
    m = cost.model_cost(cost.ViTShape.vit("base", 16, 224, batch=1))
    assert m.flops / 2e9 == pytest.approx(17.6, rel=0.01)
    assert m.flops / 1e9 == pytest.approx(35.2, rel=0.01)


# GMACs per image as published (timm's model cards, from fvcore-style counts)
@pytest.mark.parametrize(
    "size,patch,img,gmacs",
    [
        ("tiny", 16, 224, 1.3),
        ("small", 16, 224, 4.6),
        ("base", 32, 224, 4.4),
        ("base", 16, 384, 55.5),
        ("large", 16, 224, 61.6),
        ("huge", 14, 224, 167.4),
    ],
)
def test_gmacs_match_published(size, patch, img, gmacs):
    m = cost.model_cost(cost.ViTShape.vit(size, patch, img, batch=1))
    assert m.flops / 2e9 == pytest.approx(gmacs, rel=0.04)


def _counted_flops(backend, batch, img, depth):
    model = create_model("vit_tiny_patch16_224", img_size=img, depth=depth, backend=backend).eval()
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("batch,img,depth", [(1, 64, 2), (3, 96, 1)])
def test_flops_equal_torch_flop_counter_on_the_model(batch, img, depth):
    """An independent count: torch's FlopCounterMode on the reference model's forward with
    backend="reference" (the oracle's plain PyTorch code, whose matmuls and convolution the counter
    sees as aten ops; SDPA held to its math backend)."""
    tokens = (img // 16) ** 2 + 1
    shape = cost.ViTShape(batch, tokens, 192, 3, 768, depth, 4, 16, img=(img, img), num_classes=1000)
    assert cost.model_cost(shape).flops == pytest.approx(_counted_flops("reference", batch, img, depth), rel=1e-9)


@pytest.mark.parametrize("batch,img,depth", [(1, 64, 2), (3, 96, 1)])
def test_custom_op_flop_formulas_count_what_the_torch_path_counts(batch, img, depth):
    """The fused model's ops are custom ops (torch.ops.vit_kernels.*): their FLOP formulas
    (vit_kernels.library.FLOPS) give FlopCounterMode the same total as the oracle's aten ops."""
    assert _counted_flops("torch", batch, img, depth) == _counted_flops("reference", batch, img, depth)


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
    assert (bc.flops - 4.0 * 256 * 197**2 * 768) / 1e12 == pytest.approx(0.714, abs=0.001)
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
    text = cost_text.block_report(cost.block_cost(s), peaks.by_key("h100"), torch.bfloat16)
    assert "38.18A" in text and "17.18A" in text and "H100 SXM" in text
    assert "ms (compute)" in text and "ms (memory)" in text
    text = cost_text.block_report(cost.block_cost(s), None, torch.bfloat16)
    assert "bound" not in text


# ---------------------------------------------------------------------------------------------
# The kernel model (vit_kernels.bench.cost_kernels): bytes counted by hand for small shapes


def test_gemm_kernel_counts_every_tile_load():
    """M=256, N=128, K=64 fp16 in 128x64x32 tiles: 2 row tiles x 2 column tiles. A (32768 B) is loaded once
    per column tile (2x), W (16384 B) once per row tile (2x): 98304 B of loads, 49152 of them first reads,
    49152 L2 re-reads; out 65536 B written. Padded FLOPs 2*256*128*64; 4 tiles on 2 SMs = 2 waves of 2
    K steps."""
    k = ck.gemm_kernel("g", 256, 128, 64, 2, (128, 64, 32, 3), sms=2)
    assert (k.dram_bytes, k.l2_bytes) == (49152 + 65536, 49152)
    assert k.flops == 2 * 256 * 128 * 64 and (k.serial_steps, k.stages) == (4, 3)
    # + bias (2 B per column, per row tile), mean/rstd (8 B per row, per column tile), gamma/beta on the
    # A loads (4 B per K element, per program) and a residual read once
    k = ck.gemm_kernel(
        "g", 256, 128, 64, 2, (128, 64, 32, 3), sms=2, col_vec_bytes=2, row_vec_bytes=8, k_vec_bytes=4, residual=True
    )
    first = 49152 + 128 * 2 + 256 * 8 + 64 * 4 + 65536
    loads = 98304 + 2 * 128 * 2 + 2 * 256 * 8 + 4 * 64 * 4 + 65536
    assert (k.dram_bytes, k.l2_bytes) == (first + 65536, loads - first)
    # 200 rows: two row tiles still (the second padded to 128 rows of MMA work), bytes of 200 rows only
    k = ck.gemm_kernel("g", 200, 128, 64, 2, (128, 64, 32, 3), sms=2)
    assert k.flops == 2 * 256 * 128 * 64 and k.dram_bytes == 200 * 64 * 2 + 16384 + 200 * 128 * 2


def test_flash_attention_kernel_rereads_kv_per_query_tile():
    """B=1, H=2, 100 tokens, head_dim 80 fp16 in 64x32 tiles: Q, K, V, O 32000 B each; 2 query tiles per
    head, so K and V are loaded twice (64000 B of L2 re-reads); the LSE 2*100*4 B. MMA work 128 x 128
    (padded tokens) x 80 (64 + 16) x 4 x 2 heads; 4 programs on 4 SMs walk 4 key tiles."""
    k = ck.flash_attention_kernel("f", 1, 2, 100, 80, 2, (64, 32, 3), sms=4, chunks=80, lse=True)
    assert (k.dram_bytes, k.l2_bytes) == (4 * 32000 + 800, 64000)
    assert k.flops == 4 * 2 * 128 * 128 * 80 and k.serial_steps == 4
    padded = ck.flash_attention_kernel("f", 1, 2, 100, 80, 2, (64, 32, 3), sms=4, chunks=128)
    assert padded.flops == k.flops * 128 / 80


def test_single_kernel_reads_x_seven_times_per_head():
    """1 image of 16 tokens, dim 32, 2 heads (head_dim 16) fp16, LayerNorm with beta, QKV bias. Each of the
    2 programs loads x (1024 B) 7 times, its head's W_k and W_v rows (16*32*2 + 16*2 = 1056 B each) once
    and W_q's once per query tile (1 tile of 16 rows), gamma and beta (128 B) per projection pass (3)."""
    from vit_kernels.triton import qkv_attention as tq

    assert tq.kv_layout(16) == (64, 0) and tq.kernel_config(16) == (16, 32, 8, 1)
    k = ck.single_qkv_attention_kernel(1, 16, 32, 2, 2, torch.float16, sms=4)
    loads = 2 * (7 * 1024 + 3 * 1056 + 3 * 128)
    first = 1024 + 6 * 1056 + 128
    assert (k.dram_bytes, k.l2_bytes) == (first + 1024, loads - first)
    # MMA work per program: K and V over 64 padded rows, Q over 16 rows, scores and P @ V over 16 x 64
    assert k.flops == 2 * (2 * 2 * 64 * 32 * 16 + 2 * 16 * 32 * 16 + 4 * 16 * 64 * 16)
    assert (k.serial_steps, k.stages) == (1 * 4 * 1 + 1 * (3 * 1 + 1), 1)


def test_kernel_time_is_the_largest_term():
    p = peaks.Peak("toy", "toy", "toy", 100.0, 100.0, 50.0, 10.0, 1000.0)
    m = ck.Machine(p, sms=10, l2_gbs=3000.0, latency_ns=600.0, l2_latency_ns=200.0)
    k = ck.KernelCost("k", 1e9, 1e6, 3e6, serial_steps=100, stages=3)
    # compute 1e9/1e14 = 1e-5 s; HBM 1e6/1e12 = 1e-6; L2 3e6/3e12 = 1e-6; latency: 3/4 of the bytes from
    # L2 -> 0.75*200 + 0.25*600 = 300 ns a step, 100 steps with 2 loads ahead -> 1.5e-5 s
    t = k.terms(m, torch.bfloat16)
    assert t == pytest.approx({"compute": 1e-5, "hbm": 1e-6, "l2": 1e-6, "latency": 1.5e-5})
    assert k.seconds(m, torch.bfloat16) == pytest.approx(1.5e-5) and k.limit(m, torch.bfloat16) == "latency"
    assert ck.path_seconds([k, ck.elementwise_kernel("add", 2e6, 1e6)], m, torch.bfloat16) == pytest.approx(1.8e-5)
    assert k.seconds(ck.Machine(peaks.by_key("v100"), 80, 2700.0), torch.bfloat16) is None
    assert ck.Machine.of(peaks.by_key("h100")).sms == 132


def test_fold_kernel_bytes_by_hand():
    """W (8, 4) fp16 read and W * gamma written (64 + 64), gamma and beta (8 + 8), b (16), the sums in fp32
    (column sums, unscale factors, folded bias, bias, dominance flags: 5 x 32) and gamma and beta in fp32
    (16 + 16): 352 bytes; without b, 336; W read a second time from L2 (64)."""
    assert ck.fold_kernel(8, 4, 2, True).dram_bytes == 352
    assert ck.fold_kernel(8, 4, 2, False).dram_bytes == 336
    assert ck.fold_kernel(8, 4, 2, True).l2_bytes == 64
    # the prologue launch: the fold and the row statistics of x (16 rows of 4 fp16: 128 read, 128 written)
    assert ck.prologue_kernel(16, 8, 4, 2, True).dram_bytes == 352 + 256
    assert ck.prologue_kernel(16, 8, 4, 2, True).l2_bytes == 64


def test_paths_of_a_vit_b_block():
    """ViT-B/16 at batch 256 bf16: the single kernel loads x 7 x 12 = 84 times per image; the split path
    once per column tile of its QKV GEMM; every path writes the same output; the TMA GEMM (128x256 tiles)
    re-reads x less than gemm.py's."""
    s = cost.ViTShape.vit("base", 16, 224, batch=256, dtype=torch.bfloat16)
    qkv = ck.qkv_attention_paths(256, 197, 768, 12, torch.bfloat16, sms=132)
    assert set(qkv) == {"torch", "split", "split+tma", "single_kernel"}
    [single] = qkv["single_kernel"]
    assert single.dram_bytes + single.l2_bytes >= 84 * s.A
    assert "single_kernel" not in ck.qkv_attention_paths(8, 1025, 768, 12, torch.bfloat16, sms=132)
    mlp = ck.mlp_paths(s.rows, 768, 3072, torch.bfloat16, sms=132)
    fc1 = {path: next(k for k in mlp[path] if "fc1" in k.name) for path in ("tma", "triton")}
    assert fc1["tma"].l2_bytes < fc1["triton"].l2_bytes
    prologue = "layernorm prologue (row stats + fold)"  # the fold runs on every call, with the statistics
    assert [k.name for k in mlp["tma"]][0] == prologue and [k.name for k in qkv["split+tma"]][0] == prologue
    for paths in (qkv, mlp, ck.linear_paths(s.rows, 768, 768, torch.bfloat16, sms=132)):
        assert all(k.dram_bytes > 0 for ks in paths.values() for k in ks)
    assert "tma" not in ck.linear_paths(64, 32, 32, torch.float32, sms=4)
    m = ck.Machine.of(peaks.by_key("h100"))
    assert ck.path_seconds(qkv["single_kernel"], m, torch.bfloat16) > 3 * ck.path_seconds(
        qkv["split"], m, torch.bfloat16
    )


def test_kernels_report_text():
    m = ck.Machine.of(peaks.by_key("h100"))
    paths = ck.qkv_attention_paths(32, 197, 768, 12, torch.bfloat16, sms=m.sms)
    text = cost_text.kernels_report("qkv_attention", paths, m, torch.bfloat16, {"split": 0.5})
    assert "H100 SXM: 132 SMs" in text and "L2 re-reads" in text and "ms modeled, 0.5000 ms measured" in text
    assert "qkv+attention (single kernel)" in text and "(latency)" in text
    text = cost_text.kernels_report("qkv_attention", paths, None, torch.bfloat16)
    assert "modeled" not in text and "L2 re-reads" in text


def test_bench_and_profile_put_modeled_beside_measured():
    from vit_kernels.bench import attention as batt
    from vit_kernels.bench import profile

    h100 = peaks.by_key("h100")
    c = batt.AttnCase(32, 12, 197, 64, torch.bfloat16)
    row = {"ms": 0.5, "note": "path=split"}
    batt.add_modeled_columns(row, "vk_qkv:triton", c, h100, measured_on_gpu=True)
    want = (
        ck.path_seconds(
            ck.qkv_attention_paths(32, 197, 768, 12, torch.bfloat16, sms=132)["split"],
            ck.Machine.of(h100),
            torch.bfloat16,
        )
        * 1e3
    )
    assert row["modeled_ms"] == pytest.approx(want) and row["x_modeled"] == pytest.approx(0.5 / want)
    cpu = {"ms": 0.5}
    batt.add_modeled_columns(cpu, "vk_flash:triton", c, h100, measured_on_gpu=False)
    assert "modeled_ms" in cpu and "x_modeled" not in cpu
    other = {"ms": 0.5}
    batt.add_modeled_columns(other, "sdpa:cudnn", c, h100, measured_on_gpu=True)
    assert "modeled_ms" not in other  # not modeled: no figure rather than a wrong one
    shape = cost.ViTShape(8, 197, 768, 12, 3072, 1, 2)
    ks = profile.stage_kernels(shape, torch.bfloat16, 132, "triton")
    labels = [f"eager/{s}" for s in profile.EAGER_STAGES] + [f"fused/{s}" for s in profile.FUSED_STAGES]
    assert set(ks) == set(labels) and ks["eager/merge_heads"] == []
    assert "fused/mlp" not in profile.stage_kernels(shape, torch.bfloat16, 132, "cuda")


def test_model_bench_modeled_beside_measured():
    """bench.throughput's rows: the kernel model of a whole forward for the providers it models (sdpa,
    triton), depth x the block's kernels plus the patch embedding and head at their roofline."""
    from vit_kernels.bench import throughput

    h100 = peaks.by_key("h100")
    m = ck.Machine.of(h100)
    s = cost.ViTShape.vit("base", 16, 224, batch=32, dtype=torch.bfloat16)
    blk = ck.path_seconds(ck.block_kernels(s, torch.bfloat16, m.sms, "triton"), m, torch.bfloat16)
    t = ck.model_seconds(s, torch.bfloat16, m, "triton")
    assert 12 * blk < t < 12 * blk * 1.2
    assert ck.model_seconds(s, torch.bfloat16, m, "eager") is None
    row = {"ms": 10.0}
    throughput.add_modeled_columns(row, s, "sdpa", "inference", torch.bfloat16, h100, measured_on_gpu=True)
    assert row["modeled_ms"] == pytest.approx(ck.model_seconds(s, torch.bfloat16, m, "sdpa") * 1e3)
    assert row["x_modeled"] == pytest.approx(10.0 / row["modeled_ms"])
    for provider, mode in (("compile", "inference"), ("sdpa", "train")):
        r = {"ms": 10.0}
        throughput.add_modeled_columns(r, s, provider, mode, torch.bfloat16, h100, measured_on_gpu=True)
        assert "modeled_ms" not in r
