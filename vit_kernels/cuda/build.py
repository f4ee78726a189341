"""Building the csrc extension: toolkit, flags, sources, and the JIT build with ninja.

This file needs only torch (and filelock, a dependency of torch): setup.py loads it on its own,
without importing the vit_kernels package (``setup.py``'s ``_loader()``), for the toolkit root, the
architectures and the flags of the prebuilt ``vit_kernels._C``. Loading a build (once per process,
the prebuilt ``_C`` first) is :mod:`vit_kernels.cuda`'s part.

JIT builds go into a cache folder owned by the user: ``$VIT_KERNELS_CACHE`` or
``~/.cache/vit_kernels`` (``$XDG_CACHE_HOME`` respected), one sub-folder per variant keyed by a hash
of the compiler flags, torch and Python versions. Source changes are picked up by ninja's own
dependency tracking (headers included) in that folder. Processes started together build once: each
takes a file lock in the variant's folder (``build.lock``, released by the OS if its holder dies)
around the build, and the ones that come after find it built.

* Emulator build: ``csrc/bindings/*.cpp`` + ``csrc/emulation/*.cpp``, host C++ compiler, ``-O2
  -DVK_EMULATE``. No CUDA toolkit needed.
* GPU build: ``csrc/bindings/*.cpp`` + every ``csrc/**/*.cu`` with nvcc for the architectures of
  ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``). The toolkit root comes from ``CUDA_HOME``, else
  ``CUDA_PATH``, else ``nvcc --dryrun`` (its ``#$ TOP=`` line), because the ``nvcc`` on PATH may be a
  wrapper outside the toolkit (see :func:`toolkit_root`, which also says which was used).

A build that compiles says so on stderr before it starts (what, where, about how long) and when it
is done (how long it took): a live line with rich when stderr is a terminal, else two plain lines.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"
# -std=c++20: the emulator's race checker names source lines with std::source_location; torch 2.11 (seen)
# compiles extensions as C++17, 2.14 as C++20 (torch's flag comes first, ours wins)
EMULATOR_CFLAGS = ["-O2", "-g0", "-DVK_EMULATE", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-std=c++20"]
GPU_CUDA_CFLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
# what the user is told to expect before a build from scratch (the emulator took 175 s on 2 busy cores)
EXPECTED_TIME = {"emulator": "1-3 min", "gpu": "a few minutes"}
TITLE = {"emulator": "the CUDA extension (host emulation, for CPU tensors)", "gpu": "the CUDA extension (GPU build)"}


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
        return (
            f"the csrc sources are not at {CSRC} (JIT builds need a source checkout of vit_kernels; "
            f"a wheel carries the prebuilt vit_kernels._C instead)"
        )
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
        p = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
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
    """nvcc's -gencode flags for arch_list() entries ("9.0a+PTX" adds the PTX of compute_90a)."""
    out = []
    for a in archs:
        num = a.replace("+PTX", "").replace(".", "")
        out.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            out.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return out


def binding_sources() -> List[Path]:
    """The torch-side sources of both builds: csrc/bindings/*.cpp (op bindings + module, self-test bindings)."""
    return sorted((CSRC / "bindings").glob("*.cpp"))


def cu_sources() -> List[Path]:
    """Every .cu file of csrc (the GPU build), the emulation folder left out."""
    return sorted(p for p in CSRC.rglob("*.cu") if "emulation" not in p.parts)


def emulation_sources() -> List[Path]:
    return sorted((CSRC / "emulation").glob("*.cpp"))


def host_compiler_missing() -> Optional[str]:
    """None when the host C++ compiler ($CXX or c++) is on PATH, else why not."""
    cxx = os.environ.get("CXX", "c++")
    return None if shutil.which(cxx) else f"no host C++ compiler ({cxx}) on PATH"


# --------------------------------------------------------------------------- variants
def flags(kind: str) -> Tuple[List[str], List[str]]:
    """(host compiler flags, nvcc flags) of a build variant: "emulator" or "gpu"."""
    if kind == "emulator":
        return EMULATOR_CFLAGS, []
    return ["-O2"], GPU_CUDA_CFLAGS + gencode_flags(arch_list())


def variant_dir(kind: str) -> Path:
    """The cache folder of one build variant ("emulator" or "gpu"): a hash of its flags, torch,
    Python and the machine."""
    cflags, cuda_cflags = flags(kind)
    key = "\n".join([kind, torch.__version__, sys.version, platform.machine(), *cflags, *cuda_cflags])
    return cache_dir() / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_build(kind: str) -> Optional[Path]:
    """The folder of this variant's JIT build when a built library is there, else None."""
    try:
        d = variant_dir(kind)
    except BuildError:
        return None
    return d if any(d.glob("*.so")) else None


# --------------------------------------------------------------------------- telling the user
class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_cuda_home_guess() -> None:
    """torch.utils.cpp_extension warns when it is imported on a machine without a CUDA runtime
    ("No CUDA runtime is found, using CUDA_HOME='/usr/local'"): noise on a CPU machine, where the
    emulator build needs no CUDA and torch.utils.benchmark imports cpp_extension to time anything.
    Drop that one message (every other warning of cpp_extension stays); the GPU build sets
    CUDA_HOME itself from :func:`toolkit_root`, and says where it came from in ``info``."""
    log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessage) for f in log.filters):
        log.addFilter(_DropMessage("No CUDA runtime is found"))


@contextlib.contextmanager
def _announce(kind: str, build_dir: Path, fresh: bool):
    """Around a build: a line before it ("building ..., ~1 min", only when nothing was built in this
    folder yet) and one after it when it compiled anything (how long it took). A live spinner with
    rich when stderr is a terminal; plain lines otherwise; nothing on stdout."""
    what = TITLE.get(kind, kind)
    so_before = {p: p.stat().st_mtime for p in build_dir.glob("*.so")}
    t0 = time.perf_counter()
    status = None
    if fresh:
        line = f"building {what}, {EXPECTED_TIME.get(kind, 'a minute or more')} (once; cached in {build_dir})"
        status = _live_status(line)
        if status is None:
            print(f"vit_kernels: {line}", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if status is not None:
            status.stop()
    rebuilt = fresh or any(so_before.get(p) != p.stat().st_mtime for p in build_dir.glob("*.so"))
    if rebuilt:
        verb = "built" if fresh else "rebuilt (sources changed)"
        print(f"vit_kernels: {verb} {what} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _live_status(line: str):
    """A started rich spinner with the elapsed time on stderr; None when stderr is not a terminal,
    rich is not installed, or another rich display is live (it redirects sys.stderr through its
    FileProxy and prints plain lines above itself; two live displays would garble the terminal)."""
    if not sys.stderr.isatty() or type(sys.stderr).__name__ == "FileProxy":
        return None
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    p = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    p.add_task(line, total=None)
    p.start()
    return p


# --------------------------------------------------------------------------- builds
def jit_load(kind: str, name: str, sources: List[Path]):
    """Build (when missing or stale) and load one variant ("emulator" or "gpu", compiled with
    :func:`flags`) with torch.utils.cpp_extension.load, in :func:`variant_dir`'s folder, under a
    file lock shared with other processes."""
    from filelock import FileLock, Timeout  # a dependency of torch

    quiet_cuda_home_guess()
    from torch.utils import cpp_extension

    cflags, cuda_cflags = flags(kind)
    build_dir = variant_dir(kind)
    # Other processes building this variant wait here. (torch 2.14's load() also locks its folder;
    # older torch used a lock file that a killed build left behind, blocking every later build.)
    lock = FileLock(str(build_dir / "build.lock"))
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(
                f"vit_kernels: waiting for another process that builds {TITLE.get(kind, kind)} in {build_dir}",
                file=sys.stderr,
                flush=True,
            )
            lock.acquire()
    except OSError as e:  # a regular file where a folder should be ($VIT_KERNELS_CACHE), a read-only folder
        raise BuildError(f"cannot use the build folder {build_dir} ({type(e).__name__}: {e})") from e
    try:
        fresh = not any(build_dir.glob(f"{name}*.so"))
        with _announce(kind, build_dir, fresh):
            try:
                return cpp_extension.load(
                    name=name,
                    sources=[str(s) for s in sources],
                    extra_cflags=cflags,
                    extra_cuda_cflags=cuda_cflags or None,
                    extra_include_paths=[str(CSRC / "include")],
                    build_directory=str(build_dir),
                    verbose=bool(os.environ.get("VIT_KERNELS_VERBOSE_BUILD")),
                    with_cuda=bool(cuda_cflags),
                )
            except Exception as e:
                tail = "\n".join(str(e).strip().splitlines()[-40:])
                raise BuildError(f"building the {kind} extension in {build_dir} failed:\n{tail}") from e
    finally:
        lock.release()


def build_emulator():
    """JIT-build (or load from the cache) the host-emulation extension. Raises :class:`BuildError`."""
    why = sources_present() or host_compiler_missing()
    if why:
        raise BuildError(why)
    return jit_load("emulator", "vit_kernels_emulator", [*binding_sources(), *emulation_sources()])


def build_gpu():
    """JIT-build (or load from the cache) the GPU extension with nvcc. Raises :class:`BuildError`."""
    why = sources_present()
    if why:
        raise BuildError(f"vit_kernels._C is not installed and {why}")
    if not torch.version.cuda:
        raise BuildError(f"this torch ({torch.__version__}) is not a CUDA build")
    root, how = toolkit_root()
    if root is None:
        raise BuildError(f"no CUDA toolkit found: {how}")
    quiet_cuda_home_guess()
    from torch.utils import cpp_extension

    # torch guesses the toolkit from the folder of the nvcc on PATH, which can be a wrapper's folder
    # (PLATFORM.md): point it at the root found above, visibly.
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    return jit_load("gpu", "vit_kernels_gpu", [*binding_sources(), *cu_sources()])
