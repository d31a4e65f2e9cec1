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
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError
from gpt2lab.model import PRESETS, GPTConfig

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


@dataclass
class SFTConfig:
    """Instruction-tuning data (used when data.format is "sft")."""

    path: str | None = None
    """Records file (.json array or .jsonl), or "alpaca" for the Stanford Alpaca set."""
    template: str = "alpaca"
    """Prompt template: "alpaca", "chat" (messages records), or a custom string such as
    "Q: {instruction}\\nA: {output}"."""
    mask_prompt: bool = True
    """Leave prompt tokens out of the loss (only response tokens are counted)."""
    truncation: str = "truncate"
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
    fused: bool | str = "auto"
    """Fused AdamW kernel: "auto" = fused on CUDA and CPU (several times faster there), foreach
    elsewhere; true/false to force."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still reported)."""
    schedule: str = "cosine"
    """"cosine" (warmup, cosine decay to min_lr at max_steps), "constant" (warmup, then lr), or
    "wsd" (warmup, stable lr, linear decay to min_lr over the last decay_fraction of the steps)."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    decay_fraction: float = 0.2
    """wsd only: fraction of max_steps spent decaying to min_lr."""


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 1000
    """Number of optimizer steps."""
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
    """Compute precision: "auto" (bf16 on CUDA with bf16 support, fp16 + loss scaling on older CUDA,
    fp32 on CPU), "fp32", "bf16" or "fp16". Weights and optimizer state stay fp32."""
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
    eval_batches: int = 20
    """Validation micro-batches (of micro_batch_size rows) per evaluation, in total over all ranks, so the
    validation set is the same whatever the world size (rounded up to a multiple of the world size)."""
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

    strategy: str = "auto"
    """"auto" (ddp with several ranks, none with one), "none", "ddp" or "fsdp" (FSDP2, sharded)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP2 options."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward to save memory: "none", "block" (every block) or
    "selective" (every other block)."""
    compile_blocks: bool = False
    """With train.compile: compile each block separately (faster compile; used with FSDP)."""


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
    """Benchmarks run during training."""

    hellaswag_every: int = 0
    """Run HellaSwag every this many steps (0 = off)."""
    hellaswag_limit: int | None = None
    """HellaSwag examples per evaluation (null = all 10,042)."""


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
            "train.dtype": ("auto", "fp32", "bf16", "fp16"),
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
                        "train.eval_every", "train.eval_batches", "train.sample_every", "train.sample_tokens",
                        "checkpoint.every", "checkpoint.keep_last", "eval.hellaswag_every", "lora.r")
        for key in non_negative:
            if get_dotted(self, key) < 0:
                raise UserError(f"{key} must be >= 0, got {get_dotted(self, key)}")
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
# Field docs and types


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal right after each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    if cls is ModelConfig:  # made by make_dataclass: no source of its own
        docs.update(field_docs(GPTConfig))
        docs.update(field_docs(_ModelInit))
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Every leaf field of a config tree: (dotted key, type, default, docstring), in declaration order."""
    out = []
    docs, hints = field_docs(cls), _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(iter_fields(tp, key + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((key, tp, default, docs.get(f.name, "")))
    return out


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _type_name(tp: Any) -> str:
    """A short name of a field type for help text: FLOAT, INT, BOOL, STR, LIST, ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return "LIST"
    return getattr(tp, "__name__", str(tp)).upper()


# --------------------------------------------------------------------------------------------------
# Coercion


class _CoerceError(ValueError):
    pass


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any) -> Any:
    """`value` (from YAML or the command line) converted to type `tp`; ValueError if it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise _CoerceError("null is not allowed")
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str):
            # Text converts to a non-text type where it can ("true" -> True in bool | str), else stays text.
            options = [a for a in options if a is not str] + [a for a in options if a is str]
        else:
            # Exact type first (so 3 stays an int in int | float), then conversions in declared order.
            options = [a for a in options if _is_instance(value, a)] + options
        for a in options:
            try:
                return coerce(value, a)
            except _CoerceError:
                continue
        raise _CoerceError(f"expected {_type_name(tp)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _CoerceError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.replace("_", ""))
            with contextlib.suppress(ValueError):
                f = float(value)  # "5e3"
                if f.is_integer():
                    return int(f)
        raise _CoerceError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError("expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise _CoerceError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _CoerceError("expected a string")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_scalar(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0]) for v in value)
            if len(value) != len(args):
                raise _CoerceError(f"expected a list of {len(args)} values")
            return tuple(coerce(v, a) for v, a in zip(value, args))
        return [coerce(v, args[0] if args else Any) for v in value]
    raise _CoerceError(f"unsupported type {tp}")


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(tp, type) and isinstance(value, tp)


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it ("3" -> 3, "true" -> True, "[a, b]" -> list)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------------------------------
# Setting values


def all_keys() -> list[str]:
    return [key for key, *_ in iter_fields(RunConfig)]


def _suggest(key: str) -> str:
    """' (did you mean X?)' for the known key closest to an unknown one, or ''."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"; did you mean '{same_leaf[0]}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        by_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.7)
        close = [k for k in keys if by_leaf and k.endswith("." + by_leaf[0])]
    return f"; did you mean '{close[0]}'?" if close else ""


def set_dotted(cfg: RunConfig, key: str, value: Any, where: str) -> None:
    """Set field `key` ("optim.lr") of `cfg` to `value` coerced to the field's type.

    `where` says where the value came from ("command line", "configs/x.yaml:12") for error messages.
    """
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            raise UserError(f"{where}: unknown config key '{key}'{_suggest(key)}")
        tp = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise UserError(f"{where}: '{key}' is a section; set its fields, e.g. {key}.{fields(tp)[0].name}")
                for sub, v in value.items():
                    set_dotted(cfg, f"{key}.{sub}", v, where)
                return
            try:
                setattr(obj, part, coerce(value, tp))
            except _CoerceError as e:
                raise UserError(f"{where}: {key}={value!r} is not a valid {_type_name(tp)}: {e}") from None
            return
        obj = getattr(obj, part)


def _flatten(data: dict, lines: dict[str, int], prefix: str = "") -> list[tuple[str, Any, int | None]]:
    """A nested mapping as (dotted key, value, line) leaves; sections recurse into their fields."""
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, lines, key + "."))
        else:
            out.append((key, v, lines.get(key)))
    return out


def _load_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """A YAML mapping and the 1-based line of each dotted key; UserError naming file:line on errors."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config {path} ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a config file must be a mapping of sections (model:, train:, ...)")
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def config_dir() -> Path:
    """The packaged presets folder (gpt2lab/configs)."""
    return Path(str(resources.files("gpt2lab").joinpath("configs")))


def preset_names() -> list[str]:
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


def apply_yaml(cfg: RunConfig, path: Path) -> None:
    """Apply every key of a YAML config file onto `cfg`; errors name the file and line."""
    data, lines = _load_yaml(path)
    for key, value, line in _flatten(data, lines):
        set_dotted(cfg, key, value, f"{path}:{line}" if line else str(path))


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


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """["--optim.lr", "3e-4", "--train.compile", "--a.b=c"] -> [("optim.lr", "3e-4"), ("train.compile", "true"), ("a.b", "c")]."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': overrides look like --section.field VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i += 1
            value = argv[i]
        else:
            value = "true"  # a bare flag
        out.append((key, value))
        i += 1
    return out


# --------------------------------------------------------------------------------------------------
# Serialising


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts/lists/scalars (tuples become lists), for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(d: dict) -> RunConfig:
    """A RunConfig from `to_dict` output (e.g. a run's config.yaml)."""
    cfg = RunConfig()
    for key, value, _ in _flatten(d, {}):
        set_dotted(cfg, key, value, "saved config")
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (what the run actually used) as YAML."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# Command line


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """--config, --out, --resume, and one --section.field option per config field (with its docstring)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = f"{parser.prog} [--config NAME|PATH] [--out DIR] [--resume [CKPT]] [--section.field VALUE ...]"
    parser.allow_abbrev = False  # "--optim.l" must not silently mean --optim.lr
    parser.add_argument("--config", default=default_config, metavar="NAME|PATH",
                        help=f"preset name ({', '.join(preset_names())}) or a YAML file (default: {default_config})")
    parser.add_argument("--out", metavar="DIR", help="run directory (same as --checkpoint.out_dir)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from the newest checkpoint of the run directory (or from CKPT)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, tp, default, doc in iter_fields(RunConfig):
        section = key.rsplit(".", 1)[0] if "." in key else "run"
        if section not in groups:
            groups[section] = parser.add_argument_group(section, _section_doc(section))
        metavar = _type_name(tp)
        shown = "null" if default is None else repr(default) if isinstance(default, str) else default
        if section == "model" and key[6:] in _GPT_DEFAULTS:
            fallback = "the data's vocabulary" if key == "model.vocab_size" else _GPT_DEFAULTS[key[6:]]
            shown = f"null = the preset's, else {fallback}"
        help_ = f"{doc} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, metavar=metavar, help=help_)
        if tp is bool:
            kwargs.update(nargs="?", const="true")
        groups[section].add_argument(f"--{key}", **kwargs)

    def error(message: str) -> typing.NoReturn:
        unknown = message.split("unrecognized arguments:")[-1].split() if "unrecognized" in message else []
        flags = [u for u in unknown if u.startswith("--")]
        if flags:
            key = flags[0][2:].split("=", 1)[0]
            message = f"unknown config key '{key}'{_suggest(key)}"
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error  # one line with a suggestion instead of argparse's usage dump


_GPT_DEFAULTS = {f.name: f.default for f in fields(GPTConfig)}


def _section_doc(section: str) -> str:
    cls: Any = RunConfig
    for part in section.split("."):
        if part == "run":
            return RunConfig.__doc__ or ""
        cls = _hints(cls)[part]
    return textwrap.fill(" ".join((cls.__doc__ or "").split()), width=100)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a parsed command line made by `add_config_arguments`."""
    names = set(all_keys())
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    if args.out is not None:
        overrides["checkpoint.out_dir"] = args.out
    if args.resume is not None:
        overrides["checkpoint.resume"] = args.resume
    return load_config(args.config, overrides)
