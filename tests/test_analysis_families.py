"""vit_kernels.analysis on fused models of every family against an oracle made here, apart from
vit_kernels: each layer's softmax(q k^T * scale) taken in float64 from the UNFUSED model's own modules
(timm's attention with fused_attn off, transformers' eager output_attentions, vit-pytorch's Softmax,
torchvision's MultiheadAttention input projected with its own in_proj weights), then the ViT paper's
mean attention distance from it: patch centres in pixels, Euclidean, the prefix tokens (class token,
registers, DeiT's distillation token) left out as queries and as keys without renormalising, the
convention vit_kernels.reference.mean_attention_distance documents; the class token's row over the
patches; attention rollout (Abnar & Zuidema). In every layer one head is sharp (random q, k weights
of std 3/sqrt(dim)) and the other flat (q weights zero), the sharp one alternating with the layer,
so heads, layers or samples that changed places would show (the test checks the oracle tells them
apart). Tiny models (2 layers, dim 64, 2 heads, 8- to 16-pixel patches, 16-48 px images)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels import analysis
from vit_kernels.ops.attention_stats import StatsRequest, recording
from vit_kernels.testing import assert_close

pytest.importorskip("vit_kernels.triton.attention_stats")
DIM, HEADS, HD = 64, 2, 32


def make_heads_differ(pairs):
    """pairs: one (q weight, k weight) per layer, (DIM or more rows, DIM): head l % 2 of layer l made
    sharp, the other flat (uniform attention)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer, (wq, wk) in enumerate(pairs):
            sharp, flat = layer % 2, 1 - layer % 2
            for w in (wq, wk):
                w[sharp * HD : (sharp + 1) * HD] = torch.randn(HD, w.shape[1], generator=g) * 3 / math.sqrt(DIM)
            wq[flat * HD : (flat + 1) * HD] = 0


def oracle(probs, prefix, grid, patch):
    """distance (layers, heads), cls (layers, batch, heads, gh, gw), rollout (batch, gh, gw) from the
    per-layer probabilities (batch, heads, tokens, tokens) in float64; distance per sample too."""
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([(r.flatten() + 0.5) * patch, (c.flatten() + 0.5) * patch], -1).double()
    d = ((centres[:, None] - centres[None]) ** 2).sum(-1).sqrt()  # pixels between patch centres
    per_sample = torch.stack([(p[..., prefix:, prefix:] * d).sum(-1).mean(-1) for p in probs])  # (L, B, H)
    cls = torch.stack([p[:, :, 0, prefix:].reshape(*p.shape[:2], gh, gw) for p in probs])
    roll = None
    for p in probs:
        a = 0.5 * p.mean(1) + 0.5 * torch.eye(p.shape[-1], dtype=p.dtype)
        a = a / a.sum(-1, keepdim=True)
        roll = a if roll is None else a @ roll
    return dict(
        per_sample=per_sample, distance=per_sample.mean(1), cls=cls, rollout=roll[:, 0, prefix:].reshape(-1, gh, gw)
    )


# ------------------------------------------------------------------ each family's own probabilities
def probs_timm(model, x):
    m = copy.deepcopy(model).eval()
    out = []
    for blk in m.blocks:
        blk.attn.fused_attn = False  # timm's explicit softmax, which attn_drop receives
        blk.attn.attn_drop.register_forward_hook(lambda mod, i, o: out.append(i[0].double()))
    with torch.no_grad():
        m(x)
    return out


def probs_hf(model, x, **kw):
    m = copy.deepcopy(model).eval()
    m.config._attn_implementation = "eager"
    with torch.no_grad():
        return [p.double() for p in m(x, output_attentions=True, **kw).attentions]


def probs_torchvision(model, x):
    m = copy.deepcopy(model).eval()
    out = []

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["query"]
        q, k, _ = F.linear(h, mod.in_proj_weight, mod.in_proj_bias).chunk(3, -1)
        q, k = (t.unflatten(-1, (mod.num_heads, -1)).transpose(1, 2) for t in (q, k))
        out.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1))

    for layer in m.encoder.layers:
        layer.self_attention.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        m(x)
    return out


def probs_vit_pytorch(model, x):
    m = copy.deepcopy(model).eval()
    out = []
    for attn, _ in m.transformer.layers:
        attn.attend.register_forward_hook(lambda mod, i, o: out.append(o.double()))
    with torch.no_grad():
        m(x)
    return out


# ------------------------------------------------------------------ the checks
def check_against_oracle(fused, x, want, geo=None, class_token=True):
    """Distance, class-token maps and rollout of the fused model against the oracle (fp32 floor), or
    the maps refused (no class token)."""
    assert_close(analysis.mean_attention_distance(fused, x, geo), want["distance"], name="distance")
    if class_token:
        assert_close(analysis.cls_attention(fused, x, geo), want["cls"], name="cls_attention")
        assert_close(analysis.attention_rollout(fused, x, geo), want["rollout"], name="rollout")
    else:
        for fn in (analysis.cls_attention, analysis.attention_rollout):
            with pytest.raises(ValueError, match="model: has no class token"):
                fn(fused, x, geo)


def assert_oracle_tells_apart(want):
    """The oracle's heads, layers and samples differ (else a transposition could not fail the test)."""
    d = want["per_sample"]
    assert (d[:, :, 0] - d[:, :, 1]).abs().min() > 0.05, d  # pixels; the tolerance is ~1e-4
    assert (d[0] - d[1]).abs().min() > 0.05, d
    if d.shape[1] > 1:
        assert (want["cls"][:, 0] - want["cls"][:, 1]).abs().max() > 1e-4  # 10x the fp32 tolerance


TIMM_CASES = {  # name: (timm keyword arguments, image (H, W)); random inits at DIM, HEADS, 2 layers
    "reg4": (dict(img_size=32, patch_size=8, reg_tokens=4), (32, 32)),
    "no_class_token_avg": (dict(img_size=32, patch_size=8, class_token=False, global_pool="avg"), (32, 32)),
    "no_class_token_reg2": (
        dict(img_size=32, patch_size=8, class_token=False, global_pool="avg", reg_tokens=2),
        (32, 32),
    ),
    "no_embed_class_reg1": (dict(img_size=32, patch_size=8, no_embed_class=True, reg_tokens=1), (32, 32)),
    "non_square_32x48": (dict(img_size=(32, 48), patch_size=8), (32, 48)),
    "dynamic_24x40_reg2": (dict(img_size=32, patch_size=8, dynamic_img_size=True, reg_tokens=2), (24, 40)),
    "patch14": (dict(img_size=28, patch_size=14), (28, 28)),
    "patch16": (dict(img_size=32, patch_size=16), (32, 32)),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_variants_against_their_own_softmax(case, backend):
    """timm with registers, without a class token, with no_embed_class, non-square (fixed and dynamic)
    and patches of 8, 14, 16: prefix tokens and grid as timm has them, and the statistics equal the
    oracle's. geometry(model) without img_size is the model's own (height, width): it took the height
    for both sides, a 4x4 grid for a 32x48 model (refused later only because the images did not fit)."""
    timm = pytest.importorskip("timm")
    kw, size = TIMM_CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=10, **kw
    ).eval()
    make_heads_differ([(b.attn.qkv.weight, b.attn.qkv.weight[DIM:]) for b in model.blocks])
    x = torch.randn(2, 3, *size)
    fused = vk.fuse(copy.deepcopy(model), backend=backend)
    geo = analysis.geometry(fused, size)
    p = kw["patch_size"]
    assert (geo.patch_size, geo.grid, geo.prefix_tokens, geo.class_token) == (
        p,
        (size[0] // p, size[1] // p),
        model.num_prefix_tokens,
        model.cls_token is not None,
    )
    if not kw.get("dynamic_img_size"):
        assert analysis.geometry(fused) == geo
    want = oracle(probs_timm(model.double(), x.double()), geo.prefix_tokens, geo.grid, p)
    assert_oracle_tells_apart(want)
    check_against_oracle(fused, x, want, class_token=geo.class_token)


class Interpolating(torch.nn.Module):
    """Calls a transformers ViT with interpolate_pos_encoding=True (analysis runs model(images))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, interpolate_pos_encoding=True)


def build_family(family, monkeypatch):
    """(model, its probabilities function, image (H, W), prefix tokens, class token, keyword arguments
    of its forward), tiny, random weights, heads made to differ."""
    torch.manual_seed(0)
    if family.startswith("hf"):
        transformers = pytest.importorskip("transformers")
        kw = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128)
        kw.update(image_size=(32, 48) if family == "hf_vit_32x48" else 32, patch_size=8)
        if family == "hf_deit":  # class and distillation tokens; DeiTLayer is ViTLayer's copy (swap.hf)
            from transformers.models.deit.modeling_deit import DeiTLayer

            from vit_kernels.swap import hf

            monkeypatch.setattr(hf, "EXTRA_LAYER_CLASSES", [DeiTLayer])
            model = transformers.DeiTModel(transformers.DeiTConfig(**kw), add_pooling_layer=False)
        else:
            model = transformers.ViTForImageClassification(transformers.ViTConfig(**kw))
        base = getattr(model, "vit", model)
        make_heads_differ([(a.q_proj.weight, a.k_proj.weight) for a in (layer.attention for layer in base.layers)])
        if family == "hf_vit_24x40":
            return model, probs_hf, (24, 40), 1, True, dict(interpolate_pos_encoding=True)
        return (
            model,
            probs_hf,
            (32, 48) if family == "hf_vit_32x48" else (32, 32),
            2 if family == "hf_deit" else 1,
            True,
            {},
        )
    if family == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=HEADS, hidden_dim=DIM, mlp_dim=128, num_classes=10
        )
        make_heads_differ(
            [(a.in_proj_weight, a.in_proj_weight[DIM:]) for a in (x.self_attention for x in model.encoder.layers)]
        )
        return model, probs_torchvision, (32, 32), 1, True, {}
    vit_pytorch = pytest.importorskip("vit_pytorch")
    pool = family.split("_")[-1]
    model = vit_pytorch.ViT(
        image_size=32, patch_size=8, num_classes=10, dim=DIM, depth=2, heads=HEADS, dim_head=HD, mlp_dim=128, pool=pool
    )
    make_heads_differ([(a.to_qkv.weight, a.to_qkv.weight[DIM:]) for a, _ in model.transformer.layers])
    return model, probs_vit_pytorch, (32, 32), 1 if pool == "cls" else 0, pool == "cls", {}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "family",
    ["hf_vit", "hf_vit_32x48", "hf_vit_24x40", "hf_deit", "torchvision", "vit_pytorch_cls", "vit_pytorch_mean"],
)
def test_other_families_against_their_own_softmax(family, backend, monkeypatch):
    """transformers' ViT (square; configured 32x48, whose geometry(model) took 32 for both sides;
    24x40 with interpolate_pos_encoding, the fused model called through a wrapper with an explicit
    Geometry), DeiT (class + distillation token: geometry said 1 prefix
    token, so the distance was refused as a token-count mismatch and the maps failed to reshape),
    torchvision's ViT, vit-pytorch with pool "cls" and "mean" (no class token: geometry said
    class_token=True with 0 prefix tokens) against the oracle."""
    model, probs, size, prefix, class_token, call = build_family(family, monkeypatch)
    model.eval()
    x = torch.randn(2, 3, *size)
    fused = vk.fuse(copy.deepcopy(model), backend=backend)
    geo = analysis.geometry(fused, size)
    assert (geo.grid, geo.prefix_tokens, geo.class_token, geo.depth) == (
        (size[0] // 8, size[1] // 8),
        prefix,
        class_token,
        2,
    )
    if not call:  # the model's own size
        assert analysis.geometry(fused) == geo
    want = oracle(probs(model.double(), x.double(), **call), prefix, geo.grid, 8)
    assert_oracle_tells_apart(want)
    check_against_oracle(Interpolating(fused) if call else fused, x, want, geo, class_token)


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("triton", torch.float32),
        ("triton", torch.float16),
        ("cuda", torch.float32),  # csrc/attention/stats.cu (the host emulator on CPU tensors)
        ("torch", torch.float32),
        ("torch", torch.bfloat16),
    ],
)
def test_per_sample_statistics_keep_batch_and_head_order(backend, dtype):
    """What the fused kernels record per layer, (batch, heads) distances and (batch, heads, 1, tokens)
    class-token rows, for 3 different images, against the oracle sample by sample; the baseline is
    the same oracle on the unfused model run at ``dtype`` (bf16 runs on the torch backend only: the
    interpreter refuses it). Catches a (batch * heads) order mixed up between the kernels' grid and
    the host (the earlier tests average the distance over the batch)."""
    timm = pytest.importorskip("timm")
    if backend == "cuda":
        from vit_kernels import cuda

        why = cuda.unavailable_reason(torch.device("cpu"))
        if why:
            pytest.skip(f"CUDA C++ backend unavailable on the CPU: {why}")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=DIM,
        depth=2,
        num_heads=HEADS,
        reg_tokens=2,
    ).eval()
    make_heads_differ([(b.attn.qkv.weight, b.attn.qkv.weight[DIM:]) for b in model.blocks])
    x = torch.randn(3, 3, 32, 32)
    want = oracle(probs_timm(copy.deepcopy(model).double(), x.double()), 3, (4, 4), 8)
    assert_oracle_tells_apart(want)
    base = oracle(probs_timm(copy.deepcopy(model).to(dtype), x.to(dtype)), 3, (4, 4), 8)
    fused = vk.fuse(copy.deepcopy(model).to(dtype), backend=backend)
    with torch.no_grad(), recording(StatsRequest(rows=(0,), grid=(4, 4), patch_size=8.0, prefix_tokens=3)) as rec:
        fused(x.to(dtype))
    distance = torch.stack([r.distance for r in rec])
    rows = torch.stack([r.rows[:, :, 0, 3:].reshape(3, HEADS, 4, 4) for r in rec])
    assert_close(distance, want["per_sample"], base["per_sample"], name="per-sample distance")
    assert_close(rows, want["cls"], base["cls"], name="class-token rows")


def test_attention_commands_on_a_non_square_model(tmp_path, capsys):
    """attention-distance on a transformers config of image_size (32, 48): the random images are
    32x48 and the JSON holds the oracle's distances on a 4x6 grid; attention-map draws 224x149 panels
    (the input's aspect). They ran 32x32 images (the model refused them) while geometry read one side;
    then randn and the image loader got the (height, width) pair as a side."""
    transformers = pytest.importorskip("transformers")
    Image = pytest.importorskip("PIL.Image")
    from vit_kernels import cli
    from vit_kernels.commands import verify as verify_cmd

    cfg = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128, patch_size=8)
    transformers.ViTConfig(image_size=[32, 48], **cfg).save_pretrained(tmp_path / "hf")
    argv = ["attention-distance", "--model", f"hf:{tmp_path / 'hf'}", "--backend", "torch", "--batch-size", "2"]
    argv += ["--seed", "3", "--out-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    meta = json.load(open(tmp_path / "out" / "attention_distance.json"))
    assert (meta["img_size"], meta["grid"], meta["prefix_tokens"]) == ([32, 48], [4, 6], 1)
    torch.manual_seed(3)  # the model and the images as the command makes them
    model = verify_cmd.build(meta["model"], cli.build_parser()[0].parse_args(argv)).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    want = oracle(probs_hf(model.double(), x.double()), 1, (4, 6), 8)["distance"]
    assert_close(torch.tensor(meta["distance_px"]), want, name="attention_distance.json")
    image = tmp_path / "a.png"
    Image.new("RGB", (60, 40), (30, 60, 120)).save(image)
    argv = ["attention-map", str(image), *argv[1:5], "--out", str(tmp_path / "map.png")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "map.png") as im:
        assert im.size == (3 * (224 + 4) + 4, 149 + 14 + 4 + 4)  # the original and 2 layers' maps


@pytest.mark.parametrize("fn", ["geometry", "cls_attention", "attention_rollout", "mean_attention_distance"])
def test_non_square_patches_are_refused(fn):
    """timm with patch_size=(16, 8) (a 2x4 grid at 32x32): refused naming the patch size. geometry took
    the height, 16, for both sides: a 2x2 grid, then a token-count error for the distance and a
    reshape error for the maps."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=(16, 8),
        embed_dim=DIM,
        depth=2,
        num_heads=HEADS,
    )
    fused = vk.fuse(model.eval(), backend="torch")
    with pytest.raises(
        ValueError, match=r"^model: expected square patches, got patch size \(16, 8\) \(height, width\)$"
    ):
        getattr(analysis, fn)(fused, *([] if fn == "geometry" else [torch.randn(1, 3, 32, 32)]))
