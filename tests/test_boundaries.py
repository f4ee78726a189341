"""Bad input at the boundaries people use: the CLI and vk.fuse / unfuse / verify / fuse_report.

Each refusal is one line that names the argument, what was expected and what was received; the CLI
exits with code 2 and prints no traceback unless -v is given (before or after the command). Most
cases call ``cli.main`` in-process; two run ``python -m vit_kernels`` end to end.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["vit_kernels:vit_tiny_patch16_224", "--depth", "1", "--img-size", "32", "--backend", "torch"]


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line]


def assert_one_line_error(rc, capsys, *parts):
    lines = error_lines(capsys)
    assert rc == 2 and len(lines) == 1, (rc, lines)
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "argv,option,value",
    [
        (["verify", *TINY[:1], "--depth", "0"], "--depth", "0"),
        (["verify", *TINY[:1], "--batch-size", "-3"], "--batch-size", "-3"),
        (["verify", *TINY[:1], "--img-size", "0"], "--img-size", "0"),
        (["verify", *TINY[:1], "--depth", "two"], "--depth", "'two'"),
        (["bench", "--depth", "-1"], "--depth", "-1"),
        (["bench", "--batch-size", "0"], "-b/--batch-size", "0"),
        (["bench", "--img-size", "-224"], "--img-size", "-224"),
        (["bench", "--repeats", "0"], "--num-bench-iter/--repeats", "0"),
        (["profile-attention", "--batch-size", "0"], "--batch-size", "0"),
        (["profile-attention", "--heads", "-2"], "--heads", "-2"),
        (["profile-attention", "--breakdown-tokens", "0"], "--breakdown-tokens", "0"),
        (["inspect", "--jobs", "0"], "--jobs", "0"),
        (["inspect", "--jobs", "-4"], "--jobs", "-4"),
    ],
)
def test_non_positive_numbers_are_refused(argv, option, value, capsys):
    assert_one_line_error(cli.main(argv), capsys, f"argument {option}", "expected an integer >= 1", f"got {value}")


@pytest.mark.parametrize(
    "argv,option,value",
    [
        (["selftest", "--depth", "0"], "--depth", "0"),  # depth 0 checked the patch embedding alone and said OK
        (["selftest", "--depth", "-1"], "--depth", "-1"),
        (["selftest", "--batch-size", "0"], "--batch-size", "0"),  # 0 became the default batch, silently
        (["selftest", "--img-size", "0"], "--img-size", "0"),
    ],
)
def test_selftest_non_positive_numbers_are_refused(argv, option, value, capsys):
    assert_one_line_error(cli.main(argv), capsys, f"argument {option}", "expected an integer >= 1", f"got {value}")


@pytest.mark.parametrize("command", ["bench", "profile-attention"])
@pytest.mark.parametrize("value", ["-1", "-0.5", "inf", "nan"])
def test_max_time_must_not_be_negative(command, value, capsys):
    """A negative --max-time was read as 'the time is up' (0 means that: the fewest samples only, as
    tests/test_bench_cli.py uses it); refused, as an infinite or NaN one."""
    line = assert_one_line_error(cli.main([command, "--max-time", value]), capsys, "argument --max-time", "expected")
    assert "number >= 0" in line, line


@pytest.mark.parametrize("value", ["0", "50,-1"])
def test_non_positive_tokens_are_refused(value, capsys):
    assert_one_line_error(cli.main(["profile-attention", "--tokens", value]), capsys, "tokens", "positive", repr(value))


@pytest.mark.parametrize("command", ["bench", "profile-attention"])
def test_out_that_is_a_file_is_refused(command, tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("not a folder")
    assert_one_line_error(
        cli.main([command, "--out", str(f)]), capsys, "argument --out", "expected a folder", "which is a file"
    )
    assert_one_line_error(cli.main([command, "--out", str(f / "sub")]), capsys, "argument --out", f"but {f} is a file")
    assert f.read_text() == "not a folder"


# ------------------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint(tmp_path, capsys):
    rc = cli.main(["verify", *TINY, "--checkpoint", str(tmp_path / "nope.safetensors")])
    assert_one_line_error(rc, capsys, "checkpoint: expected a .safetensors file", "no such file")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_corrupt_checkpoint(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(os.urandom(64))
    rc = cli.main(["verify", *TINY, "--checkpoint", str(path)])
    assert_one_line_error(rc, capsys, "checkpoint: expected", "cannot read", name)


@pytest.mark.parametrize(
    "content,said",
    [
        ([torch.zeros(2)], "got list"),
        ({"w": torch.zeros(2), "n": 3}, "non-tensor"),
        ({"blocks.0.attn.qkv.weight": torch.zeros(2)}, "missing"),
    ],
)
def test_wrong_format_checkpoint(content, said, tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    rc = cli.main(["verify", *TINY, "--checkpoint", str(path)])
    assert_one_line_error(rc, capsys, "checkpoint: expected", said)


def test_checkpoint_of_another_shape(tmp_path, capsys):
    from vit_kernels.commands import verify as verify_cmd

    model = vk.models.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    sd = model.state_dict()
    sd["head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(
        SystemExit,
        match=r"checkpoint: expected the \d+ tensors .* 1 of another shape "
        r"\(e.g. 'head.weight'\)",
    ):
        verify_cmd.load_checkpoint(model, str(path))


# ------------------------------------------------------------------------------------- HF config folders
@pytest.mark.parametrize(
    "config,said",
    [
        (None, "holds no config.json"),
        ("{not json", "does not parse"),
        ("[1, 2]", "got a list"),
        (json.dumps({"model_type": "vit"}), "without hidden_size"),
        (json.dumps({"model_type": "bert"}), "model_type='bert'"),
        (
            json.dumps(
                dict(
                    hidden_size=64,
                    num_hidden_layers=0,
                    num_attention_heads=2,
                    intermediate_size=128,
                    image_size=32,
                    patch_size=8,
                )
            ),
            "num_hidden_layers >= 1",
        ),
        (
            json.dumps(
                dict(
                    hidden_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=3,
                    intermediate_size=128,
                    image_size=32,
                    patch_size=8,
                )
            ),
            "divisible by num_attention_heads",
        ),
        (
            json.dumps(
                dict(
                    hidden_size="wide",
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=128,
                    image_size=32,
                    patch_size=8,
                )
            ),
            "hidden_size",
        ),
    ],
)
def test_malformed_hf_config_folder(config, said, tmp_path, capsys):
    pytest.importorskip("transformers")
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    rc = cli.main(["verify", f"hf:{tmp_path}", "--backend", "torch"])
    assert_one_line_error(rc, capsys, "model: ", said)


@pytest.mark.parametrize(
    "argv,lib,said",
    [
        (["timm:vit_nope_patch16_224"], "timm", "model: expected a timm model name"),
        (["timm:resnet18"], "timm", "model timm:resnet18: expected a ViT of a known family"),
        (["timm:resnet18", "--depth", "2"], "timm", "model: expected a timm model that takes depth, got 'resnet18'"),
        (
            ["torchvision:vit_b_16", "--depth", "1", "--img-size", "30"],
            "torchvision",
            "img_size: expected a multiple of patch_size=16",
        ),
        (
            ["vit_pytorch:vit_tiny_patch16_224", "--depth", "1", "--img-size", "30"],
            "vit_pytorch",
            "img_size: expected a multiple of patch_size=16, got 30",
        ),
    ],
)
def test_models_verify_cannot_build(argv, lib, said, capsys):
    pytest.importorskip(lib)
    assert_one_line_error(cli.main(["verify", *argv, "--backend", "torch"]), capsys, said)


def test_inspect_kernel_that_matches_nothing(capsys):
    rc = cli.main(["inspect", "--backend", "triton", "--kernel", "no_such_kernel"])
    assert_one_line_error(
        rc,
        capsys,
        "kernel: expected part of a kernel name",
        "flash_attention_fwd",
        "got 'no_such_kernel', which matches none",
    )


NO_CONFIG = "got 'no_such_config', which matches none"


@pytest.mark.parametrize(
    "argv,parts",
    [
        (["--config", "no_such_config"], ("config: expected part of a configuration label of a kernel (", NO_CONFIG)),
        (
            ["--kernel", "row_stats", "--config", "no_such_config"],
            ("config: expected part of a configuration label of the kernels matching 'row_stats' (", NO_CONFIG),
        ),
        (
            ["--kernel", "gemm_tma_proj", "--arch", "sm_80"],
            ("arch: expected an architecture the selected configurations are compiled for (sm_90), got sm_80",),
        ),
    ],
)
def test_inspect_selection_that_leaves_nothing(argv, parts, capsys):
    """Filters or an --arch that leave no configuration to compile: one line naming the option that emptied
    the selection, exit 2 (was exit 0 with "0 kernel configurations, 0 with problems": a clean run)."""
    assert_one_line_error(cli.main(["inspect", "--backend", "triton", *argv]), capsys, *parts)


# ------------------------------------------------------------------------------------- -v anywhere
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(where, capsys):
    argv = ["verify", "hf:/nonexistent/folder", "--backend", "torch"]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "model: expected hf:" in err.splitlines()[-1]


def test_verbose_flag_parses_before_or_after_the_command():
    parse = cli.build_parser()[0].parse_args
    assert parse(["verify", *TINY, "-v"]).verbose is True
    assert parse(["verify", "--verbose", *TINY]).verbose is True
    assert parse(["-v", "verify", *TINY]).verbose is True
    assert parse(["verify", *TINY]).verbose is False


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "vit_kernels", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_end_to_end_bad_depth_exits_2_in_one_line():
    p = _cli("verify", "vit_kernels:vit_tiny_patch16_224", "--depth", "0")
    lines = [line for line in p.stderr.splitlines() if line and not line.startswith("note:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "argument --depth: expected an integer >= 1, got 0" in lines[0] and "Traceback" not in p.stderr


def test_end_to_end_missing_checkpoint_traceback_only_with_v(tmp_path):
    argv = [
        "verify",
        "vit_kernels:vit_tiny_patch16_224",
        "--depth",
        "1",
        "--img-size",
        "32",
        "--backend",
        "torch",
        "--checkpoint",
        str(tmp_path / "missing.pt"),
    ]
    p = _cli(*argv)
    lines = [line for line in p.stderr.splitlines() if line and not line.startswith("note:")]
    assert p.returncode == 2 and len(lines) == 1 and "checkpoint: expected" in lines[0], p.stderr
    p = _cli(*argv, "-v")
    assert p.returncode == 2 and "Traceback" in p.stderr and "checkpoint: expected" in p.stderr.splitlines()[-1]


# ------------------------------------------------------------------------------------- the Python API
def _timm_tiny(depth=1):
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


@pytest.mark.parametrize("fn", ["fuse", "unfuse", "fuse_report", "verify"])
@pytest.mark.parametrize("bad", [3, "vit_base_patch16_224", None, torch.zeros(2)])
def test_api_refuses_a_non_module(fn, bad):
    name = "original" if fn == "verify" else "model"
    with pytest.raises(TypeError, match=f"{name}: expected a torch.nn.Module .* got {type(bad).__name__}"):
        getattr(vk, fn)(bad)


@pytest.mark.parametrize("fn", ["fuse", "unfuse", "verify"])
def test_api_refuses_a_module_without_a_vit(fn):
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    name = "original" if fn == "verify" else "model"
    with pytest.raises(
        ValueError, match=f"{name}: expected a ViT of a known family .* got Sequential, which holds none"
    ):
        getattr(vk, fn)(m)


def test_fuse_report_says_there_is_no_vit():
    report = vk.fuse_report(nn.Linear(2, 2))
    assert not report.fused and "no ViT part" in report.left[0].reason


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: vk.fuse(m, backend=3), TypeError, "backend: expected one of .* got int 3"),
        (lambda m: vk.fuse(m, backend="gpu"), ValueError, "backend: expected one of .* got 'gpu'"),
        (lambda m: vk.fuse(m, ops="mlp"), TypeError, "ops: expected a sequence"),
        (lambda m: vk.fuse_report(m, backend=["triton"]), TypeError, "backend: expected one of"),
        (lambda m: vk.verify(m, dtype="fp16"), TypeError, "dtype: expected a floating torch.dtype .* got 'fp16'"),
        (lambda m: vk.verify(m, dtype=torch.int32), TypeError, "dtype: expected a floating torch.dtype"),
        (lambda m: vk.verify(m, inputs=[torch.zeros(1, 3, 32, 32)]), TypeError, "inputs: expected a tensor"),
        (lambda m: vk.verify(m, fused="fused"), TypeError, "fused: expected a torch.nn.Module"),
        (lambda m: vk.verify(m, oracle=1.0), TypeError, "oracle: expected a torch.nn.Module"),
        (lambda m: vk.verify(m, m, backend="torch"), ValueError, "backend: expected None when a fused model"),
    ],
)
def test_api_wrong_option_types(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_timm_tiny())


# ------------------------------------------------------------------------------------- never a PASS on nothing
def test_verify_never_passes_a_model_with_no_blocks():
    model = _timm_tiny(depth=0)
    report = vk.verify(model, backend="torch")
    assert report.status == "NOT CHECKED" and not report.ok, str(report)
    assert "no transformer block" in str(report)


def test_verify_never_passes_when_nothing_is_fused():
    model = _timm_tiny()
    report = vk.verify(model, copy.deepcopy(model))
    assert report.status == "NOT CHECKED" and not report.ok and "nothing in the fused model is fused" in str(report)


def test_cli_verify_of_an_hf_config_without_layers_is_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="vit",
                hidden_size=64,
                num_hidden_layers=0,
                num_attention_heads=2,
                intermediate_size=128,
                image_size=32,
                patch_size=8,
            )
        )
    )
    rc = cli.main(["verify", f"hf:{tmp_path}", "--backend", "torch"])
    assert "PASS" not in capsys.readouterr().out and rc == 2
