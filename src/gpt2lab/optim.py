"""AdamW with GPT-2's parameter groups, and learning-rate schedules as pure functions of the step.

    optimizer = build_optimizer(model, cfg.optim, device_type="cuda")
    for step in range(max_steps):
        set_lr(optimizer, lr_at(step, cfg.optim, max_steps))
        ...

Weight decay applies to tensors with >= 2 dimensions (Linear weights and embeddings, as nanoGPT);
biases and LayerNorm gains are not decayed. A schedule's only state is the step, so resuming needs
nothing but the step number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from gpt2lab.config import OptimConfig
from gpt2lab.errors import UserError


def param_groups(params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups from (name, param) pairs: decayed (>= 2-D) and not decayed (biases, norms).
    Frozen parameters (requires_grad False, e.g. a LoRA base) are left out."""
    decay, no_decay = [], []
    for _, p in params:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


FUSED_DEVICES = ("cuda", "cpu")
"""Devices where cfg.fused "auto" picks the fused AdamW kernel (one pass over each tensor). On this
project's 2-core CPU it steps GPT-2 124M in 0.07 s against 0.41 s for the foreach kernel."""


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str, *,
                    muon_dtype: torch.dtype = torch.bfloat16) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW over the trainable parameters of `model` (cfg.name "muon": `MuonWithAdamW`, orthogonalising
    in `muon_dtype`, which the caller resolves from cfg.muon_dtype); with cfg.fused "auto" the fused
    AdamW kernel on CUDA and CPU, the foreach kernel elsewhere."""
    fused = device_type in FUSED_DEVICES if cfg.fused == "auto" else bool(cfg.fused)
    named = list(model.named_parameters())
    muon_params: list[torch.nn.Parameter] = []
    if cfg.name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UserError(f"optim.name=muon needs torch.optim.Muon (torch >= 2.9); this torch is "
                            f"{torch.__version__}: upgrade torch or use optim.name adamw")
        muon_params, named = muon_split(model)
    groups = [g for g in param_groups(named, cfg.weight_decay) if g["params"]]
    adamw = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused, foreach=None if fused else True,
    )
    if not muon_params:
        return adamw
    muon = Muon([{"params": muon_params, "lr_scale": cfg.muon_lr / cfg.lr if cfg.lr else 0.0}],
                lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, ns_dtype=muon_dtype)
    return MuonWithAdamW(muon, adamw)


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[tuple[str, torch.nn.Parameter]]]:
    """(Muon's parameters, the rest as (name, param)): Muon takes the trainable 2-D weights inside the
    transformer blocks (attention and MLP matrices); embeddings, the tied LM head, biases and gains
    stay with AdamW, as Muon is meant only for hidden matrices."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = ".h." in f".{name}" and p.dim() == 2
        (muon.append(p) if hidden else rest.append((name, p)))
    return muon, rest


_MuonBase: Any = getattr(torch.optim, "Muon", torch.optim.Optimizer)
"""torch.optim.Muon (torch >= 2.9); on an older torch `build_optimizer` refuses optim.name muon first."""


class Muon(_MuonBase):
    """torch.optim.Muon, orthogonalising each update in `ns_dtype`.

    torch.optim.Muon runs its Newton-Schulz iterations in bf16, which is what a GPU (or a CPU with
    AMX) does fast, but a CPU without bf16 units runs those matmuls 8-60x slower than fp32: the
    0.8M-parameter speedrun model's step took 0.99 s there instead of 0.11 s. With `ns_dtype` bf16 the step is
    torch's own; otherwise the same update (momentum, Nesterov, the same iterations and learning-rate
    adjustment, decoupled weight decay) with the iterations in `ns_dtype`. The state ("momentum_buffer")
    and its state_dict are torch's either way, so a run may resume with the other dtype."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim's signature
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        return self._step_in(self.ns_dtype, closure)

    @torch.no_grad()
    def _step_in(self, dtype: torch.dtype, closure=None):  # noqa: ANN001, ANN202
        """One Muon step with the Newton-Schulz iterations in `dtype` (bf16 here gives torch's step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dim() != 2:
                    raise ValueError("Muon updates 2-D matrices only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's approximate orthogonalisation of the matrix `g` (U S' V^T with S' near 1, for g = U S V^T):
    `steps` quintic Newton-Schulz iterations in `dtype`, on the wide orientation of g."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # g may be the momentum buffer itself: never scale it in place
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate multiplier for a matrix of `shape` (its `adjust_lr_fn`)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer.

    `param_groups` lists both optimizers' groups (so `set_lr` and gradient unscaling see every
    parameter), and iterating yields the two torch optimizers, which is how
    torch.distributed.checkpoint saves and loads them. A Muon group's lr is optim.lr's schedule times
    `lr_scale` = muon_lr / lr."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def __iter__(self):
        return iter((self.muon, self.adamw))

    def step(self, closure=None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """Set the learning rate of every group (a group's `lr_scale`, e.g. Muon's, multiplies it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --------------------------------------------------------------------------------------------------
# Schedules: lr of optimizer step `step` (0-based) of a run of `max_steps` steps.


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: (step + 1) / warmup_steps for the first warmup_steps steps, then 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def constant_lr(step: int, *, lr: float, warmup_steps: int) -> float:
    """Warmup, then `lr` forever."""
    return lr * warmup_factor(step, warmup_steps)


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Warmup, then half a cosine from lr (at warmup_steps) to min_lr (at max_steps); min_lr after that."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay_fraction: float) -> float:
    """Warmup-stable-decay: warmup, `lr` until the last decay_fraction of max_steps, then linear to min_lr."""
    decay_steps = round(decay_fraction * max_steps)
    decay_start = max_steps - decay_steps
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    if step < decay_start:
        return lr
    if step >= max_steps:
        return min_lr
    progress = (step - decay_start) / max(1, decay_steps)
    return lr + progress * (min_lr - lr)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate of step `step` under schedule `cfg.schedule`."""
    if cfg.schedule == "constant":
        return constant_lr(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "wsd":
        return wsd_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps,
                      decay_fraction=cfg.decay_fraction)
    return cosine_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps)
