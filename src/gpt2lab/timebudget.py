"""The time budget of a run (train.max_time): reading a duration, the loop's step clock, and the one
place that decides how many steps a run takes (`Planner`: calibration, the first choice, revisions,
the final count, resume). Pure Python (no torch): the trainer hands the planner its learning-rate
schedule, its cost estimates and its agreement across ranks as functions.

    planner = Planner.for_run(cfg.train.max_time, cfg.train.max_steps, started_at, resumed=time_plan)
    planner.start(clock, lr=..., warmup_steps=..., costs=..., agree=...)   # when the loop starts
    while step < planner.max_steps:
        clock.start("step", step); ... one step ...; clock.tick(step)
        choice = planner.after_step(step)   # a Choice when the count was chosen (the "plan" event)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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
SAY_SHARE = 0.05
"""A revised count is said (printed) when it moves the count said last by more than this share."""
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
    """The training loop's one clock: seconds spent in steps, that is wall time less the work done
    between steps (validation, hooks, checkpoints: `between_steps`), read over windows of steps. The
    log lines (tokens/s), the live display and the time budget's choices all read it."""

    def __init__(self) -> None:
        self.between = 0.0
        """Seconds spent so far in work between steps."""
        self.took: dict[str, float] = {}
        """Seconds the last run of each piece of that work took, by name ("validation", a hook, ...)."""
        self.step_s = 0.0
        """Seconds of the last step (from `tick`)."""
        self._marks: dict[str, tuple[float, int]] = {}  # window -> (reading, step) where it started

    def reading(self) -> float:
        return time.perf_counter() - self.between

    def start(self, window: str, step: int) -> None:
        """(Re)start the window `window` after `step`."""
        self._marks[window] = (self.reading(), step)

    def per_step(self, window: str, step: int, restart: bool = True) -> float:
        """Seconds per step of `window`, from its start to after `step`; with `restart`, the window
        starts again here."""
        now = self.reading()
        then, since = self._marks[window]
        if restart:
            self._marks[window] = (now, step)
        return (now - then) / max(1, step - since)

    def tick(self, step: int) -> float:
        """After `step`: its seconds since start("step", step - 1) before it, kept in `step_s`."""
        self.step_s = self.per_step("step", step)
        return self.step_s

    @contextlib.contextmanager
    def between_steps(self, name: str) -> Iterator[None]:
        """Time work done between steps: kept out of every window, its seconds kept in `took[name]`."""
        t0 = time.perf_counter()
        yield
        self.took[name] = time.perf_counter() - t0
        self.between += self.took[name]


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


# --------------------------------------------------------------------------------------------------
# The plan: the one place that decides a run's step count


@dataclass
class Plan:
    """What train.max_time chose, as checkpoints keep it (`time_plan`, see to_dict)."""

    max_time: str | None
    """The budget it was chosen for, as written (train.max_time)."""
    cap: int
    """The most steps it may choose (train.max_steps as given)."""
    max_steps: int
    """The step count chosen."""
    final: bool = False
    """The count stands: choosing again would change the learning rate of a step already taken."""
    elapsed_s: float | None = None
    """Seconds of the budget spent when it was chosen (None: a count made final without a choice)."""

    def to_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        if self.elapsed_s is None:
            del state["elapsed_s"]
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Plan:
        """The plan of a checkpoint's `time_plan` (a dict without `final` is a final one)."""
        elapsed = state.get("elapsed_s")
        return cls(state.get("max_time"), int(state["cap"]), int(state["max_steps"]), bool(state.get("final", True)),
                   None if elapsed is None else float(elapsed))


@dataclass(frozen=True)
class Choice:
    """One choice of the step count: what the run logs (the "plan" event) and says."""

    max_steps: int
    previous: int | None
    """The count it replaces (None: the first choice of this process)."""
    step_s: float
    """Seconds a step takes, as measured for this choice."""
    remaining_s: float
    budget_s: float
    costs: dict[str, float]
    """Seconds one run of each event between steps takes ("validation", a hook, "checkpoint")."""
    said: int | None = None
    """The count said last, when this revision moves it by more than SAY_SHARE (worth saying)."""

    @property
    def revised(self) -> bool:
        return self.previous is not None

    def event(self) -> dict[str, Any]:
        """The metrics of the "plan" event in metrics.jsonl."""
        return {"max_steps": self.max_steps, "previous_max_steps": self.previous, "step_s": self.step_s,
                "remaining_s": self.remaining_s, "budget_s": self.budget_s, "revised": self.revised,
                **{f"{name}_s": seconds for name, seconds in self.costs.items()}}


Costs = dict[str, tuple[int, float, bool]]
"""Work between steps by name: (every, seconds, at_end), as plan_steps takes it."""


class Planner:
    """The step count of a run, and under train.max_time the one place that chooses it.

    The trainer calls `start` when its loop starts and `after_step` after every step, and otherwise only
    reads `max_steps`. Without a budget the count is train.max_steps throughout (a resumed plan is
    kept for later checkpoints as it was). With one, the first steps are timed (`calibrating`), the
    count is chosen (at most the cap) so that the rest of the run fits, then chosen again every
    REPLAN_SHARE of it for as long as no step taken would have had another learning rate; from then
    on it is final. Build it with `for_run`, which also takes up a resumed checkpoint's plan.
    """

    def __init__(self, max_steps: int, max_time: str | None = None, *, budget: TimeBudget | None = None,
                 cap: int | None = None, plan: Plan | None = None, resumed: str | None = None,
                 spent_s: float = 0.0, on_choice: Callable[[Choice], None] | None = None) -> None:
        self.max_steps = max_steps
        """The run's step count: the one the learning-rate schedule is laid over."""
        self.max_time = max_time
        self.cap = max_steps if cap is None else cap
        """The most steps a choice may take."""
        self.budget = budget
        self.plan = plan
        """What was chosen (None: nothing yet), kept in checkpoints by `state_dict`."""
        self.resumed = resumed
        """How a resumed plan was taken up: "final" (its count stands), "open" (chosen again), or None."""
        self.spent_s = spent_s
        """Seconds of train.max_time spent before `budget` started (by the process a resumed plan comes from)."""
        self.on_choice = on_choice
        self._costs: Costs | None = None  # estimated at the first choice of this process
        self._step_times: list[float] = []
        self._calibrating = budget is not None
        self._every = self._next = 0  # steps between choices after the first; the step of the next one
        self._said = 0  # the count said last

    @classmethod
    def for_run(cls, max_time: str | None, max_steps: int, started_at: float, resumed: dict | None = None,
                on_choice: Callable[[Choice], None] | None = None) -> Planner:
        """The planner of a run with these settings (train.max_time, train.max_steps), whose budget
        counts from `started_at` (a time.monotonic() value).

        On resume, `resumed` is the checkpoint's `time_plan`. A final count stands (the schedule was laid
        over it), as long as max_time and max_steps are the run's own. A count that was still open is
        chosen again from the resumed step, within the budget the run had left, keeping the learning
        rate of every step taken. Other settings start a new choice (an ordinary change of settings)."""
        plan = Plan.from_dict(resumed) if resumed else None
        if max_time is None:
            return cls(max_steps, plan=plan)
        seconds = parse_duration(max_time)
        if plan is None or plan.max_time != max_time or max_steps not in (plan.cap, plan.max_steps):
            return cls(max_steps, max_time, budget=TimeBudget(seconds, started_at), on_choice=on_choice)
        if plan.final:
            return cls(plan.max_steps, max_time, plan=plan, resumed="final")
        spent = plan.elapsed_s or 0.0
        return cls(plan.max_steps, max_time, budget=TimeBudget(seconds - spent, started_at), cap=plan.cap,
                   plan=plan, resumed="open", spent_s=spent, on_choice=on_choice)

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint's `time_plan`: None, or what train.max_time chose."""
        return None if self.plan is None else self.plan.to_dict()

    @property
    def calibrating(self) -> bool:
        """Steps are being timed one by one (the trainer waits for the device after each)."""
        return self._calibrating

    def start(self, clock: StepClock, *, lr: Callable[[int, int], float], warmup_steps: int,
              costs: Callable[[], Costs], agree: Callable[[float], float] | None = None) -> None:
        """The training loop starts: it times its steps and its work between steps with `clock`;
        lr(step, max_steps) is the schedule; costs() estimates the work between steps (called once,
        at the first choice); agree(x) is the largest x over all ranks (they must choose alike; None:
        one process)."""
        self._clock, self._lr, self._warmup_steps = clock, lr, warmup_steps
        self._estimate, self._agree = costs, agree or (lambda x: x)

    def after_step(self, step: int) -> Choice | None:
        """After `step`: choose the step count when the first steps are timed, and again every
        REPLAN_SHARE of the run until the count is final. Returns the choice made, if any."""
        if self.budget is None or (self.plan is not None and self.plan.final):
            return None
        clock = self._clock
        if self._calibrating:
            self._step_times.append(clock.step_s)
            if not self._calibrated(step):
                return None
            choice = self._choose(step, statistics.median(self._step_times[1:]))
            self._calibrating = False
            self._every = max(1, round(REPLAN_SHARE * self.max_steps))
            self._next = step + self._every
            clock.start("since first choice", step)
            clock.start("since last choice", step)
            return choice
        if step < self._next:
            return None
        self._next = step + self._every
        # the slower pace of the two: a machine whose speed drifts is planned for at its slower one
        return self._choose(step, max(clock.per_step("since last choice", step),
                                      clock.per_step("since first choice", step, restart=False)))

    def _calibrated(self, step: int) -> bool:
        """Enough steps timed: CALIBRATION_STEPS, then on to the end of the warmup unless that takes
        more than CALIBRATION_SHARE of the budget (ranks agree: the first done decides for all)."""
        if len(self._step_times) < CALIBRATION_STEPS:
            return False
        done = step >= self._warmup_steps or sum(self._step_times) >= CALIBRATION_SHARE * self.budget.seconds
        return self._agree(float(done)) > 0

    def _choose(self, step: int, step_s: float) -> Choice | None:
        """Choose max_steps from the time left, the time a step takes and what every later event costs
        (estimated at the first choice, then as last measured); a later choice stands only if it
        leaves the learning rate of every step taken as it was, else the count is final."""
        budget, first = self.budget, self._costs is None
        if first:
            with self._clock.between_steps("estimates"):
                self._costs = dict(self._estimate())
        for name, took in self._clock.took.items():  # what ran already is measured, not estimated
            if name in self._costs:
                every, _, at_end = self._costs[name]
                self._costs[name] = (every, took, at_end)
        remaining = budget.remaining()
        n = plan_steps(remaining, step_s, step, list(self._costs.values()), cap=self.cap)
        n = max(step, int(self._agree(float(n))))  # ranks must agree; their estimates differ by noise
        if (not first or self.resumed == "open") and not self._keeps_past_lr(n, step):
            self.plan = dataclasses.replace(self.plan, final=True)  # chosen before, or resumed open
            return None
        previous, self.max_steps = self.max_steps, n
        # elapsed: of the whole budget, so a run resumed again from this plan gets only what is left
        elapsed = self.spent_s + budget.seconds - budget.reserve_s - remaining
        self.plan = Plan(self.max_time, self.cap, n, elapsed_s=elapsed)
        said = None  # the count said last, when this choice moves it enough to be said
        if first:
            self._said = n
        elif abs(n - self._said) > SAY_SHARE * self._said:
            said, self._said = self._said, n
        choice = Choice(n, None if first else previous, step_s, remaining, budget.seconds,
                        {name: cost[1] for name, cost in self._costs.items()}, said)
        if self.on_choice is not None:
            self.on_choice(choice)
        return choice

    def _keeps_past_lr(self, max_steps: int, step: int) -> bool:
        """Whether each of the `step` steps taken had the learning rate it would have with `max_steps`."""
        return all(self._lr(s, max_steps) == self._lr(s, self.max_steps) for s in range(step))
