"""Run configuration: every section of a run as torch-free dataclasses, YAML presets and dotted overrides.

    cfg = load_config("shakespeare_char", ["--optim.lr", "3e-4", "--train.max_steps=100"])
    cfg.optim.lr                     # 0.0003

A run config is a tree of sections (`RunConfig` below). Every field carries a docstring (the string
literal right after it, as in `architecture.GPTConfig`); those docstrings are the text of
`gpt2lab train --help`, so the help can never drift from the code. This module imports no torch, so
`--help` reads the classes themselves; the modules that consume a section import it from here
(`optim.OptimConfig`, `trainer.TrainConfig`, ... are these classes).

A field with a fixed set of values is typed with a `Literal` alias below; its values are written
only there (consumers take them with `typing.get_args`), and coercion rejects any other value.

Precedence: dataclass defaults < preset YAML (`--config NAME|PATH`) < command-line overrides.
Presets live in `gpt2lab/configs/NAME.yaml` (the repo's top-level `configs/` links there).
Values are coerced to the field's type (int, float, bool, None, list, tuple, Literal); an unknown key
is a one-line UserError that suggests the closest known key, and errors in a YAML file name its line.
That machinery (coercion, YAML, overrides, argparse options) is `gpt2lab.configparse`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from gpt2lab.architecture import PRESETS, GPTConfig
from gpt2lab.configparse import (
    apply_dict,
    apply_yaml,
    check_choices,
    get_dotted,
    iter_fields,
    parse_overrides,
    save_yaml,
    set_dotted,
    to_dict,
    to_yaml,
)
from gpt2lab.devices import DtypeName
from gpt2lab.errors import UserError
from gpt2lab.timebudget import parse_duration

__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "FSDPConfig", "LogConfig", "LoraConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "SFTConfig", "TrainConfig", "all_keys", "check_seed", "config_from_args",
    "from_dict", "get_dotted", "iter_fields", "load_config", "preset_names", "save_yaml", "to_dict", "to_yaml",
]

# --------------------------------------------------------------------------------------------------
# The allowed values of choice fields (each written once; `typing.get_args(Strategy)` -> the tuple)

DataFormat = Literal["tokens", "sft"]
DataOrder = Literal["random", "sequential"]
Truncation = Literal["truncate", "drop"]
Schedule = Literal["cosine", "constant", "wsd"]
OptimizerName = Literal["adamw", "muon"]
MuonDtype = Literal["auto", "bf16", "fp32"]
Strategy = Literal["auto", "none", "ddp", "fsdp"]
ActivationCheckpointing = Literal["none", "block", "selective"]
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
"""train.sdpa_backend name -> its torch.nn.attention.SDPBackend member."""
SdpaBackend = Literal[("auto", *SDPA_BACKENDS)]

SEED_MAX = 2**63 - 1
"""The largest seed: random, numpy's generators and torch.manual_seed all take 0..SEED_MAX."""


def check_seed(seed: int | None, name: str) -> None:
    """UserError unless `seed` (from option or field `name`) is None or a whole number in 0..SEED_MAX."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise UserError(f"{name} must be a whole number from 0 to 2**63-1, got {seed}")


# Settings whose change on resume changes the continuation, so it needs checkpoint.allow_changes; any
# other keeps it bitwise what it would have been (micro-batches and ranks split the same global batch;
# frequencies only decide what is logged when). A key ending in "." stands for its whole section.
RESULT_CHANGING = ("train.tokens_per_step", "train.seed", "train.max_steps", "train.max_time", "train.dtype",
                   "train.fused_loss",
                   "data.order", "data.dir", "data.format", "data.sft.", "optim.", "lora.", "model.")

# --------------------------------------------------------------------------------------------------
# Sections of the model and the data


def _model_config_fields() -> list[tuple[str, Any, Any]]:
    """GPTConfig's fields, each defaulting to None (= take it from the preset, the data or GPTConfig)."""
    hints = typing.get_type_hints(GPTConfig)
    out = []
    for f in fields(GPTConfig):
        tp = hints[f.name]
        out.append((f.name, tp if type(None) in typing.get_args(tp) else tp | None, field(default=None)))
    return out


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
class SFTConfig:
    """Instruction-tuning data (used when data.format is "sft")."""

    path: str | None = None
    """Records file (.json array or .jsonl), or "alpaca" for the Stanford Alpaca set."""
    template: str = "alpaca"
    """Chat template (gpt2lab.chat_template): "alpaca", "chat" (messages records), "special" (messages
    records, a trained tokenizer's chat tokens), or a custom string such as "Q: {instruction}\\nA: {output}".
    Recorded in the checkpoints: chat and sample --chat use it."""
    mask_prompt: bool = True
    """Leave prompt tokens out of the loss (only response tokens are counted)."""
    truncation: Truncation = "truncate"
    """Records longer than block_size: "truncate" (cut the end) or "drop" (skip the record)."""
    packing: bool = False
    """Lay several examples end to end in one row (fewer padding tokens)."""
    val_fraction: float = 0.05
    """Fraction of records held out for validation (0 = none)."""
    skip_invalid: bool = False
    """Skip malformed records (with a count) instead of stopping at the first one."""


@dataclass
class DataConfig:
    """Training data."""

    dir: str = "data/default"
    """Prepared dataset directory (token shards + meta.json), for format "tokens"."""
    format: DataFormat = "tokens"
    """"tokens" (pretraining on prepared shards) or "sft" (instruction records, see data.sft)."""
    prepare: str | None = "default"
    """Source that `gpt2lab prepare` runs into data.dir when it has no meta.json ("default",
    "shakespeare_char", "shakespeare", ...; null = never prepare automatically)."""
    order: DataOrder = "random"
    """Batch order: "random" (random windows, nanoGPT) or "sequential" (consecutive windows)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Instruction-tuning data."""

# --------------------------------------------------------------------------------------------------
# Optimizer, training loop, parallelism


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 6e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 6e-5
    """Final learning rate of the cosine and wsd schedules."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings (params with >= 2 dims) only."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool | Literal["auto"] = "auto"
    """Fused AdamW kernel: "auto" = fused on CUDA and CPU (several times faster there), foreach
    elsewhere; true/false to force."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still reported)."""
    schedule: Schedule = "cosine"
    """"cosine" (warmup, cosine decay to min_lr at max_steps), "constant" (warmup, then lr), or
    "wsd" (warmup, stable lr, linear decay to min_lr over the last decay_fraction of the steps)."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    decay_fraction: float = 0.2
    """wsd only: fraction of max_steps spent decaying to min_lr."""
    name: OptimizerName = "adamw"
    """"adamw", or "muon": torch.optim.Muon (torch >= 2.9) for the 2-D weights inside the blocks and
    AdamW for embeddings, the tied LM head, biases and LayerNorm gains (not with FSDP)."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon matrices (the schedule scales it as it scales optim.lr)."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    muon_dtype: MuonDtype = "auto"
    """Dtype of Muon's orthogonalisation (its Newton-Schulz matmuls): "auto" = bf16 as torch.optim.Muon
    does, except on a CPU where bf16 matmuls in those layouts measure slower than fp32 (there fp32;
    precision.muon_precision); "bf16" or "fp32" to force."""


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
    resolved_config.yaml and checkpoints (so --resume continues exactly)."""
    tokens_per_step: int = 65536
    """Global batch in tokens per optimizer step (all ranks, all micro-batches); must be a multiple of
    micro_batch_size * block_size * world_size (the quotient is the gradient accumulation)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one device."""
    seed: int = 1337
    """Seed of the model init, the data order and dropout."""
    device: str = "auto"
    """"auto" (the rank's CUDA device if any, else cpu), "cpu", "cuda", "cuda:N" or "mps"."""
    dtype: DtypeName = "auto"
    """Compute precision: "auto" (bf16 on CUDA with bf16 support, fp16 + loss scaling on older CUDA; on
    CPU bf16 only where the model's training steps measure >= 1.3x faster in bf16 than fp32, cached in
    precision.json; GPT2LAB_CPU_DTYPE=fp32|bf16 decides instead), "fp32", "bf16" or "fp16". Weights
    and optimizer state stay fp32."""
    compile: bool = False
    """torch.compile the model (CUDA; slow to start, faster steps)."""
    fused_loss: bool = False
    """Compute the LM head and the loss chunk by chunk, never holding the (tokens x vocab) logits: same
    loss and gradients, several GB less memory at GPT-2 scale (see gpt2lab.losses)."""
    sdpa_backend: SdpaBackend = "auto"
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


@dataclass
class FSDPConfig:
    """FSDP2 options (parallel.strategy "fsdp")."""

    reshard_after_forward: bool = True
    """Free gathered parameters after the forward (less memory, one more all-gather in backward)."""
    mixed_precision: bool = True
    """Gather parameters and reduce gradients in the compute dtype (bf16) instead of fp32."""


@dataclass
class ParallelConfig:
    """Multi-GPU training (launch with torchrun)."""

    strategy: Strategy = "auto"
    """"auto" (ddp with several ranks, none with one), "none", "ddp" or "fsdp" (FSDP2, sharded)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP2 options."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Recompute activations in backward to save memory: "none", "block" (every block) or
    "selective" (every other block)."""
    compile_blocks: bool = False
    """With train.compile: compile each block separately (faster compile; used with FSDP)."""

# --------------------------------------------------------------------------------------------------
# Run directory, logging, in-training eval, LoRA


@dataclass
class CheckpointConfig:
    """Run directory and checkpoints."""

    out_dir: str | None = None
    """Run directory (resolved_config.yaml, metrics.jsonl, checkpoints/, loss.png); default out/<config name>."""
    every: int = 500
    """Save a checkpoint every this many steps and at the end (0 = only at the end)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints (0 = keep all)."""
    resume: bool | str = False
    """false = fresh run (refused if out_dir already has checkpoints); true or "auto" = continue from
    the newest checkpoint of out_dir ("auto" starts fresh when there is none); a path = continue
    from that checkpoint."""
    allow_changes: bool = False
    """With resume: accept settings that change the continuation ({result_changing}); each is logged and
    recorded in metrics.jsonl and resolved_config.yaml. Settings that keep it exact (micro-batch size, eval, log
    and checkpoint frequency, device, number of ranks) are always accepted and logged."""

    __doc_values__ = {"result_changing": ", ".join(k + "*" if k.endswith(".") else k for k in RESULT_CHANGING)}


@dataclass
class LogConfig:
    """Where metrics go (metrics.jsonl in the run directory is always written)."""

    progress: bool = True
    """Live progress bar when the console is a terminal (plain lines otherwise)."""
    tensorboard: bool = False
    """Also write TensorBoard events to <out_dir>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "gpt2lab"
    """W&B project name."""


@dataclass
class EvalConfig:
    """Eval tasks run during training (those of `gpt2lab eval`, at their default options)."""

    tasks: list[str] = field(default_factory=list)
    """Tasks run every eval.every steps, by their `gpt2lab eval` names, e.g. hellaswag,lambada,wikitext; lm-eval:TASK
    runs lm-evaluation-harness's task TASK (a name, or the path of a task YAML)."""
    every: int = 0
    """Run eval.tasks every this many steps (0 = off)."""
    limit: int | None = None
    """Examples per task and evaluation: the first N (null = all)."""
    hellaswag_every: int = 0
    """Older spelling, still accepted: N means eval.tasks [hellaswag] with eval.every N (0 = off)."""
    hellaswag_limit: int | None = None
    """Older spelling, still accepted: eval.limit for eval.hellaswag_every (null = all 10,042 tasks)."""


@dataclass
class LoraConfig:
    """LoRA: train low-rank adapters instead of the full weights."""

    r: int = 0
    """Adapter rank (0 = LoRA off, full finetuning)."""
    alpha: float = 16.0
    """Scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj"])
    """Names of the Linear layers that get adapters (c_attn, c_proj, c_fc, lm_head)."""
    merge: bool = False
    """Merge the adapters into the base weights at the end and save a plain checkpoint."""

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        """From a saved config (a checkpoint's "lora" entry); keys it lacks take these defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------------
# The run


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
        check_choices(self)  # Literal fields set in Python, not through coercion
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
        check_seed(self.train.seed, "train.seed")
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
# Presets and loading (the machinery is gpt2lab.configparse; these are its entry points for a RunConfig)


def config_dir() -> Path:
    """The packaged presets folder (gpt2lab/configs)."""
    return Path(str(resources.files("gpt2lab").joinpath("configs")))


def preset_names() -> list[str]:
    """Names of the packaged YAML presets."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name ("quickstart") or a YAML path -> the file; UserError with the known names."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        return path
    candidate = config_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = preset_names()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown config '{name_or_path}' (presets: {', '.join(names)}; or a path to a .yaml){hint}")


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
    """A RunConfig from `to_dict` output (e.g. a run's resolved_config.yaml)."""
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
