"""Concurrency and repeatability: the ops from 8 threads, the interpreter probe from 8 threads, the
CUDA JIT build from processes started together, and bitwise-repeatable forward results on every
backend (torch, Triton's interpreter, the CUDA host emulator on CPU tensors)."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import vit_kernels as vk
from vit_kernels.backends import Decision, record_decisions

from conftest import DEVICE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# calls per thread: the interpreter and the emulator are slow on CPU tensors
CALLS = {"torch": 100, "cuda": 10, "triton": 2}


def _cuda_or_skip():
    why = vk.backends.cuda_unavailable(DEVICE)
    if why:
        pytest.skip(f"the CUDA backend cannot run here: {why}")


def _inputs():
    """Small fp32 inputs for every op (fresh random values, no zeros)."""
    B, N, D, H, hd = 2, 17, 32, 2, 16
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    x = r(B, N, D)
    return dict(
        q=r(B, H, N, hd),
        k=r(B, H, N, hd),
        v=r(B, H, N, hd),
        x=x,
        qkv_w=r(3 * D, D) * 0.2,
        qkv_b=r(3 * D) * 0.1,
        ln_w=1 + 0.1 * r(D),
        ln_b=0.1 * r(D),
        w=r(D, D) * 0.2,
        b=r(D) * 0.1,
        ls=r(D),
        fc1_w=r(4 * D, D) * 0.2,
        fc1_b=r(4 * D) * 0.1,
        fc2_w=r(D, 4 * D) * 0.1,
        fc2_b=r(D) * 0.1,
        images=r(B, 3, 16, 16),
        pe_w=r(D, 3, 8, 8) * 0.1,
        pe_b=r(D) * 0.1,
        pos=r(1, 5, D),
        cls=r(1, 1, D),
    )


def _calls(t, backend):
    """op name -> a call of that op on ``backend``."""
    return {
        "flash_attention": lambda: vk.flash_attention(t["q"], t["k"], t["v"], backend=backend),
        "qkv_attention": lambda: vk.qkv_attention(
            t["x"], t["qkv_w"], t["qkv_b"], num_heads=2, norm_weight=t["ln_w"], norm_bias=t["ln_b"], backend=backend
        ),
        "linear": lambda: vk.linear(t["x"], t["w"], t["b"], residual=t["x"], layer_scale=t["ls"], backend=backend),
        "layernorm_gelu_mlp": lambda: vk.layernorm_gelu_mlp(
            t["x"],
            t["ln_w"],
            t["ln_b"],
            t["fc1_w"],
            t["fc1_b"],
            t["fc2_w"],
            t["fc2_b"],
            residual=t["x"],
            backend=backend,
        ),
        "patch_embed": lambda: vk.patch_embed(
            t["images"], t["pe_w"], t["pe_b"], patch_size=8, pos_embed=t["pos"], cls_token=t["cls"], backend=backend
        ),
    }


def _run_threads(jobs):
    """Run each job in its own thread, started together; re-raise the first failure."""
    errors = []
    start = threading.Barrier(len(jobs))

    def wrap(job):
        try:
            start.wait()
            job()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_ops_from_8_threads_x_100_calls_torch():
    t = _inputs()
    calls = _calls(t, "torch")
    want = {op: f() for op, f in calls.items()}
    seen = []

    def job():
        with record_decisions() as rec:
            for _ in range(CALLS["torch"]):
                for op, f in calls.items():
                    assert torch.equal(f(), want[op]), op
        seen.append(rec)

    _run_threads([job] * 8)
    assert len(seen) == 8
    for rec in seen:  # each thread saw exactly its own calls, every one on torch
        assert len(rec) == CALLS["torch"] * len(calls)
        assert all(d.backend == "torch" and d.requested == "torch" for d in rec)
    for op in calls:
        d = vk.last_decision(op)
        assert isinstance(d, Decision) and d.backend == "torch"


@pytest.mark.parametrize("threads_per_backend", [(3, 3, 2)])
def test_ops_from_8_threads_mixing_backends(threads_per_backend):
    """Threads on torch, the CUDA emulator and Triton's interpreter at once: every result equals the
    one-thread result of its backend, and each thread's decisions are its own (the interpreter is
    not thread-safe by itself: vit_kernels.triton serializes its launches)."""
    _cuda_or_skip()
    t = _inputs()
    ops = ("flash_attention", "qkv_attention", "linear", "layernorm_gelu_mlp", "patch_embed")
    backends = [b for b, n in zip(("torch", "cuda", "triton"), threads_per_backend) for _ in range(n)]
    want = {b: {op: f() for op, f in _calls(t, b).items() if op in ops} for b in set(backends)}
    seen = {}

    def job_for(i, backend):
        def job():
            calls = _calls(t, backend)
            with record_decisions() as rec:
                for _ in range(CALLS[backend]):
                    for op in ops:
                        out = calls[op]()
                        assert torch.equal(out, want[backend][op]), (backend, op)
            seen[i] = (backend, rec)

        return job

    _run_threads([job_for(i, b) for i, b in enumerate(backends)])
    assert len(seen) == len(backends)
    for backend, rec in seen.values():
        assert len(rec) == CALLS[backend] * len(ops)
        assert {d.backend for d in rec} == {backend}, (backend, {str(d) for d in rec})
    for op in ops:
        assert vk.last_decision(op).backend in set(backends)


@pytest.mark.parametrize("autocast", [False, True])
def test_one_fused_model_shared_by_8_threads(autocast):
    """Eight threads running one fused model (under autocast its wrappers cast the parameters to the
    autocast dtype on every call) get the one-thread result every time."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
    ).eval()
    vk.fuse(model, backend="torch")
    x = torch.randn(2, 3, 32, 32)

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    want = forward()

    def job():
        for _ in range(20):
            assert torch.equal(forward(), want)

    _run_threads([job] * 8)


def test_interpreter_probe_runs_once_for_8_threads():
    """Eight threads asking at once whether the interpreter mishandles bf16 share one probe launch."""
    if DEVICE.type != "cpu" or not vk.backends.interpreter_enabled():
        pytest.skip("the probe is for Triton's interpreter on CPU tensors")
    from vit_kernels.triton import interpreter

    interpreter._bf16_probe.cache_clear()
    answers = []
    _run_threads([lambda: answers.append(interpreter.bf16_flaw())] * 8)
    assert len(set(answers)) == 1 and len(answers) == 8
    assert interpreter._bf16_probe.cache_info().misses == 1


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_forward_is_bitwise_repeatable_over_10_runs(backend):
    if backend == "cuda":
        _cuda_or_skip()
    t = _inputs()
    for op, f in _calls(t, backend).items():
        first = f()
        assert not torch.isnan(first).any(), op
        for _ in range(9):
            assert torch.equal(f(), first), f"{op} on {backend}: a run differs from the first"
        assert vk.last_decision(op).backend == backend


# --------------------------------------------------------------------------------------- the JIT build
def test_threads_asking_for_the_emulator_build_it_once(monkeypatch):
    from vit_kernels import cuda as vk_cuda

    monkeypatch.setattr(vk_cuda, "_MODULES", {})
    monkeypatch.setattr(vk_cuda, "_FAILURES", {})
    builds = []

    def slow_build():
        builds.append(threading.get_ident())
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(vk_cuda, "_build_emulator", slow_build)
    modules = []
    _run_threads([lambda: modules.append(vk_cuda.emulator_module())] * 8)
    assert len(builds) == 1 and len(modules) == 8 and len({id(m) for m in modules}) == 1


_FAKE_BUILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from torch.utils import cpp_extension
    import vit_kernels.cuda as vk_cuda

    def fake_load(name, sources, build_directory, **kw):
        """Stands in for the compiler: 'builds' (slowly) when the library is missing."""
        so = Path(build_directory) / (name + ".so")
        if not so.exists():
            time.sleep(1.0)
            with open(Path(build_directory) / "builds.log", "a") as f:
                f.write(str(os.getpid()) + "\\n")
            so.write_text("built")
        return "module from " + so.name

    cpp_extension.load = fake_load
    print("ready", flush=True)
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.01)
    print(vk_cuda.build.jit_load("emulator", "vit_kernels_emulator", []))
''')


def _start_together(script, cache, n, extra_args=()):
    """n processes running ``script`` with VIT_KERNELS_CACHE=cache; released together once all
    have imported torch (they print 'ready' and wait for a file). Returns their CompletedProcess-like
    (returncode, stdout, stderr)."""
    env = dict(
        os.environ, VIT_KERNELS_CACHE=str(cache), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    go = cache.parent / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), *extra_args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.write_text("go")
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        out.append((p.returncode, stdout, stderr))
    return out


def test_processes_started_together_build_once_fake_compiler(tmp_path):
    """The file lock around the JIT build: two processes, one build, both load it."""
    cache = tmp_path / "cache"
    results = _start_together(_FAKE_BUILD, cache, 2)
    for rc, out, err in results:
        assert rc == 0 and "module from vit_kernels_emulator.so" in out, err
    (log,) = list(cache.glob("emulator-*/builds.log"))
    assert len(log.read_text().split()) == 1, log.read_text()
    # the one that builds says so before (what, about how long) and after (how long it took); no stdout noise
    told = [err for _, _, err in results if "vit_kernels: building the CUDA extension (host emulation" in err]
    assert len(told) == 1 and "1-3 min" in told[0], [err for _, _, err in results]
    assert "vit_kernels: built the CUDA extension (host emulation, for CPU tensors) in " in told[0], told[0]
    assert all(out.strip().splitlines()[-1].startswith("module from") for _, out, _ in results)


_REAL_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    print("ready", flush=True)
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.01)
    import vit_kernels.cuda as vk_cuda
    m = vk_cuda.emulator_module()
    print("loaded", m.__file__)
""")


@pytest.mark.slow
def test_processes_started_together_build_the_emulator_once(tmp_path):
    """Three processes build the host-emulation extension into one empty cache folder: every one
    loads it and each object file was compiled once (ninja's log has one line per output)."""
    if vk.backends.cuda_unavailable(torch.device("cpu")) is not None:
        pytest.skip("the emulator cannot be built here")
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    results = _start_together(_REAL_BUILD, cache, 3)
    for rc, out, err in results:
        assert rc == 0 and "loaded" in out, err
    (log,) = list(cache.glob("emulator-*/.ninja_log"))
    outputs = [line.split("\t")[3] for line in log.read_text().splitlines() if not line.startswith("#")]
    assert outputs and len(outputs) == len(set(outputs)), outputs
    print(f"3 processes, one build: {time.perf_counter() - t0:.0f} s")
