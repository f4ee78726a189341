"""Settings of the host emulator (csrc/include/vk/emulator.h) for the launches of a ``with`` block.

The emulator runs each thread block's threads as fibers, in the order of a *schedule*:
``round_robin`` (default; warps in lock-step), ``reverse``, ``warp_major``, ``warp_major_reverse``
(one warp runs as far as it can before the next, so warps run whole barrier intervals out of step)
or ``random`` (seeded). Its *race checker* (on by default) shadows dynamic shared memory and makes a
launch raise ``RuntimeError`` naming each read-after-write, write-after-read or write-after-write
hazard with both source lines. The environment variables ``VK_EMU_SCHEDULE`` (``random:SEED`` for a
seed) and ``VK_EMU_RACECHECK=0|1`` set the defaults of a process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

SCHEDULES = ("round_robin", "reverse", "warp_major", "warp_major_reverse", "random")


def settings() -> Tuple[str, int, bool]:
    """(schedule, seed, racecheck) the emulator's next launch uses."""
    from . import emulator_module

    return tuple(emulator_module().emulator_settings())


@contextlib.contextmanager
def emulator_settings(
    schedule: Optional[str] = None, *, seed: Optional[int] = None, racecheck: Optional[bool] = None
) -> Iterator[None]:
    """Launches inside the block use this schedule / seed / race checker; the previous settings come back
    after it. Process-wide: do not change them while another thread launches."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if racecheck is not None and not isinstance(racecheck, bool):
        raise ValueError(f"racecheck: expected a bool, got {racecheck!r}")
    from . import emulator_module

    ext = emulator_module()
    old = tuple(ext.emulator_settings())
    ext.set_emulator_settings(
        schedule if schedule is not None else old[0],
        seed if seed is not None else old[1],
        racecheck if racecheck is not None else old[2],
    )
    try:
        yield
    finally:
        ext.set_emulator_settings(*old)
