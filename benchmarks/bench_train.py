"""Training throughput of gpt2lab's GPT against transformers' GPT2LMHeadModel, same weights, same process.

    python benchmarks/bench_train.py                       # gpt2 (124M), B=4, T=256, fp32 CPU
    python benchmarks/bench_train.py --preset gpt2-mini --batch 8 --seq 256 --repeats 7

One step = forward, backward and an AdamW step on fixed random tokens, with the optimizer gpt2lab
trains with (gpt2lab.optim.build_optimizer: the fused kernel on CPU, lr 0 so the weights stay put),
the same for both models. The two models take turns (ours, theirs, ours, ...) after one warm-up step
each, so a machine whose load drifts slows both alike; the reported figure is the median tokens/s
and the ratio of medians. Needs `transformers` (pip install 'gpt2lab[hf]').
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from gpt2lab.bench import GPTAdapter, HFAdapter, ModelAdapter, hf_twin, measure_interleaved
from gpt2lab.config import OptimConfig
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import build_optimizer


def train_step(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, fused: bool | str):
    """A callable running one forward + backward + AdamW step and returning tokens/s."""
    optimizer = build_optimizer(adapter.model, OptimConfig(lr=0.0, min_lr=0.0, fused=fused), "cpu")

    def run_once() -> float:
        t0 = time.perf_counter()
        adapter.loss(x, y).backward()
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
    runs = {
        "gpt2lab": train_step(GPTAdapter(ours), x, y, fused),
        "transformers": train_step(HFAdapter(theirs), x, y, fused),
    }
    result = measure_interleaved(runs, repeats=args.repeats, warmup=1)
    ours_tps, theirs_tps = result["gpt2lab"].median, result["transformers"].median
    record = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "fused_adamw": args.fused,
        "gpt2lab_tok_s": ours_tps, "transformers_tok_s": theirs_tps, "ratio": ours_tps / theirs_tps,
        "gpt2lab_all": result["gpt2lab"].values, "transformers_all": result["transformers"].values,
    }
    if args.json:
        print(json.dumps(record))
        return
    print(f"training step (fwd+bwd+AdamW fused={args.fused}), {args.preset}, B={args.batch}, T={args.seq}, fp32, "
          f"{record['threads']} threads, torch {torch.__version__}")
    for name in runs:
        m = result[name]
        print(f"  {name:<13} median {m.median:8.1f} tok/s   (min {m.min:.1f}, max {m.max:.1f}, n={len(m.values)})")
    print(f"  ratio gpt2lab / transformers: {record['ratio']:.3f}x")


if __name__ == "__main__":
    main()
