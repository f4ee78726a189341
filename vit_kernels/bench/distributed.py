"""bench under ``torchrun --nproc-per-node N``: one process per GPU, throughput summed over them.

torchrun (``torch.distributed.run``) starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE;
nothing here launches a process. :func:`setup` joins the process group (NCCL on GPUs, gloo on the
CPU) and gives each process its GPU (``cuda:LOCAL_RANK``). Every rank then builds and times the
same cases on its own batch of ``--batch-size`` images; the train step wraps the model in
DistributedDataParallel, so each step all-reduces the gradients as a data-parallel job does.
Every rank takes the same number of timed steps (:func:`fixed_sampler`: a timer that stops
after a count rather than a time, which would differ between ranks and leave one waiting in an
all-reduce), and :func:`reduce_row` merges the ranks' rows: img/s summed, ms/step the slowest
rank's median, peak memory the largest. Rank 0 prints and writes the files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List

import torch


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """The process's place as torchrun sets it (RANK, LOCAL_RANK, WORLD_SIZE); one process without."""
    try:
        return World(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )
    except ValueError as e:
        raise SystemExit(f"torchrun environment: expected integers in RANK, LOCAL_RANK, WORLD_SIZE: {e}")


def setup(device: torch.device) -> tuple:
    """(World, this rank's device). With WORLD_SIZE > 1: joins the process group (NCCL for a CUDA
    device, gloo for the CPU) and takes GPU LOCAL_RANK."""
    world = from_env()
    if world.size <= 1:
        return world, device
    import torch.distributed as dist

    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"torchrun: LOCAL_RANK {world.local_rank} has no GPU ({torch.cuda.device_count()} "
                f"visible); use --nproc-per-node <= the number of GPUs"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def teardown(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank done before any tears down (gloo aborted a rank once, under load)
            dist.destroy_process_group()


def size() -> int:
    """Processes in the group (1 when torch.distributed is not initialized)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def fixed_sampler(count: int, device: torch.device) -> Callable[[Callable, float], List[float]]:
    """A sampler for timer.measure that times exactly ``count`` calls (ms each, synchronized on a
    GPU), whatever the time budget: every rank then runs the same number of steps."""

    def sample(fn, budget_s):
        out = []
        for _ in range(count):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    return sample


def reduce_row(row: Dict) -> Dict:
    """Merge every rank's row of one case (call it on every rank, once per case, error or not):
    img/s (and its p20/p80) summed over the ranks, ms/step and its p20/p80 the slowest rank's, peak
    memory the largest, TFLOP/s summed; an error or a missing timing on any rank makes the row that
    rank's. Returns the merged row (the same on every rank)."""
    import torch.distributed as dist

    rows: List[Dict] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    n = len(rows)
    bad = next((r for r in rows if "ms" not in r), None)
    if bad is not None:
        out = dict(bad)
        if bad["status"] == "error":
            out["note"] = f"rank {rows.index(bad)} of {n}: {bad.get('note', '')}"
        return out
    out = dict(rows[0])
    for k in ("img_per_s", "img_per_s_p20", "img_per_s_p80", "tflops"):
        if k in out:
            out[k] = sum(r[k] for r in rows)
    slowest = max(rows, key=lambda r: r["ms"])
    for k in ("ms", "ms_p20", "ms_p80", "ms_min", "ms_max", "spread_pct"):
        out[k] = slowest[k]
    if "peak_mem_mib" in out:
        out["peak_mem_mib"] = max(r["peak_mem_mib"] for r in rows)
    out.pop("x_bound", None)  # the roofline bound is one GPU's
    out.update(ranks=n, global_batch=sum(r["batch"] for r in rows))
    note = (
        f"torchrun: {n} processes, img/s summed over them, ms/step the slowest rank's "
        f"(rank {rows.index(slowest)}), batch {out['batch']} per process"
    )
    out["note"] = "; ".join(x for x in (out.get("note"), note) if x)
    return out
