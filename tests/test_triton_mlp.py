"""Triton layernorm_gelu_mlp (vit_kernels.triton.mlp): LayerNorm on fc1's loads, bias + GELU in
fc1's epilogue, bias + layer scale + residual in fc2's. Checked against vit_kernels.reference in
float64 under the tolerance rule, the oracle at the same dtype (plain PyTorch) as the baseline, NaN-filled outputs.
"""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.testing import assert_close

pytest.importorskip("triton")
from vit_kernels.triton.mlp import layernorm_gelu_mlp_forward  # noqa: E402
from vit_kernels.dtypes import KERNEL_DTYPES

from conftest import DEVICE  # noqa: E402

DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale + shift).to(dtype)


def d64(t):
    return None if t is None else t.double()


def oracle(x, nw, nb, w1, b1, w2, b2, eps, approximate, res, ls):
    """The float64 oracle with the op's semantics: norm_weight None means no LayerNorm."""
    if nw is not None:
        return R.layernorm_gelu_mlp(
            *map(d64, (x, nw, nb, w1, b1, w2, b2)),
            eps=eps,
            approximate=approximate,
            residual=d64(res),
            layer_scale=d64(ls),
        )
    h = R.gelu(R.linear(d64(x), d64(w1), d64(b1)), approximate)
    return R.linear(h, d64(w2), d64(b2), residual=d64(res), layer_scale=d64(ls))


def check_mlp(B, N, dim, hidden, dtype, approximate, norm, bias, residual):
    """norm: "affine" | "weight" | "none"; residual: "none" | "res" | "res+ls"."""
    x = randn(B, N, dim, dtype=dtype, scale=2.0, shift=0.5)
    nw = randn(dim, dtype=dtype, scale=0.5, shift=1.0) if norm != "none" else None
    nb = randn(dim, dtype=dtype, scale=0.5) if norm == "affine" else None
    w1 = randn(hidden, dim, dtype=dtype, scale=dim**-0.5)
    w2 = randn(dim, hidden, dtype=dtype, scale=hidden**-0.5)
    b1 = randn(hidden, dtype=dtype) if bias else None
    b2 = randn(dim, dtype=dtype) if bias else None
    res = randn(B, N, dim, dtype=dtype) if residual != "none" else None
    ls = randn(dim, dtype=dtype, scale=0.5) if residual == "res+ls" else None
    eps = 1e-6
    out = torch.full((B, N, dim), float("nan"), dtype=dtype, device=DEVICE)
    got = layernorm_gelu_mlp_forward(
        x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate, residual=res, layer_scale=ls, out=out
    )
    assert got is out
    base = R.layernorm_gelu_mlp(
        x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate, residual=res, layer_scale=ls
    )
    assert_close(got, oracle(x, nw, nb, w1, b1, w2, b2, eps, approximate, res, ls), base)


# (batch, tokens, dim, hidden): tokens 1/50/197/257/577, batch 1 and 3, ViT and odd dims.
SHAPES = [(1, 1, 192, 768), (3, 50, 72, 200), (1, 197, 200, 72), (3, 257, 192, 384), (1, 577, 96, 384)]
NORMS = ["affine", "none", "weight"]
RESIDUALS = ["res+ls", "none", "res"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_mlp(case, dtype):
    i = case + DTYPES.index(dtype)
    check_mlp(
        *SHAPES[case],
        dtype,
        approximate=["none", "tanh"][i % 2],
        norm=NORMS[i % 3],
        bias=i % 4 != 3,
        residual=RESIDUALS[(i // 2) % 3],
    )


EPILOGUES = [(True, "res+ls"), (False, "none"), (True, "res"), (False, "res+ls")]  # (bias, residual)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mlp_full(shape, epilogue, norm, approximate, dtype):
    check_mlp(*shape, dtype, approximate, norm, *epilogue)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 577, 384, 1536), (1, 1025, 192, 768)], ids=str)
def test_mlp_large(shape, approximate, dtype):
    check_mlp(*shape, dtype, approximate, "affine", True, "res+ls")


def test_mlp_op_dispatches_to_triton_and_strided_x():
    """The public op on backend='triton', with x token-major in memory (read through strides)."""
    dtype = torch.float16
    x = randn(50, 3, 72, dtype=dtype).transpose(0, 1)
    args = [
        randn(72, dtype=dtype),
        randn(72, dtype=dtype),
        randn(144, 72, dtype=dtype, scale=0.12),
        randn(144, dtype=dtype),
        randn(72, 144, dtype=dtype, scale=0.08),
        randn(72, dtype=dtype),
    ]
    got = vk.layernorm_gelu_mlp(x, *args, approximate="tanh", residual=x, backend="triton")
    assert vk.last_decision("layernorm_gelu_mlp").backend == "triton"
    base = R.layernorm_gelu_mlp(x, *args, eps=1e-6, approximate="tanh", residual=x, layer_scale=None)
    assert_close(got, oracle(x, *args, 1e-6, "tanh", x, None), base)


def test_mlp_rejects_bad_approximate():
    x = randn(2, 3, 16, dtype=torch.float32)
    w = randn(16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"approximate: expected one of \('none', 'tanh'\), got 'erf'"):
        layernorm_gelu_mlp_forward(x, None, None, w, None, w, None, approximate="erf")
