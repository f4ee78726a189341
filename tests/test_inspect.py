"""`python -m vit_kernels inspect`: every launchable Triton configuration compiles ahead of time
for sm_80 and sm_90 with zero spills, shared memory within the per-block limit, and tensor-core
instructions wherever there is a tl.dot. Runs in a subprocess without the interpreter."""
import json
import os
import subprocess
import sys

import pytest

from vit_kernels.commands.inspect import TRITON_MODULES, problems


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "vit_kernels", "inspect", "--json", "--backend", "triton"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_every_triton_family_is_inspected(rows):
    kernels = {r["kernel"] for r in rows}
    assert kernels, "inspect found no Triton kernel"
    for arch in ("sm_80", "sm_90"):
        assert any(r["arch"] == arch for r in rows)
    for r in rows:
        assert set(r) >= {"kernel", "arch", "config", "regs", "spill_bytes", "shared_bytes",
                          "tensor_core_instructions"}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_spills_shared_within_limit_tensor_cores_used(rows, arch):
    bad = [f"{r['kernel']} [{r['config']}]: {'; '.join(problems(r))}" for r in rows
           if r["arch"] == arch and problems(r)]
    assert not bad, "\n".join(bad)


def test_problems_flags_each_kind_of_fault():
    ok = {"kernel": "k", "arch": "sm_80", "config": "", "regs": 128, "spill_bytes": 0, "shared_bytes": 1024,
          "tensor_core_instructions": ["HMMA"], "has_dot": True}
    assert problems(ok) == []
    assert "spills" in problems({**ok, "spill_bytes": 8})[0]
    assert "shared memory" in problems({**ok, "shared_bytes": 200 * 1024})[0]
    assert "tensor-core" in problems({**ok, "tensor_core_instructions": []})[0]
    assert problems({**ok, "arch": "sm_90", "shared_bytes": 200 * 1024}) == []


def test_cuda_kernels_are_listed_beside_the_triton_ones():
    """The csrc kernels come from nvcc's resource usage (cached by tests/test_cuda_build.py)."""
    from vit_kernels import cuda as vk_cuda
    root, how = vk_cuda.toolkit_root()
    assert root is not None, f"no CUDA toolkit: {how}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "vit_kernels", "inspect", "--json", "--backend", "cuda",
                          "--arch", "sm_80"], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    kernels = {r["kernel"] for r in rows}
    assert {"vk::gemm_detail::gemm_kernel", "vk::attn::flash_fwd_kernel", "vk::layernorm_stats_kernel"} <= kernels
    assert all(r["backend"] == "cuda" and not problems(r) for r in rows)
