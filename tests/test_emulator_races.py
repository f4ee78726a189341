"""The emulator's race checker and schedules (csrc/include/vk/emulator.h, "Race checker" in vk/port.h).

1. Each hazard class is caught, with both source lines, on a purpose-written kernel
   (csrc/selftest/race_selftest.cu); the same exchanges with their barriers / waits pass clean.
2. A missing barrier or cp.async wait also changes the *values* under some schedule (checker off).
3. The real kernels (GEMM with every loader, attention on the cp.async and the plain-load paths,
   LayerNorm row statistics) run clean under the checker on a small shape under every schedule, and
   give bitwise the same result whatever the schedule. (The checker is on in every other emulator
   test too: it is the default.)
"""

import re
from pathlib import Path

import pytest
import torch

from vit_kernels import cuda as vk_cuda
from vit_kernels.cuda import ops
from vit_kernels.cuda.emulation import SCHEDULES, emulator_settings

RACE_SRC = Path(vk_cuda.CSRC) / "selftest" / "race_selftest.cu"
CASES = [
    "clean",
    "read_after_write",
    "write_after_read",
    "write_after_write",
    "async_no_wait",
    "async_wait_too_weak",
    "warp_no_syncwarp",
    "warp_syncwarp",
]  # vk::RaceCase, in order


@pytest.fixture(scope="module")
def ext():
    try:
        return vk_cuda.emulator_module()
    except vk_cuda.BuildError as e:
        pytest.fail(f"the emulator build failed: {e}")


def line_of(marker: str) -> int:
    """The line of race_selftest.cu that carries the comment `// race: <marker>`."""
    lines = RACE_SRC.read_text().splitlines()
    hits = [i + 1 for i, s in enumerate(lines) if s.rstrip().endswith(f"// race: {marker}")]
    assert len(hits) == 1, f"marker {marker!r}: {hits}"
    return hits[0]


def run(ext, case: str, x: torch.Tensor) -> torch.Tensor:
    return ext.selftest_race(x, CASES.index(case))


# (case, the kind reported under round_robin, the line that runs second, the line that ran first)
HAZARDS = [
    ("read_after_write", "read-after-write", "raw read", "raw write"),
    ("write_after_read", "write-after-read", "war write", "war read"),
    ("write_after_write", "write-after-write", "waw write", "waw write"),
    ("async_no_wait", "read-after-write", "async read", "async copy"),
    ("async_wait_too_weak", "read-after-write", "weak read", "weak copy"),
    ("warp_no_syncwarp", "read-after-write", "warp read", "warp write"),
]


@pytest.mark.parametrize("case,kind,now,prev", HAZARDS, ids=[h[0] for h in HAZARDS])
def test_each_hazard_class_is_reported_with_its_lines(ext, case, kind, now, prev):
    x = torch.randn(512)
    with emulator_settings("round_robin", racecheck=True):
        with pytest.raises(RuntimeError) as err:
            run(ext, case, x)
    msg = str(err.value)
    assert "racecheck: kernel selftest_race_kernel" in msg, msg
    pattern = (
        rf"{kind}: thread \d+ \(warp \d\) \w+.* at race_selftest\.cu:{line_of(now)}; .* at "
        rf"race_selftest\.cu:{line_of(prev)}"
    )
    assert re.search(pattern, msg), f"expected /{pattern}/ in:\n{msg}"
    if case.startswith("async"):
        assert "no cp.async.wait_group has landed" in msg, msg


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["clean", "warp_syncwarp"])
def test_the_synchronised_exchanges_are_clean_and_right(ext, case, schedule):
    x = torch.randn(512)
    with emulator_settings(schedule, seed=7, racecheck=True):
        got = run(ext, case, x)
    t = torch.arange(64)
    other = (t + 32) % 64
    if case == "clean":
        expected = x[t % 32] + x[4 * other] + x[256 + 4 * other]
    else:
        expected = x[t ^ 1]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", [h[0] for h in HAZARDS])
def test_every_schedule_reports_the_hazard(ext, case, schedule):
    """Which of two unordered accesses runs first depends on the schedule; that there is a hazard does not."""
    with emulator_settings(schedule, seed=11, racecheck=True):
        with pytest.raises(RuntimeError, match=r"(?s)racecheck.*(read-after-write|write-after-read|write-after-write)"):
            run(ext, case, torch.randn(512))


@pytest.mark.parametrize("case", ["read_after_write", "async_no_wait", "async_wait_too_weak", "warp_no_syncwarp"])
def test_a_missing_sync_changes_the_values_under_some_schedule(ext, case):
    """Checker off: cp.async destinations are poisoned (NaN) until their wait, and warps run out of step
    under the warp-major and reversed schedules, so the race shows up as wrong values too."""
    x = torch.randn(512)
    t = torch.arange(64)
    wrong = []
    for schedule in SCHEDULES:
        with emulator_settings(schedule, seed=3, racecheck=False):
            got = run(ext, case, x)
        if case == "read_after_write":
            got, expected = got[32:], x[:32]  # warp 1 reads what warp 0 wrote
        elif case == "warp_no_syncwarp":
            expected = x[t ^ 1]
        else:
            expected = None
        if expected is None or not torch.equal(got, expected):
            wrong.append(schedule)
    assert wrong, f"{case}: every schedule gave the right values"
    if case.startswith("async"):
        assert wrong == list(SCHEDULES), "a read before cp.async.wait_group must see the poison under any schedule"


def test_settings_are_checked_and_restored(ext):
    before = ext.emulator_settings()
    with pytest.raises(ValueError, match="schedule: expected one of"):
        with emulator_settings("sideways"):
            pass
    with pytest.raises(RuntimeError, match="schedule: expected one of"):
        ext.set_emulator_settings("sideways", 1, True)
    with emulator_settings("random", seed=5, racecheck=False):
        assert tuple(ext.emulator_settings()) == ("random", 5, False)
    assert ext.emulator_settings() == before


# ------------------------------------------------------------------------------- the real kernels
def _attention_cases():
    def make(dtype, hd, strided):
        def f():
            g = torch.Generator().manual_seed(0)
            shape = (1, 2, 80, 2 * hd if strided else hd)  # 80 keys: a full tile and a tail tile
            q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            if strided:  # channel stride 2: the plain-load path instead of cp.async
                q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
            return ops.flash_attention_forward(q, k, v, hd**-0.5)

        return f

    return {
        f"attention-{str(dt)[6:]}-hd{hd}{'-strided' if s else ''}": make(dt, hd, s)
        for dt, hd, s in [
            (torch.float16, 64, False),
            (torch.bfloat16, 72, False),
            (torch.float32, 64, False),
            (torch.float16, 64, True),
        ]
    }


def _gemm_cases():
    def make(dtype, k):
        def f():
            g = torch.Generator().manual_seed(1)
            x = torch.randn(70, k, generator=g).to(dtype)
            w = (torch.randn(72, k, generator=g) / k**0.5).to(dtype)
            b = torch.randn(72, generator=g).to(dtype)
            return ops.linear_forward(x, w, b, config=0)

        return f

    def mlp(dtype):
        def f():
            g = torch.Generator().manual_seed(2)
            x = torch.randn(2, 35, 64, generator=g).to(dtype)
            p = [torch.randn(s, generator=g).to(dtype) * 0.2 for s in [(64,), (64,), (96, 64), (96,), (64, 96), (64,)]]
            return ops.layernorm_gelu_mlp_forward(
                x, *p, eps=1e-6, approximate="none", residual=x, layer_scale=p[1], config=0
            )

        return f

    def patch(dtype):
        def f():
            g = torch.Generator().manual_seed(3)
            img = torch.randn(1, 3, 32, 32, generator=g).to(dtype)
            w = (torch.randn(64, 3, 8, 8, generator=g) * 0.1).to(dtype)
            pos = torch.randn(17, 64, generator=g).to(dtype)
            cls = torch.randn(64, generator=g).to(dtype)
            return ops.patch_embed_forward(img, w, None, patch_size=8, pos_embed=pos, cls_token=cls, config=0)

        return f

    cases = {}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dt)[6:]
        cases[f"gemm-{name}-cp.async"] = make(dt, 64)
        cases[f"gemm-{name}-plain"] = make(dt, 36)  # K % 8 != 0: rows not 16-byte aligned
        cases[f"mlp-layernorm-{name}"] = mlp(dt)
    cases["patch-embed-float16"] = patch(torch.float16)
    cases["row-stats-float32"] = lambda: torch.stack(
        ops.row_stats(torch.randn(20, 100, generator=torch.Generator().manual_seed(4)), 1e-5)
    )
    return cases


REAL = {**_attention_cases(), **_gemm_cases()}


@pytest.mark.parametrize("name", list(REAL))
def test_real_kernels_are_clean_and_schedule_independent(name):
    """Under every schedule, with the race checker on: no hazard (a launch with one raises), and bitwise the
    same output as round_robin (threads compute the same things in whatever order they run)."""
    results = {}
    for schedule in SCHEDULES:
        with emulator_settings(schedule, seed=13, racecheck=True):
            results[schedule] = REAL[name]()
    ref = results["round_robin"]
    assert torch.isfinite(ref).all()
    for schedule, got in results.items():
        assert torch.equal(got, ref), f"{name}: {schedule} differs from round_robin"
