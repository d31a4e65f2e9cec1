"""A minimal training loop over `gpt2lab.parallel`, run by tests/test_distributed.py under torchrun
(or as one plain process) to prove the parallel layer on its own, independent of the trainer.

Same math as the trainer (docs/design.md): the global batch of a step is a pure function of
(seed, step), each rank takes its contiguous share, micro-batch losses are summed and divided by
the global number of counted tokens (some targets are -100, so ranks count differently).

    torchrun --nproc_per_node=2 tests/dist_helpers.py --out DIR --strategy fsdp --steps 4
    python tests/dist_helpers.py --out DIR --steps 4 --resume DIR/ckpt_2

Writes (rank 0) DIR/losses.json {step: loss} and DIR/final.safetensors; checkpoints DIR/ckpt_<step>.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from gpt2lab import parallel
from gpt2lab.config import OptimConfig
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import build_optimizer

MODEL = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
GLOBAL_ROWS, MICRO_ROWS = 8, 2


def global_batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(GLOBAL_ROWS, T) inputs and targets of `step`; about a quarter of the targets are ignored (-100)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL_ROWS, MODEL.block_size + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) < 0.25] = -100
    return x, y


def train_step(model, optimizer, env: parallel.DistEnv, step: int) -> float:
    x, y = global_batch(step)
    rows = GLOBAL_ROWS // env.world_size
    x, y = x[env.rank * rows:(env.rank + 1) * rows], y[env.rank * rows:(env.rank + 1) * rows]
    count = parallel.all_reduce((y != -100).sum().float())
    micro = list(zip(x.split(MICRO_ROWS), y.split(MICRO_ROWS)))
    loss_sum = torch.zeros(())
    for i, (xb, yb) in enumerate(micro):
        with parallel.no_sync(model, enabled=i < len(micro) - 1):
            _, loss = model(xb.to(env.device), yb.to(env.device), loss_reduction="sum")
            (loss / count).backward()
        loss_sum += loss.detach().cpu()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (parallel.all_reduce(loss_sum) / count).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="none")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = parallel.init_distributed("cpu")
    (out / f"pid.{env.rank}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    cfg = SimpleNamespace(strategy=args.strategy, activation_checkpointing="none", compile_blocks=False,
                          fsdp=SimpleNamespace(reshard_after_forward=True, mixed_precision=False))
    model = parallel.parallelize(GPT(MODEL), cfg, env)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), "cpu")
    start, losses = 0, {}
    resume = args.resume
    if resume == "latest":  # what a restarted job does: the newest complete checkpoint, if any
        found = sorted(out.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
        resume = str(found[-1]) if found else None
    if resume:
        state = parallel.load_sharded(resume, model, optimizer)
        start, losses = state["step"], state["losses"]
    for step in range(start, args.steps):
        losses[str(step)] = train_step(model, optimizer, env, step)
        if args.save_every and (step + 1) % args.save_every == 0:
            parallel.save_sharded(out / f"ckpt_{step + 1}", model, optimizer, {"step": step + 1, "losses": losses},
                                  model_config=MODEL, tokenizer={"type": "test"}, step=step + 1)
    state = parallel.model_state_for_save(model)
    if env.is_main:
        from safetensors.torch import save_file

        (out / "losses.json").write_text(json.dumps(losses))
        save_file(state, str(out / "final.safetensors"))
    parallel.destroy()


if __name__ == "__main__":
    main()
