"""layernorm_gelu_mlp on every fused backend against the float64 oracle under the tolerance rule (baseline:
the oracle's code at the inputs' dtype), outputs NaN-filled before every launch (tests/poison.py): the Triton
launcher (vit_kernels.triton.mlp: LayerNorm on fc1's loads, bias + GELU in fc1's epilogue, bias + layer
scale + residual in fc2's; the interpreter on CPU tensors) and the CUDA wrapper (vit_kernels.cuda.ops: the
csrc GEMM twice with the same loaders and epilogues; the host emulator on CPU tensors, the GPU build on CUDA
tensors). Helpers: tests/gemm_cases.py.

One test body per behaviour, parametrized over the backends; what only one backend has ends in _triton.
"""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.testing import assert_close

import gemm_cases as G
from gemm_cases import DTYPES, d64, rand
from poison import poison_empty


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


def mlp_forward(backend, *args, **kwargs):
    """The backend's layernorm_gelu_mlp_forward (the Triton launcher or the CUDA wrapper: one contract)."""
    G.require(backend)
    if backend == "triton":
        from vit_kernels.triton.mlp import layernorm_gelu_mlp_forward
    else:
        from vit_kernels.cuda.ops import layernorm_gelu_mlp_forward
    return layernorm_gelu_mlp_forward(*args, **kwargs)


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


def check_mlp(backend, lead, dim, hidden, out_dim, dtype, approximate, norm, bias, residual, **kwargs):
    """x: (*lead, dim) -> (*lead, out_dim). norm: "affine" | "weight" | "none"; residual: "none" | "res" |
    "res+ls". kwargs go to the launcher (out=...). Returns the result."""
    x = rand(*lead, dim, dtype=dtype, scale=2.0, shift=0.5)
    nw = rand(dim, dtype=dtype, scale=0.5, shift=1.0) if norm != "none" else None
    nb = rand(dim, dtype=dtype, scale=0.5) if norm == "affine" else None
    w1 = rand(hidden, dim, dtype=dtype, scale=dim**-0.5)
    w2 = rand(out_dim, hidden, dtype=dtype, scale=hidden**-0.5)
    b1 = rand(hidden, dtype=dtype) if bias else None
    b2 = rand(out_dim, dtype=dtype) if bias else None
    res = rand(*lead, out_dim, dtype=dtype) if residual != "none" else None
    ls = rand(out_dim, dtype=dtype, scale=0.5) if residual == "res+ls" else None
    eps = 1e-6
    got = mlp_forward(
        backend, x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate, residual=res, layer_scale=ls, **kwargs
    )
    base = R.layernorm_gelu_mlp(
        x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate, residual=res, layer_scale=ls
    )
    assert_close(got, oracle(x, nw, nb, w1, b1, w2, b2, eps, approximate, res, ls), base)
    return got


# (batch, tokens, dim, hidden): tokens 1/50/197/257/577, batch 1 and 3, ViT and odd dims.
SHAPES = [(1, 1, 192, 768), (3, 50, 72, 200), (1, 197, 200, 72), (3, 257, 192, 384), (1, 577, 96, 384)]
NORMS = ["affine", "none", "weight"]
RESIDUALS = ["res+ls", "none", "res"]


def triton_cases():
    """Each shape once per dtype, GELU / LayerNorm / bias / residual rotating with shape and dtype."""
    cases = []
    for d, dtype in enumerate(DTYPES):
        for c, (B, N, dim, hidden) in enumerate(SHAPES):
            i = c + d
            variant = (["none", "tanh"][i % 2], NORMS[i % 3], i % 4 != 3, RESIDUALS[(i // 2) % 3])
            cases.append((dtype, ((B, N), dim, hidden, dim, *variant)))
    return cases


# (lead, dim, hidden, out, approximate, norm, bias, residual): the emulator is slow, so fewer and smaller
# cases, with 2-D x, odd dims everywhere and an fc2 narrower than dim.
CUDA_CASES = [
    ((2, 50), 64, 256, 64, "none", "affine", True, "res+ls"),
    ((1, 197), 40, 120, 40, "tanh", "affine", True, "none"),
    ((257,), 24, 72, 24, "none", "none", True, "res+ls"),
    ((1,), 33, 47, 19, "tanh", "affine", True, "res+ls"),
]
PARAMS = [("triton", dtype, case) for dtype, case in triton_cases()] + [
    ("cuda", dtype, case) for dtype in DTYPES for case in CUDA_CASES
]


def ids(v):
    return str(v).split(".")[-1] if isinstance(v, torch.dtype) else str(v)


@pytest.mark.parametrize("backend,dtype,case", PARAMS, ids=ids)
def test_layernorm_gelu_mlp(backend, dtype, case):
    check_mlp(backend, *case[:4], dtype, *case[4:])


def test_writes_into_out_triton():
    out = torch.full((3, 50, 72), float("nan"), dtype=torch.float16, device=G.DEVICE)
    assert check_mlp("triton", (3, 50), 72, 200, 72, torch.float16, "tanh", "affine", True, "res", out=out) is out


EPILOGUES = [(True, "res+ls"), (False, "none"), (True, "res"), (False, "res+ls")]  # (bias, residual)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layernorm_gelu_mlp_full_triton(shape, epilogue, norm, approximate, dtype):
    B, N, dim, hidden = shape
    check_mlp("triton", (B, N), dim, hidden, dim, dtype, approximate, norm, *epilogue)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 577, 384, 1536), (1, 1025, 192, 768)], ids=str)
def test_layernorm_gelu_mlp_large_triton(shape, approximate, dtype):
    B, N, dim, hidden = shape
    check_mlp("triton", (B, N), dim, hidden, dim, dtype, approximate, "affine", True, "res+ls")


def test_public_op_reads_token_major_x_triton():
    """The public op on backend='triton', with x token-major in memory (read through strides)."""
    G.require("triton")
    dtype = torch.float16
    x = rand(50, 3, 72, dtype=dtype).transpose(0, 1)
    args = [
        rand(72, dtype=dtype),
        rand(72, dtype=dtype),
        rand(144, 72, dtype=dtype, scale=0.12),
        rand(144, dtype=dtype),
        rand(72, 144, dtype=dtype, scale=0.08),
        rand(72, dtype=dtype),
    ]
    got = vk.layernorm_gelu_mlp(x, *args, approximate="tanh", residual=x, backend="triton")
    assert vk.last_decision("layernorm_gelu_mlp").backend == "triton"
    base = R.layernorm_gelu_mlp(x, *args, eps=1e-6, approximate="tanh", residual=x, layer_scale=None)
    assert_close(got, oracle(x, *args, 1e-6, "tanh", x, None), base)


def test_rejects_bad_approximate_triton():
    G.require("triton")
    from vit_kernels.triton.mlp import layernorm_gelu_mlp_forward

    x = rand(2, 3, 16, dtype=torch.float32)
    w = rand(16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"approximate: expected one of \('none', 'tanh'\), got 'erf'"):
        layernorm_gelu_mlp_forward(x, None, None, w, None, w, None, approximate="erf")
