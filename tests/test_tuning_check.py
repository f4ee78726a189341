"""The tuner's correctness check (vit_kernels.tuning.check_plan): its float64 memory is bounded at any
batch (the oracle and the torch baseline see only the first and the last entries of dim 0 once the
whole call would take more than the budget), a candidate wrong only in the first or only in the last
sample is still dropped, and an out-of-memory error in a candidate's run, check or timing drops that
candidate with the reason and the tuner goes on. The check also runs each candidate on a random draw
of the call's signature (tuning.draw): a candidate right only on the call's own values (zeros, alike
samples) is dropped there. Fake timers and fake candidates (each one the torch path's output, possibly
corrupted) keep it fast; the oracle and the torch path are the real ones."""

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
SAMPLE0, IGNORES_X = Candidate("triton", "sample0"), Candidate("triton", "ignores_x")


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
    last element off by 1 (first / last entry of dim 0, and head for attention), "triton:sample0" its
    sample 0 for every sample (a wrong batch stride), "triton:ignores_x" the torch path's output with
    the first argument zeroed (a GEMM whose K loop is broken); records the size of dim 0 (and the
    heads, for attention) each run saw, and the output's shape."""

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
        if d.path == "ignores_x":
            args = (torch.zeros_like(args[0]),) + args[1:]
        out = self.launch(Decision(d.op, "torch", "auto"), *args).clone()
        self.out_shape = tuple(out.shape)
        if d.path == "sample0":
            out = out[:1].expand_as(out).clone()
        elif d.path == "wrong_first":
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


# ---------------------------------------------------------------------------------------------
# The random draw of the call's signature: a check on the call's own values alone can be vacuous


def alike_args(case, n, inputs):
    """op_args with the samples of every batched argument alike: all zeros ("zeros"), or each a copy
    of sample 0 ("alike"); the weights as they are."""
    batched = tuning.BATCHED_ARGS[op_name(case)]

    def alike(a):
        return torch.zeros_like(a) if inputs == "zeros" else a[:1].repeat(n, *[1] * (a.dim() - 1))

    return tuple(alike(a) if i in batched and a is not None else a for i, a in enumerate(op_args(case, n)))


@pytest.mark.parametrize("inputs", ["zeros", "alike"])
@pytest.mark.parametrize("case", OPS)
def test_a_candidate_right_only_on_the_calls_own_values_is_dropped_on_the_draw(case, inputs):
    """vk.tune(model, torch.zeros(...)), or a batch of alike samples, cannot tell a wrong candidate from
    a right one: "triton:sample0" (a wrong batch stride) is right on both, "triton:ignores_x" (a broken
    K loop) on zeros. The fastest though they are, each is dropped for disagreeing with the oracle on
    the random draw of the call's signature, and the right candidate wins; a candidate wrong on the
    call's own inputs too is dropped for that."""
    runs = Runs(case)
    timer = FakeTimer({SAMPLE0.name: 0.1, IGNORES_X.name: 0.1, GOOD.name: 0.5})
    cands = [TORCH, SAMPLE0, IGNORES_X, GOOD]
    entry = make_tuner(timer).tune_signature(op_name(case), "sig", cands, runs, alike_args(case, 3, inputs))
    res = {r.candidate: r for r in entry.results}
    rule = "disagrees with the oracle beyond the tolerance rule"
    drawn = f"{rule} on a random draw of the call's signature, not on the call's own inputs: "
    assert res[SAMPLE0].ms is None and res[SAMPLE0].dropped.startswith(drawn + SAMPLE0.name), res[SAMPLE0]
    ignores_x = drawn if inputs == "zeros" else f"{rule}: "
    assert res[IGNORES_X].ms is None and res[IGNORES_X].dropped.startswith(ignores_x + IGNORES_X.name)
    assert entry.winner == GOOD and res[GOOD].ms == 0.5 and res[TORCH].ms == 1.0
    assert sorted(timer.calls) == ["torch", "triton:good"]


def odd_linear_args(dtype):
    """linear's run arguments (3 samples) in odd layouts: x at a storage offset of one element (so
    data_ptr() % 16 != 0), the weight transposed, the bias expanded (stride 0), the residual expanded
    over the batch (stride 0: every sample alike)."""

    def g(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    x = g(3 * 5 * 16 + 1)[1:].view(3, 5, 16)
    return (x, (g(16, 24) * 0.25).t(), g(1).expand(24), g(1, 5, 24).expand(3, 5, 24), g(24))


def signature_of(args):
    return [
        (a.shape, a.stride(), a.storage_offset(), a.data_ptr() & 15, a.dtype, a.device)
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_draw_has_the_calls_signature_new_values_and_is_freed_before_the_calls_check(dtype):
    """A candidate runs on a draw of the call's signature: each tensor argument of the same shape,
    strides (a transposed weight, expanded stride-0 views), storage offset and data_ptr() % 16, dtype
    and device, over a new storage of its own just big enough for its view, with new values (each
    sample its own, where the layout lets it); the other arguments as they are. The drawn tensors are
    freed before the call's own oracle runs."""
    args = odd_linear_args(dtype)
    assert args[0].data_ptr() & 15 and args[2].stride() == (0,) and args[3].stride()[0] == 0
    runs = Runs("linear")
    drawn, alive = [], []  # the draw's arguments (weak references); drawn ones alive at each oracle run

    def run(d, *a):
        if d.backend == "reference":
            alive.append(sum(r() is not None for r in drawn))
        if d.path == "good" and a[0] is not args[0]:
            assert signature_of(a) == signature_of(args)
            storages = {t.untyped_storage().data_ptr() for t in a + args if t is not None}
            assert len(storages) == 2 * len(args)  # each drawn tensor over a new storage of its own
            for t, c in zip(a, args):
                reach = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
                assert t.untyped_storage().nbytes() == reach * t.element_size()
                assert not torch.equal(t, c)
            assert not torch.equal(a[0][0], a[0][2])  # the samples differ (x is not expanded)
            drawn.extend(weakref.ref(t) for t in a)
        return runs(d, *a)

    entry = make_tuner(FakeTimer()).tune_signature("linear", "sig", [TORCH, GOOD], run, args)
    assert len(drawn) == len(args) and alive == [0, 0]  # the draw's oracle, the call's: the draw freed
    assert entry.winner in (TORCH, GOOD) and all(r.ms is not None for r in entry.results)


def test_a_right_candidate_still_wins_timed_on_the_calls_own_inputs():
    """A right candidate passes both checks and wins as before; what the timer times runs on the
    call's own tensors (the draw is for the check only)."""
    args = odd_linear_args(torch.float32)
    runs = Runs("linear")
    timing, timed = [], []

    def run(d, *a):
        if timing:
            timed.append((d.backend, all(x is y for x, y in zip(a, args))))
        return runs(d, *a)

    class Timer(FakeTimer):
        def __call__(self, candidate, fn):
            timing.append(candidate)
            try:
                return super().__call__(candidate, fn)
            finally:
                timing.clear()

    entry = make_tuner(Timer({GOOD.name: 0.5})).tune_signature("linear", "sig", [TORCH, GOOD], run, args)
    assert entry.winner == GOOD and [r.ms for r in entry.results] == [1.0, 0.5]
    assert timed == [("torch", True), ("triton", True)]
    draw_check, own_check = ["reference", "torch", "triton"], ["reference", "torch"]  # oracle, baseline, candidates
    assert [s[0] for s in runs.seen] == draw_check + own_check + ["torch", "torch", "triton", "triton"]  # run, time


def test_draw_values_follow_the_calls_scale_and_the_signature_seeds_them():
    """uint8 images: uniform over 0..255. A floating tensor: normal at its own root mean square over its
    finite values; where that is 0 (all zeros; no finite value) a GEMM weight at 1 / sqrt(fan-in), any
    other tensor at 1. The pixel norm (non-tensor arguments) as it is. The same signature draws the same
    values, another signature others; torch's global generator is left alone."""
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8, device=DEVICE)
    pos = 3 * torch.randn(1, 17, 32, device=DEVICE)
    pos[0, 1, 2] = float("inf")
    cls = torch.full((1, 1, 32), float("nan"), device=DEVICE)
    norm = (torch.rand(3, device=DEVICE), 0.5 + torch.rand(3, device=DEVICE))
    args = (images, torch.zeros(32, 3, 4, 4, device=DEVICE), torch.zeros(32, device=DEVICE), pos, cls, 4, norm)
    rng = torch.get_rng_state()
    a = tuning.draw("patch_embed", "sig", args)
    assert torch.equal(torch.get_rng_state(), rng)  # the draw's own generator
    assert a[5] == 4 and a[6] is norm
    assert a[0].dtype == torch.uint8 and (a[0].min(), a[0].max()) == (0, 255) and not torch.equal(a[0][0], a[0][1])

    def rms(t):
        return t.double().square().mean().sqrt().item()

    assert rms(a[1]) == pytest.approx(48**-0.5, rel=0.1)  # the weight's fan-in: 3 x 4 x 4
    assert rms(a[2]) == pytest.approx(1, rel=0.5) and rms(a[4]) == pytest.approx(1, rel=0.5)
    assert rms(a[3]) == pytest.approx(rms(pos[pos.isfinite()]), rel=0.15)
    assert all(t.isfinite().all() for t in a[:5])
    again, other = tuning.draw("patch_embed", "sig", args), tuning.draw("patch_embed", "sig2", args)
    assert all(torch.equal(x, y) for x, y in zip(a[:5], again[:5]))
    assert not any(torch.equal(x, y) for x, y in zip(a[:5], other[:5]))


def test_the_draw_of_an_all_zeros_float16_mlp_stays_in_range():
    """An all-zeros float16 MLP call (ViT-H's 1280 -> 5120 -> 1280: fc2's K = 5120) draws each GEMM
    weight at 1 / sqrt(fan-in) and the rest at 1: the torch path's output on the draw is finite and of
    RMS about 1 (a weight drawn at 1 would overflow float16's 65504 in fc2)."""
    z = torch.zeros
    args = (z(2, 4, 1280), z(1280), z(1280), z(5120, 1280), z(5120), z(1280, 5120), z(1280), z(2, 4, 1280), z(1280))
    args = tuple(a.to(device=DEVICE, dtype=torch.float16) for a in args) + (1e-6, "none")
    out = launcher("layernorm_gelu_mlp")(
        Decision("layernorm_gelu_mlp", "torch", "auto"), *tuning.draw("layernorm_gelu_mlp", "sig", args)
    )
    assert out.isfinite().all() and 0.3 < out.float().square().mean().sqrt().item() < 10


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_out_of_memory_in_the_draws_oracle_or_baseline_keeps_only_the_torch_path(backend, caplog):
    """As on the call's own inputs: without the draw's oracle (or torch baseline) no candidate can be
    checked; only the torch path competes, each other candidate says why, nothing is written to the
    cache file."""
    runs = Runs("linear")
    failed = []

    def run(d, *a):
        if d.backend == backend and not failed:  # the first: the draw's
            failed.append(d)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return runs(d, *a)

    timer = FakeTimer({GOOD.name: 0.5})
    with caplog.at_level(logging.WARNING, logger="vit_kernels"):
        entry = make_tuner(timer).tune_signature("linear", "sig", [TORCH, GOOD], run, op_args("linear", 4))
    res = {r.candidate: r for r in entry.results}
    what = "the float64 oracle" if backend == "reference" else "the torch path (the tolerance rule's baseline)"
    assert res[GOOD].ms is None and res[GOOD].dropped.startswith(f"{tuning.UNCHECKED}{what} ran out of memory")
    assert tuning.DRAWN in res[GOOD].dropped
    assert entry.winner == TORCH and res[TORCH].ms == 1.0 and timer.calls == ["torch"] and entry.short_of_memory
    assert any("only the torch path competes" in r.getMessage() for r in caplog.records)


def test_a_model_tuned_on_zeros_keeps_its_right_kernels():
    """vk.tune(model, torch.zeros(...)) with the real candidates (the Triton paths in the interpreter):
    the draw (zero images drawn at scale 1) drops none of the right kernels of any op."""
    from vit_kernels.models import VisionTransformer
    from test_tuning import paths_only

    model = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4, num_classes=10, backend="auto"
    ).eval()
    timer = FakeTimer({"model:fused": 1.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        result = vk.tune(model, torch.zeros(3, 3, 32, 32, device=DEVICE))
    assert {e.op for e in result.entries} == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}
    for e in result.entries:
        assert all(r.ms is not None for r in e.results), e.table()
        assert any(r.candidate.backend == "triton" for r in e.results), e.table()
