"""The CLI's habits, command by command: every option has a sentence of help with its default
shown, and the output is plain text without a terminal."""

import argparse

import pytest

from vit_kernels import cli


def _commands():
    parser, _ = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_of_every_command_has_help():
    parser, commands = _commands()
    missing = []
    for name, p in [("(top)", parser), *commands.items()]:
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not a.help or a.help == argparse.SUPPRESS or len(a.help.split()) < 3:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}: {a.help!r}")
    assert not missing, "options without a sentence of help:\n" + "\n".join(missing)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_shows_every_default(command, capsys):
    """Each option whose default is a value (not None, not an off flag) shows it in --help."""
    _, commands = _commands()
    p = commands[command]
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for a in p._actions:
        d = a.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or isinstance(a, argparse._HelpAction):
            continue
        if "default" not in (a.help or "").lower():  # else the sentence says it in its own words
            assert f"(default: {d})" in text, f"{command} {a.option_strings}: '(default: {d})' not in the help"


def test_kineto_debris_is_dropped_and_real_lines_are_kept(capfd):
    """The profiler's routine log lines written to file descriptor 2 inside the block are dropped,
    anything else written there comes out after it."""
    import os

    from vit_kernels.bench.profile import profiler_debris_filtered

    with profiler_debris_filtered():
        os.write(
            2,
            b"USDT:2026-11-26 01:27:16 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
            b"a real warning\n"
            b"STAGE:2026-11-26 01:27:16 1:1 ActivityProfilerController.cpp:312] Completed Stage: Warm Up\n",
        )
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "profiler_start" not in err and "Completed Stage" not in err


def test_block_breakdown_prints_no_profiler_debris(capfd):
    from vit_kernels.bench.profile import breakdown

    rows = breakdown(dim=32, heads=2, tokens=5, batch=1, iters=1, warmup=1)
    assert rows and all(r["ms"] >= 0 for r in rows)
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_" not in err and "gpuGetDeviceCount" not in err, err


def test_importing_cpp_extension_leaves_no_cuda_home_guess(tmp_path):
    """On a machine without a CUDA runtime, torch.utils.cpp_extension logs that it guesses CUDA_HOME
    when it is imported (torch.utils.benchmark imports it): the CLI drops that message."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom vit_kernels import cli\nrc = cli.main(['info'])\n"
        "import torch.utils.cpp_extension\nsys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "No CUDA runtime is found" not in p.stderr, p.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the interpreter is turned on without a CUDA device"
)
def test_python_m_turns_the_interpreter_on_before_kernels_are_defined(tmp_path):
    """`python -m vit_kernels selftest` on a CPU without TRITON_INTERPRET in the environment: Triton
    reads it when @triton.jit defines a kernel (at import), so the CLI's switch must come before the
    package imports its kernels; every Triton row then runs in the interpreter and passes. (It came
    too late before: every Triton row failed with "Cannot call @triton.jit'd outside of the scope of
    a kernel".)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "vit_kernels", "selftest", "vit_tiny_patch16_224", "--batch-size", "1"]
    cmd += ["--backend", "triton", "--json-out", str(tmp_path / "selftest.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if " triton " in line]
    assert len(rows) == 4 and all(" PASS " in r for r in rows), p.stdout
    assert cli._INTERPRETER_NOTE in p.stderr, p.stderr


class _Terminal:
    """A stream that says it is a terminal (what rich draws on)."""

    def __init__(self):
        import io

        self.buf = io.StringIO()

    def write(self, s):
        return self.buf.write(s)

    def flush(self):
        pass

    def isatty(self):
        return True


ROWS = [{"name": "gemm [qkv]", "ms": 1.23456, "status": "ok"}, {"name": "attn", "ms": None, "status": "error"}]
COLUMNS = [("name", "name"), ("ms", "ms"), ("status", "status")]


def test_tables_are_plain_text_without_a_terminal(capsys):
    from vit_kernels.bench import report

    report.print_table(ROWS, COLUMNS, title="a title")
    out = capsys.readouterr().out
    assert out == "a title\n" + report.format_table(ROWS, COLUMNS) + "\n"
    lines = out.splitlines()
    assert lines[1].split() == ["name", "ms", "status"] and lines[3].split() == ["gemm", "[qkv]", "1.23", "ok"]


def test_tables_are_rich_on_a_terminal():
    from vit_kernels.bench import report

    term = _Terminal()
    report.print_table(ROWS, COLUMNS, title="a title", file=term, styles={"status": {"error": "red"}})
    text = term.buf.getvalue()
    assert "─" in text and "a title" in text
    assert "gemm [qkv]" in text and "1.23" in text  # markup-like text is shown as written
    assert "\x1b[31merror" in text or "\x1b[31m" in text  # the style reached the terminal
    assert "[red]" not in text


def test_progress_writes_nothing_without_a_terminal(capsys):
    from vit_kernels.bench import report

    with report.progress(3, "work") as bar:
        for i in range(3):
            bar.describe(f"step {i}")
            bar.advance(f"step {i}")
    assert capsys.readouterr() == ("", "")


def test_verify_progress_counts_the_blocks_of_each_pass():
    """The block list verify's progress bar counts: timm's blocks, torchvision's encoder layers,
    vit_pytorch's [attention, feed-forward] pairs (by their attention)."""
    from vit_kernels.commands.verify import block_list
    from vit_kernels.models import registry

    for name, cls in [
        ("timm:vit_tiny_patch16_224", "Block"),
        ("torchvision:vit_b_16", "EncoderBlock"),
        ("vit_pytorch:vit_base_patch16_224", "Attention"),
        ("vit_tiny_patch16_224", "Block"),
    ]:
        kind, depth = block_list(registry.build(name, depth=3, img_size=32))
        assert (kind.__name__, depth) == (cls, 3), name


def test_attention_plot_error_bars_span_p20_to_p80(tmp_path):
    """profile-attention's TFLOP/s bars: the throughput at the p80 step time (low) and at the p20
    one (high); none for an untimed row; plot_lines draws them."""
    from vit_kernels.bench import report
    from vit_kernels.commands.profile_attention import tflops_range

    assert tflops_range({"tflops": 2.0, "ms": 1.0, "ms_p20": 0.5, "ms_p80": 2.0}) == (1.0, 4.0)
    assert tflops_range({"status": "not measured"}) is None
    out = report.plot_lines(
        tmp_path / "a.png",
        [50, 197],
        {"a": [1.0, 2.0], "b": [None, None]},
        "tokens",
        "TFLOP/s",
        "t",
        ranges={"a": [(0.5, 1.5), None]},
    )
    assert out.stat().st_size > 0
