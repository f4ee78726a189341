"""DistributedDataParallel over the fused reference ViT: 2 CPU processes (gloo) on halves of each
global batch end with the parameters of one process trained on the whole batches.

DDP averages the two half-batch gradients; with a mean loss over equal halves that is the
whole-batch gradient, so the two runs differ only by the order of floating-point sums. The model
runs in float64 (the fused modules' torch path takes it), which makes that difference ~1e-15 and
lets the tolerance be tight.
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vit_kernels import training
from vit_kernels.models import create_model

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this build",
)

STEPS, BATCH, LR, SEED = 3, 8, 0.05, 1234


def _model():
    """The fused reference ViT (vit_kernels.nn modules), small, backend torch, float64."""
    return create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, backend="torch").double()


def _batches():
    g = torch.Generator().manual_seed(SEED)
    return [
        (torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def _single(batches):
    torch.manual_seed(SEED)
    model = _model()
    training.sgd_steps(model, batches, LR)
    return model.state_dict()


def test_ddp_two_processes_match_one(tmp_path):
    batches = _batches()
    out = tmp_path / "rank0.pt"
    mp.spawn(
        training.ddp_train,
        nprocs=2,
        join=True,
        args=(2, f"file://{tmp_path / 'init'}", functools.partial(_model), batches, LR, SEED, str(out)),
    )
    ddp = torch.load(out)
    single = _single(batches)
    torch.manual_seed(SEED)
    init = _model().state_dict()
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the runs trained (parameters moved), and halving the data would have shown: one process on
    # the first halves only ends elsewhere
    moved = max((single[n] - init[n]).abs().max().item() for n in single)
    assert moved > 1e-4, f"training moved no parameter by more than {moved:.2e}"
    half = _single([(x[: BATCH // 2], y[: BATCH // 2]) for x, y in batches])
    gap = max((half[n] - single[n]).abs().max().item() for n in single)
    assert gap > 1e-6, f"half the batch gave the same parameters (max gap {gap:.2e}): the test could not fail"


def test_bench_train_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m vit_kernels bench --bench train`` on the CPU (gloo): one row per
    provider from rank 0, img/s summed over the two processes (at least twice what the slowest
    rank's step time gives one process), the not-measured row as in a single process."""
    import csv
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "vit_kernels",
        "bench",
        "--device",
        "cpu",
        "--depth",
        "1",
        "--img-size",
        "32",
        "-b",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "3",
        "--no-progress",
        "--no-plot",
        "--bench",
        "train",
        "--providers",
        "sdpa,triton",
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    aborted = "terminate called without an active exception"
    if done.returncode != 0 and aborted in done.stderr and (tmp_path / "results.csv").exists():
        # Both ranks aborted (SIGABRT) at exit after the results were written and the process group
        # destroyed: seen in CI under load (2026-11-26 18:45 UTC, and once before), never reproduced here in
        # 20+ runs, cause not found (PyTorch's gloo teardown). Run once more; the second run must pass whole.
        (tmp_path / "results.csv").unlink()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("vit_kernels bench on") == 1, done.stdout  # rank 0 alone prints
    with open(tmp_path / "results.csv") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"sdpa", "triton"}
    sdpa = rows["sdpa"]
    assert sdpa["train_status"] == "ok" and "torchrun: 2 processes" in sdpa["train_note"], sdpa
    per_process = 2 * 1e3 / float(sdpa["train_step_time"])
    assert float(sdpa["train_samples_per_sec"]) >= 2 * per_process * 0.999, sdpa
    assert rows["triton"]["train_status"] == "not measured", rows["triton"]
