"""The tuner's correctness check (vit_kernels.tuning.check_plan): its float64 memory is bounded at any
batch (the oracle and the torch baseline see only the first and the last entries of dim 0 once the
whole call would take more than the budget), a candidate wrong only in the first or only in the last
sample is still dropped, and an out-of-memory error in a candidate's run, check or timing drops that
candidate with the reason and the tuner goes on. Fake timers and fake candidates (each one the torch
path's output, possibly corrupted) keep it fast; the oracle and the torch path are the real ones."""

import importlib
import io
import json
import logging
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vit_kernels as vk
from vit_kernels import testing, tuning
from vit_kernels.backends import Decision
from vit_kernels.tuning import CHECK_BYTES, Candidate, check_plan

from conftest import DEVICE  # noqa: E402
from test_tuning import FakeTimer, linear_args, make_tuner

MODULES = {
    "linear": "linear",
    "linear_2d": "linear",
    "layernorm_gelu_mlp": "mlp",
    "qkv_attention": "qkv_attention",
    "flash_attention": "flash_attention",
    "patch_embed": "patch_embed",
}
OPS = list(MODULES)
TORCH = Candidate("torch")
GOOD, WRONG_FIRST, WRONG_LAST = (Candidate("triton", p) for p in ("good", "wrong_first", "wrong_last"))


def op_args(case, n, dtype=torch.float32):
    """The run arguments of one op call (as the op passes them to the tuner) with n entries in dim 0."""

    def g(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    if case == "linear":
        return (g(n, 5, 16), g(24, 16) * 0.25, g(24), g(n, 5, 24), g(24))
    if case == "linear_2d":  # rows
        return (g(n, 16), g(24, 16) * 0.25, g(24), g(n, 24), None)
    if case == "layernorm_gelu_mlp":
        ln = (1 + 0.1 * g(16), 0.1 * g(16))
        return (g(n, 5, 16), *ln, g(64, 16) * 0.25, g(64), g(16, 64) * 0.125, g(16), g(n, 5, 16), g(16), 1e-6, "none")
    if case == "qkv_attention":  # 4 heads of 4
        return (g(n, 6, 16), g(48, 16) * 0.25, g(48), 1 + 0.1 * g(16), 0.1 * g(16), 4, 0.5, 1e-6, None)
    if case == "flash_attention":
        return (g(n, 4, 6, 8), g(n, 4, 7, 8), g(n, 4, 7, 8), 8**-0.5)
    if case == "patch_embed":
        return (g(n, 3, 8, 8), g(16, 3, 4, 4) * 0.2, g(16), g(1, 5, 16), g(1, 1, 16), 4, None)
    raise ValueError(case)


def op_name(case):
    return "linear" if case == "linear_2d" else case


def launcher(case):
    return importlib.import_module(f"vit_kernels.ops.{MODULES[case]}")._launch


class Runs:
    """The run function the tuner gets: torch and the oracle really run; candidate "triton:good" is
    the torch path's output, "triton:wrong_first" / "triton:wrong_last" that output with its first /
    last element off by 1 (first / last entry of dim 0, and head for attention); records the size of
    dim 0 (and the heads, for attention) each run saw, and the output's shape."""

    def __init__(self, case, fail=None):
        self.case = case
        self.launch = launcher(case)
        self.seen = []  # (backend, dim-0 size of the first argument[, heads])
        self.fail = fail or {}  # candidate path -> exception its run raises
        self.out_shape = None

    def __call__(self, d, *args):
        heads = {"qkv_attention": lambda: args[5], "flash_attention": lambda: args[0].shape[1]}.get(self.case)
        self.seen.append((d.backend, args[0].shape[0]) + ((heads(),) if heads else ()))
        if d.path in self.fail:
            raise self.fail[d.path]
        if d.backend != "triton":
            return self.launch(d, *args)
        out = self.launch(Decision(d.op, "torch", "auto"), *args).clone()
        self.out_shape = tuple(out.shape)
        if d.path == "wrong_first":
            out.view(-1)[0] += 1.0
        elif d.path == "wrong_last":
            out.view(-1)[-1] += 1.0  # the last element: the last partial tile of the last sample
        return out


def tuned(case, n, check_bytes, cands=(TORCH, GOOD, WRONG_FIRST, WRONG_LAST), timer=None, fail=None):
    runs = Runs(case, fail)
    t = make_tuner(timer or FakeTimer({"triton:wrong_first": 0.1, "triton:wrong_last": 0.1, "triton:good": 0.5}))
    t.check_bytes = check_bytes
    entry = t.tune_signature(op_name(case), "sig", list(cands), runs, op_args(case, n))
    return entry, runs, {r.candidate: r for r in entry.results}


@pytest.mark.parametrize("case", OPS)
def test_a_large_call_is_checked_on_its_first_and_last_entries_and_a_wrong_end_is_dropped(case):
    """Above the budget the oracle and the torch baseline see the first and the last entry only (2 of
    12, on the draw as on the call's inputs; for attention also the first and the last head only, 2
    of 4); a candidate wrong only in its first, or only in its last element is still dropped, with the
    index of the wrong element in the call (not in the checked part); a right one wins."""
    n = 12
    entry, runs, res = tuned(case, n, check_bytes=1)  # 1 byte: keep = 1 (and keep_heads = 1)
    attention = case in ("qkv_attention", "flash_attention")
    checked = [s for s in runs.seen if s[0] == "reference"]  # the draw's oracle, then the call's
    assert checked == 2 * [("reference", 2, 2) if attention else ("reference", 2)]
    assert {s[1:] for s in runs.seen if s[0] == "triton"} == {(n, 4) if attention else (n,)}  # the whole call
    first, last = res[WRONG_FIRST], res[WRONG_LAST]
    assert first.ms is None and "disagrees with the oracle" in first.dropped
    assert last.ms is None and "disagrees with the oracle" in last.dropped
    assert f"at index {(0,) * len(runs.out_shape)} " in first.dropped
    assert f"at index {tuple(s - 1 for s in runs.out_shape)} " in last.dropped
    assert f"(checked on entries 0 and {n - 1} of {n} along dim 0{', heads 0 and 3 of 4' if attention else ''})" in (
        last.dropped
    )
    assert res[GOOD].ms == 0.5 and entry.winner == GOOD and not entry.short_of_memory


@pytest.mark.parametrize("case", ["linear", "qkv_attention"])
def test_a_small_call_is_checked_whole(case):
    """Under the budget the oracle sees the whole call (a candidate wrong in a middle entry is dropped)."""
    n = 5
    middle = Candidate("triton", "wrong_middle")
    runs = Runs(case)
    real = runs.__call__

    def run(d, *args):
        if d.path != "wrong_middle":
            return real(d, *args)
        out = real(Decision(d.op, "torch", "auto"), *args).clone()
        out[n // 2].view(-1)[0] += 1.0
        return out

    t = make_tuner(FakeTimer())
    entry = t.tune_signature(op_name(case), "sig", [TORCH, middle], run, op_args(case, n))
    assert check_plan(op_name(case), op_args(case, n)).keep == 0
    assert runs.seen[0][:2] == ("reference", n) and runs.seen[0][2:] in ((), (4,))
    assert entry.results[1].ms is None and f"at index ({n // 2}," in entry.results[1].dropped


def test_keep_is_as_many_entries_as_fit_the_budget():
    """keep = the most entries at each end that fit the budget (at least one); the whole call once they
    would cover it; the slice is entries [0, keep) and [n - keep, n) in order."""
    args = op_args("linear", 20)
    whole = check_plan("linear", args, budget=1 << 40)
    per = whole.full_bytes - check_plan("linear", op_args("linear", 19), budget=1 << 40).full_bytes
    fixed = whole.full_bytes - 20 * per
    for budget, keep in ((1, 1), (fixed + 2 * per, 1), (fixed + 6 * per + 1, 3), (fixed + 20 * per, 0)):
        plan = check_plan("linear", args, budget=budget)
        assert plan.keep == keep, (budget, plan)
        assert plan.bytes == (fixed + 2 * keep * per if keep else whole.full_bytes)
    plan = check_plan("linear", args, budget=fixed + 6 * per)
    assert plan.take(torch.arange(20)).tolist() == [0, 1, 2, 17, 18, 19]
    assert [plan.where((i, 4, 7)) for i in range(6)] == [(e, 4, 7) for e in (0, 1, 2, 17, 18, 19)]
    assert str(plan).startswith("entries 0-2 and 17-19 of 20 along dim 0")


def vit_b16_args(op, batch=256, dtype=torch.bfloat16):
    """Run arguments of the ViT-B/16 call of ``op`` at ``batch`` (meta tensors: no memory)."""
    B, N, C, H, hidden = batch, 197, 768, 12, 3072

    def m(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x = m(B, N, C)
    return {
        "qkv_attention": (x, m(3 * C, C), m(3 * C), m(C), m(C), H, 64**-0.5, 1e-6, None),
        "linear": (x, m(C, C), m(C), x, m(C)),
        "layernorm_gelu_mlp": (x, m(C), m(C), m(hidden, C), m(hidden), m(C, hidden), m(C), x, m(C), 1e-6, "none"),
        "flash_attention": (m(B, H, N, 64), m(B, H, N, 64), m(B, H, N, 64), None),
        "patch_embed": (m(B, 3, 224, 224), m(C, 3, 16, 16), m(C), m(1, N, C), m(1, 1, C), 16, None),
    }[op]


@pytest.mark.parametrize("op", ["qkv_attention", "linear", "layernorm_gelu_mlp", "flash_attention", "patch_embed"])
def test_vit_b16_batch_256_check_fits_the_budget(op):
    """ViT-B/16 bf16 at batch 256: the whole call's check would take GBs of float64 (the H200 run:
    about 6 GB during tuning); the plan's takes at most CHECK_BYTES and covers both ends of the batch."""
    plan = check_plan(op, vit_b16_args(op))
    assert plan.full_bytes > 4 * CHECK_BYTES
    assert 1 <= plan.keep < 128 and plan.bytes <= CHECK_BYTES
    ends = plan.take(torch.arange(256)).tolist()
    assert ends[0] == 0 and ends[-1] == 255 and len(ends) == 2 * plan.keep
    assert check_plan(op, vit_b16_args(op, batch=1)).keep == 0


def long_sequence_args(op, batch, tokens, dtype=torch.bfloat16):
    """ViT-B's attention (12 heads of 64) over ``tokens`` tokens (meta tensors)."""

    def m(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    if op == "qkv_attention":
        return (m(batch, tokens, 768), m(3 * 768, 768), m(3 * 768), m(768), m(768), 12, 0.125, 1e-6, None)
    return (m(batch, 12, tokens, 64), m(batch, 12, tokens, 64), m(batch, 12, tokens, 64), 0.125)


@pytest.mark.parametrize("op", ["qkv_attention", "flash_attention"])
def test_attention_over_long_sequences_is_checked_on_its_first_and_last_heads(op):
    """When one sample's scores alone are too big (1370 tokens: DINOv2 at 518 px; 4097: 1024 px at
    patch 16), the check keeps the first and the last heads too: two samples (or the only one) of two
    heads, not two samples of twelve."""
    plan = check_plan(op, long_sequence_args(op, 64, 1370))
    assert (plan.keep, plan.heads, plan.keep_heads) == (1, 12, 1)
    assert plan.bytes <= 1.1 * CHECK_BYTES and plan.full_bytes > 30 * plan.bytes
    assert plan.covers == "entries 0 and 63 of 64 along dim 0, heads 0 and 11 of 12"
    one = check_plan(op, long_sequence_args(op, 1, 4097))
    assert (one.keep, one.keep_heads) == (0, 1) and one.full_bytes > 5 * one.bytes
    assert one.covers == "the only entry of dim 0, heads 0 and 11 of 12"


def test_heads_are_cut_from_the_weights_and_the_output_consistently():
    """qkv_attention cut to heads 0 and 3 of 4 is the call on those heads: the oracle on the cut
    inputs equals the same columns of the oracle on the whole call; flash_attention the same on dim 1."""
    for case in ("qkv_attention", "flash_attention"):
        args = op_args(case, 3, dtype=torch.float64)
        plan = check_plan(case, args, budget=1)
        assert (plan.keep, plan.keep_heads) == (1, 1)
        launch = launcher(case)
        whole = launch(Decision(case, "reference", "auto"), *args)
        cut = launch(Decision(case, "reference", "auto"), *plan.inputs(args))
        torch.testing.assert_close(cut, plan.take(whole), rtol=1e-12, atol=1e-12)
        last = tuple(s - 1 for s in cut.shape)
        assert plan.where(last) == tuple(s - 1 for s in whole.shape)
    assert plan.where((1, 1, 5, 7)) == (2, 3, 5, 7) and plan.where((0, 0, 1, 2)) == (0, 0, 1, 2)  # flash_attention


class PeakBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among the storages made inside the block."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()

    def _freed(self, key, nbytes):
        self.now -= nbytes
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self.live:
                    self.live.add(key)
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self._freed, key, s.nbytes())
        return out


@pytest.mark.parametrize("case", OPS)
@pytest.mark.parametrize("check_bytes", [1, CHECK_BYTES], ids=["sliced", "whole"])
def test_the_estimate_bounds_the_checks_measured_memory(case, check_bytes):
    """The plan's bytes bound what the check really allocates (the slices, their float64 copies, the
    oracle's intermediates and output, the comparison's copies), measured by tracking every storage
    made, and are not far above it (at most 3x): the stated bound is the real one."""
    op, launch = op_name(case), launcher(case)
    args = op_args(case, 12)
    plan = check_plan(op, args, budget=check_bytes)
    assert (plan.keep == 1) == (check_bytes == 1)
    out = launch(Decision(op, "torch", "auto"), *args)
    baseline = launch(Decision(op, "torch", "auto"), *args)
    with PeakBytes() as m:
        oracle = launch(Decision(op, "reference", "auto"), *[tuning._f64(a) for a in plan.inputs(args)])
        testing.compare(plan.take(out), oracle, plan.take(baseline))
        del oracle
    assert m.peak <= plan.bytes <= 3 * m.peak, (m.peak, plan)


def test_out_of_memory_in_a_run_the_check_or_the_timer_drops_that_candidate_and_goes_on(monkeypatch, caplog):
    """Each stage's out-of-memory drops its candidate with the reason (and a warning); the others compete."""
    run_oom, check_oom, timer_oom = (Candidate("triton", p) for p in ("oom_run", "oom_check", "oom_timer"))
    real_compare = testing.compare

    def compare(out, oracle, baseline=None, *, name="output", **kw):
        if name == check_oom.name:
            raise RuntimeError("CUDA error: out of memory")
        return real_compare(out, oracle, baseline, name=name, **kw)

    class Timer(FakeTimer):
        def __call__(self, candidate, fn):
            if candidate == timer_oom:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
            return super().__call__(candidate, fn)

    monkeypatch.setattr(testing, "compare", compare)
    fail = {"oom_run": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")}
    cands = (TORCH, run_oom, check_oom, timer_oom, GOOD)
    with caplog.at_level(logging.WARNING, logger="vit_kernels"):
        entry, runs, res = tuned("linear", 12, CHECK_BYTES, cands, Timer({"triton:good": 0.5}), fail)
    assert res[run_oom].dropped == "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
    assert res[check_oom].dropped == "out of memory: RuntimeError: CUDA error: out of memory"
    assert res[timer_oom].dropped.startswith("out of memory: OutOfMemoryError: CUDA out of memory. Tried")
    assert entry.winner == GOOD and res[TORCH].ms == 1.0 and res[GOOD].ms == 0.5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all("out of memory" in w for w in warned)


def test_a_candidate_out_of_memory_shows_in_the_report_and_the_decision(monkeypatch, tmp_path):
    """Through the op: the CUDA candidate runs out of memory, Triton wins; the table and the
    Decision's reasons say why cuda was dropped; the choice is not cached in the file (another
    process, with more free memory, tunes again)."""
    linear_op = importlib.import_module("vit_kernels.ops.linear")
    real = linear_op._launch

    def launch(d, *args):
        if d.backend == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(d, *args)

    monkeypatch.setattr(linear_op, "_launch", launch)

    def cands(op, facts, available, device_type):
        return [TORCH, Candidate("triton"), Candidate("cuda")]

    x, w, b, r = linear_args()
    path = str(tmp_path / "tuning.json")
    first = FakeTimer({"triton": 0.5})
    with tuning.use_tuner(make_tuner(first, path=path, candidate_list=cands)):
        vk.linear(x, w, b, residual=r)
        vk.linear(x, w, b, residual=r)  # the choice is kept for the process: nothing timed again
        report = io.StringIO()
        tuning.tune_report(file=report)
    d = vk.last_decision("linear")
    assert d.backend == "triton" and first.calls == ["torch", "triton"]
    assert d.reasons["cuda"] == (
        "dropped when tuned: cuda: out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert "dropped: out of memory: OutOfMemoryError" in report.getvalue()
    assert json.load(open(path))["entries"] == {}
    again = FakeTimer()
    with tuning.use_tuner(make_tuner(again, path=path, candidate_list=cands)):
        vk.linear(x, w, b, residual=r)
    assert again.calls == ["torch", "triton"]


def test_torch_baseline_out_of_memory_keeps_only_the_torch_path(caplog):
    """Without the baseline no candidate can be checked: none but torch is kept, each says why."""
    torch_oom = RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
    runs = Runs("linear")

    def run(d, *args):
        if d.backend == "torch":
            raise torch_oom
        return runs(d, *args)

    with caplog.at_level(logging.WARNING, logger="vit_kernels"):
        entry = make_tuner(FakeTimer()).tune_signature("linear", "sig", [TORCH, GOOD], run, op_args("linear", 4))
    res = {r.candidate: r for r in entry.results}
    assert entry.winner == TORCH and res[TORCH].dropped.startswith("out of memory: RuntimeError")
    assert res[GOOD].ms is None and res[GOOD].dropped.startswith("not checked: the torch path")
    assert entry.short_of_memory  # never written to the cache file
    assert any("only the torch path competes" in r.getMessage() for r in caplog.records)


def test_out_of_memory_is_told_from_other_errors():
    assert tuning.out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert tuning.out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert tuning.out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"))
    assert not tuning.out_of_memory(RuntimeError("misaligned address"))
    assert not tuning.out_of_memory(ValueError("out of memory"))


def test_a_model_tuned_at_a_small_budget_checks_its_real_kernels_on_both_ends():
    """vk.tune with the real candidates (the Triton paths in the interpreter, the torch path) and a
    1-byte budget: every op's oracle sees samples 0 and 2 of 3 only (attention: heads 0 and 3 of 4),
    and no right kernel is dropped by the cut (each one's slice is compared with the right entries)."""
    from vit_kernels.models import VisionTransformer
    from test_tuning import VERSIONS, paths_only

    seen = []

    class Recording(tuning.Tuner):
        def tune_signature(self, op, sig, cands, run, args):
            def recorded(d, *a):
                heads = a[5] if op == "qkv_attention" else None
                seen.append((op, d.backend, a[0].shape[0], heads))
                return run(d, *a)

            return super().tune_signature(op, sig, cands, recorded, args)

    model = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4, num_classes=10, backend="auto"
    ).eval()
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    tuner = Recording(
        timer=FakeTimer({"model:fused": 1.0, "model:unfused": 2.0}),
        tunable=lambda device: None,
        device_facts=lambda device: ("fake-gpu", 90),
        versions=VERSIONS,
        path=None,
        candidate_list=paths_only,
        check_bytes=1,
    )
    with tuning.use_tuner(tuner):
        result = vk.tune(model, images)
    assert {e.op for e in result.entries} == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}
    for e in result.entries:
        assert all(r.ms is not None for r in e.results), e.table()
        assert any(r.candidate.backend == "triton" for r in e.results), e.table()
    checked = {(op, n, heads) for op, backend, n, heads in seen if backend == "reference"}
    assert checked == {("patch_embed", 2, None), ("qkv_attention", 2, 2), ("linear", 2, None),
                       ("layernorm_gelu_mlp", 2, None)}  # fmt: skip
    assert {n for op, backend, n, _ in seen if backend == "triton"} == {3}
