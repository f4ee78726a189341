"""Build entry for vit_kernels. Metadata lives in pyproject.toml.

The csrc CUDA extension is built here when a CUDA toolchain and torch are importable in the
build environment (see vit_kernels/cuda for the JIT build used otherwise); set
VIT_KERNELS_SKIP_CUDA_BUILD=1 to skip it.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["vit_kernels", "vit_kernels.*"]))
