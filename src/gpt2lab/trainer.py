"""The one training loop (pretraining and finetuning alike). It builds nothing and parses nothing:
`gpt2lab.run` hands it a parallelized model, an optimizer, data and sinks.

    trainer = Trainer(module, optimizer, train_data, parts)
    result = trainer.fit()

One optimizer step:

    x, y = train_data.get_batch(step)            this rank's rows of the step's global batch
    N = all_reduce(count of targets != -100)     counted tokens of the whole step, all ranks
    for each of the `accum` micro-batches:       no gradient sync except on the last
        loss_sum(micro-batch) / N -> backward    so accumulation and ranks never change the update
    unscale (fp16), clip the global grad norm, AdamW step at lr_at(step)

The host waits for the device (`.item()`) only when it logs, evaluates or saves. A non-finite
loss stops the run with a message and leaves the last good checkpoint as it was. SIGTERM/SIGINT
finish the current step, save a checkpoint and return (a second SIGINT stops at once).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab import parallel
from gpt2lab.checkpoint import prune_checkpoints, step_dir
from gpt2lab.config import OptimConfig, TrainConfig
from gpt2lab.errors import UserError
from gpt2lab.logging import RunLogger
from gpt2lab.optim import lr_at, set_lr

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------
# Batch geometry


def batch_geometry(tokens_per_step: int, micro_batch_size: int, block_size: int, world_size: int) -> tuple[int, int]:
    """(global rows per step, gradient-accumulation steps) for a global batch given in tokens.

    accum = tokens_per_step / (micro_batch_size * block_size * world_size) must be a whole number.
    """
    per_pass = micro_batch_size * block_size * world_size
    if tokens_per_step % per_pass:
        lower = max(per_pass, tokens_per_step // per_pass * per_pass)
        raise UserError(
            f"train.tokens_per_step={tokens_per_step:,} is not a multiple of micro_batch_size * block_size * "
            f"world_size = {micro_batch_size} * {block_size} * {world_size} = {per_pass:,}; use e.g. "
            f"--train.tokens_per_step {lower} or {lower + per_pass}"
        )
    return tokens_per_step // block_size, tokens_per_step // per_pass


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


@dataclass
class TrainerParts:
    """What the trainer needs besides the model, optimizer and training data (built by gpt2lab.run)."""

    train: TrainConfig
    optim: OptimConfig
    env: Any
    """gpt2lab.parallel.DistEnv"""
    logger: RunLogger
    run_dir: Path
    block_size: int
    dtype: torch.dtype
    """Autocast dtype (float32 = no autocast)."""
    scaler: torch.amp.GradScaler
    eval_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    """A fresh iterator over the same validation batches each call; None = no validation."""
    checkpoint_every: int = 0
    keep_last: int = 0
    save_checkpoint: Callable[[Path, int, dict], None] | None = None
    """save_checkpoint(path, step, train_state): writes a checkpoint on every rank (collective)."""
    sample: Callable[[], str] | None = None
    """Generates the sample text shown at eval time (called on every rank; printed by rank 0)."""
    hellaswag: Callable[[], dict] | None = None
    """In-training HellaSwag (every rank), called every eval.hellaswag_every steps."""
    hellaswag_every: int = 0
    flops_per_token: float | None = None
    """Training FLOPs per token (6N + attention), for MFU."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device at the compute dtype, for MFU."""


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done."""
    train_loss: float | None
    val_loss: float | None
    stopped_by: str | None = None
    """None when max_steps was reached, else the signal that stopped the run (SIGTERM, SIGINT)."""
    checkpoint: Path | None = None
    sample: str | None = None
    history: list[dict] = field(default_factory=list)
    """Every logged event: {"event": "train"|"eval", "step": ..., metrics}."""


class TrainingDiverged(UserError):
    """The loss (or the gradient norm) became NaN or infinite."""


class Trainer:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: Any,
                 parts: TrainerParts, *, start_step: int = 0) -> None:
        self.module = module
        self.optimizer = optimizer
        self.train_data = train_data
        self.p = parts
        self.cfg = parts.train
        self.env = parts.env
        self.step = start_step
        self.params = [p for p in module.parameters() if p.requires_grad]
        _, self.accum = batch_geometry(self.cfg.tokens_per_step, self.cfg.micro_batch_size, parts.block_size,
                                       self.env.world_size)
        self.device = self.env.device
        sdpa_context(self.cfg.sdpa_backend, self.device)  # an unusable backend fails here, not at step 1
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)  # any non-finite loss since last check
        self._stop_signal: str | None = None
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
            "scaler": self.p.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.train_data.load_state_dict(state["data"])
        if state.get("scaler"):
            self.p.scaler.load_state_dict(state["scaler"])
        if self.env.world_size == 1 or self.env.rank == 0:
            set_rng_state(state["rng"])
        else:  # other ranks' dropout streams: a pure function of (seed, rank, step)
            torch.manual_seed(hash((self.cfg.seed, self.env.rank, self.step)) % 2**63)

    # ---------------------------------------------------------------------------------------------
    # One step

    def _autocast(self):
        if self.p.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.p.dtype)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step on the batch of `step`; returns (loss, grad norm) as device tensors, without
        waiting for the device (loss: mean over the step's counted tokens of all ranks), and the lr."""
        lr = lr_at(step, self.p.optim, self.cfg.max_steps)
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
                    self.p.scaler.scale(loss / denom).backward()
                loss_sum += loss.detach().float()
        self.p.scaler.unscale_(self.optimizer)
        max_norm = self.p.optim.grad_clip if self.p.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.p.scaler.step(self.optimizer)
        self.p.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        parallel.all_reduce(loss_sum, "sum")  # queued on the device; read only at log time
        loss = loss_sum / denom
        self._bad |= ~torch.isfinite(loss)
        if not self.p.scaler.is_enabled():  # with fp16 loss scaling an inf norm just skips the step
            self._bad |= ~torch.isfinite(grad_norm)
        return loss, grad_norm, lr

    # ---------------------------------------------------------------------------------------------
    # Evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per counted token over the fixed validation batches, reduced across ranks."""
        if self.p.eval_batches is None:
            return None
        self.module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for x, y in self.p.eval_batches():
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
        if self.p.save_checkpoint is None:
            return
        self._check_finite(step)  # never save weights that went bad
        path = step_dir(self.p.run_dir, step)
        self.p.save_checkpoint(path, step, self.state_dict())
        self.last_checkpoint = path
        if self.env.is_main:
            prune_checkpoints(self.p.run_dir, self.p.keep_last)
        parallel.barrier()

    def _log(self, event: str, step: int, metrics: dict) -> None:
        self.history.append({"event": event, "step": step, **metrics})
        self.p.logger.log(event, step, metrics)

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

    def _every(self, n: int, step: int) -> bool:
        return n > 0 and step % n == 0

    def fit(self) -> TrainResult:
        """Train from self.step to train.max_steps (or a stop signal); eval, sample and save on schedule."""
        cfg, p = self.cfg, self.p
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                previous[sig] = signal.signal(sig, self._on_signal)
        train_loss = val_loss = None
        sample = None
        try:
            self.module.train()
            t_last, step_last = time.perf_counter(), self.step
            tokens_per_step = cfg.tokens_per_step
            while self.step < cfg.max_steps:
                loss, grad_norm, lr = self.train_step(self.step)
                self.step += 1
                step = self.step
                last = step == cfg.max_steps
                if self._every(cfg.log_every, step) or last:
                    self._check_finite(step)
                    train_loss = loss.item()
                    now = time.perf_counter()
                    dt = (now - t_last) / max(1, step - step_last)
                    t_last, step_last = now, step
                    tok_s = tokens_per_step / dt
                    mfu = None
                    if p.flops_per_token and p.peak_flops:
                        mfu = p.flops_per_token * tok_s / (p.peak_flops * self.env.world_size)
                    self._log("train", step, {
                        "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / self.env.world_size,
                        "mfu": mfu, "step_time_s": dt,
                        "eta_s": dt * (cfg.max_steps - step), "tokens": step * tokens_per_step,
                    })
                if self._every(cfg.eval_every, step) or last:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        self._log("eval", step, {"val_loss": val_loss})
                    t_last, step_last = time.perf_counter(), step  # keep eval time out of tokens/s
                if p.sample is not None and self._every(cfg.sample_every, step) and not last:
                    self._show_sample(step)
                    t_last, step_last = time.perf_counter(), step
                if p.hellaswag is not None and self._every(p.hellaswag_every, step):
                    result = p.hellaswag()
                    if result:
                        self._log("hellaswag", step, result)
                    t_last, step_last = time.perf_counter(), step
                stop = self._agreed_stop()
                if self._every(p.checkpoint_every, step) or last or stop:
                    self._save(step)
                    t_last, step_last = time.perf_counter(), step
                if stop:
                    p.logger.print(f"{self._stop_signal}: stopped after step {step}; checkpoint saved to "
                                   f"{self.last_checkpoint}; continue with --resume")
                    self._log("stopped", step, {"signal": self._stop_signal})
                    break
            else:
                if p.sample is not None:
                    sample = self._show_sample(self.step)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return TrainResult(step=self.step, train_loss=train_loss, val_loss=val_loss, stopped_by=self._stop_signal,
                           checkpoint=self.last_checkpoint, sample=sample, history=self.history)

    def _show_sample(self, step: int) -> str:
        text = self.p.sample()
        self.p.logger.print(f"--- sample at step {step} ---\n{text}\n---")
        return text
