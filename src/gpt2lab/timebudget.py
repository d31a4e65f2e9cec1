"""The time budget of a run (train.max_time): reading a duration, timing steps, and choosing how many
steps fit. Pure Python (no torch), so the config layer can check a duration without importing torch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gpt2lab.errors import UserError

CALIBRATION_STEPS = 10
"""The fewest steps timed before a time-budgeted run fixes its step count (the first, a warm-up, is
not used). Timing goes on through the warmup (where the schedule does not depend on the step count,
so the run is the one an explicit train.max_steps would give) while it takes under
CALIBRATION_SHARE of the budget."""
CALIBRATION_SHARE = 0.05
REPLAN_SHARE = 0.05
"""After the first plan the step count is chosen again every this share of it (from the steps since
the last choice: CPUs slow down once their boost budget is spent), for as long as no step taken so
far would have had another learning rate (warmup-stable-decay: until the decay; constant: always;
cosine: not after the warmup). From then on the count is final."""
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?")


def parse_duration(text: str | float | int, where: str = "train.max_time") -> float:
    """Seconds of a duration: 140, "140s", "3m", "2.5m", "1h30m", "1h 5m 10s"; a UserError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.fullmatch(str(text).replace(" ", "").lower())
        if not match or not any(match.groups()):
            raise UserError(f"{where}: cannot read {text!r} as a duration; use e.g. 140s, 3m, 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + sec
    if not seconds > 0 or math.isinf(seconds):
        raise UserError(f"{where} must be a positive duration, got {text!r}")
    return seconds


class StepClock:
    """How long a step takes, for train.max_time: each of the first steps timed alone (calibrating),
    then the wall time between choices of the step count less `between`, the seconds spent so far
    on work between steps (validation, hooks, checkpoints: the trainer's running total)."""

    def __init__(self) -> None:
        self.calibrating = True
        self.step_times: list[float] = []
        self.every = 0
        self._first = self._last = (0.0, 0, 0.0)  # (time, step, between) at the first and last choice

    def start(self, step: int, every: int, between: float) -> None:
        """The first choice was made after `step`; the next ones come every `every` steps."""
        self.calibrating, self.every = False, every
        self._first = self._last = (time.perf_counter(), step, between)

    def due(self, step: int) -> bool:
        return (step - self._last[1]) % self.every == 0

    def step_time(self, step: int, between: float) -> float:
        """Seconds per step: the slower of those since the last choice and those since the first (a
        machine whose speed drifts is planned for at its slower pace); starts the next window."""
        now = time.perf_counter()

        def since(mark: tuple[float, int, float]) -> float:
            return (now - mark[0] - (between - mark[2])) / max(1, step - mark[1])

        seconds = max(since(self._last), since(self._first))
        self._last = (now, step, between)
        return seconds


@dataclass(frozen=True)
class TimeBudget:
    """The wall-clock budget of a run: `seconds` counted from `started_at` (a time.monotonic() value),
    of which `reserve_s` is kept for what follows the last step (the plot and the summary)."""

    seconds: float
    started_at: float
    reserve_s: float = 2.5  # the plot imports matplotlib: ~2 s in a fresh process on a slow CPU

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.started_at) - self.reserve_s


def plan_steps(remaining_s: float, step_s: float, done: int, costs: Sequence[tuple[int, float, bool]],
               cap: int, margin: float = 0.05) -> int:
    """The most steps (done <= n <= cap) whose rest fits in `remaining_s` less a `margin` fraction.

    The steps still to run take `step_s` each; each (every, seconds, at_end) in `costs` is work done
    after every `every`-th step (0 = never) and, when `at_end`, once more after the last step when
    that is not one of them (validation, a sample, checkpoints)."""
    budget = remaining_s * (1 - margin)

    def total(n: int) -> float:
        seconds = (n - done) * step_s
        for every, cost, at_end in costs:
            runs = n // every - done // every if every > 0 else 0
            if at_end and (every <= 0 or n % every):
                runs += 1
            seconds += runs * cost
        return seconds

    if total(cap) <= budget:
        return cap
    lo, hi = done, cap  # total() never decreases with n: the largest n that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
    return lo
