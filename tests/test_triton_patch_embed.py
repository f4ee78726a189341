"""Triton patch_embed (vit_kernels.triton.patch_embed): an implicit GEMM gathering patches from
the image through its strides, with bias, class token and position embedding in the epilogue.
Checked against vit_kernels.reference in float64 under the tolerance rule, plain PyTorch (conv2d)
at the same dtype as the baseline, NaN-filled outputs.
"""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.testing import assert_close

pytest.importorskip("triton")
from vit_kernels.triton.patch_embed import patch_embed_forward  # noqa: E402
from vit_kernels.dtypes import KERNEL_DTYPES

from conftest import DEVICE  # noqa: E402

DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def d64(t):
    return None if t is None else t.double()


def check_patch_embed(
    B, C, H, W, p, dim, dtype, *, channels_last, bias, pos, cls, pos_2d=False, weight_channels_last=False
):
    images = randn(B, C, H, W, dtype=dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    weight = randn(dim, C, p, p, dtype=dtype, scale=(C * p * p) ** -0.5)
    if weight_channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    b = randn(dim, dtype=dtype) if bias else None
    T = (1 if cls else 0) + (H // p) * (W // p)
    pe = (randn(T, dim, dtype=dtype) if pos_2d else randn(1, T, dim, dtype=dtype)) if pos else None
    ct = randn(1, 1, dim, dtype=dtype) if cls else None
    out = torch.full((B, T, dim), float("nan"), dtype=dtype, device=DEVICE)
    got = patch_embed_forward(images, weight, b, patch_size=p, pos_embed=pe, cls_token=ct, out=out)
    assert got is out
    oracle = R.patch_embed(d64(images), d64(weight), d64(b), patch_size=p, pos_embed=d64(pe), cls_token=d64(ct))
    base = R.patch_embed(images, weight, b, patch_size=p, pos_embed=pe, cls_token=ct)
    assert_close(got, oracle, base)


# (batch, channels, H, W, p, dim, channels_last, bias, pos, cls): p 1/14/16/32, non-square
# images, NCHW and channels_last, each epilogue term on and off somewhere.
CASES = [
    (3, 3, 48, 80, 16, 72, True, True, True, True),
    (2, 3, 28, 70, 14, 200, True, False, True, True),
    (1, 3, 42, 28, 14, 64, False, True, False, True),
    (2, 3, 64, 96, 32, 96, False, True, True, False),
    (1, 3, 96, 32, 32, 64, True, False, False, False),
    (3, 96, 5, 7, 1, 72, True, True, True, True),  # hybrid: a CNN feature map, p = 1
    (1, 64, 6, 4, 1, 48, False, False, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_patch_embed(case, dtype):
    B, C, H, W, p, dim, cl, bias, pos, cls = CASES[case]
    check_patch_embed(B, C, H, W, p, dim, dtype, channels_last=cl, bias=bias, pos=pos, cls=cls)


def test_patch_embed_vit_224():
    """ViT-Ti/16 at 224 px: 197 tokens (fp16 by default; every dtype in the slow sweep)."""
    check_patch_embed(1, 3, 224, 224, 16, 192, torch.float16, channels_last=False, bias=True, pos=True, cls=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
def test_patch_embed_full(shape, flags, channels_last, dtype):
    bias, pos, cls = flags
    check_patch_embed(*shape, dtype, channels_last=channels_last, bias=bias, pos=pos, cls=cls)


def test_patch_embed_2d_pos_and_strided_weight():
    """pos_embed as (T, dim) and a channels_last Conv2d weight: both read through their strides."""
    check_patch_embed(
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


def test_patch_embed_images_not_copied():
    """A sliced batch (a non-contiguous view) is read in place: no unfold/im2col, no copy."""
    dtype = torch.float16
    big = randn(4, 3, 32, 64, dtype=dtype)
    images = big[1:3, :, :, 16:48]  # (2, 3, 32, 32), strides of the big tensor
    weight, b = randn(64, 3, 16, 16, dtype=dtype, scale=0.036), randn(64, dtype=dtype)
    got = patch_embed_forward(images, weight, b, patch_size=16, out=torch.full((2, 4, 64), float("nan"), dtype=dtype))
    assert_close(
        got,
        R.patch_embed(d64(images), d64(weight), d64(b), patch_size=16),
        R.patch_embed(images, weight, b, patch_size=16, pos_embed=None, cls_token=None),
    )


def test_patch_embed_op_dispatches_to_triton():
    images = randn(1, 3, 32, 32, dtype=torch.float32)
    weight, cls = randn(32, 3, 16, 16, dtype=torch.float32, scale=0.036), randn(32, dtype=torch.float32)
    pos = randn(1, 5, 32, dtype=torch.float32)
    got = vk.patch_embed(images, weight, None, patch_size=16, pos_embed=pos, cls_token=cls, backend="triton")
    assert vk.last_decision("patch_embed").backend == "triton"
    assert_close(
        got,
        R.patch_embed(d64(images), d64(weight), None, patch_size=16, pos_embed=d64(pos), cls_token=d64(cls)),
        R.patch_embed(images, weight, None, patch_size=16, pos_embed=pos, cls_token=cls),
    )
