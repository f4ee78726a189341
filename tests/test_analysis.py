"""vit_kernels.analysis and the attention-map / attention-distance commands: statistics read out of
fused models against the float64 oracle, PNG/CSV/JSON written for each model family (tiny configs,
random weights, a synthetic image made here)."""

import copy
import csv
import json
import os
import re

import pytest
import torch

import vit_kernels as vk
from vit_kernels import analysis, cli, reference
from vit_kernels.models import VisionTransformer
from vit_kernels.testing import assert_close

pytest.importorskip("vit_kernels.triton.attention_stats")
Image = pytest.importorskip("PIL.Image")
# a one-block reference ViT at 32 px on the torch backend: the CLI cases that need a model but not its kernels
TINY = ["--model", "vit_kernels:vit_tiny_patch16_224", "--depth", "1", "--img-size", "32", "--backend", "torch"]


def tiny_vit(backend, reg_tokens=0, **kw):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        reg_tokens=reg_tokens,
        backend=backend,
        **kw,
    ).eval()


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_reference_vit_statistics_against_the_oracle(reg_tokens):
    """The triton model's maps, rollout and distances against the same model on the float64 oracle
    (backend "reference"), baseline: the torch backend in fp32."""
    model = tiny_vit("triton", reg_tokens)
    m64 = copy.deepcopy(model).double()
    vk.nn.set_backend(m64, "reference")
    m32 = copy.deepcopy(model)
    vk.nn.set_backend(m32, "torch")
    x = torch.randn(2, 3, 32, 32)
    geo = analysis.geometry(model)
    assert geo == analysis.Geometry(32, 8, (4, 4), 1 + reg_tokens, 2)
    for fn, shape in (
        (analysis.cls_attention, (2, 2, 2, 4, 4)),
        (analysis.attention_rollout, (2, 4, 4)),
        (analysis.mean_attention_distance, (2, 2)),
    ):
        got = fn(model, x)
        assert got.shape == shape
        assert_close(got, fn(m64, x.double()), fn(m32, x), name=fn.__name__)


@pytest.mark.parametrize("size", [(32, 48), (56, 24)])
@pytest.mark.parametrize("batch", [1, 3])
def test_non_square_images_against_the_oracle(size, batch):
    """A dynamic_img_size model on non-square images (a register token beside the class token): the
    patch grid comes from the images' (H, W). It was read from the width alone, a square grid: a reshape
    error for the maps and rollout, a token-count error for the distance."""
    model = tiny_vit("triton", reg_tokens=1, dynamic_img_size=True)
    m64 = copy.deepcopy(model).double()
    vk.nn.set_backend(m64, "reference")
    m32 = copy.deepcopy(model)
    vk.nn.set_backend(m32, "torch")
    x = torch.randn(batch, 3, *size)
    gh, gw = size[0] // 8, size[1] // 8
    assert analysis.geometry(model, size) == analysis.Geometry(size, 8, (gh, gw), 2, 2)
    for fn, shape in (
        (analysis.cls_attention, (2, batch, 2, gh, gw)),
        (analysis.attention_rollout, (batch, gh, gw)),
        (analysis.mean_attention_distance, (2, 2)),
    ):
        got = fn(model, x)
        assert got.shape == shape
        assert_close(got, fn(m64, x.double()), fn(m32, x), name=f"{fn.__name__} {size}")


@pytest.mark.parametrize("fn", ["cls_attention", "attention_rollout", "mean_attention_distance"])
def test_images_that_do_not_fit_are_refused(fn):
    """Images of another size than an explicit Geometry (a reshape error after the model ran, before) and
    images that are not 4-D (timm: "not enough values to unpack"): one ValueError naming images."""
    model = tiny_vit("torch", dynamic_img_size=True)
    said = "images: expected (batch, channels, 32, 32) for the geometry's 4x4 grid of 8-pixel patches, got shape "
    with pytest.raises(ValueError, match=re.escape(said + "(1, 3, 32, 48)")):
        getattr(analysis, fn)(model, torch.randn(1, 3, 32, 48), analysis.geometry(model))
    timm = pytest.importorskip("timm")
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    model = vk.fuse(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval(), backend="torch")
    with pytest.raises(ValueError, match=re.escape("images: expected (batch, channels, H, W), got shape (3, 32, 32)")):
        getattr(analysis, fn)(model, torch.randn(3, 32, 32))


def test_distance_is_the_papers_definition():
    """One layer by hand: the recorded distance equals the float64 oracle on the layer's own q, k."""
    model = tiny_vit("reference").double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    blk = model.blocks[0].attn
    tokens = model.patch_embed(x, model.pos_embed, model.cls_token)
    h = reference.layer_norm(tokens, blk.norm.weight, blk.norm.bias, blk.norm.eps)
    q, k, _ = reference.linear(h, blk.qkv.weight, blk.qkv.bias).reshape(1, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
    want = reference.mean_attention_distance(q, k, grid=(4, 4), patch_size=8)[0]
    assert_close(analysis.mean_attention_distance(model, x)[0], want, name="layer 0")


def test_a_layer_not_fused_is_an_error():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    fused = vk.fuse(model, ops=("mlp",), backend="torch")
    with pytest.raises(RuntimeError, match="0 of its 2 attention layers ran a vit_kernels attention op"):
        analysis.cls_attention(fused, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_a_compiled_model_is_an_error_that_says_so(how):
    """A torch.compile graph hands no statistics to the recording: the error names torch.compile and the way
    out (it said the layers were not fused or ran their original modules, which they did not); under
    torch.compiler.set_stance('force_eager') the compiled model gives the oracle's distances."""
    model = tiny_vit("triton")
    m64 = copy.deepcopy(model).double()
    vk.nn.set_backend(m64, "reference")
    m32 = copy.deepcopy(model)
    vk.nn.set_backend(m32, "torch")
    if how == "model.compile()":
        compiled = model
        compiled.compile(backend="eager")
    else:
        compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"a graph made by torch.compile, which keeps none; pass the module it"):
        analysis.mean_attention_distance(compiled, x)
    with torch.compiler.set_stance("force_eager"):
        got = analysis.mean_attention_distance(compiled, x)
    want = analysis.mean_attention_distance(m64, x.double())
    assert_close(got, want, analysis.mean_attention_distance(m32, x), name=f"{how} under force_eager")


@pytest.mark.parametrize("family", ["vit_kernels", "timm"])
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_no_class_token_is_refused_registers_are_not_one(family, reg_tokens):
    """Without a class token, CLS maps and rollout refuse (registers in front are not a class token: row 0
    would be register 0's attention); the mean attention distance still runs, with the registers as prefix."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, reg_tokens=reg_tokens)
    if family == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, class_token=False, global_pool="avg", **kw)
        model = vk.fuse(model.eval(), backend="torch")
    else:
        model = VisionTransformer(class_token=False, pool="mean", backend="torch", **kw).eval()
    geo = analysis.geometry(model)
    assert (geo.class_token, geo.prefix_tokens) == (False, reg_tokens)
    x = torch.randn(1, 3, 32, 32)
    for fn in (analysis.cls_attention, analysis.attention_rollout):
        with pytest.raises(ValueError, match=r"model: has no class token"):
            fn(model, x)
    assert analysis.mean_attention_distance(model, x).shape == (2, 2)


@pytest.fixture
def image(tmp_path):
    """A synthetic 80x64 picture: a yellow disc and a red square on blue."""
    from PIL import ImageDraw

    im = Image.new("RGB", (80, 64), (30, 60, 120))
    d = ImageDraw.Draw(im)
    d.ellipse((10, 10, 40, 40), fill=(250, 200, 40))
    d.rectangle((50, 36, 74, 60), fill=(200, 30, 30))
    path = tmp_path / "sample.png"
    im.save(path)
    return str(path)


def hf_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    cfg.save_pretrained(tmp_path / "hf")
    return f"hf:{tmp_path / 'hf'}"


MAP_CASES = [  # (model, extra options): tiny configs; torchvision's smallest ViT is ViT-B, run on torch
    ("vit_kernels:vit_tiny_patch16_224", ["--heads", "all"]),
    ("vit_kernels:vit_tiny_patch16_224", ["--rollout"]),
    ("timm:vit_tiny_patch16_224", []),
    ("hf", []),
    ("vit_pytorch:vit_tiny_patch16_224", []),
    ("torchvision:vit_b_16", ["--backend", "torch"]),
    ("timm:vit_tiny_patch16_224", ["--backend", "cuda"]),  # the csrc kernels, host emulator
]


@pytest.mark.parametrize("spec,extra", MAP_CASES)
def test_attention_map_command(spec, extra, image, tmp_path, capsys):
    spec = hf_config(tmp_path) if spec == "hf" else spec
    out = str(tmp_path / "map.png")
    rc = cli.main(["attention-map", image, "--model", spec, "--depth", "2", "--img-size", "32", "--out", out, *extra])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        w, h = im.size
        pixels = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(pixels) > 100  # overlays, not a blank sheet
    heads = "--heads" in extra
    assert (w, h) == (
        (3 * 228 + 4, 3 * 242 + 4)
        if heads
        else (2 * 228 + 4, 242 + 4)
        if "--rollout" in extra
        else (3 * 228 + 4, 242 + 4)
    )
    assert out in capsys.readouterr().out


def test_attention_map_default_output_beside_the_image(image, capsys):
    assert (
        cli.main(
            ["attention-map", image, "--model", "vit_kernels:vit_tiny_patch16_224", "--depth", "1", "--img-size", "32"]
        )
        == 0
    )
    assert os.path.isfile(image.replace("sample.png", "sample_attention.png"))


def test_attention_map_out_folders_are_created(image, tmp_path, capsys):
    """--out under folders that do not exist yet: created, as attention-distance's --out-dir (was: "No such
    file or directory" once the model had run)."""
    out = tmp_path / "new" / "folder" / "map.png"
    assert cli.main(["attention-map", image, *TINY, "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (2 * 228 + 4, 242 + 4)  # the original and layer 1's map


def test_attention_distance_command(image, tmp_path, capsys):
    out = tmp_path / "dist"
    rc = cli.main(
        [
            "attention-distance",
            "--model",
            "timm:vit_tiny_patch16_224",
            "--depth",
            "2",
            "--img-size",
            "32",
            "--images",
            image,
            image,
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "attention_distance.csv")))
    assert len(rows) == 2 * 3 and {r["layer"] for r in rows} == {"1", "2"}
    meta = json.load(open(out / "attention_distance.json"))
    assert meta["grid"] == [2, 2] and meta["patch_size"] == 16 and len(meta["distance_px"]) == 2
    d = torch.tensor(meta["distance_px"])
    # 2x2 grid of 16 px patches: every distance lies between 0 and the diagonal
    assert (d > 0).all() and (d < 16 * 2**0.5).all()
    with Image.open(out / "attention_distance.png") as im:
        assert im.size == (500, 400)


@pytest.mark.parametrize("batch", [[], ["--batch-size", "2"]])
def test_attention_distance_random_images(batch, tmp_path, capsys):
    """Without --images: --batch-size random images, 4 when it is not given."""
    out = tmp_path / "dist"
    assert cli.main(["attention-distance", *TINY, *batch, "--out-dir", str(out)]) == 0, capsys.readouterr().err
    meta = json.load(open(out / "attention_distance.json"))
    assert meta["images"] == f"{batch[1] if batch else 4} random normal image(s)"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["attention-map", "missing.png", "--model", "vit_kernels:vit_tiny_patch16_224"],
            "argument image: expected an image file, got 'missing.png': no such file",
        ),
        (
            ["attention-map", "NOTIMAGE", "--model", "vit_kernels:vit_tiny_patch16_224"],
            "argument image: expected an image file Pillow can read",
        ),
        (["attention-map", "IMAGE", "--model", "resnet50"], "model: expected a preset 'vit_<size>_patch<p>_<img>'"),
        (
            ["attention-map", "IMAGE", "--model", "vit_kernels:vit_tiny_patch16_224", "--img-size", "40"],
            "img_size: expected a multiple of patch_size=16, got 40",
        ),
        (
            ["attention-distance", "--model", "timm:vit_tiny_patch16_224", "--batch-size", "0"],
            "argument --batch-size: expected an integer >= 1, got 0",
        ),
        (
            ["attention-map", "IMAGE", "--model", "timm:vit_tiny_patch16_224", "--backend", "gpu"],
            "argument --backend: invalid choice",
        ),
        # --out, refused while the command line is parsed (it was found after the model ran: "unknown file extension")
        (
            ["attention-map", "IMAGE", *TINY, "--out", "FOLDER"],
            "argument --out: expected an image file to write, named .png, .jpg or another extension Pillow writes, "
            "got 'FOLDER', which is a folder",
        ),
        (
            ["attention-map", "IMAGE", *TINY, "--out", "FOLDER/map"],
            "argument --out: expected an image file to write, named .png, .jpg or another extension Pillow writes, "
            "got 'FOLDER/map', which has no extension",
        ),
        (
            ["attention-map", "IMAGE", *TINY, "--out", "FOLDER/map.txt"],
            "got 'FOLDER/map.txt', whose extension '.txt' is not one",
        ),
        (
            ["attention-map", "IMAGE", *TINY, "--out", "IMAGE/map.png"],
            "got 'IMAGE/map.png', but IMAGE is a file",
        ),
        # --batch-size is the number of random images: with --images it was ignored (the files ran, exit 0)
        (
            ["attention-distance", *TINY, "--images", "IMAGE", "IMAGE", "--batch-size", "1"],
            "argument --batch-size: expected no --batch-size with --images (it sets the number of random images; "
            "the files given are the batch), got --batch-size 1 with 2 image(s)",
        ),
        # --rollout is one map from the head means: --heads all was ignored (one rollout panel, exit 0)
        (
            ["attention-map", "IMAGE", *TINY, "--rollout", "--heads", "all"],
            "argument --heads: expected mean with --rollout (rollout is one map per image, from the head means "
            "of every layer), got --heads all",
        ),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, message, image, tmp_path, capsys):
    notimage = tmp_path / "x.png"
    notimage.write_text("not an image")
    folder = str(tmp_path / "folder")
    os.makedirs(folder)

    def fill(a):
        return a.replace("NOTIMAGE", str(notimage)).replace("IMAGE", image).replace("FOLDER", folder)

    argv, message = [fill(a) for a in argv], fill(message)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_attention_map_loads_a_local_checkpoint(image, tmp_path, capsys):
    """--checkpoint goes through verify's safe loader: weights saved from the seed-5 model give the
    same picture as building that model; a file that is not a checkpoint is refused in one line."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from vit_kernels.commands import verify as verify_cmd

    spec = ["--model", "vit_kernels:vit_tiny_patch16_224", "--depth", "1", "--img-size", "32", "--backend", "torch"]
    args = cli.build_parser()[0].parse_args(["attention-map", image, *spec, "--seed", "5"])
    torch.manual_seed(5)
    save_file(verify_cmd.build(args.model, args).state_dict(), str(tmp_path / "w.safetensors"))
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    assert cli.main(["attention-map", image, *spec, "--seed", "5", "--out", a]) == 0
    assert cli.main(["attention-map", image, *spec, "--checkpoint", str(tmp_path / "w.safetensors"), "--out", b]) == 0
    c = str(tmp_path / "c.png")
    assert cli.main(["attention-map", image, *spec, "--out", c]) == 0  # seed 0, no checkpoint
    data = [open(p, "rb").read() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]
    capsys.readouterr()
    assert cli.main(["attention-map", image, *spec, "--checkpoint", image]) == 2
    err = capsys.readouterr().err
    assert "checkpoint: expected a .safetensors file or a torch.save file" in err and len(err.strip().splitlines()) == 1


def test_uniform_attention_gives_the_grid_mean_distance():
    """q = k = 0 (QKV weights and bias zeroed): every token attends uniformly, so each head's mean
    attention distance is (1 / tokens) x the mean over patches of the summed distances to all
    patches; and the class token's map is flat at 1 / tokens."""
    model = tiny_vit("triton")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
    x = torch.randn(2, 3, 32, 32)
    want = reference.patch_distances((4, 4), 8.0).sum(-1).mean().item() / 17
    d = analysis.mean_attention_distance(model, x)
    assert torch.allclose(d, torch.full((2, 2), want), rtol=1e-5), (d, want)
    maps = analysis.cls_attention(model, x)
    assert torch.allclose(maps, torch.full_like(maps, 1 / 17), rtol=1e-5)
