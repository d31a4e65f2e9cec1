"""The one timing harness: how gpt2lab times anything, from `gpt2lab bench` to the precision probes.

    seconds, out = time_call(fn, device)          one call's wall time (queued device work included)
    turns = take_turns({"fp32": a, "bf16": b}, rounds=8, warmup=1, budget_s=0.5, abba=True)
    turns.median("fp32"), turns.best("bf16")     seconds of the timed calls; turns.values: what they returned
    with one_thread(): ...                        torch's CPU kernels on one thread for the block

Taking turns is the rule: timings of things to compare alternate call by call (a b a b, or a b b a
with `abba`), so a machine whose speed drifts (boost clocks, other jobs) slows them alike, and
warm-up calls (kernel selection, buffers, thread start-up, JIT) are made first and never timed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels, so wall-clock time covers the work."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """(seconds, fn()): the wall time of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Turns:
    """The timings `take_turns` made, by name: seconds of each timed call and what it returned."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    """Wall time of each timed call, in order."""
    values: dict[str, list[Any]] = field(default_factory=dict)
    """What each timed call returned (e.g. tokens/s a call measured itself), in order."""
    warmup_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Wall time of the untimed warm-up calls (a first estimate of the cost, not a measurement)."""

    @property
    def rounds(self) -> int:
        """Rounds completed: every name was timed this many times."""
        return min((len(s) for s in self.seconds.values()), default=0)

    @property
    def spent(self) -> float:
        """Seconds spent in timed calls."""
        return sum(sum(s) for s in self.seconds.values())

    def best(self, name: str) -> float:
        """The shortest timed call of `name` (inf before any)."""
        return min(self.seconds[name], default=math.inf)

    def median(self, name: str) -> float:
        """The median timed call of `name` (inf before any)."""
        return statistics.median(self.seconds[name]) if self.seconds[name] else math.inf


def take_turns(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 1, min_rounds: int = 1,
               budget_s: float = math.inf, abba: bool = False, stop: Callable[[Turns], bool] | None = None,
               device: torch.device | str | None = None) -> Turns:
    """Call each of `calls` `warmup` times untimed, then up to `rounds` rounds of one timed call of each.

    Calls alternate in every phase: a b a b (with `abba`, every other round runs in reverse: a b b a,
    so neither always follows the other). After `min_rounds` rounds no new round starts once
    `budget_s` seconds were spent in timed calls; `stop(turns)`, asked before every round (the first
    one included, after the warm-up), ends the timing early when it returns True.
    """
    names = list(calls)
    turns = Turns({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names})
    for _ in range(warmup):
        for name in names:
            turns.warmup_seconds[name].append(time_call(calls[name], device)[0])
    for r in range(rounds):
        if (r >= min_rounds and turns.spent >= budget_s) or (stop is not None and stop(turns)):
            break
        for name in (names[::-1] if abba and r % 2 else names):
            seconds, out = time_call(calls[name], device)
            turns.seconds[name].append(seconds)
            turns.values[name].append(out)
    return turns


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread for the duration (the thread count is restored after):
    tiny multi-threaded calls time thread wake-ups (and preemption, on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cpu_time_share(fn: Callable[[], Any], threads: int) -> tuple[Any, float, float]:
    """(fn(), wall seconds, share): the share of the CPU time `threads` threads could have used during
    the call that this process got (1.0: all of it; less: other processes held the CPUs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out, wall, cpu / max(wall * threads, 1e-12)
