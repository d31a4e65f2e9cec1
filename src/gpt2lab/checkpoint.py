"""Checkpoints that describe themselves, written atomically, loaded without executing pickled code.

A checkpoint is a directory:

    step_000500/
      config.json        {"format": "gpt2lab-checkpoint", "version": 1, "model": GPTConfig fields,
                          "tokenizer": tokenizer identity, "step": 500, ...caller's extras}
      model.safetensors  weights with clean keys (no `_orig_mod.` / `module.`); the tied
                         embedding is stored once, as `transformer.wte.weight`
      train_state.pt     optional: optimizer, scheduler, RNG and loader state (torch.load weights_only)

Runs keep their checkpoints under `<run_dir>/checkpoints/`; `find_latest` picks the newest
complete one (a directory is complete once it has been renamed into place, so a crash mid-write
never leaves a half checkpoint with a final name).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2lab.config import LoraConfig
from gpt2lab.errors import UserError
from gpt2lab.fileio import (
    atomic_dir,
    check_safetensors,
    clean_state_dict,
    in_file,
    load_model_weights,
    read_json,
    read_safetensors,
    read_versioned_json,
    save_safetensors,
)
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.parallel import barrier, is_fsdp, unwrap
from gpt2lab.tokenizer import TOKENIZER_SHAPE

FORMAT = "gpt2lab-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
DCP_DIR = "dcp"
"""Subdirectory of an FSDP checkpoint holding the sharded model and optimizer (torch.distributed.checkpoint)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
T = TypeVar("T")

CONFIG_SHAPE = {"format": str, "version": int, "model": GPTConfig, "tokenizer?": (TOKENIZER_SHAPE, None),
                "step?": (int, None), "lora?": (LoraConfig, None)}
"""What config.json holds (see `fileio.shape_problem`); callers may add entries of their own."""
FIX = "restore it or use another checkpoint"


def write_checkpoint(
    directory: str | Path,
    model_state: dict[str, torch.Tensor],
    model_config: GPTConfig,
    tokenizer: dict,
    *,
    step: int | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write the files of a checkpoint into an existing `directory` (not atomic: wrap it in `atomic_dir`)."""
    directory = Path(directory)
    config = {"format": FORMAT, "version": VERSION, "model": model_config.to_dict(), "tokenizer": tokenizer,
              "step": step, **(extra or {})}
    save_safetensors(clean_state_dict(model_state), directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE_FILE)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module | dict[str, torch.Tensor],
    model_config: GPTConfig,
    tokenizer: dict,
    *,
    step: int | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Atomically write a checkpoint directory. `model` is a module (wrappers are fine) or a state dict."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_checkpoint(tmp, state, model_config, tokenizer, step=step, train_state=train_state, extra=extra)
    return path


def is_checkpoint(path: str | Path) -> bool:
    """True for a gpt2lab checkpoint directory, and for a damaged one (a step_* directory whose
    config.json no longer parses), so loading it reports what is wrong instead of "not a checkpoint"."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return read_json(p, dict).get("format") == FORMAT
    except UserError:
        return bool(_STEP_DIR.match(Path(path).name))


def _step_dirs(run_dir: Path) -> list[Path]:
    base = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := _STEP_DIR.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run (under run_dir/checkpoints or run_dir itself), oldest first, damaged ones
    included (see `intact_checkpoints`)."""
    return _step_dirs(Path(run_dir))


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be loaded (a truncated or corrupt file, named), or None when intact.
    Reads every header; the train state is memory-mapped, so its tensors are not read."""
    try:
        read_config(path)
        check_safetensors(path / WEIGHTS_FILE, FIX)
        if (path / TRAIN_STATE_FILE).exists():
            load_train_state(path, mmap=True)
    except UserError as e:
        return str(e)
    return None


def intact_checkpoints(run_dir: str | Path) -> tuple[list[Path], list[str]]:
    """(the intact checkpoints of a run, oldest first; one line per damaged one, naming it and why).
    Only the newest are checked until one is intact: older ones are taken as they are."""
    ckpts = list_checkpoints(run_dir)
    skipped = []
    while ckpts:
        problem = checkpoint_problem(ckpts[-1])
        if problem is None:
            break
        skipped.append(f"skipped {ckpts.pop().name}: {problem}")
    return ckpts, skipped


def is_merged_checkpoint(path: str | Path) -> bool:
    """True for a directory that holds only a checkpoint `gpt2lab merge-lora` wrote (an earlier output)."""
    path = Path(path)
    try:
        merged = "lora_merged" in read_config(path)
    except UserError:
        return False
    return merged and {p.name for p in path.iterdir()} <= {CONFIG_FILE, WEIGHTS_FILE}


def find_latest(path: str | Path) -> Path | None:
    """The checkpoint `path` names: itself if it is one, else the newest in a run directory."""
    if is_checkpoint(path):
        return Path(path)
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def read_newest(path: str | Path, read: Callable[[Path], T], attempts: int = 20) -> T:
    """`read(checkpoint)` for the checkpoint `path` names (see `find_latest`).

    A live run rotates its checkpoints: it renames a new one into place, then deletes the older ones
    (checkpoint.keep_last), so the checkpoint a reader picked can vanish under it (or be replaced
    under the same name) while it reads. Such a read is started again on the checkpoint that is the
    newest then: a run always holds one complete checkpoint, kept until a newer one is in place.
    A read that fails on a checkpoint that is still there, unchanged, is the checkpoint's own problem
    and raised as it is."""
    path = Path(path)
    ckpt = find_latest(path)
    for _ in range(attempts):
        if ckpt is None:
            if not path.exists():
                raise UserError(f"checkpoint path {path} does not exist")
            raise UserError(f"{path} holds no gpt2lab checkpoint (expected config.json or checkpoints/step_*/)")
        before = _identity(ckpt)
        try:
            return read(ckpt)
        except (UserError, OSError):
            now = find_latest(path)
            if now is None or (now == ckpt and _identity(now) == before):
                raise
            ckpt = now
    raise UserError(f"{path}: its checkpoints were replaced faster than one could be read ({attempts} tries); "
                    "load a checkpoint directory of it instead, or wait for the run to end")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`: a directory replaced under the same name has another; None if gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_config(path: str | Path) -> dict:
    """The config.json of a checkpoint directory, checked against CONFIG_SHAPE and the model's own rules."""
    file = Path(path) / CONFIG_FILE
    config = read_versioned_json(file, FORMAT, VERSION, "gpt2lab checkpoint", CONFIG_SHAPE, FIX)
    with in_file(file, FIX):
        GPTConfig.from_dict(config["model"])
    return config


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The safetensors weights of a checkpoint (no pickle involved); a damaged file is a one-line error."""
    return read_safetensors(Path(path) / WEIGHTS_FILE, FIX, device=str(device))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Build the model a checkpoint (or run directory) describes; returns (model, config dict).

    A LoRA run's checkpoint also holds lora_A/lora_B: load it through `gpt2lab.loading`, which
    applies and merges them; here such a checkpoint is an error."""

    def read(ckpt: Path) -> tuple[GPT, dict]:
        config = read_config(ckpt)
        model = build_model(config, device)
        if has_lora(config):
            raise UserError(f"{ckpt} holds LoRA adapters; load it with gpt2lab.loading.load_model")
        load_model_weights(model, load_weights(ckpt, device), str(ckpt))
        config["path"] = str(ckpt)
        return model, config

    return read_newest(path, read)


def build_model(config: dict, device: str | torch.device = "cpu") -> GPT:
    """The (uninitialised) model a checkpoint's config.json describes."""
    return GPT.empty(GPTConfig.from_dict(config["model"]), device)


def has_lora(config: dict) -> bool:
    """True when a checkpoint's weights include LoRA adapters (a LoRA run's step checkpoints)."""
    return bool((config.get("lora") or {}).get("r"))


def load_train_state(path: str | Path, mmap: bool = False) -> dict:
    """The train state of a checkpoint, loaded with weights_only=True (no code execution); `mmap` maps
    the tensors instead of reading them (enough to check the file)."""
    import pickle

    f = Path(path) / TRAIN_STATE_FILE
    if not f.is_file():
        raise UserError(f"{path} has no {TRAIN_STATE_FILE}: it holds weights only and cannot be resumed")
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # weights_only refused an object: loading it would run code
        raise UserError(f"{f} holds Python objects whose loading would run code, which gpt2lab refuses; "
                        "gpt2lab writes tensors and numbers only, so this file did not come from it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{f} is damaged or truncated ({' '.join(str(e).split())[:100]}); resume from "
                        "an earlier checkpoint") from None


# --------------------------------------------------------------------------------------------------
# Run directories


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in a run directory: <run_dir>/checkpoints/step_000500."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints of a run (0 = keep all), and any
    temp directories a crash mid-save left behind; returns the deleted paths."""
    base = Path(run_dir) / "checkpoints"
    if not base.is_dir():
        return []
    doomed = [p for p in base.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    ckpts = list_checkpoints(run_dir)
    if keep_last > 0:
        doomed += ckpts[:-keep_last]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def check_writable(directory: str | Path, what: str = "checkpoint.out_dir") -> Path:
    """Create `directory` if needed and prove it is writable; a one-line UserError otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{what} {directory} is not writable ({e.strerror}); choose another directory with --out") from None
    return directory


def check_same_architecture(saved: dict, config: GPTConfig, source: str) -> None:
    """UserError naming the first architecture field in which `config` differs from a checkpoint's `saved`
    model dict (dropout may differ: it is a training setting, not part of the weights)."""
    current = config.to_dict()
    for key in current:
        if key == "dropout":
            continue
        if key in saved and saved[key] != current[key]:
            raise UserError(
                f"cannot resume from {source}: it has model.{key}={saved[key]!r} but the config says "
                f"{current[key]!r}; use the checkpoint's architecture or start a new run with --out"
            )


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints (any strategy, any world size)


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state_for_save(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full model state dict with clean keys as CPU tensors on rank 0, None on other ranks.
    Collective under FSDP (shards are gathered to rank 0 one tensor at a time): call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_fsdp(module):
        state = get_model_state_dict(module, options=_full_options(cpu_offload=True))
    else:
        state = unwrap(module).state_dict() if rank == 0 else {}
    return clean_state_dict(state) if rank == 0 else None


def optimizer_state_for_save(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The full optimizer state keyed by parameter names (so any strategy and world size can load it)
    as CPU tensors on rank 0, None on other ranks. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    return state if (not dist.is_initialized() or dist.get_rank() == 0) else None


def save_sharded(
    path: str | Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: dict,
    *,
    model_config: GPTConfig,
    tokenizer: dict,
    step: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a resumable checkpoint directory for any strategy; call on every rank.

    none / DDP: rank 0 writes a normal checkpoint (config.json, model.safetensors, train_state.pt
    holding `extra_state` plus the optimizer state keyed by parameter names).
    FSDP: every rank writes its shards of model and optimizer to `dcp/` (torch.distributed.checkpoint);
    rank 0 adds config.json, consolidated model.safetensors (so sample/eval/convert read it as
    any checkpoint) and train_state.pt holding `extra_state`. The directory is written under a temp
    name on the shared filesystem and renamed by rank 0 once every rank has finished, so a crash
    never leaves a partial checkpoint under the final name.
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if "optimizer" in extra_state:
        raise ValueError("extra_state must not hold 'optimizer'; the optimizer is passed separately")
    if not is_fsdp(module):
        model_state = model_state_for_save(module)
        optim_state = optimizer_state_for_save(module, optimizer)
        if rank == 0:
            with atomic_dir(path) as tmp:
                write_checkpoint(tmp, model_state, model_config, tokenizer, step=step,
                                 train_state={**extra_state, "optimizer": optim_state}, extra=extra)
        barrier()
        return path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with _shared_atomic_dir(path, rank) as tmp:
        sharded = {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}
        dcp.save(sharded, checkpoint_id=str(tmp / DCP_DIR))
        model_state = model_state_for_save(module)
        if rank == 0:
            write_checkpoint(tmp, model_state, model_config, tokenizer, step=step, train_state=extra_state,
                             extra={**(extra or {}), "sharded": DCP_DIR})
    return path


@contextlib.contextmanager
def _shared_atomic_dir(path: Path, rank: int) -> Iterator[Path]:
    """checkpoint.atomic_dir for all ranks: rank 0 creates the temp dir and tells the others its name;
    after every rank has written, rank 0 renames it into place; then all ranks go on."""
    with contextlib.ExitStack() as stack:
        name = [str(stack.enter_context(atomic_dir(path))) if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        yield Path(name[0])
        barrier()  # every rank's shards are written before rank 0 renames
    barrier()  # the final name exists for every rank on return


def load_sharded(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (and optimizer) state from a checkpoint written by `save_sharded` at any world size
    and strategy into `module` as parallelized now (or a plain GPT in one process, with no process
    group); returns the `extra_state` given to save_sharded. Call on every rank."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    train_state = load_train_state(path)
    if (path / DCP_DIR).is_dir():
        _load_dcp(path / DCP_DIR, module, optimizer)
        return train_state
    weights = load_weights(path)
    weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied: stored once
    try:
        set_model_state_dict(module, weights, options=_full_options())
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the model config ({str(e).splitlines()[0]})") from None
    optim_state = train_state.pop("optimizer", None)
    if optimizer is not None:
        if optim_state is None:
            raise UserError(f"{path}/{TRAIN_STATE_FILE} holds no optimizer state; it cannot be resumed")
        set_optimizer_state_dict(module, optimizer, optim_state, options=_full_options())
    return train_state


def _load_dcp(dcp_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(module, optimizer)  # allocates the moments to fill
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=not dist.is_initialized())
    except (RuntimeError, dcp.CheckpointException) as e:
        raise UserError(f"{dcp_dir}: cannot load into this model ({str(e).splitlines()[0]})") from None
    set_model_state_dict(module, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state["optimizer"])
