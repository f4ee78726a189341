"""Loading the csrc extension: the GPU build (prebuilt ``vit_kernels._C`` or a JIT build with ninja)
and the host-emulation build (JIT, for CPU tensors; slow, for verification).

Nothing is built at import. The first call that needs a build (:func:`gpu_module`,
:func:`emulator_module`, :func:`unavailable_reason` for a device, or an op with
``backend="cuda"``) builds it through :mod:`vit_kernels.cuda.build` (toolkit, flags, the JIT build
into a per-user cache folder, with a line on stderr before and after) and keeps the module for
the process. Threads of one process build once (a lock here); processes started together build
once too (a file lock in the build folder, see :mod:`vit_kernels.cuda.build`).

A failed or missing build never breaks the Triton or torch paths: :func:`unavailable_reason`
returns why, and ``backend="auto"`` moves on.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional

import torch

from . import build

# re-exported: the build's names, where callers have always found them
from .build import CSRC as CSRC
from .build import EMULATOR_CFLAGS as EMULATOR_CFLAGS
from .build import GPU_CUDA_CFLAGS as GPU_CUDA_CFLAGS
from .build import BuildError as BuildError
from .build import arch_list as arch_list
from .build import cache_dir as cache_dir
from .build import cu_sources as cu_sources
from .build import gencode_flags as gencode_flags
from .build import toolkit_root as toolkit_root

_LOCK = threading.Lock()  # threads wait for one build per kind; processes wait on a file lock (build.jit_load)
_MODULES = {}  # kind -> module
_FAILURES = {}  # kind -> reason


def _load(kind: str):
    with _LOCK:
        if kind in _MODULES:
            return _MODULES[kind]
        if kind in _FAILURES:
            raise BuildError(_FAILURES[kind])
        try:
            mod = _build_emulator() if kind == "emulator" else _build_gpu()
        except BuildError as e:
            _FAILURES[kind] = str(e)
            raise
        _MODULES[kind] = mod
        return mod


def _prebuilt():
    """vit_kernels._C (built by setup.py), or None when it is not installed."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


def _build_emulator():
    return build.build_emulator()


def _build_gpu():
    return _prebuilt() or build.build_gpu()


def emulator_module():
    """The host-emulation build (built on first use). Raises :class:`BuildError` when it cannot be built."""
    return _load("emulator")


def gpu_module():
    """The GPU build: vit_kernels._C when installed, else a JIT build. Raises :class:`BuildError`."""
    return _load("gpu")


def module_for(device: torch.device):
    """The build that runs kernels on ``device``: the GPU build for CUDA, the emulator for the CPU."""
    if device.type == "cuda":
        return gpu_module()
    if device.type == "cpu":
        return emulator_module()
    raise BuildError(f"the CUDA C++ backend does not run on device type {device.type!r}")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the CUDA backend can run on ``device``, else why not.

    On a CUDA device it needs the GPU build, on the CPU the host-emulation build; either is built
    (once per process, cached on disk) by this call when missing.
    """
    if os.environ.get("VIT_KERNELS_DISABLE_CUDA_BACKEND"):
        return "disabled by VIT_KERNELS_DISABLE_CUDA_BACKEND"
    if device.type not in ("cuda", "cpu"):
        return f"the CUDA C++ backend does not run on device type {device.type!r}"
    try:
        module_for(device)
    except BuildError as e:
        return str(e)
    return None


def availability(device: torch.device) -> str:
    """One line for ``info``: whether the CUDA backend can run on ``device``, without building anything."""
    if os.environ.get("VIT_KERNELS_DISABLE_CUDA_BACKEND"):
        return "unavailable: disabled by VIT_KERNELS_DISABLE_CUDA_BACKEND"
    if device.type not in ("cuda", "cpu"):
        return f"unavailable: the CUDA C++ backend does not run on device type {device.type!r}"
    kind = "gpu" if device.type == "cuda" else "emulator"
    what = "GPU build" if kind == "gpu" else "host-emulation build (CPU tensors; slow, for verification)"
    if kind in _MODULES:
        return f"available ({what}, loaded)"
    if kind in _FAILURES:
        return f"unavailable: {_FAILURES[kind].splitlines()[0]}"
    if kind == "gpu" and _prebuilt() is not None:
        return "available (GPU build: prebuilt vit_kernels._C)"
    why = build.sources_present()
    if why:
        return f"unavailable: {why}"
    if kind == "gpu":
        if not torch.version.cuda:
            return f"unavailable: this torch ({torch.__version__}) is not a CUDA build"
        root, how = toolkit_root()
        if root is None:
            return f"unavailable: no CUDA toolkit found: {how}"
    elif build.host_compiler_missing():
        return f"unavailable: {build.host_compiler_missing()}"
    cached = build.cached_build(kind)
    if cached:
        return f"available ({what}, cached at {cached}; ninja rebuilds what changed)"
    return f"available once built ({what}: JIT-built with ninja on first use, {build.EXPECTED_TIME[kind]})"


def describe() -> List[str]:
    """Lines for ``python -m vit_kernels info``: what is built or buildable, and why not. Builds nothing."""
    lines = []
    try:
        from .. import _C  # noqa: F401

        lines.append("cuda: prebuilt GPU extension vit_kernels._C: installed")
    except ImportError as e:
        lines.append(f"cuda: prebuilt GPU extension vit_kernels._C: not installed ({e})")
    why_src = build.sources_present()
    lines.append(f"cuda: csrc sources: {'at ' + str(CSRC) if why_src is None else why_src}")
    root, how = toolkit_root()
    lines.append(f"cuda: toolkit root: {root} (from {how})" if root else f"cuda: toolkit: not found ({how})")
    try:
        archs = ";".join(arch_list())
    except BuildError as e:
        archs = str(e)
    lines.append(f"cuda: GPU build architectures: {archs} (TORCH_CUDA_ARCH_LIST)")
    lines.append(f"cuda: JIT cache: {cache_dir()}")
    for kind in ("gpu", "emulator"):
        if kind in _MODULES:
            lines.append(f"cuda: {kind} build: loaded")
        elif kind in _FAILURES:
            lines.append(f"cuda: {kind} build: failed: {_FAILURES[kind].splitlines()[0]}")
        else:
            built = build.cached_build(kind)
            lines.append(
                f"cuda: {kind} build: "
                + (
                    f"cached at {built}"
                    if built
                    else f"not built yet (built on first use, {build.EXPECTED_TIME[kind]})"
                )
            )
    return lines


def resource_usage(arch: str = "sm_80", *, refresh: bool = False) -> List[dict]:
    """Registers, spills, shared memory and tensor-core instruction counts of every csrc kernel compiled
    for ``arch`` (nvcc + cuobjdump, no GPU); see :func:`vit_kernels.cuda.resources.resource_usage`."""
    from .resources import resource_usage as _resource_usage

    return _resource_usage(arch, refresh=refresh)


__all__ = [
    "BuildError",
    "resource_usage",
    "cache_dir",
    "toolkit_root",
    "arch_list",
    "emulator_module",
    "gpu_module",
    "module_for",
    "unavailable_reason",
    "availability",
    "describe",
]
