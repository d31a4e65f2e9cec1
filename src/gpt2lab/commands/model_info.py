"""`gpt2lab model-info`: parameters, FLOPs per token and KV-cache size of an architecture.

    gpt2lab model-info gpt2
    gpt2lab model-info gpt2 --model.n_kv_head 4 --model.sliding_window 256 --seq-len 1024
    gpt2lab model-info --init runs/shakespeare
    gpt2lab model-info gpt2-medium --compare      # MHA vs GQA / MQA / sliding-window variants

Numbers are analytic (`gpt2lab.model.model_stats`): no weights are built or read.
"""

from __future__ import annotations

import argparse
import typing

from gpt2lab.architecture import GPTConfig
from gpt2lab.configparse import coerce, iter_fields, parse_scalar, shown_default, type_name
from gpt2lab.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.allow_abbrev = False
    parser.add_argument("preset", nargs="?", help="architecture preset (gpt2, gpt2-medium, ..., gpt2-tiny)")
    parser.add_argument("--init", help="read the architecture of a checkpoint, run or HF directory instead")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="context length for attention FLOPs and the full-context KV cache (default: block_size)")
    parser.add_argument("--compare", action="store_true",
                        help="compare with GQA, MQA and sliding-window variants of the same model")
    group = parser.add_argument_group("architecture overrides (GPTConfig fields)")
    for key, tp, default, doc in iter_fields(GPTConfig):
        help_ = f"{doc} (default: the preset's or --init's; GPTConfig: {shown_default(GPTConfig, key, default)})"
        group.add_argument(f"--model.{key}", dest=f"model.{key}", default=argparse.SUPPRESS,
                           metavar=type_name(tp), help=help_.replace("%", "%%"))


def _overrides(args: argparse.Namespace) -> dict:
    """--model.FIELD values, read as YAML ("null", "[256, null]") and coerced to the field's type."""
    hints = typing.get_type_hints(GPTConfig)
    out = {}
    for key, text in vars(args).items():
        if not key.startswith("model."):
            continue
        name = key.split(".", 1)[1]
        try:
            out[name] = coerce(parse_scalar(text), hints[name])
        except (ValueError, TypeError) as e:
            raise UserError(f"--{key} {text}: not a valid value for GPTConfig.{name} "
                            f"({type_name(hints[name])}: {e})") from None
    return out


def _base_config(args: argparse.Namespace) -> GPTConfig:
    from gpt2lab.loading import load_config

    if args.preset and args.init:
        raise UserError("give a preset or --init, not both")
    return load_config(args.init or args.preset or "gpt2")


def _variants(config: GPTConfig) -> list[tuple[str, GPTConfig]]:
    """The model as given, with its MHA/GQA/MQA siblings and sliding-window versions."""
    base = config.to_dict()
    nh = config.n_head
    # GQA: the divisor of n_head nearest to n_head / 4 (e.g. 3 kv heads for 12 query heads).
    divisors = [d for d in range(2, nh) if nh % d == 0]
    gqa = min(divisors, key=lambda d: (abs(d - nh / 4), d)) if divisors else None
    window = max(1, config.block_size // 4)
    rows = [("as given", config)]
    if config.n_kv_head != nh:
        rows.append((f"MHA ({nh} kv heads)", GPTConfig(**{**base, "n_kv_head": nh})))
    if gqa and gqa != config.n_kv_head:
        rows.append((f"GQA ({gqa} kv heads)", GPTConfig(**{**base, "n_kv_head": gqa})))
    if config.n_kv_head != 1:
        rows.append(("MQA (1 kv head)", GPTConfig(**{**base, "n_kv_head": 1})))
    rows.append((f"window {window}", GPTConfig(**{**base, "sliding_window": window})))
    alternate = [window if i % 2 == 0 else None for i in range(config.n_layer)]
    rows.append((f"window {window}, every other layer", GPTConfig(**{**base, "sliding_window": alternate})))
    if gqa:
        rows.append((f"GQA {gqa} + window {window}",
                     GPTConfig(**{**base, "n_kv_head": gqa, "sliding_window": window})))
    return rows


def _flops(n: float) -> str:
    return f"{n / 1e9:,.3f} GFLOP" if n >= 1e8 else f"{n / 1e6:,.2f} MFLOP"


def _describe(config: GPTConfig) -> str:
    parts = [f"{config.n_layer} layers", f"{config.n_head} heads", f"n_kv_head={config.n_kv_head}",
             f"n_embd={config.n_embd}", f"block_size={config.block_size}", f"vocab={config.padded_vocab_size}",
             f"pos_emb={config.pos_emb}"]
    if config.sliding_window:
        parts.append(f"sliding_window={config.sliding_window}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gpt2lab.console import format_bytes
    from gpt2lab.model import ModelStats, kv_cache_bytes, model_stats

    base = _base_config(args)
    config = GPTConfig(**{**base.to_dict(), **_overrides(args)})
    T = args.seq_len or config.block_size
    if T < 1:
        raise UserError(f"--seq-len must be positive, got {T}")
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 120  # piped output: do not wrap the tables at 80 columns
    console.print(_describe(config))

    def stats(c: GPTConfig) -> ModelStats:
        return model_stats(c, seq_len=T, dtype_bytes=4)

    if not args.compare:
        s = stats(config)
        table = Table(title=f"seq_len {T}")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row("parameters", f"{s.params:,} ({s.params / 1e6:,.1f} M)")
        table.add_row("non-embedding parameters", f"{s.non_embedding_params:,} ({s.non_embedding_params / 1e6:,.1f} M)")
        table.add_row("FLOPs / token, forward", _flops(s.flops_per_token_forward))
        table.add_row("FLOPs / token, train (fwd + bwd)", _flops(s.flops_per_token_train))
        for name, nb in (("fp32", 4), ("bf16", 2)):
            table.add_row(f"KV cache / token, {name}", format_bytes(model_stats(config, T, dtype_bytes=nb).kv_cache_bytes_per_token))
        for name, nb in (("fp32", 4), ("bf16", 2)):
            table.add_row(f"KV cache, {T} tokens, {name}", format_bytes(kv_cache_bytes(config, T, nb)))
        console.print(table)
        return 0

    table = Table(title=f"variants of the model above, seq_len {T} (KV cache in bf16, one sequence)")
    for col in ("variant", "params", "non-emb params", "fwd FLOPs/token", "KV / token", f"KV @ {T} tokens"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, c in _variants(config):
        s = model_stats(c, seq_len=T, dtype_bytes=2)
        table.add_row(name, f"{s.params:,}", f"{s.non_embedding_params:,}", _flops(s.flops_per_token_forward),
                      format_bytes(s.kv_cache_bytes_per_token), format_bytes(kv_cache_bytes(c, T, 2)))
    console.print(table)
    console.print("KV / token counts every layer; a windowed layer stops growing after `window` tokens.")
    return 0
