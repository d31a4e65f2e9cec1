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

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig

FORMAT = "gpt2lab-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (torch.compile, DDP, FSDP, activation checkpointing) from every key,
    drop the tied `lm_head.weight` duplicate, and make tensors contiguous CPU copies for saving."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        if key == "lm_head.weight":
            continue
        out[key] = value.detach().to("cpu").contiguous()
    return out


def atomic_dir(final: Path):
    """Context manager yielding a temp directory next to `final`; on success it is renamed to `final`
    (replacing an older one of the same name); on error it is removed and `final` is untouched."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path) -> None:
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_dir_contents(self.tmp)
        if self.final.exists():
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def _fsync_dir_contents(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


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
    from safetensors.torch import save_file

    directory = Path(directory)
    config = {"format": FORMAT, "version": VERSION, "model": model_config.to_dict(), "tokenizer": tokenizer,
              "step": step, **(extra or {})}
    save_file(clean_state_dict(model_state), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
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
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (under run_dir/checkpoints or run_dir itself), oldest first."""
    run_dir = Path(run_dir)
    base = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := _STEP_DIR.match(p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def find_latest(path: str | Path) -> Path | None:
    """The checkpoint `path` names: itself if it is one, else the newest in a run directory."""
    if is_checkpoint(path):
        return Path(path)
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def read_versioned_json(file: Path, fmt: str, version: int, what: str) -> dict:
    """A JSON config that names its `format` and `version` (checkpoint and adapter configs), validated;
    `what` says what the directory should be ("gpt2lab checkpoint", "LoRA adapter")."""
    if not file.is_file():
        raise UserError(f"{file.parent} is not a {what}: {file.name} is missing")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    found = config.get("format") if isinstance(config, dict) else None
    if found != fmt:
        raise UserError(f"{file} is not a {what} config (format={found!r})")
    if config.get("version", 0) > version:
        raise UserError(f"{file} has {what} version {config['version']}; this gpt2lab reads up to {version}")
    return config


def read_config(path: str | Path) -> dict:
    """The config.json of a checkpoint directory, validated."""
    return read_versioned_json(Path(path) / CONFIG_FILE, FORMAT, VERSION, "gpt2lab checkpoint")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The safetensors weights of a checkpoint (no pickle involved)."""
    from safetensors.torch import load_file

    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    return load_file(str(f), device=str(device))


def load_model_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load clean weights into `model`, with a one-line error naming the first mismatch."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the model config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{source}: weight {k} has shape {tuple(v.shape)} but the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Build the model a checkpoint (or run directory) describes; returns (model, config dict)."""
    ckpt = find_latest(path)
    if ckpt is None:
        if not Path(path).exists():
            raise UserError(f"checkpoint path {path} does not exist")
        raise UserError(f"{path} holds no gpt2lab checkpoint (expected config.json or checkpoints/step_*/)")
    config = read_config(ckpt)
    model_config = GPTConfig.from_dict(config["model"])
    model = GPT.empty(model_config, device)
    lora = config.get("lora")
    if lora and lora.get("r"):  # a LoRA run's checkpoint also holds lora_A/lora_B: load, then fold them in
        from gpt2lab.lora import apply_lora, merge_lora

        apply_lora(model, lora)
    load_model_weights(model, load_weights(ckpt, device), str(ckpt))
    if lora and lora.get("r"):
        merge_lora(model)
    config["path"] = str(ckpt)
    return model, config


def load_train_state(path: str | Path) -> dict:
    """The train state of a checkpoint, loaded with weights_only=True (no code execution)."""
    f = Path(path) / TRAIN_STATE_FILE
    if not f.is_file():
        raise UserError(f"{path} has no {TRAIN_STATE_FILE}: it holds weights only and cannot be resumed")
    return torch.load(f, map_location="cpu", weights_only=True)


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
