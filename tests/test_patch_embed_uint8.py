"""uint8 images into the patch embedding: (x / 255 - mean) / std per channel applied as the kernel loads
the pixels, NCHW and NHWC (channels_last: decoded (B, H, W, C) images permuted, read in place).
Checked against the float64 oracle (vit_kernels.reference.patch_embed on the same uint8 images, a
float64 weight) under the tolerance rule, the oracle's code at the weight's dtype as the baseline,
outputs NaN-filled before the launch. Bad image_mean / image_std are refused before any launch.
"""

import copy

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference as R
from vit_kernels.nn import FusedPatchEmbed
from vit_kernels.testing import assert_close

from conftest import DEVICE

pytest.importorskip("triton")
from vit_kernels.triton.patch_embed import patch_embed_forward  # noqa: E402
from vit_kernels.dtypes import KERNEL_DTYPES

DTYPES = list(KERNEL_DTYPES)  # vit_kernels.dtypes
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def uint8_images(B, C, H, W, nhwc):
    """Random pixels over the whole 0..255 range; nhwc: stored (B, H, W, C), viewed as NCHW."""
    if nhwc:
        x = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8, device=DEVICE).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return x
    return torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=DEVICE)


def random_norm(C):
    """A fresh per-channel mean in [0.3, 0.7] and std in [0.15, 0.35]."""
    mean = tuple((0.3 + 0.4 * torch.rand(C)).tolist())
    std = tuple((0.15 + 0.2 * torch.rand(C)).tolist())
    return mean, std


def params(C, p, dim, dtype, *, bias=True, pos=True, cls=True, T=None):
    f = dict(dtype=torch.float32, device=DEVICE)
    w = (torch.randn(dim, C, p, p, **f) * (C * p * p) ** -0.5).to(dtype)
    b = torch.randn(dim, **f).to(dtype) if bias else None
    pe = torch.randn(1, T, dim, **f).to(dtype) if pos else None
    ct = torch.randn(1, 1, dim, **f).to(dtype) if cls else None
    return w, b, pe, ct


def d64(t):
    return None if t is None else t.double()


def oracle_and_baseline(images, w, b, p, pe, ct, mean, std):
    kw = dict(patch_size=p, image_mean=mean, image_std=std)
    oracle = R.patch_embed(images, d64(w), d64(b), pos_embed=d64(pe), cls_token=d64(ct), **kw)
    base = R.patch_embed(images, w, b, pos_embed=pe, cls_token=ct, **kw)
    return oracle, base


# (batch, channels, H, W, p, dim, nhwc, bias, pos, cls)
CASES = [
    (2, 3, 32, 48, 16, 64, False, True, True, True),
    (2, 3, 28, 42, 14, 72, True, True, True, True),
    (1, 3, 64, 32, 32, 48, True, False, False, False),
    (3, 1, 16, 16, 8, 40, False, True, False, True),  # grayscale
    (1, 4, 6, 10, 2, 32, True, True, True, False),  # 4 channels, small patches
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_launcher_uint8(case, dtype):
    B, C, H, W, p, dim, nhwc, bias, pos, cls = CASES[case]
    images = uint8_images(B, C, H, W, nhwc)
    T = (1 if cls else 0) + (H // p) * (W // p)
    w, b, pe, ct = params(C, p, dim, dtype, bias=bias, pos=pos, cls=cls, T=T)
    mean, std = IMAGENET if C == 3 and case == 0 else random_norm(C)
    out = torch.full((B, T, dim), float("nan"), dtype=dtype, device=DEVICE)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    got = patch_embed_forward(
        images,
        w,
        b,
        patch_size=p,
        pos_embed=pe,
        cls_token=ct,
        out=out,
        image_mean=torch.tensor(mean, **f32),
        image_std=torch.tensor(std, **f32),
    )
    assert got is out and got.dtype == dtype
    assert_close(got, *oracle_and_baseline(images, w, b, p, pe, ct, mean, std))


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("nhwc", [False, True])
def test_op_uint8(backend, nhwc):
    """The op on uint8 images (tensor or sequence mean/std) on each backend, against the oracle; the
    same op on float images normalized by hand gives the same tokens."""
    dtype = torch.float16
    B, C, H, W, p, dim = 2, 3, 32, 32, 16, 64
    images = uint8_images(B, C, H, W, nhwc)
    w, b, pe, ct = params(C, p, dim, dtype, T=5)
    mean, std = random_norm(C)
    got = vk.patch_embed(
        images,
        w,
        b,
        patch_size=p,
        pos_embed=pe,
        cls_token=ct,
        image_mean=torch.tensor(mean),
        image_std=list(std),
        backend=backend,
    )
    assert vk.last_decision("patch_embed").backend == backend
    assert got.dtype == dtype and got.shape == (B, 5, dim)
    oracle, base = oracle_and_baseline(images, w, b, p, pe, ct, mean, std)
    assert_close(got, oracle, base)
    by_hand = (
        (images.float() / 255 - torch.tensor(mean, device=DEVICE).view(1, C, 1, 1))
        / torch.tensor(std, device=DEVICE).view(1, C, 1, 1)
    ).to(dtype)
    assert_close(vk.patch_embed(by_hand, w, b, patch_size=p, pos_embed=pe, cls_token=ct, backend=backend), oracle, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_launcher_uint8(case, dtype):
    """The CUDA GEMM's uint8 patch loader, both tile configs: NCHW images with 16- or 32-pixel patch rows
    take the vector path (8 or 4 bytes a load), NHWC images and p = 14, 8 (fp16/bf16) or 2 the element path."""
    from vit_kernels.cuda import ops as cuda_ops

    B, C, H, W, p, dim, nhwc, bias, pos, cls = CASES[case]
    images = uint8_images(B, C, H, W, nhwc)
    T = (1 if cls else 0) + (H // p) * (W // p)
    w, b, pe, ct = params(C, p, dim, dtype, bias=bias, pos=pos, cls=cls, T=T)
    mean, std = IMAGENET if C == 3 and case == 0 else random_norm(C)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    oracle, base = oracle_and_baseline(images, w, b, p, pe, ct, mean, std)
    for config in (0, 1):
        out = torch.full((B, T, dim), float("nan"), dtype=dtype, device=DEVICE)
        got = cuda_ops.patch_embed_forward(
            images,
            w,
            b,
            patch_size=p,
            pos_embed=pe,
            cls_token=ct,
            image_mean=torch.tensor(mean, **f32),
            image_std=torch.tensor(std, **f32),
            out=out,
            config=config,
        )
        assert got is out
        assert_close(got, oracle, base, name=f"config {config}")


# layouts.LAYOUTS that apply to 4-D images (all but transposed's column-major rows and expanded_last)
U8_LAYOUTS = ["contiguous", "channels_last", "permuted", "gaps", "row_gaps", "expanded", "offset", "misaligned"]


def uint8_in_layout(shape, layout):
    """Random uint8 pixels (0..255) with the strides and storage offset layouts.make gives a float tensor of
    ``shape`` in ``layout``."""
    from layouts import make

    geo = make(shape, layout, torch.float32, "meta")
    extent = geo.storage_offset() + sum((n - 1) * st for n, st in zip(geo.shape, geo.stride())) + 1
    buf = torch.randint(0, 256, (extent,), dtype=torch.uint8, device=DEVICE)
    return buf.as_strided(geo.shape, geo.stride(), geo.storage_offset())


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", U8_LAYOUTS)
def test_uint8_images_in_every_layout(backend, layout):
    """uint8 images read in place through any strides and byte offset (misaligned: an odd base address, so
    the CUDA loader's aligned 8-byte loads give way to element loads)."""
    dtype = torch.float16
    images = uint8_in_layout((2, 3, 16, 32), layout)
    w, b, pe, ct = params(3, 8, 32, dtype, T=9)
    mean, std = random_norm(3)
    got = vk.patch_embed(
        images, w, b, patch_size=8, pos_embed=pe, cls_token=ct, image_mean=mean, image_std=std, backend=backend
    )
    assert vk.last_decision("patch_embed").backend == backend
    assert_close(got, *oracle_and_baseline(images, w, b, 8, pe, ct, mean, std), name=layout)


def test_cuda_binding_checks_uint8_arguments():
    """The binding refuses bad uint8 arguments itself (the second line of checks; the GPU build has the
    same text) before anything launches: missing or mis-sized pixel_scale / pixel_shift, a wrong dtype,
    a scale given with float images, an out of another dtype than the weight's."""
    from vit_kernels.cuda import module_for

    ext = module_for(DEVICE)
    images = uint8_images(1, 3, 16, 16, False)
    w = params(3, 8, 16, torch.float32, pos=False)[0].reshape(16, -1)
    out = torch.full((1, 4, 16), float("nan"), device=DEVICE)
    one = torch.ones(3, dtype=torch.float32, device=DEVICE)
    bad = [
        (
            (None, None),
            r"pixel_scale, pixel_shift: uint8 images are normalized on load .* got pixel_scale None, "
            r"pixel_shift None",
        ),
        (
            (torch.ones(2, device=DEVICE), one),
            r"pixel_scale, pixel_shift: expected 3 values each \(one per "
            r"channel\), got 2 and 3",
        ),
        ((one, one.double()), r"pixel_shift: expected dtype Float, got Double"),
    ]
    for (scale, shift), msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            ext.gemm_patch(images, w, None, 8, None, None, out, -1, scale, shift)
    with pytest.raises(RuntimeError, match=r"pixel_scale, pixel_shift: normalize uint8 images on load; got Float"):
        ext.gemm_patch(images.float(), w, None, 8, None, None, out, -1, one, one)
    with pytest.raises(RuntimeError, match=r"out: expected dtype Half, got Float"):
        ext.gemm_patch(images, w.half(), None, 8, None, None, out, -1, one, one)
    assert out.isnan().all()  # nothing launched


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_bad_mean_std_refused_before_launch(backend, monkeypatch):
    """Each bad image_mean / image_std names the argument, the expectation and what it got, and no
    kernel launches (the launchers are replaced by a function that fails the test)."""
    import importlib

    pe_mod = importlib.import_module("vit_kernels.ops.patch_embed")

    def no_launch(*a, **k):
        raise AssertionError("a kernel launched for bad input")

    monkeypatch.setattr(pe_mod, "_launch", no_launch)
    images = uint8_images(1, 3, 16, 16, False)
    w = params(3, 8, 16, torch.float32, pos=False)[0]
    good_m, good_s = IMAGENET
    cases = [
        (dict(), ValueError, r"image_mean, image_std: uint8 images are normalized .* expected 3 values each"),
        (dict(image_mean=good_m), ValueError, r"got image_mean=.*image_std=None"),
        (
            dict(image_mean=(0.5, 0.5), image_std=good_s),
            ValueError,
            r"image_mean: expected 3 values for 3-channel images, got 2",
        ),
        (
            dict(image_mean=good_m, image_std=(0.2, 0.2, 0.2, 0.2)),
            ValueError,
            r"image_std: expected 3 values for 3-channel images, got 4",
        ),
        (
            dict(image_mean=good_m, image_std=(0.2, 0.0, 0.2)),
            ValueError,
            r"image_std: expected positive values \(each channel is divided by it\), got \(0.2, 0.0, 0.2\)",
        ),
        (
            dict(image_mean=(0.5, float("nan"), 0.5), image_std=good_s),
            ValueError,
            r"image_mean: expected finite values, got \(0.5, nan, 0.5\)",
        ),
        (dict(image_mean=good_m, image_std=(0.2, float("inf"), 0.2)), ValueError, r"image_std: expected finite values"),
        (dict(image_mean="abc", image_std=good_s), TypeError, r"image_mean: expected a sequence of 3 numbers"),
        (
            dict(image_mean=torch.zeros(1, 3), image_std=good_s),
            ValueError,
            r"image_mean: expected 3 values \(one per channel\), got a tensor of shape \(1, 3\)",
        ),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            vk.patch_embed(images, w, patch_size=8, backend=backend, **kw)
    with pytest.raises(ValueError, match=r"image_mean, image_std: normalize uint8 images on load; got torch.float32"):
        vk.patch_embed(images.float(), w, patch_size=8, image_mean=good_m, image_std=good_s, backend=backend)
    with pytest.raises(TypeError, match=r"bias: expected dtype torch.float32"):
        vk.patch_embed(
            images,
            w,
            torch.zeros(16, dtype=torch.float16, device=DEVICE),
            patch_size=8,
            image_mean=good_m,
            image_std=good_s,
            backend=backend,
        )


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_fused_patch_embed_module_uint8(backend):
    """nn.FusedPatchEmbed(image_mean=, image_std=) takes uint8 images as they are and float images
    (already normalized) as before; without a mean/std it refuses uint8 naming them."""
    m = FusedPatchEmbed(16, 3, 48, backend=backend, image_mean=IMAGENET[0], image_std=IMAGENET[1]).to(DEVICE)
    images = uint8_images(2, 3, 32, 48, True)
    with torch.no_grad():
        got = m(images)
    w, b = m.proj.weight.detach(), m.proj.bias.detach()
    assert_close(got, *oracle_and_baseline(images, w, b, 16, None, None, *IMAGENET))
    with pytest.raises(ValueError, match="image_mean, image_std: uint8 images are normalized"):
        FusedPatchEmbed(16, 3, 48, backend=backend).to(DEVICE)(images)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_reference_vit_takes_uint8(backend):
    """The reference ViT's data config (0.5, 0.5 by default; here ImageNet's) normalizes uint8 images
    inside the patch-embedding kernel: logits against the float64 oracle fed the normalized images,
    the oracle's code at float32 as the baseline; NHWC data, two image sizes (dynamic_img_size)."""
    from vit_kernels.models import create_model
    from vit_kernels.nn import set_backend

    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True)
    model = (
        create_model("vit_tiny_patch16_224", **cfg, image_mean=IMAGENET[0], image_std=IMAGENET[1], backend=backend)
        .to(DEVICE)
        .eval()
    )
    assert create_model("vit_tiny_patch16_224", **cfg).patch_embed.image_mean == (0.5, 0.5, 0.5)
    oracle = set_backend(create_model("vit_tiny_patch16_224", **cfg), "reference").to(DEVICE).eval()
    oracle.load_state_dict(model.state_dict())
    mean, std = (torch.tensor(v, dtype=torch.float64, device=DEVICE).view(1, 3, 1, 1) for v in IMAGENET)
    for size in [(32, 32), (48, 40)]:
        images = uint8_images(2, 3, *size, nhwc=True)
        x64 = (images.double() / 255 - mean) / std
        with torch.no_grad():
            got = model(images)
            base = oracle(x64.float())
            want = copy.deepcopy(oracle).double()(x64)
        assert got.dtype == torch.float32
        assert_close(got, want, base, name=f"logits {size}")


def _timm_model():
    timm = pytest.importorskip("timm")
    return (
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=1,
            num_heads=2,
            num_classes=5,
        ),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    )


def _torchvision_model():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    m = tv.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=5
    )
    torch.nn.init.normal_(m.heads.head.weight, std=0.05)
    return m, *IMAGENET


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_fused_model_takes_uint8(family, backend):
    """fuse() gives the patch projection the family's data config (timm pretrained_cfg, torchvision's
    weights transforms): the fused model takes decoded uint8 NHWC images as they are, against the
    unfused model in float64 fed the normalized images; the report names the mean/std used."""
    model, mean, std = (_timm_model if family == "timm" else _torchvision_model)()
    model = model.to(DEVICE).eval()
    oracle, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    vk.fuse(model, backend=backend)
    note = f"uint8 images are normalized on load with mean={mean}, std={std}"
    assert any(note in n for e in vk.fuse_report(model).fused for n in e.notes), str(vk.fuse_report(model))
    images = uint8_images(2, 3, 32, 32, nhwc=True)
    m64, s64 = (torch.tensor(v, dtype=torch.float64, device=DEVICE).view(1, 3, 1, 1) for v in (mean, std))
    x64 = (images.double() / 255 - m64) / s64
    with torch.no_grad():
        got = model(images)
        assert vk.last_decision("patch_embed").backend == backend
        assert_close(got, oracle(x64), base(x64.float()), name=f"fused {family} on uint8 images")
        # a fall-back (global module hooks make the fused parts run the original modules) normalizes too
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
        try:
            with torch.no_grad():
                model(images)
        finally:
            hook.remove()
    assert vk.last_decision("patch_embed").backend == "original"


def test_hf_uint8_is_refused_with_the_reason():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    model = vk.fuse(transformers.ViTModel(cfg).eval(), backend="torch")
    assert any(
        "uint8 images not served: ViTModel casts pixel_values" in n
        for e in vk.fuse_report(model).fused
        for n in e.notes
    )
