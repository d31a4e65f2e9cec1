"""What `dtype: auto` means on a CPU, decided by measuring this CPU rather than assumed.

    decide(fp32_rate, bf16_rate)               -> torch.bfloat16 only when bf16 is >= 1.3x faster
    train_precision(n_embd, rows)              -> Choice: fp32 vs bf16 training matmuls at the model's shapes
    forward_precision(n_embd, rows)            -> Choice: the same for forward passes only (evaluation)
    decode_precision(model, layout=...)        -> Choice: fp32 vs bf16 weights for batch-1 decoding
    muon_precision(n_embd)                     -> Choice: fp32 vs bf16 for Muon's Newton-Schulz iterations
    compute_dtype(name, device, n_embd=, rows=) -> (autocast dtype, Choice | None): resolve_dtype, but
                                                 auto on CPU measured (rank 0's choice on every rank)
    muon_dtype(name, device, n_embd=)          -> (dtype, Choice | None): the same for optim.muon_dtype

CPUs differ by two orders of magnitude here: without AVX512-BF16/AMX (e.g. AMD Zen 3) bf16 matmuls
run 7x slower than fp32 as a Linear's forward multiplies (x @ W.T) and over 100x slower as its input
gradient does (g @ W), while Intel Sapphire Rapids' AMX runs them ~3x faster. A forward pass alone
(evaluation) is therefore timed apart from a training step. Batch-1 decoding
is another matter: it reads every weight once per token, so half-size bf16 weights can win even
where bf16 matmuls lose; it is timed on the model itself, in the layout `gpt2lab sample` uses.

Each probe takes well under a second (it stops as soon as bf16 is clearly slower) and its result is
kept in `cache_dir() / "precision.json"`, keyed by CPU model, torch version, thread count, kind and
shape, so later runs on the same machine read it ("cached"); a measurement taken while other
processes held the CPUs is used but not cached. `GPT2LAB_CPU_DTYPE=fp32|bf16` skips the measurement
and makes auto on CPU mean that dtype. Probes use a private torch.Generator and torch.no_grad: they
never move the global RNG (training dropout and data draws) nor build graphs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import platform
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2lab.config import MuonDtype
from gpt2lab.devices import canonical_dtype, dtype_name, resolve_dtype, torch_dtype
from gpt2lab.download import cache_dir
from gpt2lab.errors import UserError
from gpt2lab.fileio import write_atomic

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
_CACHE_VERSION = 1


@dataclass
class Choice:
    """A precision decision for the CPU and what it rests on."""

    dtype: torch.dtype
    """The chosen dtype: torch.float32 or the low-precision candidate (torch.bfloat16)."""
    rates: dict[str, float] = field(default_factory=dict)
    """Measured speed by dtype name ("fp32", "bf16"): FLOP/s (train) or tokens/s (decode); empty if not measured."""
    speedup: float | None = None
    """Low-precision rate / fp32 rate, at the same shapes; None if not measured."""
    source: str = "measured"
    """"measured" (just now), "cached" (precision.json) or "GPT2LAB_CPU_DTYPE" (the override)."""
    kind: str = "train"
    """"train" (a training step's matmuls at the model's shapes), "forward" (the forward matmul only),
    "muon" (an iteration of Muon's orthogonalisation) or "decode" (one-token steps of the model)."""
    detail: str = ""
    """The shapes timed, e.g. "256x768 @ 768x{3072,768}" or the decoded model."""
    seconds: float = 0.0
    """How long the measurement took (that of the cached run for "cached"); for decode, not counting
    the layout of the caller's model, which decoding needs anyway."""
    busy: bool = False
    """Measured while other work held the CPUs (see BUSY_SHARE): used for this run, not cached."""

    @property
    def low(self) -> str:
        """The name of the low-precision candidate that was measured ("bf16" unless asked otherwise)."""
        return next((name for name in self.rates if name != "fp32"), dtype_name(self.dtype))

    def evidence(self) -> str:
        """Why, in a few words: the measured speeds and where they come from."""
        if self.source == OVERRIDE_ENV:
            return f"{OVERRIDE_ENV}={dtype_name(self.dtype)}"
        matmuls = self.kind != "decode"
        unit, scale = ("GFLOP/s", 1e9) if matmuls else ("tokens/s", 1.0)
        what = _WHAT[self.kind]
        where = f"at {self.detail}" if matmuls else f"of {self.detail}"
        fp32, low = self.rates.get("fp32", math.nan), self.rates.get(self.low, math.nan)
        took = f"{self.seconds:.2f} s" if self.seconds >= 0.1 else f"{self.seconds * 1e3:.0f} ms"
        when = f"measured in {took}" if self.source == "measured" else self.source
        if self.busy:
            when += " on a busy machine, not cached"
        return (f"{self.low} {what} {_times(self.speedup)} fp32 {where}: {low / scale:.3g} vs {fp32 / scale:.3g} "
                f"{unit}; {when}")

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
        return cls(**{**d, "dtype": torch_dtype(d["dtype"])})


_WHAT = {"train": "matmuls", "forward": "forward matmuls", "muon": "Newton-Schulz matmuls", "decode": "decoding"}
"""How `Choice.evidence` names what each kind timed."""


def _times(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "?x"
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.2g}x"


# --------------------------------------------------------------------------------------------------
# The decision


def decide(fp32_rate: float, bf16_rate: float, threshold: float = THRESHOLD, *,
           low: torch.dtype = torch.bfloat16) -> torch.dtype:
    """`low` (bf16) when its rate is at least `threshold` times fp32's, else torch.float32.

    Rates are speeds (FLOP/s, tokens/s: higher is faster) measured at the same shapes. The margin
    keeps a near tie on fp32, whose results are the reference."""
    return low if bf16_rate >= threshold * fp32_rate else torch.float32


def auto_on_cpu(name: str, device: torch.device) -> bool:
    """Whether the dtype setting `name` is "auto" on a CPU `device`, which this module decides (by
    measuring, or GPT2LAB_CPU_DTYPE). A bad GPT2LAB_CPU_DTYPE fails here: callers ask before any work
    (loading a model, preparing data)."""
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


# --------------------------------------------------------------------------------------------------
# Training (and batched prefill): matmuls at the model's shapes


def train_precision(n_embd: int, rows: int, *, low: torch.dtype = torch.bfloat16, threshold: float = THRESHOLD,
                    use_cache: bool = True) -> Choice:
    """fp32 or `low` (bf16) autocast for training a model of width `n_embd` on this CPU, by timing.

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
"""(fp32, low-precision) FLOP/s of the same work."""
Comparisons = tuple[Callable[[], Rates] | None, str, Callable[[], Rates], str]
"""(small timing or None, what it times, full timing, what it times): see `_measured`."""


def _measured(kind: str, shape: str, low: torch.dtype, threshold: float, use_cache: bool,
              comparisons: Callable[[], Comparisons]) -> Choice:
    """The probe the matmul kinds and Muon's share: GPT2LAB_CPU_DTYPE decides, else the cache (keyed
    by `kind` and `shape`), else a measurement. `comparisons()` (called only then) gives two timings:
    the small one (None to skip it) runs on one thread, since tiny multi-threaded calls time thread
    wake-ups (and preemption, when busy), and ends the probe when `low` is EARLY_STOP times slower
    there (a CPU without bf16 units); otherwise the full one runs with torch's threads."""
    forced = cpu_dtype_override()
    if forced is not None:
        return Choice(forced, source=OVERRIDE_ENV, kind=kind)
    key = _cache_key(kind, f"{dtype_name(low)} {shape}")
    if use_cache and (hit := _cached(key, threshold, low)) is not None:
        return hit
    start = time.perf_counter()
    with torch.no_grad():
        small, small_detail, full, detail = comparisons()
        stopped = False
        if small is not None:
            with _one_thread():
                (fp32_rate, low_rate), busy = _on_a_busy_machine(small, 1)
            stopped = low_rate * EARLY_STOP < fp32_rate
            if stopped:
                detail = f"{small_detail}, 1 thread, stopped early"
        if not stopped:  # low is not clearly slower (or the shapes are small anyway): time the full shapes
            (fp32_rate, low_rate), busy = _on_a_busy_machine(full, torch.get_num_threads())
    choice = Choice(decide(fp32_rate, low_rate, threshold, low=low), {"fp32": fp32_rate, dtype_name(low): low_rate},
                    low_rate / fp32_rate, "measured", kind, detail, round(time.perf_counter() - start, 3), busy)
    if use_cache and not busy:
        _store(key, choice)
    return choice


Matmuls = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(input x, weight W, output gradient g) of some Linear layers: x (rows, C), W (out, C), g (rows, out)."""


def _training_matmuls(rows: int, n_embd: int) -> Matmuls:
    """The fp32 operands of the MLP's Linear(C, 4C) and of a Linear(C, C) over `rows` tokens, drawn
    from a private generator (the global RNG does not move)."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, n_embd, generator=generator), torch.randn(out, n_embd, generator=generator),
             torch.randn(rows, out, generator=generator)) for out in (4 * n_embd, n_embd)]


def _on_a_busy_machine(timing: Callable[[], Any], threads: int) -> tuple[Any, bool]:
    """(timing(), busy): busy when `timing` ran long enough to tell (10 ms) and this process got less
    than BUSY_SHARE of the CPU time its `threads` could have used meanwhile: other processes held the
    CPUs (or torch has more threads than this process may run at once), so the rates are not this
    machine's own."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = timing()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall > 0.01 and cpu < BUSY_SHARE * wall * threads


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread for the duration (the thread count is restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _compare_matmuls(ops: Matmuls, low: torch.dtype, *, budget_s: float = 0.15,
                     max_rounds: int = 4, backward: bool = True) -> tuple[float, float]:
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
                   budget_s: float = 0.15, max_rounds: int = 4) -> tuple[float, float]:
    """(fp32, low) FLOP/s of two calls doing the same `flops` in the two precisions; the best time of each.

    An untimed first call of each and a timed one, then rounds of one `low` call and as many fp32 calls as take about
    as long (at most 8), until `budget_s` is spent or after `max_rounds`; a call longer than the
    budget, or a `low` one EARLY_STOP times slower than fp32, is not repeated. Taking turns makes a
    busy machine slow both alike; the extra fp32 calls make a slowed fp32 call, the one error that
    would pick bf16 wrongly, unlikely to count.
    """
    def once(call: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    fp32_call(), low_call()  # first calls: kernel selection, buffers, thread start-up; not timed
    best_fp32, best_low = once(fp32_call), once(low_call)  # an upper bound of each
    spent = 0.0
    for _ in range(max_rounds):
        if spent >= budget_s or max(best_fp32, best_low) > budget_s or best_low > EARLY_STOP * best_fp32:
            break
        dt = once(low_call)
        best_low, spent = min(best_low, dt), spent + dt
        for _ in range(max(1, min(8, round(best_low / max(best_fp32, 1e-9))))):
            dt = once(fp32_call)
            best_fp32, spent = min(best_fp32, dt), spent + dt
    return flops / max(best_fp32, 1e-9), flops / max(best_low, 1e-9)


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
# Decoding: one-token steps of the model itself


def decode_precision(model: torch.nn.Module, *, layout: Callable[[Any], Any] | None = None,
                     low: torch.dtype = torch.bfloat16, threshold: float = THRESHOLD,
                     use_cache: bool = True) -> Choice:
    """fp32 or `low` (bf16) weights for batch-1 decoding of `model` (a gpt2lab GPT) on this CPU.

    Decoding reads every weight once per token, so its speed is the weights' layout and size, not a
    matmul rate: this times a few one-token steps through the model's KV cache with the fp32 weights,
    then with a `low` copy, each laid out by `layout` as decoding will use them (e.g.
    `gpt2lab.generate.optimize_for_decoding`), in turns, stopping as soon as the copy is EARLY_STOP
    times slower: about 0.15 s of steps (at least 3 of each: longer for big models) plus the copy.

    `model`: fp32 weights on the CPU, in the layout they were loaded in; `layout(model)` is applied
    to it in place (what decoding it needs anyway; the layout functions are idempotent). Otherwise
    `model` is unchanged: the caller converts it (and lays it out again) if `low` is chosen.
    """
    forced = cpu_dtype_override()
    if forced is not None:
        return Choice(forced, source=OVERRIDE_ENV, kind="decode")
    weight = next(model.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"decode_precision needs a CPU model with fp32 weights, got {weight.dtype} on {weight.device}")
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    detail = f"this model ({n_params / 1e6:.1f}M params, batch 1)"
    shape = (f"{n_params} params, n_layer {config.n_layer}, n_embd {config.n_embd}, n_head {config.n_head}, "
             f"n_kv_head {config.n_kv_head}, layout {getattr(layout, '__name__', None)}")
    key = _cache_key("decode", f"{dtype_name(low)} {shape}")
    if use_cache and (hit := _cached(key, threshold, low)) is not None:
        return hit
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout: it would draw from the global RNG
    try:
        with torch.no_grad():
            twin = _copy_in(model, low)  # before the fp32 layout: a straight conversion, no transpose
            if layout is not None:
                t0 = time.perf_counter()
                layout(model)
                start += time.perf_counter() - t0  # the caller's work, not the probe's
                layout(twin)
            (fp32_rate, low_rate), busy = _on_a_busy_machine(lambda: _compare_decoding(model, twin),
                                                             torch.get_num_threads())
    finally:
        model.train(was_training)
    choice = Choice(decide(fp32_rate, low_rate, threshold, low=low), {"fp32": fp32_rate, dtype_name(low): low_rate},
                    low_rate / fp32_rate, "measured", "decode", detail, round(time.perf_counter() - start, 3), busy)
    if use_cache and not busy:
        _store(key, choice)
    return choice


def _compare_decoding(model: torch.nn.Module, twin: torch.nn.Module, *, budget_s: float = 0.15,
                      max_steps: int = 8) -> tuple[float, float]:
    """(tokens/s of `model`, of `twin`) for one-token decode steps at batch 1 through their KV caches,
    the best step of each. Steps are taken in turns (so a busy machine slows both alike) until
    `budget_s` is spent (at least 3 of each: the first includes one-time setup), after `max_steps`,
    or from the second on as soon as `twin` is EARLY_STOP times slower."""
    steps = max(1, min(max_steps, model.config.block_size - 1))
    token = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
    models = (model, twin)
    caches = [m.new_cache(1, steps) for m in models]
    best, spent = [math.inf, math.inf], 0.0
    for n in range(steps):
        for i in (0, 1):
            t0 = time.perf_counter()
            models[i](token, cache=caches[i])
            dt = time.perf_counter() - t0
            best[i], spent = min(best[i], dt), spent + dt
        if (n >= 1 and best[1] > EARLY_STOP * best[0]) or (n >= 2 and spent >= budget_s):
            break
    return 1 / max(best[0], 1e-9), 1 / max(best[1], 1e-9)


def _copy_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with its floating-point parameters and buffers in `dtype`, row-major whatever
    the layout of `model` (a layout made for fp32 can be the slow one for bf16: the caller's `layout`
    decides), made without a full-precision copy in between: the parameters are converted straight into it."""
    memo: dict[int, Any] = {}
    for p in model.parameters():  # tied parameters are one object: they stay tied in the copy
        converted = p.detach().to(dtype, memory_format=torch.contiguous_format) if p.is_floating_point() else None
        memo[id(p)] = torch.nn.Parameter(converted if converted is not None else p.detach().clone(),
                                         requires_grad=p.requires_grad)
    twin = copy.deepcopy(model, memo)
    return twin.to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# Resolving a dtype setting


def compute_dtype(name: str, device: torch.device, *, n_embd: int, rows: int, fp16_without_bf16: bool = True,
                  check_explicit: bool = False, forward_only: bool = False) -> tuple[torch.dtype, Choice | None]:
    """The autocast dtype for the setting `name` on `device`, and the measurement behind it.

    As `devices.resolve_dtype`, except "auto" on CPU: `train_precision(n_embd, rows)`, or with
    `forward_only` (evaluation) `forward_precision(n_embd, rows)` (or GPT2LAB_CPU_DTYPE). Under
    torch.distributed rank 0 measures and every rank takes its choice, so all ranks compute alike. With `check_explicit`, an explicit bf16/fp16 on CPU is measured too (on
    rank 0; the others get None) so the caller can warn when it is slower (`Choice.note`). The
    Choice is None where nothing was measured or decided.
    """
    name = canonical_dtype(name)
    if device.type != "cpu":
        return resolve_dtype(name, device, fp16_without_bf16=fp16_without_bf16), None
    probe = forward_precision if forward_only else train_precision
    return _on_cpu(name, functools.partial(probe, n_embd, rows), check_explicit)


def muon_dtype(name: str, device: torch.device, *, n_embd: int) -> tuple[torch.dtype, Choice | None]:
    """The dtype of Muon's orthogonalisation for the setting optim.muon_dtype `name` ("auto", "bf16",
    "fp32") on `device`, and the measurement behind it.

    "auto" is bf16 (torch.optim.Muon's) except on a CPU, where `muon_precision(n_embd)` decides (rank
    0 measures, every rank takes its choice: all ranks must step alike). An explicit bf16 on CPU is
    measured too (on rank 0) so the caller can warn when it is the slower (`Choice.note`)."""
    name = canonical_dtype(name)
    if name not in typing.get_args(MuonDtype):
        raise UserError(f"optim.muon_dtype={name!r} is not one of {', '.join(map(repr, typing.get_args(MuonDtype)))}")
    if device.type != "cpu":
        return (torch.bfloat16 if name == "auto" else torch_dtype(name)), None
    return _on_cpu(name, functools.partial(muon_precision, n_embd), check_explicit=True)


def _on_cpu(name: str, probe: Callable[..., Choice], check_explicit: bool) -> tuple[torch.dtype, Choice | None]:
    """The dtype setting `name` (canonical) on a CPU: "auto" is `probe()`'s choice, measured on rank
    0 and taken by every rank; with `check_explicit` an explicit low precision is measured too
    (`probe(low=dtype)`, on rank 0; the others get None) so the caller can warn when it is slower."""
    if name == "auto":
        cpu_dtype_override()  # a bad value fails on every rank, before any rank waits on another
        choice = _from_rank0(probe)
        return choice.dtype, choice
    dtype = torch_dtype(name)
    if check_explicit and dtype != torch.float32 and _rank() == 0:
        return dtype, probe(low=dtype)
    return dtype, None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _from_rank0(measure: Callable[[], Choice]) -> Choice:
    """`measure()` on rank 0, its result on every rank (just `measure()` outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return measure()
    box = [measure().to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Choice.from_dict(box[0])


# --------------------------------------------------------------------------------------------------
# The cache


def cache_path() -> Path:
    """The measurements' file: `cache_dir() / "precision.json"` ($GPT2LAB_CACHE, else ~/.cache/gpt2lab)."""
    return cache_dir() / CACHE_FILE


def _cpuinfo_field(name: str) -> str | None:
    """Field `name` of the first processor in /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """This CPU's model name (/proc/cpuinfo "model name"; else platform.processor() or the machine type)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo "flags"; empty where unknown)."""
    return set((_cpuinfo_field("flags") or "").split())


def _cache_key(kind: str, shape: str) -> str:
    """What a measurement depends on: the CPU, torch's kernels, the thread count, the kind and shape."""
    return f"{kind} | {shape} | {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read_cache() -> dict[str, Any]:
    """The cache's entries; an absent, unreadable or corrupt file counts as empty (it is rewritten)."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _cached(key: str, threshold: float, low: torch.dtype) -> Choice | None:
    """The cached measurement of `key`, decided afresh with `threshold`; None if absent or malformed."""
    entry = _read_cache().get(key)
    try:
        choice = Choice.from_dict(entry)
        fp32, low_rate = float(choice.rates["fp32"]), float(choice.rates[dtype_name(low)])
    except (TypeError, KeyError, ValueError, UserError):
        return None
    choice.dtype, choice.source = decide(fp32, low_rate, threshold, low=low), "cached"
    return choice


def _store(key: str, choice: Choice) -> None:
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
