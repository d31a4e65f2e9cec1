"""fp32 against bf16 on this CPU where runs spend their time, and whether dtype auto picks the faster.

    python benchmarks/bench_precision.py                   # the quickstart's model and gpt2 (124M), random weights
    python benchmarks/bench_precision.py --steps 5 --reps 7 --gpt2-batch 1 --gpt2-seq 256 --json

Three things a run repeats, each timed in fp32 and in bf16 in turns (a b b a ..., after one untimed
call of each, so a machine whose speed drifts slows both alike; medians reported):

- a training step (forward, backward and the AdamW step gpt2lab trains with: fused on the CPU, lr 0
  so the weights stay put; bf16 = autocast over fp32 weights) of the quickstart's model
  (configs/quickstart.yaml: 4 layers, 128 wide, the character vocabulary of its corpus) at its own
  micro-batch (12 x 64 tokens): `--steps` steps of each;
- the same for gpt2 (124M) at `--gpt2-batch` x `--gpt2-seq` tokens (default 1 x 256: a bf16 step on a
  CPU without bf16 units then takes under a minute);
- a decode token of gpt2 with fp32 and with bf16 weights, batch 1, as `gpt2lab sample` decodes (the
  `optimize_for_decoding` layout, the KV cache, `sampling.stream`, greedy): the one-token steps after
  a 16-token prompt's first token, `--new-tokens` of them per repetition, `--reps` repetitions.

For each, what dtype auto picks here (`gpt2lab.dtype_choice`, measured afresh before the timing as a
run measures at start: the cache is not read, GPT2LAB_CPU_DTYPE is ignored) and whether that is the
choice these timings call for (bf16 when it is at least 1.3x faster, `precision.THRESHOLD`). With it:
the CPU's model name, its avx512_bf16 / AMX flags, torch's version and threads, the date and the load
average before and after. `--preset` replaces gpt2 by another preset (e.g. gpt2-tiny, to try the script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from gpt2lab.bench import cpu_description
from gpt2lab.config import OptimConfig, load_config
from gpt2lab.data.sources import default_corpus_text
from gpt2lab.devices import cpu_flags, dtype_name
from gpt2lab.dtype_choice import Decoding, TrainingSteps
from gpt2lab.generate import optimize_for_decoding
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import build_optimizer
from gpt2lab.precision import OVERRIDE_ENV, THRESHOLD
from gpt2lab.run import model_config_from
from gpt2lab.sampling import stream
from gpt2lab.timing import take_turns
from gpt2lab.tokenizer import CharTokenizer

FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def quickstart_model() -> tuple[GPT, int, int]:
    """The quickstart's model (random weights, its corpus's character vocabulary) and its micro-batch."""
    cfg = load_config("quickstart")
    vocab = CharTokenizer.from_text(default_corpus_text()).vocab_size
    model = GPT(model_config_from(cfg.model, vocab))
    return model, cfg.train.micro_batch_size, model.config.block_size


def copy(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of `model` in `dtype`, in eval mode."""
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.to(dtype).eval()


def training_steps(model: GPT, batch: int, seq: int, steps: int) -> dict:
    """Median seconds of a training step in fp32 and in bf16 autocast, in turns, and the probe's choice."""
    choice = TrainingSteps(model, batch, seq).measure(use_cache=False)  # as `gpt2lab train` decides at start
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator) for _ in range(2))
    optimizer = build_optimizer(model, OptimConfig(lr=0.0, min_lr=0.0), "cpu")
    model.train()

    def step(dtype: torch.dtype):
        def run() -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y, loss_reduction="sum")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    turns = take_turns({name: step(dtype) for name, dtype in DTYPES.items()}, rounds=steps, abba=True)
    return summary(choice, {name: turns.seconds[name] for name in DTYPES}, batch * seq, f"{batch}x{seq} tokens")


def decoding(model: GPT, new_tokens: int, reps: int) -> dict:
    """Median seconds of a decode token with fp32 and with bf16 weights, in turns, and the probe's choice."""
    choice = Decoding(copy(model, torch.float32)).measure(use_cache=False)  # as `sample --dtype auto` decides
    models = {name: optimize_for_decoding(copy(model, dtype)) for name, dtype in DTYPES.items()}
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).tolist()

    def tokens(m: GPT):
        def run() -> float:  # seconds per token of the one-token steps (the first token ends the prefill)
            for i, _ in enumerate(stream(m, prompt, max_new_tokens=new_tokens + 1, temperature=0, stop_ids=())):
                if i == 0:
                    first = time.perf_counter()
            return (time.perf_counter() - first) / new_tokens
        return run

    turns = take_turns({name: tokens(m) for name, m in models.items()}, rounds=reps, abba=True)
    return summary(choice, turns.values, 1, f"batch 1, {new_tokens} tokens a repetition")


def summary(choice, seconds: dict[str, list[float]], tokens: int, shape: str) -> dict:
    """The figures of one comparison: median seconds and tokens/s of each dtype, bf16's speedup, the
    probe's choice and the choice the timings call for."""
    median = {name: statistics.median(s) for name, s in seconds.items()}
    speedup = median["fp32"] / median["bf16"]
    called_for = "bf16" if speedup >= THRESHOLD else "fp32"
    return {"shape": shape, "seconds": seconds, "median_s": median,
            "tokens_per_s": {name: tokens / s for name, s in median.items()}, "bf16_speedup": speedup,
            "faster": "bf16" if speedup > 1 else "fp32", "called_for": called_for,
            "auto": dtype_name(choice.dtype), "auto_right": dtype_name(choice.dtype) == called_for,
            "auto_evidence": choice.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="the larger model (default gpt2, 124M)")
    parser.add_argument("--gpt2-batch", type=int, default=1, help="its training micro-batch rows (default 1)")
    parser.add_argument("--gpt2-seq", type=int, default=256, help="its training sequence length (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per dtype (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per repetition (default 32)")
    parser.add_argument("--reps", type=int, default=5, help="decode repetitions per dtype (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.pop(OVERRIDE_ENV, None) is not None and not args.json:
        print(f"({OVERRIDE_ENV} is ignored here: the probe is what is measured)")
    load_before = os.getloadavg()
    torch.manual_seed(0)
    quickstart, batch, seq = quickstart_model()
    big = GPT(GPTConfig.from_preset(args.preset))
    results = {
        f"train quickstart ({quickstart.num_params() / 1e6:.1f}M)": training_steps(quickstart, batch, seq, args.steps),
        f"train {args.preset}": training_steps(big, args.gpt2_batch, min(args.gpt2_seq, big.config.block_size),
                                               args.steps),
        f"decode {args.preset}": decoding(big, args.new_tokens, args.reps),
    }
    record = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"), "cpu": cpu_description(),
        "flags": {flag: flag in cpu_flags() for flag in FLAGS}, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": {"before": load_before, "after": os.getloadavg()},
        "steps": args.steps, "reps": args.reps, "results": results,
    }
    if args.json:
        print(json.dumps(record))
        return
    print(f"{record['cpu']}; flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in record["flags"].items()))
    print(f"torch {record['torch']} ({record['threads']} threads), {record['date']}, load average "
          + " ".join(f"{x:.2f}" for x in load_before) + " before, " + " ".join(f"{x:.2f}" for x in os.getloadavg())
          + " after")
    print(f"\n{'':<24} {'shape':<32} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16/fp32':>9} {'auto':>5} {'right':>6}")
    for name, r in results.items():
        unit = "per token" if name.startswith("decode") else "per step"
        print(f"{name:<24} {r['shape']:<32} {r['median_s']['fp32'] * 1e3:>9.1f} {r['median_s']['bf16'] * 1e3:>9.1f} "
              f"{r['bf16_speedup']:>8.2f}x {r['auto']:>5} {'yes' if r['auto_right'] else 'NO':>6}   ({unit})")
    print(f"\n(ms: median; bf16/fp32: fp32 time over bf16 time; right: auto picked what these timings call for, "
          f"bf16 where it is >= {THRESHOLD}x faster)")
    for name, r in results.items():
        print(f"{name}: auto -> {r['auto_evidence']}")


if __name__ == "__main__":
    main()
