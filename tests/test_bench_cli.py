"""``python -m vit_kernels bench`` and ``profile-attention`` end to end at tiny sizes on this
machine: rows, files, honest "not measured" rows for the GPU-only providers, argument errors.
Nothing about speed is asserted."""

import csv
import json

import pytest
import torch

from vit_kernels import cli
from vit_kernels.bench import report

TINY = [
    "--depth",
    "1",
    "--img-size",
    "32",
    "--batch-size",
    "2",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--max-time",
    "0.2",
    "--no-progress",
]
GPU = torch.cuda.is_available()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(GPU, reason="checks the CPU behaviour")
def test_bench_cpu_defaults_measure_torch_and_mark_fused_not_measured(tmp_path, capsys):
    assert cli.main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "need a CUDA GPU" in text and "not measured" in text
    rows = {r["provider"]: r for r in _rows(tmp_path / "bench.csv")}
    assert set(rows) == {"eager", "sdpa", "triton", "cuda", "tuned"}
    for p in ("eager", "sdpa"):
        assert rows[p]["status"] == "ok" and float(rows[p]["ms"]) > 0 and float(rows[p]["img_per_s"]) > 0
    for p in ("triton", "cuda", "tuned"):
        assert rows[p]["status"] == "not measured" and rows[p]["ms"] == "" and "CUDA GPU" in rows[p]["note"]
    assert float(rows["eager"]["speedup"]) == 1.0
    data = json.loads((tmp_path / "bench.json").read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and "commit" in env and env["device"] == "cpu"
    assert data["cost"]["vit_tiny_patch16_224"]["gmacs_per_image"] > 0
    if report.matplotlib_missing() is None:
        assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_other_families_and_training(tmp_path):
    common = [
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--max-time",
        "0.2",
        "--no-progress",
        "--providers",
        "sdpa,triton",
        "--no-plot",
    ]
    assert (
        cli.main(
            [
                "bench",
                "timm:vit_tiny_patch16_224",
                "hf:vit_tiny_patch16_224",
                "--depth",
                "1",
                *common,
                "--mode",
                "inference,train",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert cli.main(["bench", "torchvision:vit_b_16", *common, "--out", str(tmp_path / "b")]) == 0
    rows = _rows(tmp_path / "a" / "bench.csv") + _rows(tmp_path / "b" / "bench.csv")
    assert len(rows) == 2 * 2 * 2 + 2
    for r in rows:
        if r["provider"] == "sdpa":
            assert r["status"] == "ok" and float(r["ms"]) > 0, r
        else:
            assert r["status"] in ("not measured", "ok", "fallback"), r
            if r["status"] == "not measured":
                assert r["note"], r


def test_bench_cost_only_reproduces_the_design_accounting(capsys):
    assert (
        cli.main(
            [
                "bench",
                "vit_base_patch16_224",
                "--batch-size",
                "256",
                "--dtype",
                "bf16",
                "--gpu",
                "h100",
                "--cost-only",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "17.56 GMACs per image" in out
    assert "38.18A" in out and "17.18A" in out and "roofline bound on H100 SXM" in out


@pytest.mark.skipif(GPU, reason="checks the CPU behaviour")
def test_bench_cuda_graphs_on_cpu_are_not_measured(tmp_path):
    assert cli.main(["bench", *TINY, "--providers", "sdpa", "--cuda-graphs", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = {r["provider"]: r for r in _rows(tmp_path / "bench.csv")}
    assert rows["sdpa"]["status"] == "ok"
    assert rows["sdpa+graphs"]["status"] == "not measured" and "CUDA GPU" in rows["sdpa+graphs"]["note"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bench", "--providers", "eager,fast"], "providers"),
        (["bench", "--mode", "serve"], "mode"),
        (["bench", "--gpu", "tpu"], "gpu"),
        (["bench", "resnet50"], "model"),
        (["profile-attention", "--tokens", "50,x"], "tokens"),
        (["profile-attention", "--providers", "sdpa:turbo"], "providers"),
        (["profile-attention", "--img-size", "100"], "img_size"),
        (["profile-attention", "--dtype", "fp8"], "dtype"),
    ],
)
def test_argument_errors_name_the_argument(argv, match, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and match in err[0], err


@pytest.mark.skipif(GPU, reason="checks the CPU behaviour")
def test_profile_attention_small(tmp_path, capsys):
    assert (
        cli.main(
            [
                "profile-attention",
                "--img-size",
                "32,64",
                "--heads",
                "2",
                "--head-dim",
                "32",
                "--warmup",
                "1",
                "--repeats",
                "2",
                "--max-time",
                "0.1",
                "--breakdown-dim",
                "64",
                "--breakdown-tokens",
                "17",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "attention.csv")
    assert sorted({int(r["tokens"]) for r in rows}) == [5, 17]
    by = {(r["provider"], int(r["tokens"])): r for r in rows}
    for n in (5, 17):
        for p in ("sdpa:flash", "sdpa:math", "eager", "qkv:torch"):
            r = by[(p, n)]
            assert r["status"] == "ok" and float(r["tflops"]) > 0 and float(r["gbs"]) > 0, r
        for p in ("vk_flash:triton", "vk_flash:cuda", "vk_qkv:triton", "vk_qkv:cuda", "sdpa:efficient", "sdpa:cudnn"):
            assert by[(p, n)]["status"] == "not measured" and by[(p, n)]["ms"] == ""
    bd = _rows(tmp_path / "block_breakdown.csv")
    assert [r["stage"] for r in bd if r["variant"] == "eager"][:3] == ["ln1", "qkv", "attention"]
    assert any(r["variant"] == "fused (torch)" for r in bd)
    assert sum(float(r["ms"]) for r in bd if r["variant"] == "eager") > 0
    assert (tmp_path / "block_trace.json").exists() and "one block" in out
    if report.matplotlib_missing() is None:
        assert (tmp_path / "attention.png").stat().st_size > 1000


@pytest.mark.skipif(GPU, reason="checks the CPU behaviour")
def test_profile_attention_backward_modes(tmp_path, capsys):
    """--mode bwd,fwd_bwd: one row per pass; backward TFLOP/s from 2.5x (3.5x) the forward's FLOPs;
    the CUDA providers say they have no backward; one PNG per pass."""
    args = ["profile-attention", "--tokens", "17", "--heads", "2", "--head-dim", "32", "--warmup", "1"]
    args += ["--repeats", "2", "--max-time", "0.1", "--no-breakdown", "--no-progress", "--out", str(tmp_path)]
    assert cli.main([*args, "--mode", "fwd,bwd,fwd_bwd"]) == 0
    rows = {(r["provider"], r["mode"]): r for r in _rows(tmp_path / "attention.csv")}
    fwd_gflop = float(rows[("sdpa:math", "fwd")]["gflop"])
    for p in ("sdpa:flash", "sdpa:math", "eager", "qkv:torch"):
        for mode, factor in (("bwd", 2.5), ("fwd_bwd", 3.5)):
            r = rows[(p, mode)]
            assert r["status"] == "ok" and float(r["tflops"]) > 0 and float(r["gbs"]) > 0, r
            if not p.startswith("qkv"):
                assert float(r["gflop"]) == pytest.approx(factor * fwd_gflop)
    for p in ("vk_flash:cuda", "vk_qkv:cuda"):
        assert rows[(p, "bwd")]["status"] == "not measured" and "forward-only" in rows[(p, "bwd")]["note"]
    assert rows[("vk_flash:triton", "bwd")]["status"] == "not measured"
    meta = json.loads((tmp_path / "attention.json").read_text())
    assert set(meta["modes"]) == {"fwd", "bwd", "fwd_bwd"} and "2.5x" in meta["flops"]
    if report.matplotlib_missing() is None:
        assert (tmp_path / "attention_bwd_float32_d32.png").stat().st_size > 1000
    assert cli.main([*args, "--mode", "backward"]) == 2
    assert "mode: expected a comma list of" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_bench_and_profile_on_a_gpu(tmp_path):
    """On a GPU: CUDA events, peak memory, CUDA graphs, SDPA backends, % of peak where the GPU is
    in the peaks table, and fused rows that either ran their backend or say why not."""
    from vit_kernels.bench import peaks

    assert cli.main(
        [
            "bench",
            *TINY,
            "--dtype",
            "bf16",
            "--mode",
            "inference",
            "--providers",
            "eager,sdpa,triton",
            "--cuda-graphs",
            "--no-plot",
            "--out",
            str(tmp_path),
        ]
    ) in (0, 1)
    rows = {r["provider"]: r for r in _rows(tmp_path / "bench.csv")}
    for p in ("eager", "sdpa", "sdpa+graphs"):
        assert rows[p]["status"] == "ok" and float(rows[p]["ms"]) > 0 and float(rows[p]["peak_mem_mib"]) > 0, rows[p]
    known = peaks.for_device(torch.device("cuda")) is not None
    assert (rows["sdpa"]["x_bound"] != "") == known
    assert rows["triton"]["status"] in ("ok", "fallback", "not measured", "error")
    if rows["triton"]["status"] != "ok":
        assert rows["triton"]["note"]
    assert cli.main(
        [
            "profile-attention",
            "--tokens",
            "197",
            "--batch-size",
            "4",
            "--dtype",
            "bf16",
            "--warmup",
            "2",
            "--repeats",
            "3",
            "--breakdown-batch",
            "4",
            "--no-plot",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    ) in (0, 1)
    arows = {r["provider"]: r for r in _rows(tmp_path / "attention.csv")}
    assert arows["sdpa:flash"]["status"] == "ok" and float(arows["sdpa:flash"]["mem_mib"]) >= 0
    assert (arows["sdpa:flash"]["pct_peak_flops"] != "") == known


# ---------------------------------------------------------------- timm's flags and fields, noise, registry

# timm benchmark.py's CSV header for --bench inference (its write_results of benchmark()'s dict:
# model, infer_samples_per_sec, infer_step_time, infer_batch_size, infer_img_size, infer_gmacs,
# infer_macts, param_count), without infer_macts (fvcore's activation count, not computed here)
TIMM_INFER_HEADER = [
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "infer_gmacs",
    "param_count",
]


def test_bench_takes_timm_flags_and_writes_timm_fields(tmp_path, capsys):
    results = tmp_path / "timm.csv"
    assert (
        cli.main(
            [
                "bench",
                "-m",
                "timm:vit_tiny_patch16_224",
                "-b",
                "2",
                "--img-size",
                "32",
                "--depth",
                "2",
                "--precision",
                "float32",
                "--bench",
                "inference",
                "--channels-last",
                "--num-warm-iter",
                "1",
                "--num-bench-iter",
                "2",
                "--max-time",
                "0.2",
                "--providers",
                "sdpa,triton",
                "--no-plot",
                "--no-progress",
                "--results-file",
                str(results),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    with open(results) as f:
        header = next(csv.reader(f))
    assert header[: len(TIMM_INFER_HEADER)] == TIMM_INFER_HEADER
    assert (tmp_path / "o" / "results.csv").read_text() == results.read_text()
    rows = {r["provider"]: r for r in _rows(results)}
    sdpa = rows["sdpa"]
    assert sdpa["model"] == "timm:vit_tiny_patch16_224" and sdpa["depth"] == "2"
    assert (sdpa["infer_batch_size"], sdpa["infer_img_size"]) == ("2", "32")
    assert float(sdpa["infer_samples_per_sec"]) == pytest.approx(2e3 / float(sdpa["infer_step_time"]), rel=1e-2)
    assert float(sdpa["infer_step_time_p20"]) <= float(sdpa["infer_step_time"]) <= float(sdpa["infer_step_time_p80"])
    # timm's vit_tiny_patch16_224 at depth 2 has 1.23 M parameters (param_count is in millions, as in timm)
    import timm

    n = sum(p.numel() for p in timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32).parameters())
    assert float(sdpa["param_count"]) == round(n / 1e6, 2)
    assert float(sdpa["infer_gflops"]) == pytest.approx(2 * float(sdpa["infer_gmacs"]), abs=0.011)
    assert rows["triton"]["infer_status"] == "not measured" and rows["triton"]["infer_samples_per_sec"] == ""
    # the depth is in every label: the table and the notes
    assert "timm:vit_tiny_patch16_224 depth 2, 32 px, batch 2" in out
    assert "CPU timings are a smoke test" in out and out.count("smoke test") == 1


def test_timm_gmacs_of_vit_base_match_timm_published_figure(capsys):
    """timm's results tables give vit_base_patch16_224 17.58 GMACs at 224 px (fvcore); ours count the
    same matmuls, convolution and attention products."""
    assert cli.main(["bench", "-m", "timm:vit_base_patch16_224", "-b", "1", "--cost-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    gmacs = float(out.split(" GMACs per image")[0].split()[-1])
    assert gmacs == pytest.approx(17.58, rel=0.01)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--bench", "train", "--mode", "inference"], "bench"),
        (["--precision", "float16", "--dtype", "bf16"], "dtype"),
        (["--amp", "--precision", "bfloat16"], "precision"),
        (["--target-spread", "0"], "target_spread"),
    ],
)
def test_bench_conflicting_flags_are_refused(argv, match, capsys):
    assert cli.main(["bench", *argv, "--cost-only", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {match}" in err and err.count("\n") == 1


def test_timm_precision_maps_to_dtype_and_autocast():
    from vit_kernels.commands import bench

    parser, _ = cli.build_parser()
    for argv, want in (
        (["--precision", "amp"], ("fp16", "autocast")),
        (["--amp", "--amp-dtype", "bfloat16"], ("bf16", "autocast")),
        (["--precision", "bfloat16"], ("bf16", "pure")),
        (["--dtype", "fp16", "--precision", "autocast"], ("fp16", "autocast")),
        ([], ("fp32", "pure")),
    ):
        assert bench.precision_of(parser.parse_args(["bench", *argv]), "fp32") == want, argv


def test_noisy_timings_warn_and_claim_no_ranks(tmp_path):
    """With a fake timer whose samples spread +-50%, the providers are not ranked and a warning says so;
    with a quiet one they are ranked by median."""
    from vit_kernels.bench import throughput as tp

    cfg = tp.BenchConfig(
        models=["vit_tiny_patch16_224"],
        providers=["eager", "sdpa"],
        device=torch.device("cpu"),
        batch_size=1,
        img_size=32,
        depth=1,
        warmup=1,
        repeats=3,
        max_time_s=0.0,
    )
    noisy = lambda fn, s: [1.0, 2.0, 3.0, 1.5, 2.5]  # noqa: E731
    rows = tp.run(cfg, sampler=noisy)
    warnings = tp.add_ranks(rows)
    assert len(warnings) == 1 and "too wide to rank" in warnings[0] and "depth 1" in warnings[0]
    assert all("rank" not in r for r in rows)
    assert all("target spread" in r["note"] for r in rows)
    quiet = iter([[4.0] * 5, [2.0] * 5])  # eager 4 ms, then sdpa 2 ms
    rows = tp.run(cfg, sampler=lambda fn, s: next(quiet))
    assert tp.add_ranks(rows) == [] and [r["rank"] for r in rows] == [2, 1]


REGISTRY_NAMES = [
    "vit_tiny_patch16_224",
    "vit_kernels:vit_tiny_patch16_224",
    "timm:vit_tiny_patch16_224",
    "torchvision:vit_b_16",
    "hf:vit_tiny_patch16_224",
    "vit_pytorch:vit_tiny_patch16_224",
]


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_every_command_accepts_the_registry_names(name, tmp_path, capsys):
    """bench, verify and profile-attention take the same names (one registry)."""
    assert (
        cli.main(
            [
                "bench",
                name,
                "--depth",
                "1",
                "--img-size",
                "32",
                "-b",
                "1",
                "--providers",
                "sdpa",
                "--num-warm-iter",
                "1",
                "--num-bench-iter",
                "1",
                "--max-time",
                "0",
                "--no-plot",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert _rows(tmp_path / "results.csv")[0]["depth"] == "1"
    assert cli.main(["verify", name, "--depth", "1", "--img-size", "32", "--backend", "torch"]) == 0
    assert (
        cli.main(
            [
                "profile-attention",
                "--model",
                name,
                "--providers",
                "eager",
                "--warmup",
                "1",
                "--repeats",
                "1",
                "--max-time",
                "0",
                "--no-breakdown",
                "--no-plot",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )


def test_hf_name_that_needs_the_network_says_so_in_one_line(capsys):
    import time

    t0 = time.perf_counter()
    for cmd in (["bench", "hf:someone/not-cached-vit", "--cost-only"], ["verify", "hf:someone/not-cached-vit"]):
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert "hf:someone/not-cached-vit needs the network" in err and err.count("\n") == 1
    assert time.perf_counter() - t0 < 10


def test_profile_attention_takes_its_shapes_from_a_registry_name(tmp_path, capsys):
    assert (
        cli.main(
            [
                "profile-attention",
                "--model",
                "timm:vit_tiny_patch16_224",
                "--providers",
                "eager",
                "--warmup",
                "1",
                "--repeats",
                "2",
                "--max-time",
                "0.1",
                "--no-breakdown",
                "--no-plot",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "3 heads of 64, 197 tokens, width 192" in capsys.readouterr().out
    rows = _rows(tmp_path / "attention.csv")
    assert [(r["tokens"], r["head_dim"]) for r in rows] == [("197", "64")]


TIMM_BOTH_HEADER = [
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "infer_gmacs",
    "train_samples_per_sec",
    "train_step_time",
    "train_batch_size",
    "train_img_size",
    "param_count",
]


def test_bench_both_writes_timm_train_fields_and_json(tmp_path):
    results = tmp_path / "timm.json"
    assert (
        cli.main(
            [
                "bench",
                "--model",
                "vit_tiny_patch16_224",
                "--depth",
                "1",
                "--img-size",
                "32",
                "-b",
                "2",
                "--bench",
                "both",
                "--providers",
                "sdpa",
                "--num-warm-iter",
                "1",
                "--num-bench-iter",
                "2",
                "--max-time",
                "0.1",
                "--no-plot",
                "--no-progress",
                "--results-file",
                str(results),
                "--results-format",
                "json",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    with open(tmp_path / "o" / "results.csv") as f:
        header = next(csv.reader(f))
    assert [h for h in header if h in TIMM_BOTH_HEADER] == TIMM_BOTH_HEADER and header[:11] == TIMM_BOTH_HEADER
    (row,) = json.loads(results.read_text())
    assert row["model"] == "vit_tiny_patch16_224" and row["depth"] == 1 and row["provider"] == "sdpa"
    assert row["train_samples_per_sec"] > 0 and row["train_batch_size"] == 2 and row["infer_step_time"] > 0


def test_torchcompile_and_channels_last_reach_the_config():
    from vit_kernels.commands import bench

    parser, _ = cli.build_parser()
    cfg, _ = bench.make_config(
        parser.parse_args(
            [
                "bench",
                "--device",
                "cpu",
                "--providers",
                "sdpa",
                "--torchcompile",
                "--torchcompile-mode",
                "max-autotune",
                "--channels-last",
                "--opt",
                "adamw",
            ]
        )
    )
    assert cfg.providers == ["sdpa", "compile"] and cfg.compile_backend == "inductor" and cfg.opt == "adamw"
    assert cfg.compile_mode == "max-autotune" and cfg.channels_last
    cfg, _ = bench.make_config(parser.parse_args(["bench", "--device", "cpu", "--torchcompile", "eager"]))
    assert "compile" in cfg.providers and cfg.compile_backend == "eager"
