"""Build entry for vit_kernels. Metadata lives in pyproject.toml.

The csrc CUDA extension (``vit_kernels._C``) is built here only when torch AND a CUDA toolkit are
importable/findable in the build environment. ``pip install -e .`` builds in an isolated environment
without torch, so there the extension is skipped (one line on stderr, not an error) and
vit_kernels builds it with ninja on first use instead (see vit_kernels/cuda/build.py).

Environment:
  VIT_KERNELS_SKIP_CUDA_BUILD=1   skip the extension
  TORCH_CUDA_ARCH_LIST            architectures, default "8.0;9.0"
  CUDA_HOME / CUDA_PATH           toolkit root; otherwise found with `nvcc --dryrun` (#$ TOP=)
To build it into an editable install: ``pip install --no-build-isolation -e .`` from an environment
with torch (or ``python setup.py build_ext --inplace``).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _note(msg: str) -> None:
    print(f"vit_kernels setup: {msg}", file=sys.stderr)


def _loader():
    """vit_kernels/cuda/build.py loaded on its own (it needs only torch), for its toolkit, source and
    flag logic, without importing the vit_kernels package."""
    spec = importlib.util.spec_from_file_location("_vit_kernels_cuda_build", HERE / "vit_kernels" / "cuda" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_extension():
    """([extensions], {cmdclass}) for vit_kernels._C, or ([], {}) with the reason on stderr."""
    if os.environ.get("VIT_KERNELS_SKIP_CUDA_BUILD", "") not in ("", "0"):
        _note("VIT_KERNELS_SKIP_CUDA_BUILD is set: not building the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _note(
            "torch is not importable in this build environment (pip's build isolation?): the CUDA "
            "extension is not built here; vit_kernels JIT-builds it on first use"
        )
        return [], {}
    if not torch.version.cuda:
        _note(f"torch {torch.__version__} is not a CUDA build: not building the CUDA extension")
        return [], {}
    build = _loader()
    root, how = build.toolkit_root()
    if root is None:
        _note(f"no CUDA toolkit ({how}): not building the CUDA extension")
        return [], {}
    _note(
        f"building vit_kernels._C with the CUDA toolkit at {root} (found from {how}) for {';'.join(build.arch_list())}"
    )
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root  # torch guessed from the nvcc on PATH, which may be a wrapper
    csrc = HERE / "csrc"
    sources = [str(p.relative_to(HERE)) for p in build.binding_sources()]
    sources += [str(p.relative_to(HERE)) for p in build.cu_sources()]
    cxx_flags, nvcc_flags = build.flags("gpu")
    ext = cpp_extension.CUDAExtension(
        "vit_kernels._C",
        sources,
        include_dirs=[str(csrc / "include")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        optional=True,
    )  # a failed compile warns and leaves the JIT path; it does not fail the install
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(packages=find_packages(include=["vit_kernels", "vit_kernels.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
