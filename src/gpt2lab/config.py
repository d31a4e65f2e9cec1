"""Run configuration: documented dataclasses, YAML presets and dotted command-line overrides.

    cfg = load_config("shakespeare_char", ["--optim.lr", "3e-4", "--train.max_steps=100"])
    cfg.optim.lr                     # 0.0003

A run config is a tree of sections (`RunConfig` below). Every field carries a docstring (the string
literal right after it, as in `model.GPTConfig`); those docstrings are the text of
`gpt2lab train --help`, so the help can never drift from the code.

Precedence: dataclass defaults < preset YAML (`--config NAME|PATH`) < command-line overrides.
Presets live in `gpt2lab/configs/NAME.yaml` (the repo's top-level `configs/` links there).
Values are coerced to the field's type (int, float, bool, None, list, tuple); an unknown key is a
one-line UserError that suggests the closest known key, and errors in a YAML file name its line.
That machinery (coercion, YAML, overrides, argparse options, the --help schema file) is
`gpt2lab.configparse`; this module is the schema itself and its load/save entry points.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpt2lab.configparse import (
    apply_dict,
    apply_yaml,
    get_dotted,
    iter_fields,
    parse_overrides,
    preset_names,
    resolve_config_path,
    save_yaml,
    set_dotted,
    to_dict,
    to_yaml,
)
from gpt2lab.data.sft import SFTConfig
from gpt2lab.devices import DTYPE_CHOICES
from gpt2lab.errors import UserError
from gpt2lab.evaluate.training import EvalConfig
from gpt2lab.lora import LoraConfig
from gpt2lab.metrics import LogConfig
from gpt2lab.model import PRESETS, GPTConfig
from gpt2lab.optim import OptimConfig
from gpt2lab.parallel import ParallelConfig
from gpt2lab.timebudget import parse_duration
from gpt2lab.trainer import TrainConfig

__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "LogConfig", "LoraConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RunConfig", "SFTConfig", "TrainConfig", "all_keys", "config_from_args", "from_dict",
    "get_dotted", "iter_fields", "load_config", "preset_names", "save_yaml", "to_dict", "to_yaml",
]

# --------------------------------------------------------------------------------------------------
# Sections


def _model_config_fields() -> list[tuple[str, Any, Any]]:
    """GPTConfig's fields, each defaulting to None (= take it from the preset, the data or GPTConfig)."""
    hints = typing.get_type_hints(GPTConfig)
    out = []
    for f in fields(GPTConfig):
        tp = hints[f.name]
        out.append((f.name, tp if _allows_none(tp) else tp | None, field(default=None)))
    return out


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


@dataclass
class _ModelInit:
    init: str = "scratch"
    """Where the weights come from: "scratch" (random init of the architecture below), an OpenAI
    preset name ("gpt2", "gpt2-medium", ...), a Hugging Face GPT-2 directory, or a gpt2lab
    checkpoint / run directory."""
    preset: str | None = None
    """Architecture preset for scratch training (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-mini,
    gpt2-tiny); the architecture fields below override it."""


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", _model_config_fields(), bases=(_ModelInit,),
)
ModelConfig.__doc__ = (
    "The model: where its weights come from (`init`) and its architecture. Architecture fields "
    "left unset (null) come from `preset`, then from the data (vocab_size = the tokenizer's), then "
    "from GPTConfig's defaults (GPT-2 124M). With a pretrained `init` only dropout may be changed."
)
ModelConfig.__module__ = __name__
ModelConfig.__field_docs_from__ = (GPTConfig,)  # made by make_dataclass: its field docs are GPTConfig's
_FALLBACKS = {f.name: f.default for f in fields(GPTConfig)} | {"vocab_size": "the data's vocabulary"}
ModelConfig.__shown_defaults__ = {name: f"null = the preset's, else {value}" for name, value in _FALLBACKS.items()}


@dataclass
class DataConfig:
    """Training data."""

    dir: str = "data/default"
    """Prepared dataset directory (token shards + meta.json), for format "tokens"."""
    format: str = "tokens"
    """"tokens" (pretraining on prepared shards) or "sft" (instruction records, see data.sft)."""
    prepare: str | None = "default"
    """Source that `gpt2lab prepare` runs into data.dir when it has no meta.json ("default",
    "shakespeare_char", "shakespeare", ...; null = never prepare automatically)."""
    order: str = "random"
    """Batch order: "random" (random windows, nanoGPT) or "sequential" (consecutive windows)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Instruction-tuning data."""


@dataclass
class CheckpointConfig:
    """Run directory and checkpoints."""

    out_dir: str | None = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, loss.png); default out/<config name>."""
    every: int = 500
    """Save a checkpoint every this many steps and at the end (0 = only at the end)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints (0 = keep all)."""
    resume: bool | str = False
    """false = fresh run (refused if out_dir already has checkpoints); true or "auto" = continue from
    the newest checkpoint of out_dir ("auto" starts fresh when there is none); a path = continue
    from that checkpoint."""
    allow_changes: bool = False
    """With resume: accept settings that change the continuation (train.tokens_per_step, train.seed,
    train.max_steps, train.dtype, data.order, data.dir, optim.*, lora.*); each is logged and recorded in
    metrics.jsonl and config.yaml. Settings that keep it exact (micro-batch size, eval, log and
    checkpoint frequency, device, number of ranks) are always accepted and logged."""


@dataclass
class RunConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Multi-GPU training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Run directory and checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """In-training benchmarks."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""
    name: str = "run"
    """Name of the run (the preset's name by default); the default out_dir is out/<name>."""

    def validate(self) -> None:
        """UserError (one line, naming the field) for values outside their allowed set or range."""
        choices = {
            "data.format": ("tokens", "sft"),
            "data.order": ("random", "sequential"),
            "data.sft.truncation": ("truncate", "drop"),
            "optim.schedule": ("cosine", "constant", "wsd"),
            "optim.name": ("adamw", "muon"),
            "optim.muon_dtype": ("auto", "bf16", "fp32"),
            "train.dtype": DTYPE_CHOICES,
            "train.sdpa_backend": ("auto", "flash", "cudnn", "efficient", "math"),
            "parallel.strategy": ("auto", "none", "ddp", "fsdp"),
            "parallel.activation_checkpointing": ("none", "block", "selective"),
        }
        for key, allowed in choices.items():
            value = get_dotted(self, key)
            if value not in allowed:
                raise UserError(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")
        positive = ("train.max_steps", "train.tokens_per_step", "train.micro_batch_size", "train.log_every")
        for key in positive:
            if get_dotted(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {get_dotted(self, key)}")
        non_negative = ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps",
                        "train.eval_every", "train.eval_tokens", "train.sample_every", "train.sample_tokens",
                        "checkpoint.every", "checkpoint.keep_last", "eval.hellaswag_every", "lora.r")
        for key in non_negative:
            if get_dotted(self, key) < 0:
                raise UserError(f"{key} must be >= 0, got {get_dotted(self, key)}")
        if not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise UserError(f"optim.betas={','.join(map(str, self.optim.betas))}: both must be in [0, 1), e.g. 0.9,0.95")
        if self.optim.name == "muon" and self.parallel.strategy == "fsdp":
            raise UserError("optim.name=muon cannot run under parallel.strategy=fsdp (Muon orthogonalises whole "
                            "matrices, FSDP shards them); use parallel.strategy ddp, or optim.name adamw")
        if self.optim.eps <= 0:
            raise UserError(f"optim.eps must be positive (e.g. 1e-8), got {self.optim.eps}")
        if self.train.eval_batches is not None and self.train.eval_batches < 0:
            raise UserError(f"train.eval_batches must be >= 0 (or null: size the set with train.eval_tokens), "
                            f"got {self.train.eval_batches}")
        if self.train.sample_temperature < 0:
            raise UserError(f"train.sample_temperature must be >= 0 (0 = greedy), got {self.train.sample_temperature}")
        if self.train.sample_top_k is not None and self.train.sample_top_k < 1:
            raise UserError(f"train.sample_top_k must be at least 1 (or null = all), got {self.train.sample_top_k}")
        if self.train.max_time is not None:
            parse_duration(self.train.max_time)
        if not 0.0 <= self.optim.decay_fraction <= 1.0:
            raise UserError(f"optim.decay_fraction must be in [0, 1], got {self.optim.decay_fraction}")
        if self.optim.fused not in (True, False, "auto"):
            raise UserError(f"optim.fused must be true, false or 'auto', got {self.optim.fused!r}")
        if self.optim.min_lr > self.optim.lr:
            raise UserError(f"optim.min_lr={self.optim.min_lr} is larger than optim.lr={self.optim.lr}")
        if self.model.preset is not None and self.model.preset not in PRESETS:
            close = difflib.get_close_matches(self.model.preset, PRESETS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"model.preset '{self.model.preset}' is unknown (known: {', '.join(PRESETS)}){hint}")

    @property
    def out_dir(self) -> Path:
        """The run directory."""
        return Path(self.checkpoint.out_dir or Path("out") / self.name)


# --------------------------------------------------------------------------------------------------
# Loading (the machinery is gpt2lab.configparse; these are its entry points for a RunConfig)


def all_keys() -> list[str]:
    """Every dotted key of a RunConfig ("model.init", ..., "name")."""
    return [key for key, *_ in iter_fields(RunConfig)]


def load_config(config: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Defaults < preset YAML `config` (name or path) < `overrides` (["--a.b", "v", "--c.d=w"] or {key: value})."""
    cfg = RunConfig()
    if config is not None:
        path = resolve_config_path(config)
        cfg.name = path.stem
        apply_yaml(cfg, path)
    items = parse_overrides(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    for key, value in items:
        set_dotted(cfg, key, value, "command line")
    cfg.validate()
    return cfg


def from_dict(d: dict) -> RunConfig:
    """A RunConfig from `to_dict` output (e.g. a run's config.yaml)."""
    cfg = RunConfig()
    apply_dict(cfg, d, "saved config")
    return cfg


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a parsed command line made by `commands.common.add_config_arguments`."""
    names = set(all_keys())
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    if args.out is not None:
        overrides["checkpoint.out_dir"] = args.out
    if args.resume is not None:
        overrides["checkpoint.resume"] = args.resume
    return load_config(args.config, overrides)
