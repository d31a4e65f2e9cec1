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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gpt2lab import parallel
from gpt2lab.config import SDPA_BACKENDS, OptimConfig, TrainConfig
from gpt2lab.errors import UserError
from gpt2lab.metrics import RunLogger
from gpt2lab.optim import lr_at, set_lr
from gpt2lab.timebudget import Costs, Planner, StepClock

IGNORE_INDEX = -100


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


def checkpoint_seconds(module: torch.nn.Module, optimizer: torch.optim.Optimizer, bytes_per_s: float = 200e6,
                       overhead_s: float = 0.2) -> float:
    """A conservative time for one checkpoint: the weights and optimizer state at `bytes_per_s`."""
    tensors = list(module.parameters())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return overhead_s + sum(t.numel() * t.element_size() for t in tensors) / bytes_per_s


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


class Trainer:
    """Trains `module` on `train_data` (get_batch(step) -> this rank's (x, y), state_dict, load_state_dict).

    `val_batches` returns a fresh iterator over the same validation batches on each call (None = no
    validation loss). `save(step, train_state)` writes a checkpoint on every rank (a collective) and
    returns its directory; None = no checkpoints. `peak_tokens_per_s` is one device's peak FLOP/s over
    the training FLOPs per token, the MFU denominator (None = no MFU). `dtype` is the autocast dtype
    (float32 = none; float16 adds loss scaling). `planner` holds the step count (train.max_time
    chooses it as the run goes; default: train.max_steps).
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: Any,
                 geometry: BatchGeometry, *, train: TrainConfig, optim: OptimConfig, env: Any,
                 logger: RunLogger | None = None, dtype: torch.dtype = torch.float32,
                 val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 hooks: Sequence[Hook] = (), save: Callable[[int, dict], Path] | None = None,
                 checkpoint_every: int = 0, peak_tokens_per_s: float | None = None, start_step: int = 0,
                 planner: Planner | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.train_data = train_data
        self.cfg = train
        self.optim = optim
        self.env = env
        self.planner = planner or Planner(train.max_steps)
        self.logger = logger or RunLogger(".", None, total_steps=self.planner.max_steps, enabled=False)
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
            "time_plan": self.planner.state_dict(),  # None, or the step count train.max_time chose
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens", self.step * self.cfg.tokens_per_step))
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
        lr = lr_at(step, self.optim, self.planner.max_steps)
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

    def _log(self, event: str, step: int, metrics: dict, show: bool = True) -> None:
        self.history.append({"event": event, "step": step, **metrics})
        self.logger.log(event, step, metrics, show=show)

    # ---------------------------------------------------------------------------------------------
    # What train.max_time plans with

    def _event_costs(self) -> Costs:
        """What the work between steps costs, estimated: (every, seconds, at_end) by name."""
        costs: Costs = {}
        if self.val_batches is not None:
            costs["validation"] = (self.cfg.eval_every, self._validation_seconds(), True)
        for hook in self.hooks:
            if hook.cost is not None:
                costs[hook.name] = (hook.every, hook.cost(), hook.at_end)
        if self.save is not None:
            costs["checkpoint"] = (self.checkpoint_every, checkpoint_seconds(self.module, self.optimizer), True)
        return costs

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

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name
        # A second Ctrl-C stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _agree_max(self, value: float) -> float:
        """The largest `value` over all ranks."""
        flag = torch.tensor(float(value), device=self.device)
        parallel.all_reduce(flag, "max")
        return flag.item()

    def _agreed_stop(self) -> bool:
        """True when any rank got a stop signal (ranks must stop at the same step)."""
        if self.env.world_size == 1:
            return self._stop_signal is not None
        stop = self._agree_max(self._stop_signal is not None) > 0
        if stop and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        return stop

    def _mfu(self, tokens_per_s: float) -> float | None:
        return tokens_per_s / (self.peak_tokens_per_s * self.env.world_size) if self.peak_tokens_per_s else None

    def _run_hook(self, hook: Hook, step: int) -> dict[str, Any] | str | None:
        out = hook.fn()
        if isinstance(out, str):
            self.logger.print(f"--- {hook.name} at step {step} ---\n{out}\n---")
        elif out:
            self._log(hook.name, step, out)
        return out

    def fit(self) -> TrainResult:
        """Train from self.step to the planner's max_steps (or a stop signal); validate, run hooks and save
        on schedule. One clock times the steps, less the work between them; the planner is asked after
        every step (train.max_time chooses the step count as the run goes)."""
        cfg, planner = self.cfg, self.planner
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                previous[sig] = signal.signal(sig, self._on_signal)
        train_loss = val_loss = None
        final: dict[str, Any] = {}
        try:
            self.module.train()
            tokens_per_step = cfg.tokens_per_step
            clock = StepClock()
            clock.start("log", self.step)
            planner.start(clock, lr=lambda step, max_steps: lr_at(step, self.optim, max_steps),
                          warmup_steps=self.optim.warmup_steps, costs=self._event_costs, agree=self._agree_max)
            while self.step < planner.max_steps:
                clock.start("step", self.step)
                loss, grad_norm, lr = self.train_step(self.step)
                self.step += 1
                self.tokens_seen += tokens_per_step
                step = self.step
                if planner.calibrating:
                    loss.item()  # wait for the device: these steps are timed one by one
                step_s = clock.tick(step)
                if (choice := planner.after_step(step)) is not None:
                    self.logger.set_total_steps(choice.max_steps)
                    self._log("plan", step, choice.event(), show=False)
                last = step == planner.max_steps
                logged = _every(cfg.log_every, step) or last
                if self.logger.live and not logged:  # a terminal watches: move every step (reads the loss)
                    self.logger.update(step, {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                                              "tokens_per_s": tokens_per_step / step_s,
                                              "mfu": self._mfu(tokens_per_step / step_s),
                                              "eta_s": step_s * (planner.max_steps - step)})
                if logged:
                    self._check_finite(step)
                    train_loss = loss.item()
                    dt = clock.per_step("log", step)  # since the last log line
                    tok_s = tokens_per_step / dt
                    mfu = self._mfu(tok_s)
                    self._log("train", step, {
                        "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / self.env.world_size,
                        "mfu": mfu, "step_time_s": dt,
                        "eta_s": dt * (planner.max_steps - step), "tokens": self.tokens_seen,
                    })
                if _every(cfg.eval_every, step) or last:
                    with self.logger.phase("validation loss"), clock.between_steps("validation"):
                        val_loss = self.evaluate()
                    if val_loss is not None:
                        self._log("eval", step, {"val_loss": val_loss})
                for hook in self.hooks:
                    if _every(hook.every, step) and not (last and hook.at_end):
                        with self.logger.phase(hook.name), clock.between_steps(hook.name):
                            self._run_hook(hook, step)
                stop = self._agreed_stop()
                if _every(self.checkpoint_every, step) or last or stop:
                    with self.logger.phase("checkpoint"), clock.between_steps("checkpoint"):
                        self._save(step)
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
