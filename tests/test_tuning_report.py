"""The tuned model's reports and memory (defects of the 2026-11-26 H200 bench run): each fused part
reports its current decision once, measured; nothing the tuner made stays alive after tuning; the
bench's peak memory is the steady-state step's for every provider; the tuning table shows a short
signature with its candidates grouped under it. Fake timers (see tests/test_tuning.py)."""

import gc
import weakref

import torch

import vit_kernels as vk
from vit_kernels import backends, tuning

from conftest import DEVICE  # noqa: E402
from test_tuning import FakeTimer, make_tuner, paths_only, tiny_vit, tma_only


class RepeatingTimer(FakeTimer):
    """A fake timer that runs the candidate several times, as a real one does (warm-up, repeats)."""

    def __init__(self, ms=None, repeats=4):
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
        with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
            row, step, _ = tp.prepare("vit_tiny_patch16_224", provider, "inference", cfg)
        assert events[-2:] == ["forward", "start peak"] and events.count("start peak") == 1, events
        step()
        assert events[-1] == "forward"  # the timed steps run inside the window
        if provider == "tuned":
            assert "timed model:unfused" in events and "timed torch" in events
