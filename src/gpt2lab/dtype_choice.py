"""The one resolver of a dtype setting: train, eval, sample, chat and bench hand it (the requested
dtype, the device, what the run repeats) and get (the dtype, the line to print).

    from gpt2lab.dtype_choice import TrainingSteps, load_dtype, resolve
    resolved = resolve(cfg.train.dtype, device, TrainingSteps(model, 12, 64), setting="train.dtype")
    resolved.dtype, resolved.line          # autocast dtype; "train.dtype auto -> fp32 (...)" or None
    model = load_model(init, dtype=load_dtype(args.dtype, device))  # fp32 where resolve will measure

What a run repeats, the work it hands over:
    TrainingSteps(model, batch_size, seq_len)   forward + backward of a micro-batch, under autocast (train, bench)
    ForwardPasses(model, batch_size, seq_len)   forward passes with the weights converted (eval)
    Decoding(model)                             batch-1 one-token steps with the weights converted (sample, chat)
    decoding_int8(work, resolved)               ... and with int8 linear layers: auto's third candidate (sample, chat)
    MuonIterations(n_embd)                      Muon's Newton-Schulz iterations (optim.muon_dtype)

Off a CPU, "auto" is the device's (`devices.resolve_dtype`; eval and sample keep the stored weights).
On a CPU it is measured, since bf16 there runs 100x slower or 3x faster depending on the CPU. The
cheap matmul probe of `gpt2lab.precision` is the gate: where bf16 matmuls at the model's shapes are
slower, so is anything built of them, and fp32 it is at once (~0.1 s on a CPU without bf16 units).
Where they are faster, the run's own work is timed, fp32 against bf16, and bf16 is taken when it is
1.3x faster: a small model's step is not its matmuls (on an AMD Zen 4 CPU the quickstart's bf16
matmuls ran 1.9x faster than fp32 while its steps are mostly other work). A step too long to time
within the budget is matmul-bound: there the gate decides. Decoding reads every weight once per
token, so half-size bf16 weights can win where bf16 matmuls lose: it is always timed, as `gpt2lab
sample` decodes. Every choice is cached by what was timed (`precision.probe`), and under
torch.distributed rank 0 measures and every rank takes its choice.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gpt2lab import parallel
from gpt2lab.config import MuonDtype
from gpt2lab.devices import canonical_dtype, resolve_dtype, torch_dtype
from gpt2lab.errors import UserError
from gpt2lab.generate import optimize_for_decoding
from gpt2lab.int8 import quantize_int8
from gpt2lab.model import model_stats
from gpt2lab.precision import (
    EARLY_STOP,
    MUON_THRESHOLD,
    THRESHOLD,
    Choice,
    Rates,
    auto_on_cpu,
    cpu_dtype_override,
    forward_precision,
    measured_choice,
    muon_precision,
    on_a_busy_machine,
    probe,
    train_precision,
)
from gpt2lab.sampling import one_token_step, sample_next
from gpt2lab.timing import Turns, take_turns

GATE = 1.0
"""bf16 matmuls at least this much faster than fp32 (at the model's shapes) call for timing the
model's own steps; slower ones end the probe: fp32, as nothing built of them runs faster."""
LONG_STEP_S = 0.25
"""A step of the model predicted (its FLOPs at the matmul probe's fp32 rate) or found (its untimed
first call) to take longer than this is not timed: it is matmul-bound, and the matmul probe decides."""
STEP_BUDGET_S = 1.0
"""Seconds of timed steps (fp32 and bf16 together) after which no new round starts."""
STEP_ROUNDS = (2, 12)
"""(at least, at most) rounds of one fp32 and one bf16 step."""
DECODE_BUDGET_S = 0.75
"""Seconds of timed decode steps after which no new round starts: ~12 rounds for gpt2 (124M) on two
cores, 1.1 s in all with the bf16 copy and the warm-up."""
DECODE_ROUNDS = (3, 40)
"""(at least, at most) rounds of one fp32 and one bf16 decode step."""
DECODE_WARMUP = 2
"""Untimed decode steps of each model first (kernel selection, JIT, the cache's first writes)."""


@dataclass
class Resolution:
    """What a dtype setting resolved to."""

    dtype: torch.dtype | None
    """The dtype to compute in (TrainingSteps: the autocast dtype over fp32 weights; the others: the
    dtype to convert the weights to); None: keep the weights' stored dtype."""
    line: str | None
    """What to print: what auto chose and why, or a warning that an explicit low precision measured
    slower; None when there is nothing to say (a GPU, an explicit dtype, GPT2LAB_CPU_DTYPE)."""
    choice: Choice | None
    """The measurement behind it; None where nothing was measured."""


def resolve(requested: str, device: torch.device, work: Work, *, setting: str = "--dtype",
            check_explicit: bool = False, fp16_without_bf16: bool = True) -> Resolution:
    """The dtype for the setting `setting` = `requested` ("auto", "fp32", "bf16", "fp16" or an alias)
    on `device` for `work`, and the line to print.

    "auto" on a CPU is `work.measure()` (GPT2LAB_CPU_DTYPE decides instead); with `check_explicit`,
    an explicit bf16/fp16 on a CPU is measured too, for a warning when it is the slower. Under
    torch.distributed every rank must call this at the same point: rank 0 measures, every rank takes
    its result. `fp16_without_bf16`: what auto means on a CUDA GPU without bf16 (see `resolve_dtype`).
    """
    name = canonical_dtype(requested)
    work.check(name, setting)
    if device.type != "cpu" or not (name == "auto" or (check_explicit and name != "fp32")):
        return Resolution(work.unmeasured(name, device, fp16_without_bf16), None, None)
    cpu_dtype_override()  # a bad value fails on every rank, before any rank waits on another
    low = torch.bfloat16 if name == "auto" else torch_dtype(name)
    choice = Choice.from_dict(parallel.from_rank0(lambda: work.measure(low).to_dict()))
    dtype = choice.dtype if name == "auto" else low
    return Resolution(dtype, choice.note(setting, name), choice)


def load_dtype(requested: str, device: torch.device) -> str:
    """The dtype to load weights in before `resolve`: "fp32" where it measures (auto on a CPU: fp32
    weights are timed against a low-precision copy), else `requested` ("auto": as stored). A bad
    GPT2LAB_CPU_DTYPE fails here, before the model loads."""
    return "fp32" if auto_on_cpu(requested, device) else canonical_dtype(requested)


# --------------------------------------------------------------------------------------------------
# What a run repeats


class Work(abc.ABC):
    """What a run repeats, which decides its dtype on a CPU."""

    @abc.abstractmethod
    def measure(self, low: torch.dtype = torch.bfloat16, *, threshold: float = THRESHOLD,
                use_cache: bool = True) -> Choice:
        """fp32 or `low` for this work on this CPU (measured, cached or GPT2LAB_CPU_DTYPE's)."""

    def unmeasured(self, name: str, device: torch.device, fp16_without_bf16: bool) -> torch.dtype | None:
        """The dtype of the setting `name` where nothing is measured (a GPU, an explicit dtype)."""
        return resolve_dtype(name, device, fp16_without_bf16=fp16_without_bf16)

    def check(self, name: str, setting: str) -> None:
        """A UserError for a dtype name this work cannot use."""
        return  # every dtype name resolve_dtype accepts (Muon's work narrows it)


@dataclass
class TrainingSteps(Work):
    """Training: forward + backward of `batch_size` x `seq_len` tokens of `model` under autocast."""

    model: nn.Module
    batch_size: int
    seq_len: int
    fused_loss: bool = False

    def measure(self, low: torch.dtype = torch.bfloat16, *, threshold: float = THRESHOLD,
                use_cache: bool = True) -> Choice:
        """The training matmul probe (`precision.train_precision`) as the gate, then training steps
        of the model (`_model_steps`) where it passes."""
        B, T = self.batch_size, self.seq_len
        what = f"{_model_identity(self.model)}, micro-batch {B}x{T}" + (", fused loss" if self.fused_loss else "")

        def measure() -> Choice:
            start = time.perf_counter()
            gate = train_precision(self.model.config.n_embd, B * T, low=low, threshold=threshold, use_cache=use_cache)
            return _model_steps("train_step", self.model, B, T, low, threshold, gate, start, self.fused_loss)

        return probe("train_step", what, low, threshold, use_cache, measure)


@dataclass
class ForwardPasses(Work):
    """Evaluation: forward passes of `batch_size` x `seq_len` tokens of `model`, weights converted."""

    model: nn.Module
    batch_size: int
    seq_len: int

    def measure(self, low: torch.dtype = torch.bfloat16, *, threshold: float = THRESHOLD,
                use_cache: bool = True) -> Choice:
        """The forward matmul probe (`precision.forward_precision`) as the gate, then forward passes
        of the model with fp32 and with `low` weights where it passes."""
        B, T = self.batch_size, self.seq_len
        what = f"{_model_identity(self.model)}, batch {B}x{T}"

        def measure() -> Choice:
            start = time.perf_counter()
            gate = forward_precision(self.model.config.n_embd, B * T, low=low, threshold=threshold,
                                     use_cache=use_cache)
            return _model_steps("forward_pass", self.model, B, T, low, threshold, gate, start)

        return probe("forward_pass", what, low, threshold, use_cache, measure)

    def unmeasured(self, name: str, device: torch.device, fp16_without_bf16: bool) -> torch.dtype | None:
        return torch_dtype(name)  # auto off a CPU: the weights as stored


@dataclass
class Decoding(Work):
    """Sampling: batch-1 one-token steps of `model` through its KV cache, weights converted and laid
    out by `layout` as `gpt2lab sample` decodes."""

    model: nn.Module
    layout: Callable[[Any], Any] = optimize_for_decoding

    def measure(self, low: torch.dtype = torch.bfloat16, *, threshold: float = THRESHOLD,
                use_cache: bool = True) -> Choice:
        """fp32 or `low` weights for decoding `model` (fp32 weights on the CPU), by timing decode steps;
        `low` torch.int8 stands for int8 linear layers (`gpt2lab.int8.quantize_int8`).

        `layout(model)` is applied to the model in place (decoding needs it anyway; layouts are
        idempotent) and to a `low` copy, then `_compare_decoding` times them. Otherwise `model` is
        unchanged: the caller converts it (and lays it out again) if `low` is chosen."""
        model = self.model
        weight = next(model.parameters())
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"decoding is measured on a CPU model with fp32 weights, got {weight.dtype} on "
                             f"{weight.device}")
        n_params = _n_params(model)
        what = f"{_model_identity(model)}, layout {getattr(self.layout, '__name__', None)}"

        def measure() -> Choice:
            start = time.perf_counter()
            was_training = model.training
            model.eval()  # no dropout: it would draw from the global RNG
            try:
                with torch.no_grad():
                    # before the fp32 layout: a straight conversion, no transpose
                    twin = quantize_int8(_copy_in(model, torch.float32)) if low == torch.int8 else _copy_in(model, low)
                    t0 = time.perf_counter()
                    self.layout(model)
                    start += time.perf_counter() - t0  # the caller's work, not the probe's
                    self.layout(twin)
                rates, busy = on_a_busy_machine(lambda: _compare_decoding(model, twin), torch.get_num_threads())
            finally:
                model.train(was_training)
            return measured_choice("decode", f"this model ({n_params / 1e6:.1f}M params, batch 1)", rates, low,
                                   threshold, time.perf_counter() - start, busy)

        return probe("decode", what, low, threshold, use_cache, measure)

    def unmeasured(self, name: str, device: torch.device, fp16_without_bf16: bool) -> torch.dtype | None:
        return torch_dtype(name)  # auto off a CPU: the weights as stored


def decoding_int8(work: Decoding, resolved: Resolution) -> Choice | None:
    """For `--dtype auto` on a CPU, after `resolve(..., work)` chose fp32 or bf16 for decoding the fp32
    model of `work`: the measured Choice of int8 linear layers (laid out by the same `work.layout`)
    when they decode THRESHOLD times faster than fp32 and than the bf16 auto took (int8 costs more
    precision than bf16), else None. Cached like every probe; GPT2LAB_CPU_DTYPE (fp32|bf16) rules
    int8 out; a model with unmerged LoRA layers is not measured."""
    from gpt2lab.lora import lora_modules

    if not hasattr(torch, "_weight_int8pack_mm") or lora_modules(work.model):
        return None
    choice = work.measure(torch.int8)
    if choice.dtype != torch.int8:
        return None
    taken = resolved.choice
    if taken is not None and taken.dtype == torch.bfloat16 and choice.rates["int8"] < THRESHOLD * taken.rates["bf16"]:
        return None  # rates of separate measurements, each timed in turns against fp32
    return choice


@dataclass
class MuonIterations(Work):
    """Muon's orthogonalisation: Newton-Schulz iterations on matrices of a model of width `n_embd`;
    "auto" is bf16 (torch.optim.Muon's) unless the CPU runs fp32 faster."""

    n_embd: int

    def measure(self, low: torch.dtype = torch.bfloat16, *, threshold: float = MUON_THRESHOLD,
                use_cache: bool = True) -> Choice:
        return muon_precision(self.n_embd, low=low, threshold=threshold, use_cache=use_cache)

    def unmeasured(self, name: str, device: torch.device, fp16_without_bf16: bool) -> torch.dtype | None:
        return torch.bfloat16 if name == "auto" else torch_dtype(name)

    def check(self, name: str, setting: str) -> None:
        if name not in typing.get_args(MuonDtype):
            raise UserError(f"{setting}={name!r} is not one of {', '.join(map(repr, typing.get_args(MuonDtype)))}")


def _model_identity(model: nn.Module) -> str:
    """What a measurement of `model` depends on, for the cache key: its size and shape (whatever the
    layout its linear layers have been given for decoding)."""
    c = model.config
    return (f"{_n_params(model)} params ({_adapter_params(model)} trained), n_layer {c.n_layer}, "
            f"n_embd {c.n_embd}, n_head {c.n_head}, n_kv_head {c.n_kv_head}, vocab {c.vocab_size}")


def _adapter_params(model: nn.Module) -> int:
    """Parameters of the model's LoRA adapters (0 without)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def _n_params(model: nn.Module) -> int:
    """The model's parameters with the tied embedding counted once and any LoRA adapters, counted
    from its config (packed or int8 linear layers hold their weights outside `.parameters()`)."""
    return model_stats(model.config).params + _adapter_params(model)


# --------------------------------------------------------------------------------------------------
# Timing the model's own steps


def _model_steps(kind: str, model: nn.Module, batch_size: int, seq_len: int, low: torch.dtype, threshold: float,
                 gate: Choice, start: float, fused_loss: bool = False) -> Choice:
    """The choice for `kind` "train_step" (forward + backward under autocast) or "forward_pass"
    (forward with converted weights) at `batch_size` x `seq_len` tokens of `model`, given the matmul
    probe's `gate`: the gate itself where bf16 matmuls are not faster (GATE; nor, then, the step) or
    where a step is too long to time (LONG_STEP_S: matmul-bound); else the faster in `_compare_steps`.

    The model is left as it was: its mode, its gradients (the timed steps' are dropped), the global
    RNG (dropout draws in a forked RNG), its weights (no optimizer step)."""
    if gate.speedup is None or gate.speedup < GATE:
        return gate
    tokens = batch_size * seq_len
    stats = model_stats(model.config, seq_len)
    flops = stats.flops_per_token_train if kind == "train_step" else stats.flops_per_token_forward
    predicted = flops * tokens / gate.rates["fp32"]
    too_long = dataclasses.replace(gate, detail=f"{gate.detail}; a step of this model too long to time")
    if predicted > LONG_STEP_S:
        return too_long
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
            for _ in range(2))
    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}  # set aside: backward would add to them in place
    try:
        for p in grads:
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            if kind == "train_step":
                model.train()
                calls = {"fp32": _training_step(model, x, y, torch.float32, fused_loss),
                         "low": _training_step(model, x, y, low, fused_loss)}
            else:
                model.eval()
                calls = {"fp32": _forward_pass(model, x), "low": _forward_pass(_copy_in(model, low), x)}
            rates, busy = on_a_busy_machine(lambda: _compare_steps(calls, tokens), torch.get_num_threads())
    finally:
        model.train(was_training)
        for p, grad in grads.items():
            p.grad = grad
    if rates is None:
        return too_long
    n_params = _n_params(model)
    detail = f"{batch_size}x{seq_len} tokens of this model ({n_params / 1e6:.2g}M params)"
    return measured_choice(kind, detail, rates, low, threshold, time.perf_counter() - start, busy or gate.busy,
                           matmul_speedup=gate.speedup)


def _training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                   fused_loss: bool) -> Callable[[], None]:
    """One micro-batch of the trainer: forward with the summed loss under `dtype` autocast, backward;
    the gradients are dropped after (each call allocates them afresh, as a step's first micro-batch)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y, loss_reduction="sum", fused_loss=fused_loss)
        loss.backward()
        for p in params:
            p.grad = None

    return step


def _forward_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A forward pass of `model` over x (B, T), logits at every position, as evaluation scores."""
    @torch.no_grad()
    def run() -> None:
        model(x)

    return run


def _compare_steps(calls: dict[str, Callable[[], None]], tokens: int) -> Rates | None:
    """(fp32, low) tokens/s of `calls` "fp32" and "low", each the median of interleaved timed steps
    (a b b a ...) after an untimed one; None when that first fp32 step took over 4 LONG_STEP_S (its
    prediction was far off: a step too long to time). STEP_ROUNDS rounds within STEP_BUDGET_S, fewer
    when `low` is EARLY_STOP times slower."""
    def enough(turns: Turns) -> bool:
        if turns.rounds == 0:
            return turns.warmup_seconds["fp32"][0] > 4 * LONG_STEP_S
        return turns.rounds >= STEP_ROUNDS[0] and turns.median("low") > EARLY_STOP * turns.median("fp32")

    turns = take_turns(calls, rounds=STEP_ROUNDS[1], min_rounds=STEP_ROUNDS[0], budget_s=STEP_BUDGET_S, abba=True,
                       stop=enough)
    if turns.rounds == 0:
        return None
    return tokens / turns.median("fp32"), tokens / turns.median("low")


# --------------------------------------------------------------------------------------------------
# Timing decode steps


def _compare_decoding(model: nn.Module, twin: nn.Module) -> Rates:
    """(tokens/s of `model`, of `twin`) for batch-1 decode steps taken as `gpt2lab sample` takes them
    (`_decode_step`), each the median of its timed steps. DECODE_WARMUP untimed steps of each first,
    then rounds of one step of each, in turns (a b b a ...), DECODE_ROUNDS of them within
    DECODE_BUDGET_S (a learned-position model: at most block_size steps in all), fewer when `twin`
    is EARLY_STOP times slower."""
    steps = DECODE_WARMUP + DECODE_ROUNDS[1]
    if model.config.pos_emb == "learned":
        steps = min(steps, model.config.block_size)
    warmup = min(DECODE_WARMUP, steps // 2)

    def enough(turns: Turns) -> bool:
        return turns.rounds >= 2 and turns.median("low") > EARLY_STOP * turns.median("fp32")

    calls = {"fp32": _decode_step(model, steps), "low": _decode_step(twin, steps)}
    turns = take_turns(calls, rounds=steps - warmup, warmup=warmup, min_rounds=DECODE_ROUNDS[0],
                       budget_s=DECODE_BUDGET_S, abba=True, stop=enough)
    return 1 / turns.median("fp32"), 1 / turns.median("low")


def _decode_step(model: nn.Module, max_len: int) -> Callable[[], None]:
    """A callable taking the next greedy decode step of `model` at batch 1, as `sampling.stream` does:
    the token from the last logits (`sample_next`), then `one_token_step` through a KV cache at its
    position; at most `max_len` calls."""
    with torch.inference_mode():
        cache = model.new_cache(1, max_len)
        state = {"logits": torch.zeros(1, model.config.vocab_size, dtype=next(model.parameters()).dtype),
                 "pos": torch.zeros((1, 1), dtype=torch.long)}
    decode = one_token_step(model, cache)

    @torch.inference_mode()
    def step() -> None:
        token = sample_next(state["logits"], temperature=0)  # (1,)
        state["logits"] = decode(model, cache, token[:, None], state["pos"])
        state["pos"] += 1

    return step


def _copy_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
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

