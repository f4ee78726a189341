"""patch_embed on every fused backend against the float64 oracle under the tolerance rule (baseline: plain
PyTorch, conv2d, at the inputs' dtype), written into a NaN-filled `out` the launcher must return: the Triton
launcher (vit_kernels.triton.patch_embed: an implicit GEMM gathering patches from the image through its
strides, bias, class token and position embedding in the epilogue; the interpreter on CPU tensors) and the
CUDA wrapper (vit_kernels.cuda.ops: the csrc GEMM with its patch loader; the host emulator on CPU tensors, the
GPU build on CUDA tensors). uint8 images: tests/test_patch_embed_uint8.py. Helpers: tests/gemm_cases.py.

One test body per behaviour, parametrized over the backends; what only one backend has ends in _triton.
"""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.testing import assert_close

import gemm_cases as G
from gemm_cases import BACKENDS, DTYPES, d64, rand
from poison import poison_empty


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_empty(monkeypatch)


def patch_embed_forward(backend, *args, **kwargs):
    """The backend's patch_embed_forward (the Triton launcher or the CUDA wrapper: one contract)."""
    G.require(backend)
    if backend == "triton":
        from vit_kernels.triton.patch_embed import patch_embed_forward as launch
    else:
        from vit_kernels.cuda.ops import patch_embed_forward as launch
    return launch(*args, **kwargs)


def check_patch_embed(
    backend, B, C, H, W, p, dim, dtype, *, channels_last, bias, pos, cls, pos_2d=False, weight_channels_last=False
):
    images = rand(B, C, H, W, dtype=dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    weight = rand(dim, C, p, p, dtype=dtype, scale=(C * p * p) ** -0.5)
    if weight_channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    b = rand(dim, dtype=dtype) if bias else None
    T = (1 if cls else 0) + (H // p) * (W // p)
    pe = (rand(T, dim, dtype=dtype) if pos_2d else rand(1, T, dim, dtype=dtype)) if pos else None
    ct = rand(1, 1, dim, dtype=dtype) if cls else None
    out = G.nan_like((B, T, dim), dtype)
    got = patch_embed_forward(backend, images, weight, b, patch_size=p, pos_embed=pe, cls_token=ct, out=out)
    assert got is out
    oracle = R.patch_embed(d64(images), d64(weight), d64(b), patch_size=p, pos_embed=d64(pe), cls_token=d64(ct))
    base = R.patch_embed(images, weight, b, patch_size=p, pos_embed=pe, cls_token=ct)
    assert_close(got, oracle, base)


# (batch, channels, H, W, p, dim, channels_last, bias, pos, cls).
# Triton: p 1/14/16/32, non-square images, NCHW and channels_last, each epilogue term on and off somewhere.
# CUDA (the emulator is slow): smaller images; 16-wide patches (16-byte gathers) and odd ones (element gathers).
CASES = {
    "triton": [
        (3, 3, 48, 80, 16, 72, True, True, True, True),
        (2, 3, 28, 70, 14, 200, True, False, True, True),
        (1, 3, 42, 28, 14, 64, False, True, False, True),
        (2, 3, 64, 96, 32, 96, False, True, True, False),
        (1, 3, 96, 32, 32, 64, True, False, False, False),
        (3, 96, 5, 7, 1, 72, True, True, True, True),  # hybrid: a CNN feature map, p = 1
        (1, 64, 6, 4, 1, 48, False, False, True, True),
    ],
    "cuda": [
        (2, 3, 32, 48, 16, 64, False, True, True, True),  # NCHW, 16-wide patches: 16-byte gathers
        (1, 3, 28, 21, 7, 40, False, True, True, True),  # odd patch: element gathers, 12 patches
        (3, 2, 14, 14, 7, 24, False, True, True, False),  # no class token
        (2, 3, 32, 32, 8, 32, True, True, False, True),  # channels_last, read through strides, no pos
    ],
}


def ids(v):
    return str(v).split(".")[-1] if isinstance(v, torch.dtype) else str(v)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in CASES[b]], ids=ids)
def test_patch_embed(backend, case, dtype):
    B, C, H, W, p, dim, cl, bias, pos, cls = case
    check_patch_embed(backend, B, C, H, W, p, dim, dtype, channels_last=cl, bias=bias, pos=pos, cls=cls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_dispatches_to_the_backend(backend):
    G.require(backend)
    images = rand(1, 3, 32, 32, dtype=torch.float32)
    weight, cls = rand(32, 3, 16, 16, dtype=torch.float32, scale=0.036), rand(32, dtype=torch.float32)
    pos = rand(1, 5, 32, dtype=torch.float32)
    got = vk.patch_embed(images, weight, None, patch_size=16, pos_embed=pos, cls_token=cls, backend=backend)
    assert vk.last_decision("patch_embed").backend == backend
    assert_close(
        got,
        R.patch_embed(d64(images), d64(weight), None, patch_size=16, pos_embed=d64(pos), cls_token=d64(cls)),
        R.patch_embed(images, weight, None, patch_size=16, pos_embed=pos, cls_token=cls),
    )


def test_vit_224_triton():
    """ViT-Ti/16 at 224 px: 197 tokens (fp16 by default; every dtype in the slow sweep)."""
    check_patch_embed(
        "triton", 1, 3, 224, 224, 16, 192, torch.float16, channels_last=False, bias=True, pos=True, cls=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("flags", [(b, p, c) for b in (0, 1) for p in (0, 1) for c in (0, 1)], ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 224, 224, 16, 192),
        (2, 3, 48, 80, 16, 72),
        (2, 3, 28, 70, 14, 200),
        (1, 3, 224, 224, 14, 96),
        (2, 3, 64, 96, 32, 96),
        (3, 96, 5, 7, 1, 72),
        (1, 3, 240, 160, 16, 64),
    ],
    ids=str,
)
def test_patch_embed_full_triton(shape, flags, channels_last, dtype):
    bias, pos, cls = flags
    check_patch_embed("triton", *shape, dtype, channels_last=channels_last, bias=bias, pos=pos, cls=cls)


def test_2d_pos_and_strided_weight_triton():
    """pos_embed as (T, dim) and a channels_last Conv2d weight: both read through their strides (the CUDA
    wrapper takes a contiguous weight; vit_kernels.ops copies it)."""
    check_patch_embed(
        "triton",
        2,
        3,
        32,
        48,
        16,
        64,
        torch.bfloat16,
        channels_last=False,
        bias=True,
        pos=True,
        cls=True,
        pos_2d=True,
        weight_channels_last=True,
    )


def test_images_not_copied_triton():
    """A sliced batch (a non-contiguous view) is read in place: no unfold/im2col, no copy."""
    G.require("triton")
    from vit_kernels.triton.patch_embed import patch_embed_forward as launch

    dtype = torch.float16
    big = rand(4, 3, 32, 64, dtype=dtype)
    images = big[1:3, :, :, 16:48]  # (2, 3, 32, 32), strides of the big tensor
    weight, b = rand(64, 3, 16, 16, dtype=dtype, scale=0.036), rand(64, dtype=dtype)
    got = launch(images, weight, b, patch_size=16, out=G.nan_like((2, 4, 64), dtype))
    assert_close(
        got,
        R.patch_embed(d64(images), d64(weight), d64(b), patch_size=16),
        R.patch_embed(images, weight, b, patch_size=16, pos_embed=None, cls_token=None),
    )
