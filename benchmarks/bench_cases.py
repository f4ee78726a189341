"""The cases of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``).

The same cases at two sizes: small on a CPU (so the suite runs anywhere, in minutes), full on a
CUDA GPU (ViT-B/16 at batch 256 in bf16; attention up to 4097 tokens). The Triton and CUDA
kernels are skipped on the CPU with the reason (their interpreter and emulator are not
timings); a fused case whose ops ran torch is skipped too, never reported as a fused timing.

A thin layer over the harness (vit_kernels.bench: the same cases, builders and providers as the
CLI); only the clock differs: pytest-benchmark times with the host clock, so on a GPU every call
is followed by torch.cuda.synchronize() (the time includes the launch), while the CLI
(``python -m vit_kernels bench``) times with triton.testing.do_bench (CUDA events, L2 flushed) and
torch.utils.benchmark on the CPU.
"""

import os
from types import SimpleNamespace

import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")

SIZES = SimpleNamespace(
    **(
        dict(
            model="vit_base_patch16_224",
            batch=256,
            img=None,
            depth=None,
            dtype=torch.bfloat16,
            tokens=[50, 197, 257, 577, 1025, 2305, 4097],
            heads=12,
            head_dim=64,
            total_tokens=65536,
            rounds=20,
            warmup=5,
        )
        if GPU
        else dict(
            model="vit_tiny_patch16_224",
            batch=2,
            img=64,
            depth=2,
            dtype=torch.float32,
            tokens=[50, 197],
            heads=3,
            head_dim=64,
            total_tokens=None,
            rounds=3,
            warmup=1,
        )
    )
)


def attn_batch(tokens: int) -> int:
    return max(1, SIZES.total_tokens // tokens) if SIZES.total_tokens else 1


def synced(fn):
    """fn followed by a device synchronize on a GPU, so the host clock sees the work."""
    if not GPU:
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def run_benchmark(benchmark, fn, **info):
    benchmark.extra_info.update(
        {"device": torch.cuda.get_device_name() if GPU else "cpu", "torch": torch.__version__, **info}
    )
    return benchmark.pedantic(synced(fn), rounds=SIZES.rounds, warmup_rounds=SIZES.warmup, iterations=1)


def compile_on_cpu_allowed() -> bool:
    return GPU or os.environ.get("VK_BENCH_COMPILE") == "1"
