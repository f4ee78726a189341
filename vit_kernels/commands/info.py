"""``python -m vit_kernels info``: versions, devices, and which backends are available and why not."""

from __future__ import annotations

import platform

import torch


def add_parser(sub) -> None:
    sub.add_parser("info", help="what is installed and which backends can run here")


def run(args) -> int:
    from .. import __version__
    from ..backends import interpreter_enabled, triton_unavailable

    print(f"vit_kernels {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as e:  # pragma: no cover
        print(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        dev = torch.device("cpu")
        print("device: no CUDA device; CPU only" + (" (Triton interpreter on)" if interpreter_enabled() else ""))
    why = triton_unavailable(dev)
    print(f"backend triton: {'available' if why is None else 'unavailable: ' + why}")
    from .. import cuda as vk_cuda  # describes the CUDA backend without building it

    print(f"backend cuda: {vk_cuda.availability(dev)}")
    for line in vk_cuda.describe():
        print("  " + line)
    print("backend torch: available")
    return 0
