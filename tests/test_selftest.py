"""`python -m vit_kernels selftest`: every fused kernel a model uses, at its shapes, against the
float64 oracle; on a CPU through the interpreter (Triton) and the host emulator (CUDA)."""

import json
import types

import pytest
import torch

from vit_kernels import cli
from vit_kernels.commands import selftest as st

# A tiny reference model: ViT-Ti at 64 px (17 tokens), one block.
TINY = ["--img-size", "64", "--depth", "1"]


def run_selftest(tmp_path, *argv):
    out = tmp_path / "selftest.json"
    rc = cli.main(["selftest", *argv, "--json-out", str(out)])
    return rc, json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run: interpreter, emulator, no timings")
def test_tiny_reference_model_on_cpu_both_backends(tmp_path, capsys):
    rc, res = run_selftest(tmp_path, "vit_tiny_patch16_224", *TINY)
    assert rc == 0, res
    assert res["ok"] is True and res["device"] == "cpu" and res["dtype"] == "fp16"
    assert res["batch"] == st.CPU_BATCH and res["depth"] == 1
    assert "timings need a GPU" in res["timings"] and "interpreter" in res["how"] and "emulator" in res["how"]
    assert "needs a GPU" in res["sanitizer_note"] and res["sanitizer"] == []
    got = {(r["op"], r["backend"]) for r in res["rows"]}
    assert got == {
        (op, b) for op in ("patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp") for b in ("triton", "cuda")
    }
    for r in res["rows"]:
        assert set(r) >= {
            "op",
            "backend",
            "path",
            "shape",
            "dtype",
            "status",
            "max_abs_err",
            "bound",
            "torch_err",
            "fused_ms",
            "torch_ms",
            "speedup",
            "reason",
        }
        assert r["status"] == "PASS", r
        assert 0 < r["max_abs_err"] <= r["bound"] and r["fused_ms"] is None
    paths = {r["backend"]: r["path"] for r in res["rows"] if r["op"] == "qkv_attention"}
    assert paths == {"triton": "split", "cuda": "split"}
    printed = capsys.readouterr().out
    assert "timings need a GPU" in printed and "layernorm_gelu_mlp" in printed and "OK" in printed


def test_a_wrong_kernel_is_reported_as_fail_with_exit_code_1(tmp_path, monkeypatch):
    """Inject a wrong Triton linear (its result off by 0.05) and a crashing Triton MLP: the first
    is FAIL, the second ERROR with its message, the others pass, the exit code is 1."""
    from vit_kernels.triton import gemm, mlp

    right = gemm.linear_forward

    def wrong(*args, **kwargs):
        return right(*args, **kwargs) + 0.05

    def crash(*args, **kwargs):
        raise IndexError("injected crash")

    monkeypatch.setattr(gemm, "linear_forward", wrong)
    monkeypatch.setattr(mlp, "layernorm_gelu_mlp_forward", crash)
    rc, res = run_selftest(tmp_path, "vit_tiny_patch16_224", *TINY, "--backend", "triton")
    assert rc == 1 and res["ok"] is False
    status = {r["op"]: r["status"] for r in res["rows"]}
    assert status == {"patch_embed": "PASS", "qkv_attention": "PASS", "linear": "FAIL", "layernorm_gelu_mlp": "ERROR"}
    bad = next(r for r in res["rows"] if r["op"] == "linear")
    assert bad["max_abs_err"] > bad["bound"] and "FAILED" in bad["reason"]
    assert "injected crash" in next(r for r in res["rows"] if r["op"] == "layernorm_gelu_mlp")["reason"]


def test_a_timm_model_by_registry_name(tmp_path):
    pytest.importorskip("timm")
    rc, res = run_selftest(tmp_path, "timm:vit_tiny_patch16_224", *TINY, "--backend", "triton")
    assert rc == 0, res
    assert [r["op"] for r in res["rows"]] == ["patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"]
    assert all(r["status"] == "PASS" for r in res["rows"]), res["rows"]


def test_distinct_calls_dedupe_identical_blocks():
    from vit_kernels.models import create_model

    model = create_model("vit_tiny_patch16_224", img_size=32, depth=3, backend="torch").eval()
    calls = st.distinct_calls(model, torch.randn(2, 3, 32, 32))
    assert [c[0] for c in calls] == ["patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"]


def test_sanitizer_runs_memcheck_and_racecheck_and_reads_their_summary(monkeypatch):
    """The re-run command and the verdict, with a fake compute-sanitizer (no GPU here)."""
    monkeypatch.setattr(st, "sanitizer_path", lambda: "/opt/cuda/bin/compute-sanitizer")
    args = types.SimpleNamespace(
        model="vit_tiny_patch16_224",
        dtype="fp16",
        seed=0,
        batch_size=4,
        depth=None,
        img_size=None,
        checkpoint=None,
        backend=["cuda"],
        json_out="out.json",
    )
    seen = []

    def fake_run(cmd, **kw):
        seen.append((cmd, kw["env"][st.UNDER_SANITIZER]))
        ok = "memcheck" in cmd
        text = "========= ERROR SUMMARY: 0 errors\n" if ok else "Race reported\n========= ERROR SUMMARY: 3 errors\n"
        return types.SimpleNamespace(returncode=0 if ok else 1, stdout="", stderr=text)

    rows = st.run_sanitizers(args, runner=fake_run)
    assert [r["tool"] for r in rows] == ["memcheck", "racecheck"]
    assert rows[0]["status"] == "PASS" and rows[0]["errors"] == 0
    assert rows[1]["status"] == "FAIL" and rows[1]["errors"] == 3 and "Race" in rows[1]["output_tail"]
    cmd, tool = seen[0]
    assert tool == "memcheck" and cmd[:4] == [
        "/opt/cuda/bin/compute-sanitizer",
        "--tool",
        "memcheck",
        "--error-exitcode",
    ]
    assert cmd[cmd.index("selftest") + 1] == "vit_tiny_patch16_224"
    assert {"--no-timing", "--no-sanitizer"} <= set(cmd) and cmd[cmd.index("--batch-size") + 1] == "4"
    assert cmd[cmd.index("--backend") + 1] == "cuda" and "--depth" not in cmd
    assert st.parse_sanitizer("memcheck", 1, "no summary")["status"] == "FAIL"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_selftest_on_a_gpu_times_every_kernel_against_torch(tmp_path):
    """On a GPU: the same checks, on the device, each fused call timed beside the torch path."""
    rc, res = run_selftest(tmp_path, "vit_tiny_patch16_224", "--batch-size", "8", "--no-sanitizer")
    assert rc == 0, res["rows"]
    assert res["device"] != "cpu" and res["timings"].startswith("measured") and res["reduced"] == ""
    for r in res["rows"]:
        if r["status"] == "N/A":  # e.g. no CUDA extension build here: said, not hidden
            assert r["reason"], r
            continue
        assert r["status"] == "PASS" and r["fused_ms"] > 0 and r["torch_ms"] > 0, r
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["fused_ms"])
