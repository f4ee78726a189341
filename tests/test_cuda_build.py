"""The CUDA C++ build without a GPU: every .cu compiles for sm_80 and sm_90 with zero spills, the
toolkit is found behind nvcc wrappers, and the install/JIT/info paths say what they do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_kernels import cuda as vk_cuda
from vit_kernels.arch import shared_limits_by_name

REPO = Path(__file__).resolve().parents[1]
# Registers and shared memory per block (bytes) an SM can give one block.
SMEM_LIMIT = shared_limits_by_name()  # vit_kernels.arch


def _need_toolkit():
    root, how = vk_cuda.toolkit_root()
    if root is None:
        pytest.skip(f"no CUDA toolkit on this machine: {how}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_without_spills(arch):
    _need_toolkit()
    rows = vk_cuda.resource_usage(arch)
    sources = {r["source"] for r in rows}
    for src in vk_cuda.cu_sources():
        rel = str(src.relative_to(vk_cuda.CSRC))
        if rel != "gemm/gemm.cu":  # the dispatcher: host code only
            assert rel in sources, f"{rel} produced no kernel for {arch}"
    spilled = [f"{r['kernel']}<{r['config']}>: {r['spill_bytes']} bytes" for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills on {arch}: " + "; ".join(spilled)
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["shared_bytes"] <= SMEM_LIMIT[arch], r
    gemms = [r for r in rows if r["kernel"].endswith("gemm_kernel")]
    assert len(gemms) == 36, f"expected 3 dtypes x 2 tiles x 6 loader/epilogue pairs, got {len(gemms)}"
    assert len({r["config"] for r in gemms}) == 36, "instantiations must be told apart by their config"
    assert any(r["config"] == "bf16, tile 64x64x32 warp 32x32 stages 3, patch_u8, patch" for r in gemms)
    assert any(r["config"] == "fp16, tile 128x128x32 warp 64x32 stages 3, layernorm, qkv" for r in gemms)
    for r in gemms:
        uses_tc = not r["config"].startswith("fp32")
        assert bool(r["tensor_core_instructions"]) == uses_tc == r["has_dot"], r  # fp32 runs on the FMA path
    assert all(r["tensor_core_instructions"] for r in rows if "flash" in r["kernel"]), "attention without HMMA"
    fields = {"kernel", "config", "arch", "regs", "spill_bytes", "shared_bytes", "tensor_core_instructions"}
    assert fields <= set(rows[0]) and all(r["arch"] == arch for r in rows)


def test_toolkit_root_is_found_behind_the_nvcc_wrapper(monkeypatch):
    _need_toolkit()
    vk_cuda.toolkit_root.cache_clear()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    try:
        root, how = vk_cuda.toolkit_root()
        assert root is not None and (Path(root) / "bin" / "nvcc").exists(), how
        assert "--dryrun" in how
        monkeypatch.setenv("CUDA_HOME", root)
        vk_cuda.toolkit_root.cache_clear()
        assert vk_cuda.toolkit_root() == (str(Path(root).resolve()), "$CUDA_HOME")
        monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
        vk_cuda.toolkit_root.cache_clear()
        assert vk_cuda.toolkit_root()[0] is None and "no bin/nvcc" in vk_cuda.toolkit_root()[1]
    finally:
        vk_cuda.toolkit_root.cache_clear()


def test_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert vk_cuda.arch_list() == ["8.0", "9.0"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a+PTX")
    assert vk_cuda.gencode_flags(vk_cuda.arch_list()) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm80")
    with pytest.raises(vk_cuda.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        vk_cuda.arch_list()


def _setup_py(env_extra, hide_torch=False):
    code = (
        "import sys\n" + ("sys.modules['torch'] = None\n" if hide_torch else "") + "sys.argv = ['setup.py', '--name']\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})\n"
        "print('vit_kernels imported:', 'vit_kernels' in sys.modules, file=sys.stderr)\n"
    )
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_setup_skips_the_extension_quietly_without_torch():
    """pip's build isolation has no torch: setup.py must skip the extension, not fail."""
    p = _setup_py({"VIT_KERNELS_SKIP_CUDA_BUILD": ""}, hide_torch=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "vit_kernels"
    assert "torch is not importable" in p.stderr and "Traceback" not in p.stderr


def test_setup_loads_the_build_logic_without_the_package():
    """With torch and a toolkit, setup.py declares vit_kernels._C from vit_kernels/cuda/build.py loaded on
    its own (``--name`` compiles nothing); the vit_kernels package is not imported."""
    _need_toolkit()
    if not torch.version.cuda:
        pytest.skip("torch is not a CUDA build")
    p = _setup_py({"VIT_KERNELS_SKIP_CUDA_BUILD": ""})
    assert p.returncode == 0, p.stderr
    assert "building vit_kernels._C with the CUDA toolkit at" in p.stderr, p.stderr
    assert "vit_kernels imported: False" in p.stderr, p.stderr


def test_setup_skip_variable():
    p = _setup_py({"VIT_KERNELS_SKIP_CUDA_BUILD": "1"})
    assert p.returncode == 0, p.stderr
    assert "VIT_KERNELS_SKIP_CUDA_BUILD is set" in p.stderr


def test_info_describes_the_cuda_backend():
    p = subprocess.run(
        [sys.executable, "-m", "vit_kernels", "info"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "backend cuda: " in p.stdout and "toolkit" in p.stdout and "JIT cache" in p.stdout


def test_disabled_backend_says_why(monkeypatch):
    monkeypatch.setenv("VIT_KERNELS_DISABLE_CUDA_BACKEND", "1")
    assert "VIT_KERNELS_DISABLE_CUDA_BACKEND" in vk_cuda.unavailable_reason(torch.device("cpu"))


def test_unusable_build_folder_is_a_build_error(tmp_path, monkeypatch):
    """$VIT_KERNELS_CACHE naming a regular file: the build raises BuildError (the backend is unavailable,
    with the reason; `auto` moves on), never the OSError of making its folder."""
    from vit_kernels.cuda import build

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    monkeypatch.setenv("VIT_KERNELS_CACHE", str(not_a_folder))
    with pytest.raises(build.BuildError, match="cannot use the build folder"):
        build.jit_load("emulator", "vit_kernels_emulator", [])


@pytest.mark.slow
def test_gpu_extension_jit_builds():
    """The GPU build (csrc/bindings/*.cpp with torch's CUDA headers + every .cu for the arch list) links and
    imports, also on a machine without a GPU. Minutes on 2 cores, hence slow."""
    _need_toolkit()
    if not torch.version.cuda:
        pytest.skip("torch is not a CUDA build")
    m = vk_cuda.gpu_module()
    assert m.emulated is False
    for name in ("gemm_rows", "gemm_qkv", "gemm_patch", "row_stats", "selftest_mma"):
        assert hasattr(m, name)
