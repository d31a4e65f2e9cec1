"""Training throughput of gpt2lab's GPT against transformers' GPT2LMHeadModel, same weights, same process.

    python benchmarks/bench_train.py                       # gpt2 (124M), B=4, T=256, fp32 CPU
    python benchmarks/bench_train.py --preset gpt2-mini --batch 8 --seq 256 --repeats 7

One step = forward, backward and an AdamW step (foreach on CPU, the same optimizer for both models)
on fixed random tokens. The two models take turns (ours, theirs, ours, ...) after one warm-up step
each, so a machine whose load drifts slows both alike; the reported figure is the median tokens/s
and the ratio of medians. Needs `transformers` (pip install 'gpt2lab[hf]').
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from gpt2lab.bench import GPTAdapter, HFAdapter, hf_twin, measure_interleaved, train_step_bench
from gpt2lab.model import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset(args.preset, block_size=max(args.seq, 1024)))
    theirs = hf_twin(ours)  # identical weights (keys mapped, Conv1D weights transposed)
    vocab = ours.config.vocab_size
    runs = {
        "gpt2lab": train_step_bench(GPTAdapter(ours), vocab, args.batch, args.seq, steps=1),
        "transformers": train_step_bench(HFAdapter(theirs), vocab, args.batch, args.seq, steps=1),
    }
    result = measure_interleaved(runs, repeats=args.repeats, warmup=1)
    ours_tps, theirs_tps = result["gpt2lab"].median, result["transformers"].median
    record = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "gpt2lab_tok_s": ours_tps, "transformers_tok_s": theirs_tps, "ratio": ours_tps / theirs_tps,
        "gpt2lab_all": result["gpt2lab"].values, "transformers_all": result["transformers"].values,
    }
    if args.json:
        print(json.dumps(record))
        return
    print(f"training step (fwd+bwd+AdamW), {args.preset}, B={args.batch}, T={args.seq}, fp32, "
          f"{record['threads']} threads, torch {torch.__version__}")
    for name in runs:
        m = result[name]
        print(f"  {name:<13} median {m.median:8.1f} tok/s   (min {m.min:.1f}, max {m.max:.1f}, n={len(m.values)})")
    print(f"  ratio gpt2lab / transformers: {record['ratio']:.3f}x")


if __name__ == "__main__":
    main()
