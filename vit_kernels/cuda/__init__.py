"""Loading the csrc extension: the GPU build (prebuilt ``vit_kernels._C`` or a JIT build with ninja)
and the host-emulation build (JIT, for CPU tensors; slow, for verification).

Nothing is built at import. The first call that needs a build (:func:`gpu_module`,
:func:`emulator_module`, :func:`unavailable_reason` for a device, or an op with
``backend="cuda"``) compiles it with ``torch.utils.cpp_extension.load`` into a cache folder owned
by the user: ``$VIT_KERNELS_CACHE`` or ``~/.cache/vit_kernels`` (``$XDG_CACHE_HOME`` respected),
one sub-folder per variant keyed by a hash of the compiler flags, torch and Python versions. Source
changes are picked up by ninja's own dependency tracking (headers included) in that folder.
Threads of one process build once (a lock); processes started together build once too: each
takes a file lock in the variant's folder (``build.lock``, released by the OS if its holder dies)
around the build, and the ones that come after find it built.

* Emulator build: ``csrc/bindings/*.cpp`` + ``csrc/emulation/*.cpp``, host C++ compiler, ``-O2
  -DVK_EMULATE``. No CUDA toolkit needed.
* GPU build: ``csrc/bindings/*.cpp`` + every ``csrc/**/*.cu`` with nvcc for the architectures of
  ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``). The toolkit root comes from ``CUDA_HOME``, else
  ``CUDA_PATH``, else ``nvcc --dryrun`` (its ``#$ TOP=`` line), because the ``nvcc`` on PATH may be a
  wrapper outside the toolkit (see :func:`toolkit_root`, which also says which was used).

A failed or missing build never breaks the Triton or torch paths: :func:`unavailable_reason`
returns why, and ``backend="auto"`` moves on.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"
logger = logging.getLogger("vit_kernels")
EMULATOR_CFLAGS = ["-O2", "-g0", "-DVK_EMULATE", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
GPU_CUDA_CFLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why."""


# --------------------------------------------------------------------------- locations and tools
def cache_dir() -> Path:
    """Where JIT builds go: $VIT_KERNELS_CACHE, else $XDG_CACHE_HOME/vit_kernels or ~/.cache/vit_kernels."""
    env = os.environ.get("VIT_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vit_kernels"


def sources_present() -> Optional[str]:
    """None when the csrc sources are next to the package (a source checkout), else why not."""
    if not (CSRC / "bindings" / "bind_ops.cpp").is_file():
        return (f"the csrc sources are not at {CSRC} (JIT builds need a source checkout of vit_kernels; "
                f"a wheel carries the prebuilt vit_kernels._C instead)")
    return None


@functools.lru_cache(maxsize=None)
def toolkit_root() -> Tuple[Optional[str], str]:
    """(CUDA toolkit root or None, how it was found or why not).

    Order: $CUDA_HOME, $CUDA_PATH, then ``nvcc --dryrun`` of the nvcc on PATH (its ``#$ TOP=`` line
    names the toolkit even when that nvcc is a wrapper script elsewhere).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v:
            if (Path(v) / "bin" / "nvcc").exists():
                return str(Path(v).resolve()), f"${var}"
            return None, f"${var}={v} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH and neither CUDA_HOME nor CUDA_PATH is set"
    try:
        p = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True, timeout=60)
    except Exception as e:  # pragma: no cover - depends on the machine
        return None, f"`{nvcc} --dryrun` failed: {e}"
    m = re.search(r"^#\$ TOP=(.+)$", p.stdout + p.stderr, re.MULTILINE)
    if not m:
        return None, f"`{nvcc} --dryrun` printed no '#$ TOP=' line"
    root = Path(m.group(1).strip()).resolve()
    if not (root / "bin" / "nvcc").exists():
        return None, f"`nvcc --dryrun` reported TOP={root}, which has no bin/nvcc"
    return str(root), f"`{nvcc} --dryrun` (#$ TOP=)"


def arch_list() -> List[str]:
    """The GPU architectures to build for, from $TORCH_CUDA_ARCH_LIST (default "8.0;9.0")."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    archs = [a for a in re.split(r"[;\s,]+", raw.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a):
            raise BuildError(f"TORCH_CUDA_ARCH_LIST: cannot read {a!r} (expected entries like 8.0 or 9.0)")
    return archs


def gencode_flags(archs: List[str]) -> List[str]:
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def binding_sources() -> List[Path]:
    """The torch-side sources of both builds: csrc/bindings/*.cpp (op bindings + module, self-test bindings)."""
    return sorted((CSRC / "bindings").glob("*.cpp"))


def cu_sources() -> List[Path]:
    return sorted(p for p in CSRC.rglob("*.cu") if "emulation" not in p.parts)


def emulation_sources() -> List[Path]:
    return sorted((CSRC / "emulation").glob("*.cpp"))


def _variant_dir(kind: str, flags: List[str]) -> Path:
    key = "\n".join([kind, torch.__version__, sys.version, platform.machine(), *flags])
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-{h}"


# --------------------------------------------------------------------------- builds
_LOCK = threading.Lock()  # threads wait for one build per kind; processes wait on a file lock (_jit_load)
_MODULES = {}     # kind -> module
_FAILURES = {}    # kind -> reason


def _jit_load(kind: str, name: str, sources: List[Path], cflags: List[str], cuda_cflags: List[str]):
    from filelock import FileLock  # a dependency of torch
    from torch.utils import cpp_extension

    build_dir = _variant_dir(kind, cflags + cuda_cflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    # Other processes building this variant wait here. (torch 2.14's load() also locks its folder;
    # older torch used a lock file that a killed build left behind, blocking every later build.)
    with FileLock(str(build_dir / "build.lock")):
        if not any(build_dir.glob(f"{name}*.so")):
            logger.info("building the %s extension in %s (a minute or more)", kind, build_dir)
        try:
            return cpp_extension.load(
                name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=cuda_cflags or None, extra_include_paths=[str(CSRC / "include")],
                build_directory=str(build_dir), verbose=bool(os.environ.get("VIT_KERNELS_VERBOSE_BUILD")),
                with_cuda=bool(cuda_cflags))
        except Exception as e:
            msg = str(e)
            tail = "\n".join(msg.strip().splitlines()[-40:])
            raise BuildError(f"building the {kind} extension in {build_dir} failed:\n{tail}") from e


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


def _variant_dir_for(kind: str) -> Path:
    if kind == "emulator":
        return _variant_dir("emulator", EMULATOR_CFLAGS)
    return _variant_dir("gpu", ["-O2"] + GPU_CUDA_CFLAGS + gencode_flags(arch_list()))


def _cached_build(kind: str) -> Optional[Path]:
    """The folder of this variant's JIT build when a built library is there, else None."""
    try:
        d = _variant_dir_for(kind)
    except BuildError:
        return None
    return d if any(d.glob("*.so")) else None


def _build_emulator():
    why = sources_present()
    if why:
        raise BuildError(why)
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BuildError(f"no host C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    return _jit_load("emulator", "vit_kernels_emulator", [*binding_sources(), *emulation_sources()],
                     EMULATOR_CFLAGS, [])


def _build_gpu():
    try:
        from .. import _C  # built by setup.py
        return _C
    except ImportError:
        pass
    why = sources_present()
    if why:
        raise BuildError(f"vit_kernels._C is not installed and {why}")
    if not torch.version.cuda:
        raise BuildError(f"this torch ({torch.__version__}) is not a CUDA build")
    root, how = toolkit_root()
    if root is None:
        raise BuildError(f"no CUDA toolkit found: {how}")
    from torch.utils import cpp_extension
    # torch guesses the toolkit from the folder of the nvcc on PATH, which can be a wrapper's folder
    # (PLATFORM.md): point it at the root found above, visibly.
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    flags = GPU_CUDA_CFLAGS + gencode_flags(arch_list())
    # keep in step with _variant_dir_for("gpu")
    return _jit_load("gpu", "vit_kernels_gpu", [*binding_sources(), *cu_sources()], ["-O2"], flags)


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
    if kind == "gpu":
        try:
            from .. import _C  # noqa: F401
            return "available (GPU build: prebuilt vit_kernels._C)"
        except ImportError:
            pass
    why = sources_present()
    if why:
        return f"unavailable: {why}"
    if kind == "gpu":
        if not torch.version.cuda:
            return f"unavailable: this torch ({torch.__version__}) is not a CUDA build"
        root, how = toolkit_root()
        if root is None:
            return f"unavailable: no CUDA toolkit found: {how}"
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"unavailable: no host C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    cached = _cached_build(kind)
    if cached:
        return f"available ({what}, cached at {cached}; ninja rebuilds what changed)"
    return f"available once built ({what}: JIT-built with ninja on first use, a minute or more)"


def describe() -> List[str]:
    """Lines for ``python -m vit_kernels info``: what is built or buildable, and why not. Builds nothing."""
    lines = []
    try:
        from .. import _C  # noqa: F401
        lines.append("cuda: prebuilt GPU extension vit_kernels._C: installed")
    except ImportError as e:
        lines.append(f"cuda: prebuilt GPU extension vit_kernels._C: not installed ({e})")
    why_src = sources_present()
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
            built = _cached_build(kind)
            lines.append(f"cuda: {kind} build: " + (f"cached at {built}" if built
                                                      else "not built yet (built on first use)"))
    return lines


def resource_usage(arch: str = "sm_80", *, refresh: bool = False) -> List[dict]:
    """Registers, spills, shared memory and tensor-core instruction counts of every csrc kernel compiled
    for ``arch`` (nvcc + cuobjdump, no GPU); see :func:`vit_kernels.cuda.resources.resource_usage`."""
    from .resources import resource_usage as _resource_usage
    return _resource_usage(arch, refresh=refresh)


__all__ = ["BuildError", "resource_usage", "cache_dir", "toolkit_root", "arch_list", "emulator_module", "gpu_module",
           "module_for", "unavailable_reason", "availability", "describe"]
