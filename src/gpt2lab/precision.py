"""fp32 against bf16 on this CPU: the decision rule, its record (`Choice`), its cache and the cheap
kernel probes. What `dtype: auto` finally means is decided by `gpt2lab.dtype_choice`, which uses
these probes as a gate and then times what the run repeats.

    decide(fp32_rate, bf16_rate)        -> torch.bfloat16 only when bf16 is >= 1.3x faster
    train_precision(n_embd, rows)       -> Choice: fp32 vs bf16 training matmuls at a model's shapes
    forward_precision(n_embd, rows)     -> Choice: the same for the forward matmul only (evaluation)
    muon_precision(n_embd)              -> Choice: fp32 vs bf16 for Muon's Newton-Schulz iterations
    probe(kind, what, low, ..., measure) -> Choice: GPT2LAB_CPU_DTYPE, else the cache, else measure()
    auto_on_cpu(name, device)           -> whether a dtype setting is measured here (checks GPT2LAB_CPU_DTYPE)

CPUs differ by two orders of magnitude here: without AVX512-BF16/AMX (e.g. AMD Zen 3) bf16 matmuls
run 7x slower than fp32 as a Linear's forward multiplies (x @ W.T) and over 100x slower as its input
gradient does (g @ W), while Intel Sapphire Rapids' AMX runs them ~3x faster. The matmul probes time
those layouts at the model's width, first one small call on one thread that ends the probe where
bf16 is far slower (a CPU without bf16 units, in ~0.1 s).

Each measurement is kept in `cache_dir() / "precision.json"`, keyed by CPU model, torch version,
thread count, kind and what was timed, so later runs on the same machine read it ("cached"); a
measurement taken while other processes held the CPUs is used but not cached. `GPT2LAB_CPU_DTYPE=
fp32|bf16` skips the measurement and makes auto on CPU mean that dtype. Probes use private
torch.Generators and torch.no_grad: they never move the global RNG nor build graphs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2lab.devices import canonical_dtype, cpu_name, dtype_name, torch_dtype
from gpt2lab.download import cache_dir
from gpt2lab.errors import UserError
from gpt2lab.fileio import write_atomic
from gpt2lab.timing import Turns, cpu_time_share, one_thread, take_turns

OVERRIDE_ENV = "GPT2LAB_CPU_DTYPE"
"""Set to fp32 or bf16 to make dtype auto on CPU mean that dtype, without measuring."""
CACHE_FILE = "precision.json"
"""The measurements' file in `cache_dir()`."""
THRESHOLD = 1.3
"""bf16 is chosen only when it is at least this much faster than fp32 (it costs precision)."""
EARLY_STOP = 2.0
"""A bf16 probe that is this many times slower than fp32 ends the measurement: fp32 it is."""
MAX_ROWS = 256
"""Rows (tokens) of the timed training matmuls: enough to be a matrix product, not a vector one."""
SMALL_ROWS = 16
"""Rows of the small bf16 call that tells a CPU where bf16 is far slower, before any large one (enough
rows that fp32 is not just reading its weights, as in a matrix-vector product)."""
MAX_FLOPS = 5e9
"""FLOPs of one timed call of the training matmuls; wide models time fewer rows to stay within it."""
BUSY_SHARE = 0.75
"""A timing during which this process got less than this share of the CPU time its threads could
use ran on a busy machine: its result is used, but not cached."""
_CACHE_VERSION = 2
"""Version 2: training and evaluation decided by timing the model's own steps, decoding by a median
of many steps; version 1's measurements are not reused."""


@dataclass
class Choice:
    """A precision decision for the CPU and what it rests on."""

    dtype: torch.dtype
    """The chosen dtype: torch.float32 or the low-precision candidate (torch.bfloat16)."""
    rates: dict[str, float] = field(default_factory=dict)
    """Measured speed by dtype name ("fp32", "bf16"): FLOP/s (matmul kinds) or tokens/s (the model's
    own steps); empty if not measured."""
    speedup: float | None = None
    """Low-precision rate / fp32 rate, at the same shapes; None if not measured."""
    source: str = "measured"
    """"measured" (just now), "cached" (precision.json) or "GPT2LAB_CPU_DTYPE" (the override)."""
    kind: str = "train"
    """What was timed: "train" (a training step's matmuls at the model's shapes), "forward" (the
    forward matmul only), "muon" (an iteration of Muon's orthogonalisation), or the model's own work:
    "train_step" (forward + backward of a micro-batch), "forward_pass" (a forward pass of a batch),
    "decode" (one-token steps)."""
    detail: str = ""
    """The shapes timed, e.g. "256x768 @ 768x{3072,768}", or the model and its batch."""
    seconds: float = 0.0
    """How long the measurement took (that of the cached run for "cached"); for decode, not counting
    the layout of the caller's model, which decoding needs anyway."""
    busy: bool = False
    """Measured while other work held the CPUs (see BUSY_SHARE): used for this run, not cached."""
    matmul_speedup: float | None = None
    """For the model's own steps: the speedup of the matmul probe that called for timing them."""

    @property
    def low(self) -> str:
        """The name of the low-precision candidate that was measured ("bf16" unless asked otherwise)."""
        return next((name for name in self.rates if name != "fp32"), dtype_name(self.dtype))

    def evidence(self) -> str:
        """Why, in a few words: the measured speeds and where they come from."""
        if self.source == OVERRIDE_ENV:
            return f"{OVERRIDE_ENV}={dtype_name(self.dtype)}"
        matmuls = self.kind in _MATMUL_KINDS
        unit, scale = ("GFLOP/s", 1e9) if matmuls else ("tokens/s", 1.0)
        where = f"of {self.detail}" if self.kind == "decode" else f"at {self.detail}"
        fp32, low = self.rates.get("fp32", math.nan), self.rates.get(self.low, math.nan)
        gate = f" (matmuls {_times(self.matmul_speedup)})" if self.matmul_speedup is not None else ""
        took = f"{self.seconds:.2f} s" if self.seconds >= 0.1 else f"{self.seconds * 1e3:.0f} ms"
        when = f"measured in {took}" if self.source == "measured" else self.source
        if self.busy:
            when += " on a busy machine, not cached"
        return (f"{self.low} {_WHAT[self.kind]} {_times(self.speedup)} fp32 {where}: {_rate(low / scale)} vs "
                f"{_rate(fp32 / scale)} {unit}{gate}; {when}")

    def describe(self) -> str:
        """One line: the dtype and why, e.g. "bf16 (bf16 matmuls 3.40x fp32 at 256x768 @ 768x{3072,768}:
        582 vs 169 GFLOP/s; cached)"."""
        return f"{dtype_name(self.dtype)} ({self.evidence()})"

    def note(self, setting: str, requested: str) -> str | None:
        """The line to show for `setting` (e.g. "train.dtype") set to `requested`: what auto chose
        (nothing when GPT2LAB_CPU_DTYPE decided: the user said so), or a warning when an explicit
        low precision measured slower than fp32; None when there is nothing to say."""
        requested = canonical_dtype(requested)
        if requested == "auto":
            return None if self.source == OVERRIDE_ENV else f"{setting} auto -> {self.describe()}"
        if self.speedup is not None and self.speedup < 1:
            return (f"warning: {setting}={requested} on this CPU is slower than fp32 ({self.evidence()}); "
                    "dtype auto measures and picks the faster")
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the dtype by name), for the cache and for sending to other ranks."""
        return {**asdict(self), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Choice:
        # "int8": int8 linear layers for decoding (gpt2lab.int8), a candidate that is no setting's dtype
        return cls(**{**d, "dtype": torch.int8 if d["dtype"] == "int8" else torch_dtype(d["dtype"])})


_MATMUL_KINDS = ("train", "forward", "muon")
_WHAT = {"train": "matmuls", "forward": "forward matmuls", "muon": "Newton-Schulz matmuls",
         "train_step": "training steps", "forward_pass": "forward passes", "decode": "decoding"}
"""How `Choice.evidence` names what each kind timed."""


def _times(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "?x"
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.2g}x"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) and x >= 1000 else f"{x:.3g}"


# --------------------------------------------------------------------------------------------------
# The decision


def decide(fp32_rate: float, bf16_rate: float, threshold: float = THRESHOLD, *,
           low: torch.dtype = torch.bfloat16) -> torch.dtype:
    """`low` (bf16) when its rate is at least `threshold` times fp32's, else torch.float32.

    Rates are speeds (FLOP/s, tokens/s: higher is faster) measured at the same shapes. The margin
    keeps a near tie on fp32, whose results are the reference."""
    return low if bf16_rate >= threshold * fp32_rate else torch.float32


def auto_on_cpu(name: str, device: torch.device) -> bool:
    """Whether the dtype setting `name` is "auto" on a CPU `device`, which is decided by measuring (or
    GPT2LAB_CPU_DTYPE). A bad GPT2LAB_CPU_DTYPE fails here: callers ask before any work (loading a
    model, preparing data)."""
    if canonical_dtype(name) != "auto" or device.type != "cpu":
        return False
    cpu_dtype_override()
    return True


def cpu_dtype_override() -> torch.dtype | None:
    """The dtype GPT2LAB_CPU_DTYPE names (fp32 or bf16), None when it is unset or empty; a UserError
    for any other value."""
    value = os.environ.get(OVERRIDE_ENV, "").strip()
    if not value:
        return None
    name = {"float32": "fp32", "bfloat16": "bf16"}.get(value.lower(), value.lower())
    if name not in ("fp32", "bf16"):
        raise UserError(f"{OVERRIDE_ENV}={value!r} is not a CPU dtype; set it to fp32 or bf16, or unset it "
                        "to let dtype auto measure this CPU")
    return torch_dtype(name)


def probe(kind: str, what: str, low: torch.dtype, threshold: float, use_cache: bool,
          measure: Callable[[], Choice]) -> Choice:
    """The skeleton of every probe: GPT2LAB_CPU_DTYPE decides; else the cache entry of (`kind`, `low`,
    `what` was timed), decided afresh with `threshold`; else `measure()`, whose result is cached
    when it is a quiet measurement of this `kind` (not one of another kind it fell back on)."""
    forced = cpu_dtype_override()
    if forced is not None:
        return Choice(forced, source=OVERRIDE_ENV, kind=kind)
    key = cache_key(kind, f"{dtype_name(low)} {what}")
    if use_cache and (hit := cached(key, threshold, low)) is not None:
        return hit
    choice = measure()
    if use_cache and choice.kind == kind and choice.source == "measured" and not choice.busy:
        store(key, choice)
    return choice


def measured_choice(kind: str, detail: str, rates: tuple[float, float], low: torch.dtype, threshold: float,
                    seconds: float, busy: bool, matmul_speedup: float | None = None) -> Choice:
    """The Choice that (fp32, `low`) `rates` of the same work call for, just measured."""
    fp32_rate, low_rate = rates
    return Choice(decide(fp32_rate, low_rate, threshold, low=low), {"fp32": fp32_rate, dtype_name(low): low_rate},
                  low_rate / fp32_rate, "measured", kind, detail, round(seconds, 3), busy, matmul_speedup)


def on_a_busy_machine(timing: Callable[[], Any], threads: int) -> tuple[Any, bool]:
    """(timing(), busy): busy when `timing` ran long enough to tell (10 ms) and this process got less
    than BUSY_SHARE of the CPU time its `threads` could have used meanwhile: other processes held the
    CPUs (or torch has more threads than this process may run at once), so the rates are not this
    machine's own."""
    result, wall, share = cpu_time_share(timing, threads)
    return result, wall > 0.01 and share < BUSY_SHARE


# --------------------------------------------------------------------------------------------------
# Training (and batched prefill): matmuls at the model's shapes


def train_precision(n_embd: int, rows: int, *, low: torch.dtype = torch.bfloat16, threshold: float = THRESHOLD,
                    use_cache: bool = True) -> Choice:
    """fp32 or `low` (bf16) matmuls for training a model of width `n_embd` on this CPU, by timing.

    Timed: the three matmuls of a training step (forward x @ W.T, input gradient g @ W, weight
    gradient g.T @ x) of the MLP's Linear(C, 4C) and of a Linear(C, C), over `rows` tokens (those of
    one micro-batch, capped at MAX_ROWS and lower for wide models so one call stays under MAX_FLOPS).
    First the Linear(C, C) alone at SMALL_ROWS rows on one thread, fp32 and `low` in turns: when
    `low` is EARLY_STOP times slower there the probe ends (a CPU without bf16 units, in ~0.1 s).
    Otherwise both are timed at full size with torch's threads, in turns; a `low` call EARLY_STOP
    times slower than fp32's is not repeated. Uses the cache unless `use_cache` is False;
    GPT2LAB_CPU_DTYPE skips all of it.
    """
    return _matmul_precision("train", n_embd, rows, low, threshold, use_cache)


def forward_precision(n_embd: int, rows: int, *, low: torch.dtype = torch.bfloat16, threshold: float = THRESHOLD,
                      use_cache: bool = True) -> Choice:
    """fp32 or `low` (bf16) for forward passes only (evaluation: no gradients) of a model of width
    `n_embd` over `rows` tokens: `train_precision`'s probe timing just x @ W.T, the layout a CPU may
    run well in bf16 while the backward's are slow."""
    return _matmul_precision("forward", n_embd, rows, low, threshold, use_cache)


def _matmul_precision(kind: str, n_embd: int, rows: int, low: torch.dtype, threshold: float,
                      use_cache: bool) -> Choice:
    """`train_precision` (kind "train") or `forward_precision` (kind "forward")."""
    backward = kind == "train"
    C = n_embd
    rows = max(1, min(rows, MAX_ROWS, max(2 * SMALL_ROWS, int(MAX_FLOPS / (30 * C * C)))))

    def comparisons() -> Comparisons:
        ops = _training_matmuls(rows, C)
        few = [(x[:SMALL_ROWS], w, g[:SMALL_ROWS]) for x, w, g in ops[1:]]
        small = (lambda: _compare_matmuls(few, low, max_rounds=1, backward=backward)) if rows > SMALL_ROWS else None
        return (small, f"{SMALL_ROWS}x{C} @ {C}x{C}", lambda: _compare_matmuls(ops, low, backward=backward),
                f"{rows}x{C} @ {C}x{{{4 * C},{C}}}")

    return _measured(kind, f"{rows}x{C}", low, threshold, use_cache, comparisons)


Rates = tuple[float, float]
"""(fp32, low-precision) speeds of the same work."""
Comparisons = tuple[Callable[[], Rates] | None, str, Callable[[], Rates], str]
"""(small timing or None, what it times, full timing, what it times): see `_measured`."""


def _measured(kind: str, shape: str, low: torch.dtype, threshold: float, use_cache: bool,
              comparisons: Callable[[], Comparisons]) -> Choice:
    """The kernel probes' measurement, inside `probe`: `comparisons()` gives two timings: the small
    one (None to skip it) runs on one thread (see `timing.one_thread`) and ends the probe when `low`
    is EARLY_STOP times slower there (a CPU without bf16 units); otherwise the full one runs with
    torch's threads."""
    def measure() -> Choice:
        start = time.perf_counter()
        with torch.no_grad():
            small, small_detail, full, detail = comparisons()
            stopped = False
            if small is not None:
                with one_thread():
                    (fp32_rate, low_rate), busy = on_a_busy_machine(small, 1)
                stopped = low_rate * EARLY_STOP < fp32_rate
                if stopped:
                    detail = f"{small_detail}, 1 thread, stopped early"
            if not stopped:  # low is not clearly slower (or the shapes are small anyway): time the full shapes
                (fp32_rate, low_rate), busy = on_a_busy_machine(full, torch.get_num_threads())
        return measured_choice(kind, detail, (fp32_rate, low_rate), low, threshold, time.perf_counter() - start, busy)

    return probe(kind, shape, low, threshold, use_cache, measure)


Matmuls = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(input x, weight W, output gradient g) of some Linear layers: x (rows, C), W (out, C), g (rows, out)."""


def _training_matmuls(rows: int, n_embd: int) -> Matmuls:
    """The fp32 operands of the MLP's Linear(C, 4C) and of a Linear(C, C) over `rows` tokens, drawn
    from a private generator (the global RNG does not move)."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, n_embd, generator=generator), torch.randn(out, n_embd, generator=generator),
             torch.randn(rows, out, generator=generator)) for out in (4 * n_embd, n_embd)]


def _compare_matmuls(ops: Matmuls, low: torch.dtype, *, budget_s: float = 0.15,
                     max_rounds: int = 4, backward: bool = True) -> Rates:
    """(fp32, `low`) FLOP/s of a training step's matmuls of `ops`: forward x @ W.T, input gradient
    g @ W, weight gradient g.T @ x (without `backward`, the forward only), timed by `_compare_calls`."""
    flops = sum((3 if backward else 1) * 2 * x.shape[0] * x.shape[1] * w.shape[0] for x, w, _ in ops)
    low_ops = [tuple(t.to(low) for t in op) for op in ops]

    def calls(operands: Matmuls) -> Callable[[], None]:
        def run() -> None:
            for x, w, g in operands:
                torch.mm(x, w.t())  # forward
                if backward:
                    torch.mm(g, w)  # gradient of the input
                    torch.mm(g.t(), x)  # gradient of the weight
        return run

    return _compare_calls(calls(ops), calls(low_ops), flops, budget_s=budget_s, max_rounds=max_rounds)


def _compare_calls(fp32_call: Callable[[], Any], low_call: Callable[[], Any], flops: float, *,
                   budget_s: float = 0.15, max_rounds: int = 4) -> Rates:
    """(fp32, low) FLOP/s of two calls doing the same `flops` in the two precisions; the best time of each.

    `timing.take_turns` (a b b a ...) after an untimed first call of each: one timed round, then up
    to `max_rounds` more until `budget_s` is spent; a call longer than the budget, or a `low` one
    EARLY_STOP times slower than fp32, is not repeated (bf16 that slow is decided already)."""
    def decided(turns: Turns) -> bool:
        fp32, low = turns.best("fp32"), turns.best("low")
        return turns.rounds >= 1 and (max(fp32, low) > budget_s or low > EARLY_STOP * fp32)

    turns = take_turns({"fp32": fp32_call, "low": low_call}, rounds=1 + max_rounds, budget_s=budget_s, abba=True,
                       stop=decided)
    return flops / max(turns.best("fp32"), 1e-9), flops / max(turns.best("low"), 1e-9)


# --------------------------------------------------------------------------------------------------
# Muon: the matmuls of its orthogonalisation


MUON_THRESHOLD = 1.0
"""Muon orthogonalises in bf16 (torch.optim.Muon's design) unless fp32 is faster: a tie keeps bf16."""
MUON_MAX_WIDTH = 512
"""Widest matrix the Muon probe times, (512, 2048): one iteration is 2.4 GFLOP."""
MUON_SMALL_WIDTH = 64
"""Width of the one-thread Muon probe that ends the measurement where bf16 is far slower."""


def muon_precision(n_embd: int, *, low: torch.dtype = torch.bfloat16, threshold: float = MUON_THRESHOLD,
                   use_cache: bool = True) -> Choice:
    """fp32 or `low` (bf16) for the Newton-Schulz iterations of Muon on this CPU, by timing one.

    Timed: one iteration (X @ X.T, then A @ A and B @ X, as `optim.orthogonalise` runs it) on a
    (C, 4C) matrix, the shape of the MLP's weights, C = min(n_embd, MUON_MAX_WIDTH); first at
    C = MUON_SMALL_WIDTH on one thread, where `low` EARLY_STOP times slower ends the probe (a CPU
    without bf16 units, in a few ms). `low` is kept unless fp32 measures faster (`threshold` 1).
    Uses the cache unless `use_cache` is False; GPT2LAB_CPU_DTYPE skips all of it."""
    C = max(1, min(n_embd, MUON_MAX_WIDTH))

    def comparisons() -> Comparisons:
        small = (lambda: _compare_newton_schulz(MUON_SMALL_WIDTH, low, max_rounds=1)) if C > MUON_SMALL_WIDTH else None
        return (small, f"{MUON_SMALL_WIDTH}x{4 * MUON_SMALL_WIDTH}", lambda: _compare_newton_schulz(C, low),
                f"{C}x{4 * C}")

    return _measured("muon", f"{C}x{4 * C}", low, threshold, use_cache, comparisons)


def _compare_newton_schulz(width: int, low: torch.dtype, **kwargs: Any) -> tuple[float, float]:
    """(fp32, `low`) FLOP/s of one Newton-Schulz iteration on a (width, 4 width) matrix of spectral norm
    <= 1 (from a private generator), by `_compare_calls`."""
    x = torch.randn(width, 4 * width, generator=torch.Generator().manual_seed(0))
    x /= x.norm()
    flops = 2 * width * width * 4 * width * 2 + 2 * width**3  # X @ X.T and B @ X, then A @ A

    def iteration(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            gram = x @ x.T
            torch.addmm(x, torch.addmm(gram, gram, gram, beta=-4.775, alpha=2.0315), x, beta=3.4445)
        return run

    return _compare_calls(iteration(x), iteration(x.to(low)), flops, **kwargs)


# --------------------------------------------------------------------------------------------------
# The cache


def cache_path() -> Path:
    """The measurements' file: `cache_dir() / "precision.json"` ($GPT2LAB_CACHE, else ~/.cache/gpt2lab)."""
    return cache_dir() / CACHE_FILE


def cache_key(kind: str, what: str) -> str:
    """What a measurement depends on: the CPU, torch's kernels, the thread count, the kind and what was
    timed (shapes, model, micro-batch)."""
    return f"{kind} | {what} | {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read_cache() -> dict[str, Any]:
    """The cache's entries; an absent, unreadable or corrupt file counts as empty (it is rewritten)."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def cached(key: str, threshold: float, low: torch.dtype) -> Choice | None:
    """The cached measurement of `key`, decided afresh with `threshold`; None if absent or malformed."""
    entry = _read_cache().get(key)
    try:
        choice = Choice.from_dict(entry)
        fp32, low_rate = float(choice.rates["fp32"]), float(choice.rates[dtype_name(low)])
    except (TypeError, KeyError, ValueError, UserError):
        return None
    choice.dtype, choice.source = decide(fp32, low_rate, threshold, low=low), "cached"
    return choice


def store(key: str, choice: Choice) -> None:
    """Add `choice` to the cache file, written atomically (a temporary file renamed into place). A
    cache that cannot be written is skipped: the next run measures again."""
    path = cache_path()
    entries = _read_cache()
    entries[key] = {k: v for k, v in choice.to_dict().items() if k not in ("source", "busy")}
    text = json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except (OSError, UserError):
        pass
