"""Training throughput of gpt2lab's GPT against transformers' GPT2LMHeadModel, same weights, same process.

    python benchmarks/bench_train.py                       # gpt2 (124M), B=4, T=256, CPU
    python benchmarks/bench_train.py --preset gpt2-mini --batch 8 --seq 256 --repeats 7 --bf16 yes

One step = forward, backward and an AdamW step on fixed random tokens, with the optimizer gpt2lab
trains with (gpt2lab.optim.build_optimizer: the fused kernel on CPU, lr 0 so the weights stay put),
the same for both models. The variants take turns (ours, theirs, ours, ...) after one warm-up step
each, so a machine whose load drifts slows all alike; the reported figure is the median tokens/s
and the ratio of medians. Needs `transformers` (pip install 'gpt2lab[hf]').

Variants: fp32 against fp32; bf16 autocast against bf16 autocast (with --bf16 auto, only where this
CPU's bf16 steps are faster than fp32, as `gpt2lab.dtype_choice` measures them: elsewhere a bf16 step
takes minutes); and "as `gpt2lab train` runs it" (train.dtype auto) against transformers' default
(fp32). Each is also given as model FLOP/s (6N + attention per token, `model_stats`) over the
matmul peak of its precision (`gpt2lab.bench.matmul_peak`), which takes its turn with the steps in
every repetition: a VM's speed drifts within minutes, so each step is divided by the peak measured
next to it and the median of those fractions is reported.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import time

import torch

from gpt2lab.bench import (
    GPTAdapter,
    HFAdapter,
    ModelAdapter,
    cpu_description,
    hf_twin,
    matmul_peak,
    measure_interleaved,
)
from gpt2lab.config import OptimConfig
from gpt2lab.devices import dtype_name
from gpt2lab.dtype_choice import TrainingSteps, resolve
from gpt2lab.model import GPT, GPTConfig, model_stats
from gpt2lab.optim import build_optimizer


def train_step(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, fused: bool | str,
               dtype: torch.dtype = torch.float32):
    """A callable running one forward + backward + AdamW step (under `dtype` autocast) returning tokens/s."""
    optimizer = build_optimizer(adapter.model, OptimConfig(lr=0.0, min_lr=0.0, fused=fused), "cpu")
    autocast = dtype != torch.float32

    def run_once() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = adapter.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.numel() / (time.perf_counter() - t0)

    return run_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--fused", default="auto", choices=["auto", "true", "false"],
                        help="AdamW kernel for both models (auto = fused on CPU, as gpt2lab trains)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"],
                        help="time bf16 autocast too (auto: where this CPU's bf16 matmuls are faster than fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset(args.preset, block_size=max(args.seq, 1024)))
    theirs = hf_twin(ours)  # identical weights (keys mapped, Conv1D weights transposed)
    tokens = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    fused = {"auto": "auto", "true": True, "false": False}[args.fused]
    choice = resolve("auto", torch.device("cpu"), TrainingSteps(ours, args.batch, args.seq)).choice  # train.dtype auto
    faster = choice.dtype == torch.bfloat16 or (choice.speedup or 0.0) >= 1.0
    with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and faster)
    runs = {
        "gpt2lab fp32": train_step(GPTAdapter(ours), x, y, fused),
        "transformers fp32": train_step(HFAdapter(theirs), x, y, fused),
    }
    if with_bf16:
        runs["gpt2lab bf16 autocast"] = train_step(GPTAdapter(ours), x, y, fused, torch.bfloat16)
        runs["transformers bf16 autocast"] = train_step(HFAdapter(theirs), x, y, fused, torch.bfloat16)
    dtypes = {name: torch.bfloat16 if "bf16" in name else torch.float32 for name in runs}
    peak_runs = {f"peak {dtype_name(dt)}": functools.partial(matmul_peak, "cpu", dt) for dt in set(dtypes.values())}
    result = measure_interleaved({**runs, **peak_runs}, repeats=args.repeats, warmup=1)
    flops_per_token = model_stats(ours.config, seq_len=args.seq).flops_per_token_train
    peak_of = {name: result[f"peak {dtype_name(dtypes[name])}"].values for name in runs}
    peaks = {dtype_name(dt): result[f"peak {dtype_name(dt)}"].median for dt in set(dtypes.values())}
    fractions = {name: statistics.median(tok_s * flops_per_token / peak
                                         for tok_s, peak in zip(result[name].values, peak_of[name]))
                 for name in runs}
    median = {name: result[name].median for name in runs}
    as_train = f"gpt2lab {dtype_name(choice.dtype)}" + (" autocast" if choice.dtype != torch.float32 else "")
    ratios = {"fp32": median["gpt2lab fp32"] / median["transformers fp32"]}
    if with_bf16:
        ratios["bf16"] = median["gpt2lab bf16 autocast"] / median["transformers bf16 autocast"]
    if as_train in median:
        ratios["as gpt2lab train runs it / transformers default"] = median[as_train] / median["transformers fp32"]
    record = {
        "date": datetime.date.today().isoformat(), "machine": cpu_description(), "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "fused_adamw": args.fused,
        "auto_dtype": choice.describe(), "peak_flops": peaks,
        "tok_s": median, "all": {name: m.values for name, m in result.items()}, "ratios": ratios,
        "fraction_of_peak": fractions,
    }
    if args.json:
        print(json.dumps(record))
        return
    print(f"training step (fwd+bwd+AdamW fused={args.fused}), {args.preset}, B={args.batch}, T={args.seq}, "
          f"{record['threads']} threads, torch {torch.__version__}")
    print(f"{record['machine']}, {record['date']}, load average {' '.join(f'{x:.2f}' for x in record['load_average'])}")
    print("measured matmul peak (median of the turns): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"train.dtype auto here: {choice.describe()}")
    for name in runs:
        m = result[name]
        print(f"  {name:<27} median {m.median:8.1f} tok/s  (min {m.min:.1f}, max {m.max:.1f}, n={len(m.values)})"
              f"  {record['fraction_of_peak'][name]:6.1%} of the {dtype_name(dtypes[name])} peak")
    if not with_bf16:
        print(f"  (bf16 autocast not timed: {choice.describe()}; --bf16 yes times it anyway)")
    for what, ratio in ratios.items():
        print(f"  ratio gpt2lab / transformers, {what}: {ratio:.3f}x")



if __name__ == "__main__":
    main()
