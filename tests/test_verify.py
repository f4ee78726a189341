"""vit_kernels.verify and the ``verify`` command across families (small configs, torch backend)."""

import argparse
import copy
import importlib
import os

import pytest
import torch

import vit_kernels as vk
from vit_kernels.commands import verify as verify_cmd
from vit_kernels.swap import SwapWrapper


def parse(argv):
    p = argparse.ArgumentParser()
    verify_cmd.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["verify"] + argv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_timm_default_fused_copy(dtype):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=1,
        num_heads=2,
        num_classes=10,
    ).eval()
    before = copy.deepcopy(model.state_dict())
    report = vk.verify(model, dtype=dtype, backend="torch")
    assert report.ok, str(report)
    assert [c.name for c in report.comparisons] == ["output"]
    assert report.dtype == dtype and "qkv_attention" in report.decisions
    assert len(report.fuse_report.fused) == 3
    # the original is untouched: not fused, same dtype and values
    assert not any(isinstance(m, SwapWrapper) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_verify_hf_named_outputs_and_in_place_fused_original():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    model = transformers.ViTModel(cfg).eval()
    vk.fuse(model, backend="torch")  # the original itself is fused: verify compares against an unfused copy
    report = vk.verify(model, model, torch.randn(2, 3, 32, 32))
    assert report.ok, str(report)
    assert [c.name for c in report.comparisons] == ["last_hidden_state", "pooler_output"]


def test_verify_catches_a_wrong_fused_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=1,
        num_heads=2,
        num_classes=10,
    ).eval()
    fused = vk.fuse(copy.deepcopy(model), backend="torch")
    with torch.no_grad():
        fused.blocks[0].norm1.weight.mul_(1.01)  # a wrong number somewhere in the fused path
    report = vk.verify(model, fused)
    assert not report.ok and "FAILED" in str(report)


def test_verify_flags_an_identically_zero_output():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    model = tv.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4
    ).eval()  # torchvision zero-initialises the head
    report = vk.verify(model, backend="torch")
    assert not report.ok and "identically zero" in str(report)


@pytest.mark.parametrize(
    "spec",
    [
        "timm:vit_tiny_patch16_224",
        "torchvision:vit_b_16",
        "hf:google/vit-base-patch16-224",
        "vit_pytorch:vit_tiny_patch16_224",
        "vit_kernels:vit_tiny_patch16_224",
    ],
)
def test_command_builds_each_family_locally(spec, capsys):
    args = parse([spec, "--depth", "1", "--img-size", "32", "--backend", "torch", "--batch-size", "2"])
    assert verify_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "fuse report" in out


def test_command_hf_local_config(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    cfg.save_pretrained(tmp_path)
    assert verify_cmd.run(parse([f"hf:{tmp_path}", "--backend", "torch"])) == 0
    with pytest.raises(SystemExit, match="nothing is downloaded"):
        verify_cmd.run(parse(["hf:someone/not-a-known-name", "--backend", "torch"]))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_command_loads_a_checkpoint(fmt, tmp_path, capsys, monkeypatch):
    args = parse(["timm:vit_tiny_patch16_224", "--depth", "1", "--img-size", "32", "--backend", "torch"])
    model = verify_cmd.build(args.model, args)
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    path = os.path.join(tmp_path, f"w.{fmt}")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    loaded = {}
    real_verify = vk.verify

    def spy(original, fused, inputs, **kw):
        loaded.update(original.state_dict())
        return real_verify(original, fused, inputs, **kw)

    monkeypatch.setattr(vk, "verify", spy)
    assert (
        verify_cmd.run(
            parse(
                [
                    "timm:vit_tiny_patch16_224",
                    "--depth",
                    "1",
                    "--img-size",
                    "32",
                    "--backend",
                    "torch",
                    "--checkpoint",
                    path,
                ]
            )
        )
        == 0
    )
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


class _NotATensor:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    path = os.path.join(tmp_path, "evil.pt")
    torch.save({"w": _NotATensor()}, path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match="checkpoint: .*[Ww]eights only"):
        verify_cmd.load_checkpoint(model, path)


def _timm_tiny(depth=2):
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=depth,
        num_heads=2,
        num_classes=10,
    ).eval()


def test_verify_checks_the_backend_the_model_was_fused_with():
    """A model fused with backend="triton" is checked on triton (it used to be re-fused with auto,
    which takes the torch path on CPU tensors, and printed PASS)."""
    model = vk.fuse(_timm_tiny(), backend="triton")
    report = vk.verify(model)
    assert report.status == "PASS", str(report)
    assert sorted(p.op for p in report.parts) == ["attention", "attention", "mlp", "mlp", "patch_embed"]
    for p in report.parts:
        assert p.status == "checked" and p.backend == "triton" and p.ran, str(report)
        assert all(d.backend == "triton" for d in p.ran), str(report)
    attn = [p for p in report.parts if p.op == "attention"]
    assert all({d.op for d in p.ran} == {"qkv_attention", "linear"} for p in attn)
    assert "qkv_attention triton/split" in str(report)
    # the model itself was not changed, and a backend asked for re-fuses a copy with it
    assert all(w.backend == "triton" for w in model.modules() if isinstance(w, SwapWrapper))
    report = vk.verify(model, backend="torch")
    assert report.ok and {d.backend for p in report.parts for d in p.ran} == {"torch"}


def test_verify_fails_a_part_that_quietly_took_another_backend(monkeypatch):
    """A fused op that runs torch where triton was asked (a silent fallback) makes verify FAIL."""
    linear_op = importlib.import_module("vit_kernels.ops.linear")
    real = linear_op.resolve

    def falls_back(op, backend, *args, **kwargs):  # takes torch whatever was asked
        return real(op, "torch", *args, **kwargs)

    model = vk.fuse(_timm_tiny(depth=1), backend="triton")
    monkeypatch.setattr(linear_op, "resolve", falls_back)
    report = vk.verify(model)
    assert report.status == "FAIL" and all(c.ok for c in report.comparisons), str(report)
    bad = [p for p in report.parts if p.status == "FAIL"]
    assert [p.op for p in bad] == ["attention"] and "linear: backend=torch" in bad[0].why


def test_verify_says_not_checked_when_a_part_runs_the_original(monkeypatch):
    from vit_kernels.swap.timm import FusedTimmBlock

    model = vk.fuse(_timm_tiny(depth=1), backend="triton")
    monkeypatch.setattr(FusedTimmBlock, "original_reason", lambda self, x: "dropout is active (test)")
    report = vk.verify(model)
    assert report.status == "NOT CHECKED" and not report.ok, str(report)
    assert {p.op: p.status for p in report.parts} == {
        "attention": "NOT CHECKED",
        "mlp": "NOT CHECKED",
        "patch_embed": "checked",
    }
    assert "ran the original module instead of the fused ops: dropout is active (test)" in str(report)


def test_verify_a_vit_kernels_model_keeps_its_backend():
    model = vk.models.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, embed_dim=64, num_heads=2, backend="triton"
    ).eval()
    report = vk.verify(model)
    assert report.ok, str(report)
    assert {d.backend for p in report.parts for d in p.ran} == {"triton"} and len(report.parts) == 3


@pytest.mark.parametrize(
    "name, cls",
    [
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
        ("vit_base_patch16_xp_224", "ParallelScalingBlock"),
        ("vit_base_patch16_rope_reg1_gap_256", "EvaBlock"),
    ],
)
def test_verify_names_the_blocks_left_unfused(name, cls):
    """A model whose blocks are all left (timm blocks of another class than Block; the patch
    embedding fused) is NOT CHECKED, saying how many attention / MLP parts were left and why, not
    that the model has no transformer block."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        name, pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5
    ).eval()
    report = vk.verify(model, backend="torch")
    assert report.status == "NOT CHECKED" and all(c.ok for c in report.comparisons), str(report)
    assert [p.op for p in report.parts] == ["patch_embed"], str(report)
    (line,) = report.not_checked
    assert "no transformer block" not in line and "4 attention / MLP parts were left" in line, line
    assert f"blocks.0 is {cls}, not timm's Block" in line, line
