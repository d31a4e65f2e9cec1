"""One way to get a model for inference: `load_model(init)` -> (model, tokenizer).

`init` is any of
    gpt2, gpt2-medium, gpt2-large, gpt2-xl   OpenAI's weights from the HF hub (or its local cache)
    openai-community/gpt2, ...               the same, by hub id
    random:<preset>                          a randomly initialised preset (demos, benchmarks), e.g. random:gpt2-tiny
    <HF directory>                           config.json (model_type gpt2) + model.safetensors / pytorch_model.bin
    <checkpoint directory>                   a gpt2lab checkpoint (config.json + model.safetensors)
    <run directory>                          its newest checkpoint

Used by sample, chat, eval, bench and finetune; none of them needs to know which kind it got.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab.errors import UserError
from gpt2lab.model import GPT, PRESETS, GPTConfig
from gpt2lab.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict

RANDOM_PREFIX = "random:"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" (None and "auto" -> None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """torch device from "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", "mps"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device


def load_model(init: str, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer `init` names (see the module docstring), on `device`, in eval mode.

    device: a torch device or a name for `resolve_device` ("auto", "cpu", "cuda", ...).
    dtype: parameter dtype or its name (default float32); e.g. torch.bfloat16 for faster decoding.
    """
    from gpt2lab import checkpoint, hf

    dtype = parse_dtype(dtype)
    device = resolve_device(device) if isinstance(device, str) else device
    if init.startswith(RANDOM_PREFIX):
        model, tokenizer = _random_model(init[len(RANDOM_PREFIX):], device), get_tokenizer("gpt2")
    elif Path(init).exists():
        path = Path(init)
        if checkpoint.find_latest(path) is not None:
            model, config = checkpoint.load_checkpoint(path, device)
            tokenizer = _checkpoint_tokenizer(config)
        elif hf.is_hf_dir(path):
            model, tokenizer = hf.load_hf_model(path, device), get_tokenizer("gpt2")
        else:
            raise UserError(
                f"{init} is neither a gpt2lab checkpoint/run directory (config.json or checkpoints/step_*/) "
                "nor a Hugging Face GPT-2 directory (config.json + model.safetensors)"
            )
    elif hf.is_hub_name(init):
        model, tokenizer = hf.load_hf_model(init, device), get_tokenizer("gpt2")
    else:
        raise UserError(f"--init {init}: no such file or directory, and not a model name "
                        f"({', '.join(hf.HUB_MODELS)}, or random:<preset> with a preset of {', '.join(PRESETS)})")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{init}: the model has {model.config.vocab_size} token ids but its tokenizer "
                        f"({tokenizer.name}) produces {tokenizer.vocab_size}; they do not belong together")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def load_config(init: str) -> GPTConfig:
    """Only the architecture `init` names (no weights read): a preset or random:<preset>, a hub
    name (its preset), an HF directory, a checkpoint or run directory."""
    from gpt2lab import checkpoint, hf

    name = init[len(RANDOM_PREFIX):] if init.startswith(RANDOM_PREFIX) else init
    if not Path(init).exists():
        if hf.is_hub_name(name):
            name = name.rsplit("/", 1)[-1]
        return GPTConfig.from_preset(name)
    ckpt = checkpoint.find_latest(init)
    if ckpt is not None:
        return GPTConfig.from_dict(checkpoint.read_config(ckpt)["model"])
    if hf.is_hf_dir(init):
        return hf.config_from_hf(hf.read_hf_config(init), source=str(Path(init) / "config.json"))
    raise UserError(f"{init} is neither a gpt2lab checkpoint/run directory nor a Hugging Face GPT-2 directory")


def _random_model(preset: str, device: torch.device) -> GPT:
    """A preset with GPT-2 initialisation, seeded so every run gets the same weights."""
    config = GPTConfig.from_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(config)
    return model.to(device)


def _checkpoint_tokenizer(config: dict) -> Tokenizer:
    entry = config.get("tokenizer")
    if entry is None:
        raise UserError(f"{config.get('path')}/config.json has no 'tokenizer' entry; "
                        "add one, e.g. \"tokenizer\": {\"kind\": \"gpt2\"}")
    return tokenizer_from_dict(entry)
