"""The host emulator behind csrc/include/vk/port.h: mma, ldmatrix, barriers, warp collectives.

The selftest kernels (csrc/selftest/port_selftest.cu) run through the emulated build on CPU tensors.
On a machine with a GPU the same tests also run on the GPU build (marked gpu), so emulator and
hardware answer the same questions.
"""

import pytest
import torch

from vit_kernels import cuda as vk_cuda
from vit_kernels.cuda.emulation import emulator_settings

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def ext_for():
    def get(device):
        try:
            return vk_cuda.module_for(torch.device(device))
        except vk_cuda.BuildError as e:
            pytest.fail(f"the {device} build of the CUDA extension failed: {e}")

    return get


def bits16(t: torch.Tensor) -> torch.Tensor:
    """A float16/bfloat16 tensor's bit patterns as int16."""
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_matches_matmul(ext_for, device, dtype):
    ext = ext_for(device)
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(8, 16).to(dtype)  # (n, k): the "col" operand
    c = torch.randn(16, 8)
    d = ext.selftest_mma(bits16(a).to(device), bits16(b).to(device), c.to(device), dtype == torch.bfloat16).cpu()
    expected = a.double() @ b.double().t() + c.double()
    # 16-bit products are exact in fp32; only the fp32 accumulation rounds
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)
    # a wrong fragment layout (e.g. A transposed) would be far off
    assert (d.double() - (a.double().t() @ b.double().t() + c.double())).abs().max() > 1e-2


def documented_ldmatrix(src: torch.Tensor, count: int, trans: bool) -> torch.Tensor:
    """The PTX ISA's ldmatrix layout, written out: matrix j is rows 8j..8j+7 of src (8 16-bit values
    each). Without .trans lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j in its
    register j (first value in the low half); with .trans it holds column l/4, rows 2(l%4), 2(l%4)+1."""
    vals = src.view(torch.int16).to(torch.int64) & 0xFFFF
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        for j in range(count):
            m = vals[8 * j : 8 * j + 8]
            if trans:
                lo, hi = m[2 * (lane % 4), lane // 4], m[2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1]
            out[lane, j] = lo | (hi << 16)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_matches_documented_layout(ext_for, device, count, trans):
    ext = ext_for(device)
    src = torch.randint(-32768, 32767, (8 * count, 8), dtype=torch.int16)
    got = ext.selftest_ldmatrix(src.to(device), count, trans).cpu().to(torch.int64) & 0xFFFFFFFF
    torch.testing.assert_close(got, documented_ldmatrix(src, count, trans), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [64, 256])
def test_block_reduction_needs_its_barriers(ext_for, device, threads):
    """With __syncthreads the tree sum is right; without them the emulator's race checker names the
    hazard, and with the checker off the answer is wrong. This is what proves the emulator
    interleaves threads the way a GPU may: a missing barrier shows up instead of passing by luck."""
    ext = ext_for(device)
    x = torch.rand(3, threads) + 0.5
    good = ext.selftest_block_sum(x.to(device), True).cpu()
    torch.testing.assert_close(good.double(), x.double().sum(1), rtol=1e-5, atol=1e-5)
    if device == "cpu":
        with pytest.raises(
            RuntimeError,
            match=r"(?s)racecheck: kernel selftest_block_sum_kernel.*"
            r"(read-after-write|write-after-read)",
        ):
            ext.selftest_block_sum(x, False)
        with emulator_settings(racecheck=False):
            bad = ext.selftest_block_sum(x, False)
        assert not torch.allclose(bad.double(), x.double().sum(1), rtol=1e-3, atol=1e-3), (
            "the emulator gave the right sum without barriers: it does not interleave threads"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_warp_shuffles_votes_atomics(ext_for, device):
    ext = ext_for(device)
    warps = 3
    x = torch.randn(warps * 32)
    x[32:64] = x[32:64].abs() + 0.1  # warp 1: all positive
    x[64:96] = -x[64:96].abs() - 0.1  # warp 2: none positive
    sums, ballots, anys, alls, total = (t.cpu() for t in ext.selftest_warp(x.to(device)))
    torch.testing.assert_close(sums.double(), x.view(warps, 32).double().sum(1), rtol=1e-5, atol=1e-5)
    pos = (x.view(warps, 32) > 0).to(torch.int64)
    expected_ballot = (pos << torch.arange(32)).sum(1)
    assert (ballots.to(torch.int64) & 0xFFFFFFFF).tolist() == expected_ballot.tolist()
    assert anys.tolist() == [int(pos[w].any()) for w in range(warps)] == [int(pos[0].any()), 1, 0]
    assert alls.tolist() == [int(pos[w].all()) for w in range(warps)][:1] + [1, 0]
    torch.testing.assert_close(total.double(), x.double().sum().reshape(1), rtol=1e-4, atol=1e-4)
