"""The tuned model's reports and memory (defects of the 2026-11-26 H200 bench run): each fused part
reports its current decision once, measured; nothing the tuner made stays alive after tuning; the
bench's peak memory is the steady-state step's for every provider; the tuning table shows a short
signature with its candidates grouped under it. Fake timers (see tests/test_tuning.py)."""

import gc
import io
import re
import weakref

import pytest
import torch

import vit_kernels as vk
from vit_kernels import backends, tuning
from vit_kernels.tuning import Candidate

from conftest import DEVICE  # noqa: E402
from test_tuning import FakeTimer, linear_args, make_tuner, paths_only, tiny_vit, tma_only


class RepeatingTimer(FakeTimer):
    """A fake timer that runs the candidate several times, as a real one does (warm-up, repeats)."""

    def __init__(self, ms=None, repeats=3):
        super().__init__(ms)
        self.repeats = repeats

    def __call__(self, candidate, fn):
        for _ in range(self.repeats - 1):
            fn()
        return super().__call__(candidate, fn)


def test_each_part_reports_its_measured_decision_once():
    """Block 0 (the first to meet each signature, so the one that tunes) reports one measured decision
    per op call, as block 1 (a cache hit) does: the candidates' own runs while tuning are not recorded."""
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    timer = RepeatingTimer({"torch": 0.1, "model:fused": 1.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        with backends.record_decisions() as calls:
            result = vk.tune(model, images)
    for block in ("blocks.0", "blocks.1"):
        ds = result.parts[f"{block}.attn"]
        assert [d.op for d in ds] == ["qkv_attention", "linear"], ds
        assert all(d.tuned is not None for d in ds), ds
        assert [d.op for d in result.parts[f"{block}.mlp"]] == ["layernorm_gelu_mlp"]
    assert [(d.op, d.backend, d.path) for d in result.parts["blocks.0.attn"]] == [
        (d.op, d.backend, d.path) for d in result.parts["blocks.1.attn"]
    ]
    lines = str(result).splitlines()
    b0 = next(line for line in lines if line.strip().startswith("blocks.0.attn:"))
    b1 = next(line for line in lines if line.strip().startswith("blocks.1.attn:"))
    assert b0.replace("blocks.0", "blocks.1") == b1 and "untimed" not in b0, b0
    assert b0.count("qkv_attention") == 1, b0
    # the caller's own recording sees the model's op calls, not the candidates' runs
    assert len(calls) == 1 + 2 * (2 + 1), [str(d) for d in calls]  # patch_embed, 2 blocks x (qkv, linear, mlp)
    report = str(vk.fuse_report(model))
    assert report.count("tuned: qkv_attention") == 2, report


def live_tensors():
    """id -> weak reference of every tensor the garbage collector can reach (after a collection)."""
    gc.collect()
    return {id(o): weakref.ref(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def test_tuning_keeps_no_tensor_alive():
    """After vk.tune nothing the tuner made (the float64 oracle's inputs and output, the torch
    path's reference output, each candidate's output, the guard's forwards) is still referenced:
    the memory a tuned model holds is what its plain forward holds."""
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    timer = RepeatingTimer({"torch": 0.1, "model:fused": 1.0, "model:unfused": 2.0}, repeats=2)
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        with torch.no_grad():
            model(images)  # the model's own caches (position embeddings per size), made before the census
        before = live_tensors()
        result = vk.tune(model, images)
        with tuning.mode("cache-only"), torch.no_grad():
            model(images)  # the steady state: the tuned choices and launch plans in use
        after = live_tensors()
    assert result.entries and timer.calls
    assert_none_new(before, after)


def assert_none_new(before, after, keep=()):
    """No tensor in ``after`` that was not in ``before``, besides those in ``keep``."""
    new = [r() for i, r in after.items() if i not in before or before[i]() is not r()]
    new = [t for t in new if t is not None and not any(t is k for k in keep)]
    assert not new, [(tuple(t.shape), t.dtype, [type(o).__name__ for o in gc.get_referrers(t)]) for t in new]


def test_a_losing_tma_candidate_keeps_no_folded_weights():
    """The TMA GEMM folds LayerNorm into the weights once per parameter set (gemm_tma's cache); when
    the tuner times it and torch wins, the folded copies made for the timing are dropped."""
    dtype = torch.float16
    x = torch.randn(1, 16, 32, device=DEVICE).to(dtype)
    nw = (1 + 0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    nb = (0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    w1 = (torch.randn(128, 32, device=DEVICE) * 32**-0.5).to(dtype)
    b1 = torch.randn(128, device=DEVICE).to(dtype)
    w2 = (torch.randn(32, 128, device=DEVICE) * 128**-0.5).to(dtype)
    b2 = torch.randn(32, device=DEVICE).to(dtype)
    timer = FakeTimer({"torch": 0.1})
    with tuning.use_tuner(make_tuner(timer, candidate_list=tma_only)):
        before = live_tensors()
        out = vk.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x)
        after = live_tensors()
    assert vk.last_decision("layernorm_gelu_mlp").backend == "torch"
    assert any("tma" in c for c in timer.calls), timer.calls
    assert_none_new(before, after, keep=(out,))


def torch_only(op, facts, available, device_type):
    return [Candidate("torch")]


def test_bench_peak_memory_window_starts_after_tuning_and_the_first_step(monkeypatch):
    """The bench's peak-memory column is the steady-state step's for every provider: its window starts
    once the provider is ready (for `tuned`: after vk.tune timed every candidate and the guard, and
    after the first step), never over the tuning itself (the float64 oracle at batch 256 made the
    tuned row's peak 6081 MiB against sdpa's 1422 on the H200)."""
    from vit_kernels.bench import throughput as tp

    events = []
    monkeypatch.setattr(tp, "static_reason", lambda *a, **k: None)
    monkeypatch.setattr(tp, "start_peak_memory", lambda device: events.append("start peak"))
    build = tp.bmodels.build

    def build_and_watch(*args, **kwargs):  # every forward of the benchmarked model is an event
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda *_: events.append("forward"))
        return model

    monkeypatch.setattr(tp.bmodels, "build", build_and_watch)
    cfg = tp.BenchConfig(
        models=["vit_tiny_patch16_224"],
        providers=["tuned"],
        device=torch.device("cpu"),
        batch_size=1,
        img_size=32,
        depth=1,
        warmup=1,
        repeats=1,
    )

    class Timer(FakeTimer):
        def __call__(self, candidate, fn):
            events.append(f"timed {candidate.name}")
            return super().__call__(candidate, fn)

    timer = Timer({"torch": 0.1, "model:fused": 1.0, "model:unfused": 2.0})
    for provider in ("sdpa", "tuned"):
        events.clear()
        with tuning.use_tuner(make_tuner(timer, candidate_list=torch_only)):
            row, step, _ = tp.prepare("vit_tiny_patch16_224", provider, "inference", cfg)
        assert events[-2:] == ["forward", "start peak"] and events.count("start peak") == 1, events
        step()
        assert events[-1] == "forward"  # the timed steps run inside the window
        if provider == "tuned":
            assert "timed model:unfused" in events and "timed torch" in events


def tuned_linear(timer):
    """One linear call tuned with ``timer`` on a fresh tuner; returns (tuner, entry)."""
    x, w, b, r = linear_args()
    tuner = make_tuner(timer, candidate_list=paths_only)
    with tuning.use_tuner(tuner):
        vk.linear(x, w, b, residual=r)
    (entry,) = tuner.entries()
    return tuner, entry


def test_tune_report_shows_short_signatures_with_their_candidates_under_them():
    timer = FakeTimer({"torch": 0.5, "triton": 0.25})
    tuner, entry = tuned_linear(timer)
    assert entry.label == "linear 2x8x32 @ 48x32 fp32 +bias +residual"
    out = io.StringIO()
    with tuning.use_tuner(tuner):
        vk.tune_report(file=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "tuning table:" and lines[1].split() == [
        "op",
        "signature",
        "/",
        "candidate",
        "ms",
        "x",
        "torch",
        "result",
    ]
    assert lines[3] == entry.label  # the heading row: the short signature alone
    assert lines[4].split() == ["triton", "0.2500", "2.00x", "chosen"] and lines[4].startswith("  ")
    assert lines[5].split() == ["torch", "0.5000", "1.00x"]
    assert len(lines) == 6 and max(map(len, lines)) < 100, lines
    assert "|" not in out.getvalue()  # the full key is not printed ...
    assert entry.summary()["signature"] == entry.signature and "|extra=" in entry.signature  # ... it is in JSON
    assert entry.summary()["label"] == entry.label and entry.summary()["winner"]["backend"] == "triton"


def test_tune_report_on_a_terminal_is_a_rich_table():
    pytest.importorskip("rich")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tuner, entry = tuned_linear(FakeTimer({"triton": 0.25}))
    out = Terminal()
    with tuning.use_tuner(tuner):
        vk.tune_report(file=out)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # rich's styles
    assert "─" in text and entry.label in text and "|" not in text, text
    rows = [line.split() for line in text.splitlines()]
    assert ["triton", "0.2500", "4.00x", "chosen"] in rows and ["torch", "1.0000", "1.00x"] in rows, text


def sig(op, extra, *tensors, device="GPU:sm_90"):
    return "|".join([op, f"extra={extra!r}", *tensors, device, "torch=2", "triton=3", "vit_kernels=0"])


def test_short_signatures():
    bf = ":bfloat16:contiguous"
    assert (
        tuning.short_signature(
            sig(
                "qkv_attention", (12, None), "(8, 197, 768)" + bf, "(2304, 768)" + bf, "-", "(768,)" + bf, "(768,)" + bf
            )
        )
        == "qkv_attention 8x197x768 @ 2304x768 bf16 12 heads +ln"
    )
    assert (
        tuning.short_signature(
            sig("qkv_attention", (3, "single_kernel"), "(1, 50, 192)" + bf, "(576, 192)" + bf, "(576,)" + bf, "-", "-")
        )
        == "qkv_attention 1x50x192 @ 576x192 bf16 3 heads path=single_kernel +bias"
    )
    qkv = "(2, 12, 197, 64):float16:contiguous"
    assert tuning.short_signature(sig("flash_attention", (), qkv, qkv, qkv)) == "flash_attention 2x12x197x64 fp16"
    assert (
        tuning.short_signature(
            sig(
                "patch_embed",
                (16,),
                "(4, 3, 224, 224):uint8:strided:150528,1,672,3",
                "(768, 3, 16, 16)" + bf,
                "(768,)" + bf,
                "-",
                "-",
            )
        )
        == "patch_embed 4x3x224x224 @ 768x3x16x16 uint8/bf16 +bias (images strided:150528,1,672,3)"
    )
    x = "(4, 197, 768)" + bf
    mlp = sig(
        "layernorm_gelu_mlp", ("tanh",), x, "-", "-", "(3072, 768)" + bf, "-", "(768, 3072)" + bf, "-", x, "(768,)" + bf
    )
    assert (
        tuning.short_signature(mlp) == "layernorm_gelu_mlp 4x197x768 @ 3072x768 @ 768x3072 bf16 gelu=tanh +residual +ls"
    )
    foreign = "some_op|" + "x" * 100
    assert tuning.short_signature(foreign) == foreign[:59] + "…"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_tuned_rows_peak_is_a_steady_state_forwards(tmp_path):
    """The bench's tuned row against its sdpa row: the same peak-memory window, so about the same peak
    (before the fix it held the tuning's float64 oracle: 6081 MiB against 1422 on the H200 at batch 256);
    and tuning leaves nothing allocated (nothing folded is cached)."""
    from vit_kernels.bench import throughput as tp

    cfg = tp.BenchConfig(
        models=["vit_small_patch16_224"],
        providers=["sdpa", "tuned"],
        device=torch.device("cuda"),
        batch_size=32,
        dtype=torch.bfloat16,
        depth=1,
        warmup=2,
        repeats=5,
        max_time_s=0.5,
    )
    with tuning.use_tuner(tuning.Tuner(path=str(tmp_path / "tuning.json"))) as tuner:
        rows = {p: tp.run_case("vit_small_patch16_224", p, "inference", cfg) for p in ("sdpa", "tuned")}
        assert all(r["status"] == "ok" for r in rows.values()), rows
        assert rows["tuned"]["peak_mem_mib"] <= 1.25 * rows["sdpa"]["peak_mem_mib"] + 64, rows

        model = vk.models.create_model("vit_small_patch16_224", depth=1).cuda().bfloat16().eval()
        images = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)  # signatures not tuned yet
        with torch.no_grad(), tuning.mode("off"):
            model(images)  # cuBLAS's workspace and the model's caches, before the count
        torch.cuda.synchronize()
        gc.collect()
        held = torch.cuda.memory_allocated()
        timed = tuner.timed
        vk.tune(model, images, fallback=False)
        assert tuner.timed > timed
        torch.cuda.synchronize()
        gc.collect()
        assert torch.cuda.memory_allocated() - held <= 2**20 * len(tuner.entries())  # nothing folded is kept
