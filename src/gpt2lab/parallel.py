"""Distributed training: the process group from torchrun's environment, every parallel wrapping
applied in one place.

    init_distributed  -> DistEnv (rank, world size, device) from torchrun's env; one process without it
    parallelize       -> activation checkpointing -> torch.compile per block -> FSDP2 per block or DDP
    no_sync           -> skip the gradient all-reduce on accumulation micro-steps (DDP)
    all_reduce        -> reduce a metric across ranks (a no-op in one process)
    from_rank0        -> a JSON-able value computed on rank 0, on every rank (a decision all must share)

Checkpoints of a parallelized model (DCP shards under FSDP) are written and read by
`gpt2lab.checkpoint.save_sharded` / `load_sharded`.

Gradient convention: the trainer divides each rank's summed loss by the *global* number of counted
tokens of the step (docs/design.md), so the true gradient is the *sum* of the ranks' gradients.
DDP and FSDP are therefore set to sum gradients, never to average them; the update is the same for
any number of ranks and micro-batches.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2lab.config import ActivationCheckpointing, Strategy
from gpt2lab.config import FSDPConfig as FSDPConfig  # re-exported: the sections' old home
from gpt2lab.config import ParallelConfig as ParallelConfig
from gpt2lab.console import say
from gpt2lab.devices import resolve_device
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

STRATEGIES = typing.get_args(Strategy)
ACTIVATION_CHECKPOINTING = typing.get_args(ActivationCheckpointing)
DEFAULT_TIMEOUT_S = 600.0
"""Collective timeout: a rank stuck this long in a collective (a peer hung or lost) raises and exits."""

# --------------------------------------------------------------------------------------------------
# Process group


@dataclass
class DistEnv:
    """Where this process stands in the job. A single process is rank 0 of 1 with backend None."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None
    restart_count: int = 0
    """How many times torchrun's elastic agent restarted the job (TORCHELASTIC_RESTART_COUNT)."""

    @property
    def distributed(self) -> bool:
        """True when a process group is initialized (launched by torchrun)."""
        return self.backend is not None


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without WORLD_SIZE this is one process and nothing is initialized.

    Each rank uses cuda:LOCAL_RANK with NCCL on GPUs, or the CPU with Gloo. Collectives time out
    after GPT2LAB_DIST_TIMEOUT seconds (default 600), so a rank whose peer hangs exits instead of
    waiting forever; a peer that dies is noticed sooner by torchrun's agent, which stops the job.
    """
    dev = resolve_device(device)
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if "WORLD_SIZE" not in os.environ:
        return DistEnv(device=dev, restart_count=restart_count)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun "
            "(e.g. `torchrun --nproc_per_node=8 -m gpt2lab train ...`) or unset WORLD_SIZE"
        )
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} needs GPU {local_rank} but this node has {torch.cuda.device_count()}; "
                "set --nproc_per_node to at most the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on cuda or cpu, not {dev.type}; set device to cuda or cpu")
    try:
        timeout_s = float(os.environ.get("GPT2LAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise UserError(f"GPT2LAB_DIST_TIMEOUT must be a number of seconds, got {os.environ['GPT2LAB_DIST_TIMEOUT']!r}") from None
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=_attempt_store(world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout, device_id=dev if backend == "nccl" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0,
                   backend=backend, restart_count=restart_count)


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The rendezvous store of this attempt of a torchrun job, or None for torch's default.

    torchrun (c10d rendezvous) keeps one store for all restarts of a job, so a process group
    created after --max-restarts restarted it would read the dead attempt's addresses and fail to
    connect; keys are put under a per-attempt prefix instead.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"gpt2lab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place across ranks with op "sum", "mean", "max" or "min" and return it.
    A no-op in one process. CPU tensors work with NCCL too (they take a round trip to the GPU)."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if not dist.is_initialized():
        return tensor
    work = tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=_REDUCE_OPS[op])
    if op == "mean":
        work /= dist.get_world_size()  # Gloo has no AVG; sum then divide everywhere
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def from_rank0(compute: Callable[[], Any]) -> Any:
    """`compute()` run on rank 0 only, its result on every rank: for a decision every rank must share
    (a measured dtype, say), taken once. The result must be JSON-able (it travels as JSON text, so
    every rank gets the same plain data). Every rank calls this at the same point; in one process it
    is just `compute()`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    box = [json.dumps(compute()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return json.loads(box[0])


# --------------------------------------------------------------------------------------------------
# Parallelizing a model


def resolve_strategy(strategy: str, model: GPT, env: DistEnv) -> str:
    """The concrete strategy for `strategy` ("auto" picks one): "none" in one process; DDP when the
    fp32 weights, gradients and AdamW moments (16 bytes per parameter) take at most half the device
    memory (the rest is for activations); FSDP otherwise."""
    if strategy not in STRATEGIES:
        raise UserError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not env.distributed:
        if strategy in ("ddp", "fsdp"):
            say(f"gpt2lab: parallel.strategy={strategy} ignored: one process (launch with torchrun to use several)")
        return "none"
    if strategy != "auto":
        return strategy
    if env.world_size == 1:
        return "none"
    if env.device.type != "cuda":
        return "ddp"
    state_bytes = 16 * model.num_params()
    return "ddp" if state_bytes <= torch.cuda.get_device_properties(env.device).total_memory // 2 else "fsdp"


def parallelize(model: GPT, cfg: Any, env: DistEnv) -> nn.Module:
    """Apply, in this order, activation checkpointing, torch.compile per block, and FSDP2 (per block,
    then the root) or DDP, as `cfg` (a ParallelConfig) asks; return the module to train.

    `model` is built and initialized (or loaded) on the CPU or on env.device; the same seed gives the
    same weights at every world size. FSDP shards it in place and moves the shards to env.device;
    otherwise it is moved whole. Gradients are summed across ranks (see the module docstring).
    cfg fields: strategy (auto|none|ddp|fsdp), fsdp.reshard_after_forward, fsdp.mixed_precision
    (bf16 params with fp32 gradient reduction on GPU; ignored on CPU), activation_checkpointing
    (none|block|selective), compile_blocks.
    """
    strategy = resolve_strategy(cfg.strategy, model, env)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile_blocks:
        for block in model.transformer.h:
            block.compile()  # in place: parameter names keep no `_orig_mod.` prefix
    if strategy == "fsdp":
        return apply_fsdp(model, env, cfg.fsdp.reshard_after_forward, cfg.fsdp.mixed_precision)
    model.to(env.device)
    if strategy == "ddp":
        return apply_ddp(model, env)
    return model


def apply_activation_checkpointing(model: GPT, mode: str) -> None:
    """Recompute activations in backward instead of storing them: "block" wraps every block,
    "selective" every other block (half the saving for half the recompute). A wrapped block keeps
    only its input for backward and runs its forward again there."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise UserError(
            f"parallel.activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, got {mode!r}"
        )
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = 1 if mode == "block" else 2
    for i, block in enumerate(model.transformer.h):
        if i % every == 0:
            model.transformer.h[i] = checkpoint_wrapper(block)


def _mixed_precision(enabled: bool, device: torch.device):
    """bf16 parameters for compute with fp32 gradient reduction on GPU; plain fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if enabled and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: GPT, env: DistEnv, reshard_after_forward: bool = True,
               mixed_precision: bool = True) -> nn.Module:
    """Shard each block, then the root (embeddings, final norm, tied LM head), over all ranks with FSDP2.

    The last block and the root keep their parameters gathered after forward: backward needs them
    at once, so resharding them would only add an all-gather.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UserError(f"parallel.strategy=fsdp needs a newer torch than {torch.__version__} (FSDP2 with summed "
                        "gradient reduction; 2.13 is tested); upgrade torch or use parallel.strategy ddp")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp_policy = _mixed_precision(mixed_precision, env.device)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy,
                    reshard_after_forward=bool(reshard_after_forward) and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    for module in model.modules():
        if hasattr(module, "set_requires_gradient_sync"):  # every FSDPModule: sum, do not average
            module.set_gradient_divide_factor(1.0)
            if env.backend == "gloo":
                module.set_force_sum_reduction_for_comms(True)  # Gloo has no pre-multiplied sum
    return model


def _sum_allreduce_hook(state, bucket):  # unannotated: DDP rejects string annotations on hooks
    """DDP communication hook: all-reduce a dist.GradBucket of gradients as a plain sum (DDP's
    default averages); returns a future of the reduced flat tensor."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def apply_ddp(model: GPT, env: DistEnv) -> nn.Module:
    """Replicate the model with DDP; gradients are summed across ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def is_fsdp(module: nn.Module) -> bool:
    """True if `module` was sharded by `parallelize` with FSDP2."""
    return hasattr(module, "set_requires_gradient_sync") and not hasattr(module, "no_sync")


@contextlib.contextmanager
def no_sync(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: backward accumulates gradients locally, without the cross-rank reduction.

    Use it on every micro-batch of a step but the last (`module` may be torch.compile'd). Under DDP
    this is required, not an optimization: DDP reduces the accumulated .grad, and with summed
    reduction a sync per micro-batch would count earlier micro-batches once per rank. FSDP keeps
    reduce-scattering every micro-batch into separate sharded gradients (correct either way):
    skipping would hold a full unsharded gradient on every rank, the memory FSDP is chosen to save.
    In one process this does nothing.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    while hasattr(module, "_orig_mod"):  # torch.compile's wrapper
        module = module._orig_mod
    if enabled and isinstance(module, DDP):
        with module.no_sync():
            yield
    else:
        yield


def unwrap(module: nn.Module) -> GPT:
    """The GPT inside DDP / torch.compile wrappers (an FSDP-sharded GPT is its own root)."""
    while not isinstance(module, GPT):
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            raise TypeError(f"no GPT inside {type(module).__name__}")
    return module
