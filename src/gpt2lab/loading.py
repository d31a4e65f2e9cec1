"""One way to get a model for inference: `load_model(init)` -> (model, tokenizer).

`init` is any of
    gpt2, gpt2-medium, gpt2-large, gpt2-xl   OpenAI's weights from the HF hub (or its local cache)
    openai-community/gpt2, ...               the same, by hub id
    random:<preset>                          a randomly initialised preset (demos, benchmarks), e.g. random:gpt2-tiny
    <HF directory>                           config.json (model_type gpt2) + model.safetensors / pytorch_model.bin
    <checkpoint directory>                   a gpt2lab checkpoint (config.json + model.safetensors);
                                             a LoRA run's checkpoint has its adapters merged in
    <run directory>                          its newest checkpoint
    <LoRA adapter directory>                 the adapter's base (or `base`) with the adapter applied

This is the one place an `--init` string becomes a model: sample, chat, eval, bench, convert,
merge-lora and train all load through it, and none of them needs to know which kind it got.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab import checkpoint, hf, lora
from gpt2lab.devices import resolve_device, torch_dtype
from gpt2lab.errors import FileError, UserError
from gpt2lab.fileio import read_json
from gpt2lab.model import GPT, PRESETS, GPTConfig
from gpt2lab.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict

RANDOM_PREFIX = "random:"


def load_model(init: str, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, *, merge_adapter: bool = True,
               flag: str = "--init") -> tuple[GPT, Tokenizer]:
    """The model and tokenizer `init` names (see the module docstring), on `device`, in eval mode.

    device: a torch device or a name for `resolve_device` ("auto", "cpu", "cuda", ...).
    dtype: parameter dtype or its name (default float32); e.g. torch.bfloat16 for faster decoding;
    "int8": float32 with every linear layer quantized to int8 for CPU decoding (`gpt2lab.int8`).
    merge_adapter: for a LoRA adapter directory, fold the adapter into the base weights (False keeps
    the LoRA layers, e.g. to export them).
    flag: the option `init` came from (`--init`, `--model.init`), named in error messages.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if dtype == "int8":
        from gpt2lab.int8 import check_int8, quantize_int8

        check_int8(device)  # before any weight is read
        model, tokenizer = load_model(init, device, "fp32", merge_adapter=True, flag=flag)
        return quantize_int8(model), tokenizer
    dtype = torch_dtype(dtype)
    if init.startswith(RANDOM_PREFIX):
        model, tokenizer = _random_model(init[len(RANDOM_PREFIX):], device), get_tokenizer("gpt2")
    elif Path(init).exists():
        path = Path(init)
        if lora.is_adapter(path):
            model, tokenizer, _ = load_adapted_model(path, device=device, dtype=dtype)
            if merge_adapter:
                lora.merge_lora(model)
            return model.eval(), tokenizer
        if checkpoint.find_latest(path) is not None:
            model, config = _load_checkpoint(path, device)
            tokenizer = _checkpoint_tokenizer(config)
        elif hf.is_hf_dir(path):
            model, tokenizer = hf.load_hf_model(path, device), hf.read_hf_tokenizer(path)
        else:
            raise _not_a_model(path, flag)
    elif hf.is_hub_name(init):
        model, tokenizer = hf.load_hf_model(init, device, flag=flag), get_tokenizer("gpt2")
    else:
        raise UserError(_not_found(init, flag))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{init}: the model has {model.config.vocab_size} token ids but its tokenizer "
                        f"({tokenizer.name}) produces {tokenizer.vocab_size}; they do not belong together")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def chat_template_of(init: str) -> str | None:
    """The chat template a finetuned model records (checkpoint, run or adapter directory; an adapter
    without one asks its base; an HF export whose Jinja `chat_template` is a built-in template's),
    or None when `init` records none (a pretrained model, a hub name)."""
    path = Path(init)
    if lora.is_adapter(path):
        config = lora.read_adapter_config(path)
        base = config.get("base", {}).get("init")
        if isinstance(config.get("chat_template"), str):
            return config["chat_template"]
        return chat_template_of(base) if isinstance(base, str) and Path(base).resolve() != path.resolve() else None
    if path.exists() and checkpoint.find_latest(path) is not None:
        template = checkpoint.read_newest(path, checkpoint.read_config).get("chat_template")
        return template if isinstance(template, str) else None
    if path.is_dir() and hf.is_hf_dir(path):
        return hf.read_chat_template(path)
    return None


def load_config(init: str, flag: str = "--init") -> GPTConfig:
    """Only the architecture `init` names (no weights read): a preset or random:<preset>, a hub id
    (its config.json only), an HF directory, a checkpoint, run or LoRA adapter directory."""
    if init.startswith(RANDOM_PREFIX) or init in PRESETS:
        return GPTConfig.from_preset(init.removeprefix(RANDOM_PREFIX))
    if init.removeprefix("openai-community/") in hf.HUB_MODELS:  # OpenAI's four are presets: no download
        return GPTConfig.from_preset(init.removeprefix("openai-community/"))
    path = Path(init)
    if path.exists():
        if lora.is_adapter(path):
            return GPTConfig.from_dict(lora.read_adapter_config(path)["base"]["model"])
        if checkpoint.find_latest(path) is not None:
            return GPTConfig.from_dict(checkpoint.read_newest(path, checkpoint.read_config)["model"])
        if hf.is_hf_dir(path):
            return hf.config_from_hf(hf.read_hf_config(path), source=str(path / "config.json"))
        raise _not_a_model(path, flag)
    if hf.is_hub_name(init):
        hub_dir = hf.download_hf_model(init, config_only=True, flag=flag)
        return hf.config_from_hf(hf.read_hf_config(hub_dir), source=f"{init}/config.json")
    raise UserError(_not_found(init, flag))


def load_tokenizer(init: str, flag: str = "--init") -> Tokenizer:
    """Only the tokenizer of the model `init` names (no weights read), as `load_model` returns it."""
    path = Path(init)
    if init.startswith(RANDOM_PREFIX) or not path.exists():
        load_config(init, flag)  # a bad name fails as it would in load_model
        return get_tokenizer("gpt2")
    if lora.is_adapter(path):
        base = lora.read_adapter_config(path).get("base", {}).get("init")
        if not base:
            raise UserError(f"{path}: the adapter records no base model; pass it with --init")
        _check_base_chain(path, base)
        return load_tokenizer(base, flag)
    if checkpoint.find_latest(path) is not None:
        return checkpoint.read_newest(path, lambda ckpt: _checkpoint_tokenizer(checkpoint.read_config(ckpt)))
    if hf.is_hf_dir(path):
        return hf.read_hf_tokenizer(path)
    raise _not_a_model(path, flag)


def _not_a_model(path: Path, flag: str) -> UserError:
    """Why existing `path` is no model: its config.json's own problem when it has one, else what was expected."""
    config = path / checkpoint.CONFIG_FILE
    if config.is_file():
        fix = (f"{flag} takes a gpt2lab checkpoint or run directory, a LoRA adapter or a Hugging Face GPT-2 "
               "directory; restore the file or pass another")
        read_json(config, dict, fix=fix)  # invalid JSON, not UTF-8 or not an object: said here
        return FileError(config, f'has neither "format": "{checkpoint.FORMAT}" nor a Hugging Face "model_type"',
                         fix=fix)
    return UserError(f"{flag} {path}: neither a gpt2lab checkpoint/run directory (config.json or "
                     "checkpoints/step_*/), a LoRA adapter, nor a Hugging Face GPT-2 directory "
                     "(config.json + model.safetensors)")


def _not_found(init: str, flag: str) -> str:
    return (f"{flag} {init}: no such file or directory, and not a model name (a hub id such as "
            f"{', '.join(hf.HUB_MODELS)}, or random:<preset> with a preset of {', '.join(PRESETS)})")


def load_adapted_model(adapter: str | Path, base_init: str | None = None, device: str | torch.device = "cpu",
                       dtype: str | torch.dtype | None = None) -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, adapter config): the adapter's base (or `base_init`) loaded through
    `load_model`, with the adapter applied on top (not merged)."""
    from gpt2lab.lora import load_adapter, read_adapter_config

    config = read_adapter_config(adapter)
    init = base_init or config.get("base", {}).get("init")
    if not init:
        raise UserError(f"{adapter}: the adapter records no base model; pass it with --init")
    _check_base_chain(adapter, init)
    model, tokenizer = load_model(init, device=device, dtype=dtype)
    load_adapter(model, adapter)
    return model, tokenizer, config


def _check_base_chain(adapter: str | Path, init: str) -> None:
    """UserError if the base `init` of `adapter`, followed through the bases of any adapters it names,
    comes back to an adapter already on the way (an adapter whose base is itself), before anything loads."""
    seen = {Path(adapter).resolve()}
    while isinstance(init, str) and lora.is_adapter(init):
        if Path(init).resolve() in seen:
            raise UserError(f"{adapter}: its base model {init} leads back to the adapter itself; set base.init in "
                            f"its {lora.ADAPTER_CONFIG} to the model it was trained on")
        seen.add(Path(init).resolve())
        init = lora.read_adapter_config(init).get("base", {}).get("init")


def _load_checkpoint(path: Path, device: torch.device) -> tuple[GPT, dict]:
    """A checkpoint's model; a LoRA run's checkpoint (base + lora_A/lora_B) gets its adapters merged.
    A run's newest checkpoint is read even while the run rotates its checkpoints (`read_newest`)."""
    from gpt2lab.fileio import load_model_weights
    from gpt2lab.lora import LoraConfig, apply_lora, merge_lora

    def read(ckpt: Path) -> tuple[GPT, dict]:
        config = checkpoint.read_config(ckpt)
        if not checkpoint.has_lora(config):
            return checkpoint.load_checkpoint(ckpt, device)
        model = checkpoint.build_model(config, device)
        apply_lora(model, LoraConfig.from_dict(config["lora"]))
        load_model_weights(model, checkpoint.load_weights(ckpt, device), str(ckpt))
        config["path"] = str(ckpt)
        return merge_lora(model), config

    return checkpoint.read_newest(path, read)


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
