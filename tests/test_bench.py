"""The benchmark harness's pure parts: statistics, the timers' logic (with fake clocks and fake
CUDA events, so the GPU path is checked without a GPU), the peaks table, provider availability,
argument checks, writers, the profiler's stage accounting. No timing is asserted."""

import json

import pytest
import torch

from vit_kernels.bench import attention as batt
from vit_kernels.bench import models as bmodels
from vit_kernels.bench import peaks, report, timer
from vit_kernels.bench import profile as bprofile
from vit_kernels.bench import throughput as tp

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only; nothing is allocated on it


# ---------------------------------------------------------------- statistics and timers


def test_summarize_median_and_spread():
    st = timer.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st.median, st.min, st.max, st.n) == (3.0, 1.0, 5.0, 5)
    assert st.p20 == pytest.approx(1.8) and st.p80 == pytest.approx(4.2)
    assert st.spread == pytest.approx((4.2 - 1.8) / 2 / 3.0)
    with pytest.raises(ValueError, match="times_ms"):
        timer.summarize([])
    with pytest.raises(ValueError, match="q"):
        timer.percentile([1.0], 101)


class FakeSampler:
    """Stands in for the library timer: each round returns the next list of per-call ms."""

    def __init__(self, *rounds):
        self.rounds, self.calls = list(rounds), 0

    def __call__(self, fn, budget_s):
        self.calls += 1
        return self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0]


def test_measure_rounds_until_the_target_spread_or_the_time_limit():
    calls = []
    quiet = FakeSampler([5.0, 9.0, 1.0], [5.0] * 20)  # a noisy first round, then quiet ones
    m = timer.measure(lambda: calls.append(1), device=CPU, warmup=3, repeats=4, target_spread=0.05, sampler=quiet)
    assert len(calls) == 3 and quiet.calls == 2 and m.precise and m.stats.median == 5.0 and m.rounds == 2
    noisy = FakeSampler([1.0, 10.0, 5.0, 20.0])
    m = timer.measure(lambda: None, device=CPU, warmup=0, repeats=4, target_spread=0.05, max_time_s=0.0, sampler=noisy)
    assert noisy.calls == 1 and not m.precise and m.stats.spread > 0.05  # stopped by the time limit, said so
    with pytest.raises(ValueError, match="repeats"):
        timer.measure(lambda: None, device=CPU, repeats=0)
    with pytest.raises(ValueError, match="target_spread"):
        timer.measure(lambda: None, device=CPU, target_spread=0)


def test_measure_uses_the_library_timer_on_the_cpu():
    m = timer.measure(lambda: sum(range(100)), device=CPU, warmup=1, repeats=3, max_time_s=0.2, round_s=0.01)
    assert m.timer == "torch.utils.benchmark blocked_autorange" and len(m.times_ms) >= 3
    assert all(t > 0 for t in m.times_ms)


def test_gpu_timing_goes_through_triton_do_bench(monkeypatch):
    """On a CUDA device measure() asks triton.testing.do_bench (or do_bench_cudagraph) for every
    sample (return_mode="all"), with the round's time budget in ms; checked here with stand-ins."""
    triton_testing = pytest.importorskip("triton.testing")
    seen = []
    monkeypatch.setattr(
        triton_testing,
        "do_bench",
        lambda fn, warmup, rep, return_mode: seen.append(("do_bench", rep, return_mode)) or [2.0] * 10,
    )
    monkeypatch.setattr(
        triton_testing,
        "do_bench_cudagraph",
        lambda fn, rep, return_mode: seen.append(("cudagraph", rep, return_mode)) or [1.0] * 10,
    )
    m = timer.measure(lambda: None, device=CUDA, warmup=0, repeats=5, round_s=0.1)
    assert seen == [("do_bench", 100, "all")] and m.timer == "triton.testing.do_bench" and m.stats.median == 2.0
    m = timer.measure(lambda: None, device=CUDA, warmup=0, repeats=5, round_s=0.1, graph=True)
    assert seen[-1] == ("cudagraph", 100, "all") and m.timer == "triton.testing.do_bench_cudagraph"


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this checks the message on machines without CUDA")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        timer.measure(lambda: None, device=CPU, graph=True)


def _st(median, p20, p80):
    return timer.Stats(median, p20, p80, p20, p80, median, 0.0, 10)


def test_rank_only_when_the_providers_can_be_told_apart():
    ranks, bad = timer.rank([("a", _st(2.0, 1.98, 2.02)), ("b", _st(1.0, 0.99, 1.01))])
    assert ranks == {"b": 1, "a": 2} and bad == []
    ranks, bad = timer.rank([("a", _st(2.0, 1.9, 2.1)), ("b", _st(1.95, 1.85, 2.05))])
    assert ranks == {} and bad == [("b", "a")]  # overlapping p20-p80
    ranks, bad = timer.rank([("a", _st(2.0, 1.0, 3.5)), ("b", _st(9.0, 8.9, 9.1))])
    assert ranks == {} and ("a", "a") in bad  # one too noisy to rank


# ---------------------------------------------------------------- peaks


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-pcie"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla T4", "t4"),
        ("NVIDIA B200", "b200"),
    ],
)
def test_peaks_lookup_by_device_name(name, key):
    assert peaks.lookup(name).key == key


def test_peaks_unknown_and_keys():
    assert peaks.lookup("NVIDIA GeForce GTX 1080") is None
    assert peaks.by_key("H100").name == "H100 SXM" and peaks.by_key("h100-sxm").key == "h100"
    assert peaks.by_key("NVIDIA L4").key == "l4"
    with pytest.raises(ValueError, match="gpu: expected one of"):
        peaks.by_key("tpu-v5")
    h = peaks.by_key("h100")
    assert h.tflops(torch.bfloat16) == 989 and h.bandwidth_gbs == 3350
    assert h.tflops(torch.float32, tf32=False) == 67 and h.tflops(torch.float32, tf32=True) == 494
    assert peaks.by_key("v100").tflops(torch.bfloat16) is None
    assert peaks.for_device(CPU) is None
    assert "h100" in peaks.table_text()


# ---------------------------------------------------------------- providers and arguments


def test_fused_providers_are_never_timed_without_a_gpu():
    for p in ("triton", "cuda"):
        why = tp.static_reason(p, CPU, interpreter=True)
        assert "need a CUDA GPU" in why and "not timing" in why
        assert batt.static_reason(f"vk_flash:{p}", CPU, interpreter=True) is not None
        assert batt.static_reason(f"vk_qkv:{p}", CPU, interpreter=False) is not None
    assert "TRITON_INTERPRET" in tp.static_reason("triton", CUDA, interpreter=True)
    assert "CUDA GPU" in tp.static_reason("tuned", CPU, interpreter=True)
    assert "TRITON_INTERPRET" in tp.static_reason("tuned", CUDA, interpreter=True)
    assert tp.static_reason("tuned", CUDA, interpreter=False) is None
    assert "TRITON_INTERPRET" in batt.static_reason("vk_flash:triton", CUDA, interpreter=True)
    for p in ("eager", "sdpa", "compile"):
        assert tp.static_reason(p, CPU) is None
    assert "CUDA GPU" in tp.static_reason("sdpa", CPU, graphs=True)
    assert "inference" in tp.static_reason("sdpa", CUDA, graphs=True, mode="train")
    assert tp.static_reason("sdpa", CUDA, graphs=True, mode="inference") is None
    # the CUDA C++ kernels are forward-only: a train step would raise on every device
    assert "forward-only" in tp.static_reason("cuda", CUDA, mode="train", interpreter=False)
    assert "forward-only" in tp.static_reason("cuda", CPU, mode="train")


def test_sdpa_backend_availability_is_decided_per_device():
    assert "CUDA devices only" in batt.static_reason("sdpa:efficient", CPU)
    assert "CUDA devices only" in batt.static_reason("sdpa:cudnn", CPU)
    assert batt.static_reason("sdpa:flash", CPU) is None and batt.static_reason("sdpa:math", CPU) is None
    assert batt.static_reason("sdpa:cudnn", CUDA) is None
    with pytest.raises(ValueError, match="providers"):
        batt.static_reason("sdpa:magic", CPU)


def test_check_config_names_the_argument():
    good = dict(models=["vit_tiny_patch16_224"], providers=["sdpa"], device=CPU, batch_size=2)
    tp.check_config(tp.BenchConfig(**good))
    for change, match in [
        (dict(providers=["fast"]), "providers"),
        (dict(modes=["serve"]), "mode"),
        (dict(precision="half"), "precision"),
        (dict(compile_mode="turbo"), "compile_mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(models=["resnet50"]), "model"),
        (dict(models=["onnx:vit"]), "model"),
        (dict(input_dtype="int8"), "input_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            tp.check_config(tp.BenchConfig(**{**good, **change}))


def test_cases_add_graph_variants_except_for_compile():
    cfg = tp.BenchConfig(
        models=["vit_tiny_patch16_224"],
        providers=["sdpa", "compile"],
        device=CUDA,
        batch_size=1,
        modes=["inference"],
        cuda_graphs=True,
    )
    assert tp.cases(cfg) == [
        ("vit_tiny_patch16_224", "sdpa", "inference", False),
        ("vit_tiny_patch16_224", "sdpa", "inference", True),
        ("vit_tiny_patch16_224", "compile", "inference", False),
    ]


def test_speedup_is_over_eager_in_the_same_model_and_mode():
    rows = [
        {"model": "m", "mode": "inference", "provider": "eager", "ms": 10.0, "ms_p20": 9.0, "ms_p80": 11.0},
        {"model": "m", "mode": "inference", "provider": "sdpa", "ms": 4.0, "ms_p20": 3.0, "ms_p80": 5.0},
        {"model": "m", "mode": "train", "provider": "sdpa", "ms": 4.0, "ms_p20": 3.0, "ms_p80": 5.0},
        {"model": "m", "mode": "inference", "provider": "triton", "status": "not measured"},
    ]
    tp.add_speedups(rows)
    assert rows[0]["speedup"] == 1.0 and "speedup_p20" not in rows[0] and rows[1]["speedup"] == 2.5
    assert rows[1]["speedup_p20"] == pytest.approx(9 / 5) and rows[1]["speedup_p80"] == pytest.approx(11 / 3)
    assert "speedup" not in rows[2] and "speedup" not in rows[3]


def test_fallback_to_torch_is_reported():
    """A row that asked for triton but whose ops ran torch must say so."""
    from vit_kernels import backends, ops

    before = backends.last_decision()
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    ops.linear(x, w, backend="torch")
    notes = tp._fallbacks(before, "triton")
    assert any(n.startswith("FALLBACK linear ran torch") for n in notes)
    before = backends.last_decision()
    assert tp._fallbacks(before, "triton") == []  # nothing ran since


@pytest.mark.parametrize(
    "spec, where",
    [
        ("vit_tiny_patch16_224", "normalized in the patch embedding (mean=(0.5"),
        ("timm:vit_tiny_patch16_224", "normalized in PyTorch before the model"),
    ],
)
def test_uint8_input_option(spec, where):
    """--input-dtype uint8: decoded NHWC uint8 images; a model whose patch embedding reads uint8 takes
    them as they are, any other is fed (x / 255 - mean) / std computed in the timed step; the row says which."""
    pytest.importorskip("timm")
    cfg = tp.BenchConfig(
        models=[spec], providers=["eager"], device=CPU, batch_size=1, depth=1, img_size=32, input_dtype="uint8"
    )
    row, step, _ = tp.prepare(spec, "eager", "inference", cfg)
    assert where in row["note"], row["note"]
    assert step().shape[0] == 1


# ---------------------------------------------------------------- attention sweep arithmetic


def test_tokens_batch_flops_and_bytes():
    assert batt.tokens_from_images([224, 384], 16) == [197, 577]
    assert batt.tokens_from_images([224], 14) == [257]
    with pytest.raises(ValueError, match="img_size"):
        batt.tokens_from_images([100], 16)
    assert batt.batch_for(197, 65536) == 332 and batt.batch_for(100000, 65536) == 1
    c = batt.AttnCase(2, 12, 197, 64, torch.bfloat16)
    assert batt.flops("sdpa:flash", c) == 4 * 2 * 12 * 197**2 * 64
    assert batt.flops("vk_qkv:triton", c) == 4 * 2 * 12 * 197**2 * 64 + 2 * 2 * 197 * 768 * 3 * 768
    assert batt.min_bytes("eager", c) == 4 * 2 * 12 * 197 * 64 * 2


def test_backward_flops_and_bytes_count_as_flash_attention_does():
    """FlashAttention's benchmarks: the backward 2.5x the forward's FLOPs, both 3.5x; a projection's
    backward twice its forward (dX and dW). Bytes: 8 (batch, heads, tokens, head_dim) tensors + the LSE."""
    fwd, bwd, both = (batt.AttnCase(2, 12, 197, 64, torch.bfloat16, m) for m in ("fwd", "bwd", "fwd_bwd"))
    attn = 4 * 2 * 12 * 197**2 * 64
    proj = 2 * 2 * 197 * 768 * 3 * 768
    assert batt.flops("sdpa:cudnn", bwd) == 2.5 * attn and batt.flops("eager", both) == 3.5 * attn
    assert batt.flops("vk_qkv:triton", bwd) == 2.5 * attn + 2 * proj
    assert batt.flops("qkv:torch", both) == 3.5 * attn + 3 * proj
    Q = 2 * 12 * 197 * 64 * 2
    assert batt.min_bytes("vk_flash:triton", bwd) == 8 * Q + 4 * 2 * 12 * 197
    assert batt.min_bytes("sdpa:flash", both) == batt.min_bytes("sdpa:flash", fwd) + batt.min_bytes("sdpa:flash", bwd)
    for p in ("vk_flash:cuda", "vk_qkv:cuda"):
        why = batt.static_reason(p, CUDA, interpreter=False, mode="bwd")
        assert "forward-only" in why and "raises before any launch" in why
    with pytest.raises(ValueError, match="mode: expected one of"):
        batt.static_reason("eager", CPU, mode="backward")


@pytest.mark.parametrize("mode", ["bwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["vk_flash:triton", "vk_qkv:triton", "sdpa:flash", "eager"])
def test_backward_mode_times_the_gradients(provider, mode):
    """What the profiler's backward modes time is the backward: each call returns the gradients of
    every input, equal to those of SDPA's math backend (the qkv providers: PyTorch's qkv path) on the
    same inputs; the vit_kernels ones through the Triton backward kernels (the interpreter here)."""
    from vit_kernels import backends

    torch.manual_seed(0)
    case = batt.AttnCase(1, 2, 17, 32, torch.float32, mode)
    fn = batt.make_fn(provider, case, CPU)
    got = fn()
    if provider.startswith("vk_"):
        d = backends.last_decision("qkv_attention" if batt.is_qkv(provider) else "flash_attention")
        assert d.backend == "triton", str(d)
    torch.manual_seed(0)
    ref = batt.make_fn("qkv:torch" if batt.is_qkv(provider) else "sdpa:math", case, CPU)()
    assert len(got) == len(ref) == (5 if batt.is_qkv(provider) else 3)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    again = fn()  # "bwd" runs the backward again on the retained graph; "fwd_bwd" the forward too
    for a, b in zip(again, got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_percent_of_peak_and_bound_columns():
    h100 = peaks.by_key("h100")
    row = {"ms": 2.0, "gflop": 989.0, "gbs": 100.0}  # 494.5 TFLOP/s achieved
    row["tflops"] = row["gflop"] / 2e-3 / 1e3
    batt.add_peak_columns(row, torch.bfloat16, h100, measured_on_gpu=True)
    assert row["pct_peak_flops"] == pytest.approx(50.0)
    assert row["bound_ms"] == pytest.approx(1.0) and row["x_bound"] == pytest.approx(2.0)
    assert row["pct_peak_bw"] == pytest.approx(100 * 100 / 3350)
    cpu_row = {"ms": 2.0, "gflop": 989.0, "gbs": 100.0, "tflops": 494.5}
    batt.add_peak_columns(cpu_row, torch.bfloat16, h100, measured_on_gpu=False)
    assert "bound_ms" in cpu_row and "pct_peak_flops" not in cpu_row and "x_bound" not in cpu_row


# ---------------------------------------------------------------- writers


def test_table_csv_json(tmp_path):
    rows = [{"a": "x", "b": 1.23456, "c": None}, {"a": "yy", "b": 1234.7, "d": 3}]
    text = report.format_table(rows, [("a", "A"), ("b", "B"), ("c", "C")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B", "C"] and "1.23" in lines[2] and "-" in lines[2] and "1235" in lines[3]
    p = report.write_csv(tmp_path / "r.csv", rows)
    assert p.read_text().splitlines()[0] == "a,b,c,d"
    meta = report.environment(CPU)
    for k in ("device_name", "torch", "python", "commit", "date", "vit_kernels"):
        assert k in meta
    report.write_all(tmp_path, "x", rows, meta, {"config": {"k": 1}})
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["results"][1]["d"] == 3 and data["environment"]["torch"] == torch.__version__
    assert data["config"] == {"k": 1}


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {
            "label": "m depth 2, 32 px, batch 2",
            "mode": "inference",
            "provider": "eager",
            "img_per_s": 3.0,
            "img_per_s_p20": 2.5,
            "img_per_s_p80": 3.2,
            "speedup": 1.0,
        },
        {"label": "m depth 2, 32 px, batch 2", "mode": "inference", "provider": "triton"},
    ]
    report.plot_bench(tmp_path / "b.png", rows, "t")
    report.plot_lines(
        tmp_path / "l.png",
        [50, 197],
        {"sdpa": [1.0, 2.0], "vk": [None, None]},
        "tokens",
        "TFLOP/s",
        "t",
        hline=5.0,
        hline_label="peak",
    )
    assert (tmp_path / "b.png").stat().st_size > 1000 and (tmp_path / "l.png").stat().st_size > 1000


# ---------------------------------------------------------------- models and the block profiler


def test_model_names_and_shapes_agree_across_families():
    """ViT-B/16 from each library is the same shape to the cost model."""
    with torch.device("meta"):
        ms = {
            spec: bmodels.build(spec)
            for spec in (
                "vit_base_patch16_224",
                "timm:vit_base_patch16_224",
                "torchvision:vit_b_16",
                "hf:vit_base_patch16_224",
                "vit_pytorch:vit_base_patch16_224",
            )
        }
    shapes = {k: bmodels.shape_of(m, 8, torch.bfloat16) for k, m in ms.items()}
    ref = shapes["vit_base_patch16_224"]
    assert (ref.tokens, ref.dim, ref.heads, ref.hidden, ref.depth, ref.elem) == (197, 768, 12, 3072, 12, 2)
    for k, s in shapes.items():
        assert (s.tokens, s.dim, s.heads, s.hidden, s.depth, s.patch, s.num_classes) == (
            197,
            768,
            12,
            3072,
            12,
            16,
            1000,
        ), k
    with pytest.raises(ValueError, match="model"):
        bmodels.parse("vit_gigantic_patch16_224")
    assert bmodels.depth_of(bmodels.build("torchvision:vit_b_16", depth=2, img_size=32)) == 2


def test_eager_attention_switch():
    m = bmodels.build("timm:vit_tiny_patch16_224", depth=1, img_size=32, attention="eager")
    assert all(not mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn"))
    h = bmodels.build("hf:vit_tiny_patch16_224", depth=1, img_size=32, attention="eager")
    assert h.config._attn_implementation == "eager"


def test_eager_block_stages_compute_the_block():
    from vit_kernels.models.vit import Block

    blk = Block(64, 4, backend="torch", init_values=0.5).eval()
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(bprofile.eager_block(blk, x), blk(x))
        torch.testing.assert_close(bprofile.fused_block(blk, x, "torch"), blk(x))


class Ev:
    def __init__(self, name, cpu_us, dev_us, device_type="DeviceType.CPU"):
        self.name, self.cpu_time_total, self.device_time_total, self.device_type = name, cpu_us, dev_us, device_type


def test_stage_times_from_profiler_events():
    evs = [
        Ev("vk::eager/qkv", 3000.0, 1000.0),
        Ev("vk::eager/qkv", 5000.0, 3000.0),
        Ev("vk::eager/qkv", 0.0, 9999.0, "DeviceType.CUDA"),  # the range's copy on the GPU timeline
        Ev("aten::addmm", 100.0, 50.0),
        Ev("vk::eager/gelu", 400.0, 200.0),
    ]
    labels = ["eager/qkv", "eager/gelu", "eager/fc1"]
    assert bprofile.stage_times_ms(evs, labels, use_device=True, iters=2) == {
        "eager/qkv": 2.0,
        "eager/gelu": 0.1,
        "eager/fc1": 0.0,
    }
    assert bprofile.stage_times_ms(evs, labels, use_device=False, iters=2)["eager/qkv"] == 4.0


def test_stage_costs_cover_every_stage():
    from vit_kernels.bench.cost import ViTShape

    costs = bprofile.stage_costs(ViTShape(2, 17, 64, 4, 256, 1, 4))
    labels = [f"eager/{s}" for s in bprofile.EAGER_STAGES] + [f"fused/{s}" for s in bprofile.FUSED_STAGES]
    assert sorted(costs) == sorted(labels)
    assert costs["eager/gelu"][0].bytes == 2 * 2 * 17 * 256 * 4
    assert costs["eager/attention"][0].flops == 4 * 2 * 17**2 * 64
