"""`gpt2lab bench`: training and inference speed, MFU and memory of a model on this machine.

    gpt2lab bench --init gpt2                         # bf16 on a GPU; on the CPU whichever is faster there
    gpt2lab bench --init random:gpt2-medium --compile --batch-size 16
    gpt2lab bench --init gpt2 --compare hf --json     # transformers' GPT-2, same weights, interleaved

Figures (each the median of --repeats timed runs after --warmup untimed ones, with min and max):
training tokens/s and MFU (forward + backward + AdamW), prefill tokens/s, greedy decode tokens/s at
each --decode-batch-sizes, and the peak memory of each phase.
"""

from __future__ import annotations

import argparse
import json

from gpt2lab.commands.common import add_model_arguments
from gpt2lab.console import say
from gpt2lab.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, init_default="gpt2",
                        dtype_help="compute dtype, by autocast over fp32 weights: auto = bf16 on GPUs that have it; "
                                   "on CPU bf16 where the model's training steps in bf16 autocast are >= 1.3x faster "
                                   "than fp32 (timed once, then cached; GPT2LAB_CPU_DTYPE=fp32|bf16 decides "
                                   "instead); else fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for the training step (prefill and decode stay eager)")
    parser.add_argument("--seq-len", type=int, help="training / prefill sequence length (default: block_size, "
                                                    "at most 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="training / prefill batch size (default: 8)")
    parser.add_argument("--steps", type=int, default=10, help="steps (or prefills) per timed run (default: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default: 1)")
    parser.add_argument("--decode-batch-sizes", default="1,8",
                        help="comma-separated batch sizes for decoding (default: 1,8)")
    parser.add_argument("--prompt-len", type=int, default=128, help="decode prompt length (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per timed run (default: 128)")
    parser.add_argument("--compare", choices=["hf"], help="also run transformers' GPT2LMHeadModel on the same "
                                                         "weights, interleaved, and print the ratios")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2lab import bench
    from gpt2lab.devices import dtype_name, resolve_device
    from gpt2lab.dtype_choice import TrainingSteps, resolve
    from gpt2lab.loading import load_model
    from gpt2lab.model import check_memory, model_stats
    from gpt2lab.precision import auto_on_cpu

    for name in ("seq_len", "batch_size", "steps", "repeats", "prompt_len", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    try:
        decode_sizes = [int(b) for b in args.decode_batch_sizes.split(",") if b.strip()]
    except ValueError:
        decode_sizes = []
    if not decode_sizes or min(decode_sizes) <= 0:
        raise UserError(f"--decode-batch-sizes must be positive integers like 1,8, got {args.decode_batch_sizes!r}")

    device = resolve_device(args.device)
    auto_on_cpu(args.dtype, device)  # a bad GPT2LAB_CPU_DTYPE fails before the model loads
    model, _ = load_model(args.init, device=device)
    config = model.config
    seq_len = args.seq_len or min(config.block_size, 1024)
    if seq_len > config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's block_size={config.block_size}")
    check_memory(config, device, f"a training step of {args.batch_size:,} x {seq_len:,} tokens",
                 "lower --batch-size or --seq-len", model=False, train_copies=3, batch=(args.batch_size, seq_len))
    resolved = resolve(args.dtype, device, TrainingSteps(model, args.batch_size, seq_len), fp16_without_bf16=False)
    dtype, choice = resolved.dtype, resolved.choice
    if resolved.line:
        say(f"note: {resolved.line}")
    prompt_len = min(args.prompt_len, config.block_size - 1)
    new_tokens = min(args.new_tokens, config.block_size - prompt_len)

    adapters = {"gpt2lab": bench.GPTAdapter(model, torch.compile(model) if args.compile else None)}
    if args.compare == "hf":
        twin = bench.hf_twin(model)
        adapters["hf"] = bench.HFAdapter(twin, torch.compile(twin) if args.compile else None)
    V = config.vocab_size
    phases = {
        "train": {k: bench.train_step_bench(a, V, args.batch_size, seq_len, args.steps, dtype)
                  for k, a in adapters.items()},
        "prefill": {k: bench.prefill_bench(a, V, args.batch_size, seq_len, args.steps, dtype)
                    for k, a in adapters.items()},
    }
    for b in decode_sizes:
        phases[f"decode_b{b}"] = {k: bench.decode_bench(a, V, b, prompt_len, new_tokens, dtype)
                                  for k, a in adapters.items()}

    peak, peak_source = bench.peak_flops(device, dtype)
    stats = model_stats(config, seq_len)
    flops_per_token = {"train": stats.flops_per_token_train, "prefill": stats.flops_per_token_forward}
    result: dict = {
        "model": args.init, "device": bench.device_name(device), "dtype": dtype_name(dtype),
        "compile": args.compile, "params": model.num_params(), "seq_len": seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "peak_flops": peak, "peak_flops_source": peak_source,
        "flops_per_token_train": stats.flops_per_token_train,
    }
    if choice is not None:
        result["dtype_choice"] = choice.describe()
    for key in adapters:
        result[key] = {}
    for phase, runs in phases.items():
        measured = bench.measure_interleaved(runs, args.repeats, args.warmup, device)
        for key, m in measured.items():
            figures = m.to_dict()
            if phase in flops_per_token:
                figures["mfu"] = flops_per_token[phase] * m.median / peak
            result[key][phase] = figures
    if "hf" in adapters:
        result["ratio_gpt2lab_over_hf"] = {
            phase: result["gpt2lab"][phase]["tokens_per_s"] / result["hf"][phase]["tokens_per_s"] for phase in phases
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result, list(phases), list(adapters))
    return 0


def _fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def _fmt_memory(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _print_table(result: dict, phases: list[str], models: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    memory_label = "peak memory" if "CPU" not in result["device"] else "peak RSS (growth)"
    table = Table(
        title=f"{result['model']} on {result['device']}, {result['dtype']}"
              f"{', compiled' if result['compile'] else ''}: {result['params']:,} params",
        title_justify="left",
    )
    table.add_column("phase")
    for model in models:
        table.add_column(f"{model} tok/s (min-max)", justify="right")
        table.add_column(f"{model} MFU", justify="right")
        table.add_column(f"{model} {memory_label}", justify="right")
    if "hf" in models:
        table.add_column("gpt2lab / hf", justify="right")
    batch_shape = f"B={result['batch_size']} T={result['seq_len']}"
    decode_shape = f"prompt {result['prompt_len']}, +{result['new_tokens']} tokens"
    for phase in phases:
        row = [f"{phase} ({batch_shape if phase in ('train', 'prefill') else decode_shape})"]
        for model in models:
            f = result[model][phase]
            row.append(f"{f['tokens_per_s']:,.0f} ({f['tokens_per_s_min']:,.0f}-{f['tokens_per_s_max']:,.0f})")
            row.append(f"{100 * f['mfu']:.1f}%" if "mfu" in f else "-")
            memory = _fmt_memory(f["peak_memory_bytes"])
            if "CPU" in result["device"]:
                memory += f" (+{_fmt_memory(f['memory_growth_bytes'])})"
            row.append(memory)
        if "hf" in models:
            row.append(f"{result['ratio_gpt2lab_over_hf'][phase]:.2f}x")
        table.add_row(*row)
    table.caption = (f"median of {result['repeats']} runs of {result['steps']} steps after {result['warmup']} "
                     f"warm-up; MFU against {_fmt_flops(result['peak_flops'])} "
                     f"({result['peak_flops_source']})")
    Console(width=200).print(table)
