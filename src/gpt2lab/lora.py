"""LoRA (low-rank adaptation) by module replacement: the model code never knows about it.

`apply_lora(model, cfg)` swaps each targeted nn.Linear for a `LoRALinear` that keeps the frozen
base weight and bias under the same parameter names (so base checkpoints still load into it) and
adds a trainable low-rank path:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A: (r, in), B: (out, r)

A starts like an nn.Linear weight (Kaiming-uniform) and B at zero, so an adapted model computes
exactly what its base does until B is trained. Everything else is frozen. `merge_lora` folds
W + (alpha / r) B A into plain nn.Linear modules; an adapter is saved as `adapter.safetensors`
(A and B only) plus `adapter_config.json`, which records the base it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.architecture import GPTConfig
from gpt2lab.config import LoraConfig
from gpt2lab.errors import UserError
from gpt2lab.fileio import in_file, read_json, read_safetensors, read_versioned_json, save_safetensors
from gpt2lab.tokenizer import TOKENIZER_SHAPE

ADAPTER_FORMAT = "gpt2lab-lora-adapter"
ADAPTER_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SHAPE = {"format": str, "version": int, "r": int, "alpha": float, "dropout?": float, "targets?": [str],
                 "modules?": [str], "base": {"init": (str, None), "config_sha256": str, "wte_sha256": str,
                                             "model": GPTConfig},
                 "tokenizer?": (TOKENIZER_SHAPE, None)}
"""What adapter_config.json holds (see `fileio.shape_problem`)."""
FIX = "save the adapter again or use another one"


class LoRALinear(nn.Module):
    """A frozen linear layer (`weight` (out, in), `bias`) plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own Parameters: same names, same storage
        self.bias = base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default weight init
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with weight W + (alpha / r) B A (computed in fp32)."""
        w = self.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter((w.float() + delta).to(w.dtype).detach())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear for every adapted layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Replace the nn.Linear layers named by `cfg.targets` (a name or dotted suffix such as "c_attn"
    or "mlp.c_proj") with LoRALinear(r, alpha, dropout) and freeze every other parameter. Call it
    after the base weights are loaded. Returns `model` (changed in place)."""
    r, alpha, dropout, targets = cfg.r, float(cfg.alpha), cfg.dropout, list(cfg.targets)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"lora.r must be a positive integer to apply LoRA, got {r!r}")
    if alpha <= 0:
        raise UserError(f"lora.alpha must be positive, got {alpha}")
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"lora.dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise UserError("the model already has LoRA layers; merge them (merge_lora) before applying LoRA again")
    chosen = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, targets)]
    if not chosen:
        linear_names = sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                               if isinstance(m, nn.Linear)})
        raise UserError(f"lora.targets {targets} match no nn.Linear layer; layer names are {linear_names}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha, float(dropout)))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear (W + (alpha / r) B A) and make all parameters
    trainable again, leaving the model GPT-2's plain architecture. Returns `model` (changed in place)."""
    for name, module in lora_modules(model).items():
        _set_submodule(model, name, module.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The A and B matrices only, with clean keys (no compile/DDP prefixes), as contiguous CPU tensors."""
    from gpt2lab.fileio import clean_state_dict

    return clean_state_dict({k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))})


def _unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside compile/DDP wrappers (the module that has `.config`)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise UserError(f"expected a GPT model, got {type(model).__name__}")
        model = inner
    return model


def base_identity(model: nn.Module) -> dict:
    """What identifies the base model: a hash of its architecture config and a fingerprint of its
    token embedding (rounded to bf16 so the same weights loaded in any precision agree)."""
    gpt = _unwrap(model)
    config = gpt.config.to_dict()
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    rows = gpt.transformer.wte.weight[:64].detach().to("cpu", torch.bfloat16).view(torch.int16)
    weights_sha = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    return {"config_sha256": config_sha[:16], "wte_sha256": weights_sha[:16], "model": config}


def save_adapter(path: str | Path, model: nn.Module, cfg: LoraConfig, base_init: str,
                 tokenizer: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically write adapter.safetensors (A, B) and adapter_config.json (r, alpha, dropout,
    targets, adapted layer names, base init string and identity) into directory `path`."""
    from gpt2lab.fileio import atomic_dir

    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA layers to save")
    first = next(iter(modules.values()))
    weights = lora_state_dict(model)
    config = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "r": first.r,
        "alpha": first.alpha,
        "dropout": float(cfg.dropout),
        "targets": list(cfg.targets),
        "modules": sorted({key.rpartition(".")[0] for key in weights}),
        "base": {"init": str(Path(base_init).resolve()) if Path(base_init).exists() else base_init,
                 **base_identity(model)},
        "tokenizer": tokenizer,
        **(extra or {}),
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_safetensors(weights, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def is_adapter(path: str | Path) -> bool:
    """True when `path` is a directory holding a gpt2lab LoRA adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict:
    """The adapter_config.json of an adapter directory, checked against ADAPTER_SHAPE and the base model's rules."""
    file = Path(path) / ADAPTER_CONFIG
    config = read_versioned_json(file, ADAPTER_FORMAT, ADAPTER_VERSION, "gpt2lab LoRA adapter", ADAPTER_SHAPE, FIX)
    with in_file(file, FIX):
        GPTConfig.from_dict(config["base"]["model"])
    return config


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Apply the adapter saved in `path` to `model` (its base) and load A and B; returns the adapter
    config. A base with a different architecture is an error; different embedding weights, a warning."""
    config = read_adapter_config(path)
    ident = base_identity(model)
    base = config["base"]
    if base["config_sha256"] != ident["config_sha256"]:
        raise UserError(
            f"{path}: adapter was trained on base '{base.get('init')}' whose model config differs from this "
            f"model's (config hash {base['config_sha256']} vs {ident['config_sha256']}); pass that base with --init"
        )
    if base["wte_sha256"] != ident["wte_sha256"]:
        warnings.warn(f"{path}: this base's weights differ from those of '{base.get('init')}', which the adapter "
                      "was trained on", stacklevel=2)
    with in_file(Path(path) / ADAPTER_CONFIG, FIX):
        apply_lora(model, LoraConfig(r=config["r"], alpha=config["alpha"], dropout=config.get("dropout", 0.0),
                                     targets=config.get("modules") or config.get("targets")))
    f = Path(path) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise UserError(f"{path} has no {ADAPTER_WEIGHTS}; the adapter is incomplete")
    weights = read_safetensors(f, FIX)
    expected = {f"{name}.{ab}": m for name, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}
    if set(weights) != set(expected):
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise UserError(f"{f}: adapter weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, value in weights.items():
            name, _, ab = key.rpartition(".")
            param = getattr(expected[key], ab)
            if param.shape != value.shape:
                raise UserError(f"{f}: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
            param.copy_(value)
    return config


# --------------------------------------------------------------------------------------------------
# PEFT export

PEFT_WEIGHTS = "adapter_model.safetensors"


def is_peft_export(path: str | Path) -> bool:
    """True for a directory that holds only a PEFT LoRA adapter (an earlier `save_peft_adapter`)."""
    path, config = Path(path), Path(path) / "adapter_config.json"
    try:
        peft = config.is_file() and read_json(config, dict).get("peft_type") == "LORA"
    except UserError:
        return False
    return peft and {p.name for p in path.iterdir()} <= {"adapter_config.json", PEFT_WEIGHTS, "README.md"}


def save_peft_adapter(path: str | Path, model: nn.Module, base_model_name_or_path: str) -> Path:
    """Write the model's LoRA layers as a PEFT adapter (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(base, path)` applies to the HF export of the same base.

    HF GPT-2's projections are Conv1D layers, hence `fan_in_fan_out`; A (r, in) and B (out, r) are
    stored as PEFT's lora_A / lora_B weights unchanged, and the scaling alpha / r is the same."""
    from gpt2lab.fileio import atomic_dir

    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA layers to export; pass a LoRA adapter directory with --init")
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise UserError("the adapter's layers have different ranks or alphas; PEFT needs one r and alpha")
    weights = {f"base_model.model.{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").detach().cpu().contiguous()
               for name, m in modules.items() for ab in ("A", "B")}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": float(first.lora_dropout.p),
        "target_modules": sorted(modules),
        "fan_in_fan_out": True,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_safetensors(weights, tmp / PEFT_WEIGHTS)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
