"""The one training loop (pretraining and finetuning alike). It builds nothing and parses nothing:
`gpt2lab.run` hands it a parallelized model, an optimizer, data, the batch geometry, a logger and
hooks (work done every N steps: sampling, eval tasks).

    geometry = batch_geometry(tokens_per_step, micro_batch_size, block_size, world_size)
    hooks = [Hook("sample", every=250, fn=lambda: sample_text(...), at_end=True),
             Hook("eval", every=250, fn=TaskEvaluator(...))]
    trainer = Trainer(module, optimizer, train_data, geometry, train=cfg.train, optim=cfg.optim, env=env,
                      logger=logger, dtype=dtype, hooks=hooks, save=save, checkpoint_every=500)
    result = trainer.fit()

One optimizer step:

    x, y = train_data.get_batch(step)            this rank's rows of the step's global batch
    N = all_reduce(count of targets != -100)     counted tokens of the whole step, all ranks
    for each of the `accum` micro-batches:       no gradient sync except on the last
        loss_sum(micro-batch) / N -> backward    so accumulation and ranks never change the update
    unscale (fp16), clip the global grad norm, AdamW step at lr_at(step)

After a step: the log line, the validation loss, the hooks in their order, then the checkpoint; the
time they take is kept out of tokens/s. The host waits for the device (`.item()`) only when it
logs, evaluates or saves. A non-finite loss stops the run with a message and leaves the last good
checkpoint as it was. SIGTERM/SIGINT finish the current step, save a checkpoint and return (a
second SIGINT stops at once).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gpt2lab import parallel
from gpt2lab.errors import UserError
from gpt2lab.logging import RunLogger
from gpt2lab.optim import OptimConfig, lr_at, set_lr
from gpt2lab.timebudget import (
    CALIBRATION_SHARE,
    CALIBRATION_STEPS,
    REPLAN_SHARE,
    StepClock,
    TimeBudget,
    plan_steps,
)

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    """Number of optimizer steps (with max_time: the most it may choose)."""
    max_time: str | None = None
    """Wall-clock budget of the whole run, e.g. "3m", "140s", "1h30m" (null = none). The first steps are
    timed, then the number of steps is chosen (at most max_steps) so that the run, its validations,
    hooks, checkpoints and final plot end within it, and chosen again as the run goes while the
    schedule of the steps taken allows; it is printed and recorded as train.max_steps in the run's
    config.yaml and checkpoints (so --resume continues exactly)."""
    tokens_per_step: int = 65536
    """Global batch in tokens per optimizer step (all ranks, all micro-batches); must be a multiple of
    micro_batch_size * block_size * world_size (the quotient is the gradient accumulation)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one device."""
    seed: int = 1337
    """Seed of the model init, the data order and dropout."""
    device: str = "auto"
    """"auto" (the rank's CUDA device if any, else cpu), "cpu", "cuda", "cuda:N" or "mps"."""
    dtype: str = "auto"
    """Compute precision: "auto" (bf16 on CUDA with bf16 support, fp16 + loss scaling on older CUDA; on
    CPU bf16 only where the model's training steps measure >= 1.3x faster in bf16 than fp32, cached in
    precision.json; GPT2LAB_CPU_DTYPE=fp32|bf16 decides instead), "fp32", "bf16" or "fp16". Weights
    and optimizer state stay fp32."""
    compile: bool = False
    """torch.compile the model (CUDA; slow to start, faster steps)."""
    fused_loss: bool = False
    """Compute the LM head and the loss chunk by chunk, never holding the (tokens x vocab) logits: same
    loss and gradients, several GB less memory at GPT-2 scale (see gpt2lab.losses)."""
    sdpa_backend: str = "auto"
    """Attention kernel of training steps: "auto" (PyTorch picks), "flash", "math", or the CUDA-only
    "cudnn" and "efficient"."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere or newer GPUs."""
    eval_every: int = 250
    """Evaluate the validation loss every this many steps and at the end (0 = only at the end)."""
    eval_tokens: int = 327_680
    """Validation tokens per evaluation: the first eval_tokens // block_size blocks of the val split (all
    of it if shorter; for SFT data that many records), the same set whatever micro_batch_size and the
    number of ranks, so the same weights always get the same val loss (0 = no validation)."""
    eval_batches: int | None = None
    """Older way to size the validation set, in micro-batches: when set, it is eval_batches x
    micro_batch_size blocks (so it changes with micro_batch_size) and eval_tokens is not used."""
    sample_every: int = 0
    """Print a sample every this many steps (0 = only the final sample)."""
    sample_prompt: str = "\n"
    """Prompt of the samples."""
    sample_tokens: int = 200
    """New tokens per sample (0 = no samples)."""
    sample_temperature: float = 0.8
    """Sampling temperature of the samples."""
    sample_top_k: int | None = 200
    """Sample among the top-k most likely tokens (null = all)."""
    log_every: int = 10
    """Log train metrics (loss, lr, grad norm, tokens/s, MFU) every this many steps."""

# --------------------------------------------------------------------------------------------------
# Batch geometry


class BatchGeometry(NamedTuple):
    """How the global batch of one optimizer step is laid out (computed once, by `batch_geometry`)."""

    global_rows: int
    """Sequences per step, all ranks and micro-batches together."""
    accum: int
    """Micro-batches per rank and step (gradient accumulation)."""


def batch_geometry(tokens_per_step: int, micro_batch_size: int, block_size: int, world_size: int) -> BatchGeometry:
    """The BatchGeometry of a global batch given in tokens.

    accum = tokens_per_step / (micro_batch_size * block_size * world_size) must be a whole number; when it
    is not, the error suggests first a micro-batch size that keeps the global batch (the recipe), and
    only then another tokens_per_step.
    """
    per_pass = micro_batch_size * block_size * world_size
    if tokens_per_step % per_pass:
        where = (f"train.tokens_per_step={tokens_per_step:,} is not a multiple of micro_batch_size * block_size * "
                 f"world_size = {micro_batch_size} * {block_size} * {world_size} = {per_pass:,}")
        rows, rem = divmod(tokens_per_step, block_size * world_size)  # rows per rank and step
        fits = [m for m in range(min(micro_batch_size, rows), 0, -1) if rows % m == 0] if not rem else []
        if fits:
            raise UserError(f"{where}; keep the global batch with --train.micro_batch_size {fits[0]} "
                            f"({rows // fits[0]} accumulation steps), or change tokens_per_step")
        lower = max(per_pass, tokens_per_step // per_pass * per_pass)
        raise UserError(f"{where}, and no micro-batch size fits it on {world_size} rank(s); use e.g. "
                        f"--train.tokens_per_step {lower} or {lower + per_pass}")
    return BatchGeometry(tokens_per_step // block_size, tokens_per_step // per_pass)


# --------------------------------------------------------------------------------------------------
# Attention kernel

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def sdpa_context(backend: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which scaled_dot_product_attention uses only `backend` (train.sdpa_backend);
    "auto" leaves the choice to PyTorch. cudnn and efficient exist on CUDA only (flash and math
    also run on the CPU). A backend that cannot run a given call (flash with a sliding-window
    mask, say) makes that call fail with PyTorch's "No viable backend" error."""
    if backend == "auto":
        return contextlib.nullcontext()
    if backend not in SDPA_BACKENDS:
        raise UserError(f"train.sdpa_backend={backend!r} is not one of 'auto', {', '.join(map(repr, SDPA_BACKENDS))}")
    if backend in ("cudnn", "efficient") and device.type != "cuda":
        raise UserError(f"train.sdpa_backend={backend} needs a CUDA GPU; on {device.type} use auto, flash or math")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


# --------------------------------------------------------------------------------------------------
# RNG state (as tensors and lists, so a checkpoint loads with torch.load(weights_only=True))


def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "python": [version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# The trainer


@dataclass(frozen=True)
class Hook:
    """Work the trainer does between steps, on every rank (hooks may hold collectives)."""

    name: str
    """The event its metrics are logged under (and the banner of a text it returns)."""
    every: int
    """Run after every this many steps (0 = never, except at_end)."""
    fn: Callable[[], dict[str, Any] | str | None]
    """Returns metrics to log as event `name`, a text to print (a sample), or None / {} for nothing."""
    at_end: bool = False
    """Run once after the last step (after its checkpoint, not when a signal stopped the run) instead
    of at that step; what it returns is kept in TrainResult.final."""
    cost: Callable[[], float] | None = None
    """Seconds one run of `fn` takes, estimated without side effects (train.max_time plans with it;
    None = too small to count)."""


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done."""
    train_loss: float | None
    val_loss: float | None
    stopped_by: str | None = None
    """None when max_steps was reached, else the signal that stopped the run (SIGTERM, SIGINT)."""
    checkpoint: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)
    """What each at_end hook returned after the last step, by hook name (e.g. the final "sample")."""
    history: list[dict] = field(default_factory=list)
    """Every logged event: {"event": "train"|"eval", "step": ..., metrics}."""


class TrainingDiverged(UserError):
    """The loss (or the gradient norm) became NaN or infinite."""


class Trainer:
    """Trains `module` on `train_data` (get_batch(step) -> this rank's (x, y), state_dict, load_state_dict).

    `val_batches` returns a fresh iterator over the same validation batches on each call (None = no
    validation loss). `save(step, train_state)` writes a checkpoint on every rank (a collective) and
    returns its directory; None = no checkpoints. `peak_tokens_per_s` is one device's peak FLOP/s over
    the training FLOPs per token, the MFU denominator (None = no MFU). `dtype` is the autocast dtype
    (float32 = none; float16 adds loss scaling).
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: Any,
                 geometry: BatchGeometry, *, train: TrainConfig, optim: OptimConfig, env: Any,
                 logger: RunLogger | None = None, dtype: torch.dtype = torch.float32,
                 val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 hooks: Sequence[Hook] = (), save: Callable[[int, dict], Path] | None = None,
                 checkpoint_every: int = 0, peak_tokens_per_s: float | None = None, start_step: int = 0,
                 time_budget: TimeBudget | None = None, on_plan: Callable[[dict], None] | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.train_data = train_data
        self.cfg = train
        self.optim = optim
        self.env = env
        self.logger = logger or RunLogger(".", None, total_steps=train.max_steps, enabled=False)
        self.dtype = dtype
        self.val_batches = val_batches
        self.hooks = list(hooks)
        self.save = save
        self.checkpoint_every = checkpoint_every
        self.peak_tokens_per_s = peak_tokens_per_s
        self.step = start_step
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.accum = geometry.accum
        self.device = self.env.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        sdpa_context(self.cfg.sdpa_backend, self.device)  # an unusable backend fails here, not at step 1
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)  # any non-finite loss since last check
        self._stop_signal: str | None = None
        self.tokens_seen = start_step * train.tokens_per_step
        self.last_checkpoint: Path | None = None
        self.history: list[dict] = []
        self.max_steps = train.max_steps
        self.time_budget = time_budget
        self.on_plan = on_plan
        self.plan: dict | None = None  # what train.max_time chose (kept in checkpoints)
        self._cap = train.max_steps
        self._resumed_open = False  # resumed while the count was still open: keep past learning rates
        self._costs: dict[str, tuple[int, float, bool]] = {}
        self._took: dict[str, float] = {}  # seconds the last validation, hook run and save took
        self._between = 0.0  # seconds spent in all of them so far

    # ---------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict:
        """Everything but the model and optimizer needed to continue exactly (loadable weights_only)."""
        return {
            "step": self.step,  # the LR schedule is a pure function of it
            "rng": rng_state(),
            "data": self.train_data.state_dict(),
            "scaler": self.scaler.state_dict(),
            "tokens": self.tokens_seen,  # true even when a resume changed train.tokens_per_step
            "time_plan": self.plan,  # None, or the step count train.max_time chose
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens", self.step * self.cfg.tokens_per_step))
        self.plan = state.get("time_plan") if self.time_budget is None else None
        self.train_data.load_state_dict(state["data"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.env.world_size == 1 or self.env.rank == 0:
            set_rng_state(state["rng"])
        else:  # other ranks' dropout streams: a pure function of (seed, rank, step)
            torch.manual_seed(hash((self.cfg.seed, self.env.rank, self.step)) % 2**63)

    # ---------------------------------------------------------------------------------------------
    # One step

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step on the batch of `step`; returns (loss, grad norm) as device tensors, without
        waiting for the device (loss: mean over the step's counted tokens of all ranks), and the lr."""
        lr = lr_at(step, self.optim, self.max_steps)
        set_lr(self.optimizer, lr)
        x, y = self.train_data.get_batch(step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        mbs = self.cfg.micro_batch_size
        if x.shape[0] != mbs * self.accum:
            raise RuntimeError(f"batch of step {step} has {x.shape[0]} rows, expected {mbs} * {self.accum}")
        counted = (y != IGNORE_INDEX).sum()
        parallel.all_reduce(counted, "sum")
        denom = counted.clamp(min=1).float()  # a step with no counted token contributes nothing
        loss_sum = torch.zeros((), device=self.device)
        with sdpa_context(self.cfg.sdpa_backend, self.device):  # around backward too (recomputed forwards)
            for i in range(self.accum):
                xb, yb = x[i * mbs:(i + 1) * mbs], y[i * mbs:(i + 1) * mbs]
                with parallel.no_sync(self.module, enabled=i < self.accum - 1):
                    with self._autocast():
                        _, loss = self.module(xb, yb, loss_reduction="sum", fused_loss=self.cfg.fused_loss)
                    self.scaler.scale(loss / denom).backward()
                loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        parallel.all_reduce(loss_sum, "sum")  # queued on the device; read only at log time
        loss = loss_sum / denom
        self._bad |= ~torch.isfinite(loss)
        if not self.scaler.is_enabled():  # with fp16 loss scaling an inf norm just skips the step
            self._bad |= ~torch.isfinite(grad_norm)
        return loss, grad_norm, lr

    # ---------------------------------------------------------------------------------------------
    # Evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per counted token over the fixed validation batches, reduced across ranks."""
        if self.val_batches is None:
            return None
        self.module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for x, y in self.val_batches():
                x, y = x.to(self.device), y.to(self.device)
                with self._autocast():  # every rank runs every forward, even on an empty batch (FSDP)
                    _, loss = self.module(x, y, loss_reduction="sum")
                total += loss.double()
                count += (y != IGNORE_INDEX).sum()
        finally:
            self.module.train()
        parallel.all_reduce(total, "sum")
        parallel.all_reduce(count, "sum")
        return (total / count.clamp(min=1)).item()

    # ---------------------------------------------------------------------------------------------
    # The loop

    def _check_finite(self, step: int) -> None:
        flag = self._bad.float()
        parallel.all_reduce(flag, "max")
        if flag.item():
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved"
            raise TrainingDiverged(
                f"loss became NaN or infinite by step {step} ({where}); lower optim.lr, raise optim.warmup_steps "
                "or keep optim.grad_clip > 0, then resume or start again"
            )

    def _save(self, step: int) -> None:
        if self.save is None:
            return
        self._check_finite(step)  # never save weights that went bad
        self.last_checkpoint = self.save(step, self.state_dict())

    def _log(self, event: str, step: int, metrics: dict) -> None:
        self.history.append({"event": event, "step": step, **metrics})
        self.logger.log(event, step, metrics)

    # ---------------------------------------------------------------------------------------------
    # train.max_time

    def continue_plan(self, max_steps: int) -> None:
        """Resuming a run whose step count was still open: go on with `max_steps` until it is chosen
        again, and choose only counts that keep the learning rate of every step already taken."""
        self.max_steps, self._resumed_open = max_steps, True

    def _pace(self, clock: StepClock, step: int) -> None:
        """After `step`: choose the step count when the first steps are timed, and again every
        REPLAN_SHARE of the run until the count is final."""
        if clock.calibrating:
            if self._calibrated(clock.step_times):
                self._plan_steps(statistics.median(clock.step_times[1:]))
                clock.start(step, max(1, round(REPLAN_SHARE * self.max_steps)), self._between)
        elif not self.plan["final"] and clock.due(step):
            self._plan_steps(clock.step_time(step, self._between))

    def _calibrated(self, step_times: list[float]) -> bool:
        """Enough steps timed: CALIBRATION_STEPS, then on to the end of the warmup unless that takes
        more than CALIBRATION_SHARE of the budget (ranks agree: the first done decides for all)."""
        n = len(step_times)
        if n < CALIBRATION_STEPS:
            return False
        flag = torch.tensor(float(self.step >= self.optim.warmup_steps
                                  or sum(step_times) >= CALIBRATION_SHARE * self.time_budget.seconds),
                            device=self.device)
        parallel.all_reduce(flag, "max")  # one rank done is all done
        return bool(flag.item())

    def _plan_steps(self, step_s: float) -> None:
        """Choose self.max_steps from the time budget, the time a step takes and what every later
        event costs (estimated once, at the first choice); a later choice stands only if it leaves the
        learning rate of every step taken as it was, else the count is final."""
        budget = self.time_budget
        first = self.plan is None
        if first:
            if self.val_batches is not None:
                self._costs["validation"] = (self.cfg.eval_every, self._validation_seconds(), True)
            for hook in self.hooks:
                if hook.cost is not None:
                    self._costs[hook.name] = (hook.every, hook.cost(), hook.at_end)
            if self.save is not None:
                self._costs["checkpoint"] = (self.checkpoint_every, self._checkpoint_seconds(), True)
        for name, took in self._took.items():  # what ran already is measured, not estimated
            if name in self._costs:
                self._costs[name] = (self._costs[name][0], took, self._costs[name][2])
        remaining = budget.remaining()
        n = plan_steps(remaining, step_s, self.step, list(self._costs.values()), cap=self._cap)
        chosen = torch.tensor(float(n), device=self.device)
        parallel.all_reduce(chosen, "max")  # ranks must agree; their estimates differ by noise
        n = max(self.step, int(chosen.item()))
        if (not first or self._resumed_open) and not self._keeps_past_lr(n):
            base = self.plan or {"max_time": self.cfg.max_time, "cap": self._cap, "max_steps": self.max_steps}
            self.plan = {**base, "final": True}
            return
        previous, self.max_steps = self.max_steps, n
        self.plan = {"max_time": self.cfg.max_time, "cap": self._cap, "max_steps": n, "final": False,
                     "elapsed_s": budget.seconds - budget.reserve_s - remaining}
        self.logger.set_total_steps(n)
        details = {"max_steps": n, "previous_max_steps": None if first else previous, "step_s": step_s,
                   "remaining_s": remaining, "budget_s": budget.seconds, "revised": not first,
                   **{f"{k}_s": v[1] for k, v in self._costs.items()}}
        self.history.append({"event": "plan", "step": self.step, **details})
        self.logger.log("plan", self.step, details, show=False)
        if self.on_plan is not None:
            self.on_plan(details)

    def _keeps_past_lr(self, max_steps: int) -> bool:
        """Whether every step taken so far had the learning rate it would have with `max_steps`."""
        return all(lr_at(s, self.optim, max_steps) == lr_at(s, self.optim, self.max_steps) for s in range(self.step))

    @contextlib.contextmanager
    def _timed(self, name: str):
        """Time work done between steps: the last run of each (`_took`) and all of it (`_between`)."""
        t0 = time.perf_counter()
        yield
        self._took[name] = time.perf_counter() - t0
        self._between += self._took[name]

    @torch.no_grad()
    def _validation_seconds(self, timed: int = 2) -> float:
        """The time of one validation pass: the first `timed` batches' forwards, times the batch count."""
        self.module.eval()
        spent, n = 0.0, 0
        try:
            for x, y in self.val_batches():
                if n < timed:  # every rank times the same number of forwards (collectives under FSDP)
                    t0 = time.perf_counter()
                    with self._autocast():
                        _, loss = self.module(x.to(self.device), y.to(self.device), loss_reduction="sum")
                    loss.item()
                    spent += time.perf_counter() - t0
                n += 1
        finally:
            self.module.train()
        return spent / max(1, min(n, timed)) * n

    def _checkpoint_seconds(self, bytes_per_s: float = 200e6, overhead_s: float = 0.2) -> float:
        """A conservative time for one checkpoint: the weights and optimizer state at `bytes_per_s`."""
        tensors = list(self.module.parameters())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return overhead_s + sum(t.numel() * t.element_size() for t in tensors) / bytes_per_s

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name
        # A second Ctrl-C stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _agreed_stop(self) -> bool:
        """True when any rank got a stop signal (ranks must stop at the same step)."""
        if self.env.world_size == 1:
            return self._stop_signal is not None
        flag = torch.tensor(float(self._stop_signal is not None), device=self.device)
        parallel.all_reduce(flag, "max")
        if flag.item() and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        return bool(flag.item())

    def _mfu(self, tokens_per_s: float) -> float | None:
        return tokens_per_s / (self.peak_tokens_per_s * self.env.world_size) if self.peak_tokens_per_s else None

    def _every(self, n: int, step: int) -> bool:
        return n > 0 and step % n == 0

    def _run_hook(self, hook: Hook, step: int) -> dict[str, Any] | str | None:
        out = hook.fn()
        if isinstance(out, str):
            self.logger.print(f"--- {hook.name} at step {step} ---\n{out}\n---")
        elif out:
            self._log(hook.name, step, out)
        return out

    def fit(self) -> TrainResult:
        """Train from self.step to max_steps (or a stop signal); validate, run hooks and save on schedule.
        With a time budget, max_steps is chosen after the first steps and again as the run goes (`_pace`)."""
        cfg = self.cfg
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                previous[sig] = signal.signal(sig, self._on_signal)
        train_loss = val_loss = None
        final: dict[str, Any] = {}
        try:
            self.module.train()
            t_last, step_last = time.perf_counter(), self.step
            t_step = t_last
            tokens_per_step = cfg.tokens_per_step
            clock = StepClock() if self.time_budget is not None else None
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self.train_step(self.step)
                if clock is not None and clock.calibrating:
                    loss.item()  # wait for the device: these steps are timed one by one
                    clock.step_times.append(time.perf_counter() - t0)
                self.step += 1
                self.tokens_seen += tokens_per_step
                step = self.step
                if clock is not None:
                    self._pace(clock, step)
                last = step == self.max_steps
                logged = self._every(cfg.log_every, step) or last
                if self.logger.live and not logged:  # a terminal watches: move every step (reads the loss)
                    now = time.perf_counter()
                    dt = now - t_step
                    self.logger.update(step, {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                                              "tokens_per_s": tokens_per_step / dt,
                                              "mfu": self._mfu(tokens_per_step / dt),
                                              "eta_s": dt * (self.max_steps - step)})
                t_step = time.perf_counter()
                if logged:
                    self._check_finite(step)
                    train_loss = loss.item()
                    now = time.perf_counter()
                    dt = (now - t_last) / max(1, step - step_last)
                    t_last, step_last = now, step
                    tok_s = tokens_per_step / dt
                    mfu = self._mfu(tok_s)
                    self._log("train", step, {
                        "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / self.env.world_size,
                        "mfu": mfu, "step_time_s": dt,
                        "eta_s": dt * (self.max_steps - step), "tokens": self.tokens_seen,
                    })
                if self._every(cfg.eval_every, step) or last:
                    with self.logger.phase("validation loss"), self._timed("validation"):
                        val_loss = self.evaluate()
                    if val_loss is not None:
                        self._log("eval", step, {"val_loss": val_loss})
                    t_last, step_last = time.perf_counter(), step  # keep eval time out of tokens/s
                for hook in self.hooks:
                    if self._every(hook.every, step) and not (last and hook.at_end):
                        with self.logger.phase(hook.name), self._timed(hook.name):
                            self._run_hook(hook, step)
                        t_last, step_last = time.perf_counter(), step
                stop = self._agreed_stop()
                if self._every(self.checkpoint_every, step) or last or stop:
                    with self.logger.phase("checkpoint"), self._timed("checkpoint"):
                        self._save(step)
                    t_last, step_last = time.perf_counter(), step
                t_step = max(t_step, t_last)  # time spent in hooks and saves is not a step's
                if stop:
                    self.logger.print(f"{self._stop_signal}: stopped after step {step}; checkpoint saved to "
                                      f"{self.last_checkpoint}; continue with --resume")
                    self._log("stopped", step, {"signal": self._stop_signal})
                    break
            else:
                final = {hook.name: self._run_hook(hook, self.step) for hook in self.hooks if hook.at_end}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return TrainResult(step=self.step, train_loss=train_loss, val_loss=val_loss, stopped_by=self._stop_signal,
                           checkpoint=self.last_checkpoint, final=final, history=self.history)
