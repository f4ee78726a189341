"""Model throughput per provider (the cases of ``python -m vit_kernels bench``)."""

import pytest

from bench_cases import DEVICE, SIZES, compile_on_cpu_allowed, run_benchmark
from vit_kernels.bench import throughput as tp


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("provider", list(tp.PROVIDERS))
def test_throughput(benchmark, provider, mode):
    if provider == "compile" and not compile_on_cpu_allowed():
        pytest.skip("torch.compile takes ~40 s per case on a small CPU; set VK_BENCH_COMPILE=1 to run it")
    cfg = tp.BenchConfig(
        models=[SIZES.model],
        providers=[provider],
        device=DEVICE,
        batch_size=SIZES.batch,
        dtype=SIZES.dtype,
        modes=[mode],
        img_size=SIZES.img,
        depth=SIZES.depth,
    )
    row, step, shape = tp.prepare(SIZES.model, provider, mode, cfg)
    if step is None:
        pytest.skip(f"not measured: {row['note']}")
    if row["status"] == "fallback":
        pytest.skip(f"not measured as {provider}: {row['note']}")
    flops = None
    if shape is not None:
        from vit_kernels.bench.cost import model_cost, training_flops

        f = model_cost(shape).flops
        flops = f if mode == "inference" else training_flops(f)
    run_benchmark(
        benchmark,
        step,
        model=SIZES.model,
        provider=provider,
        mode=mode,
        batch=SIZES.batch,
        dtype=str(SIZES.dtype),
        gflop_per_step=flops and flops / 1e9,
        note=row["note"],
    )
