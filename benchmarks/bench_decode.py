"""Decode speed of gpt2lab vs Hugging Face transformers, same weights, same process.

    python benchmarks/bench_decode.py                 # gpt2 (124M), batch 1, 16-token prompt, 128 new tokens
    python benchmarks/bench_decode.py --reps 9 --threads 2 --no-bf16

Both models get the same random GPT-2 weights (`gpt2` preset, copied through `gpt2lab.hf`). gpt2lab
runs as `gpt2lab sample` does, after `optimize_for_decoding` (the weight layout a one-token step reads
fastest); "gpt2lab fp32 row-major" is the model as built, for comparison. Each repetition times one
greedy `generate` call of every variant, in alternating order (ABBA) so drifting machine load hits all
alike; medians are reported. tokens/s = new tokens / wall time of the whole call (prefill included).
Each rate is also given as a fraction of the weight-read floor measured in the same repetition
(`gpt2lab.bench.weight_read_pass`: one vector-matrix product per weight matrix, in the layout and dtype
decoded, nothing else), and "gpt2lab auto" names the weights `gpt2lab sample --dtype auto` picks
here (`gpt2lab.dtype_choice.resolve` with `Decoding`). "decode steps only" times gpt2lab's tokens after the first
(the one-token steps, sampling included, without the prompt's prefill) against the same floor.
The greedy tokens are compared with transformers', and with --bf16 (default on) bf16 weights are timed
too and compared with fp32: greedy token agreement and, teacher-forced on the fp32 continuation, top-1
agreement and the largest logit difference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from gpt2lab.bench import cpu_description, weight_read_pass
from gpt2lab.devices import dtype_name
from gpt2lab.dtype_choice import Decoding, resolve
from gpt2lab.generate import optimize_for_decoding
from gpt2lab.hf import gpt2lab_to_hf_state, hf_config
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.sampling import stream


def hf_twin(model: GPT, dtype: torch.dtype = torch.float32):
    """A transformers GPT2LMHeadModel holding `model`'s weights."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(gpt2lab_to_hf_state(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(dtype).eval()


def time_call(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also time gpt2lab (and transformers) with bf16 weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    hf = hf_twin(model)

    def copy(dtype: torch.dtype) -> GPT:
        twin = GPT(model.config).eval()
        twin.load_state_dict(model.state_dict())
        return twin.to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens

    steps_s: dict[int, float] = {}  # id(model) -> seconds of its last call after the first token

    def ours(m: GPT):
        def call() -> list[int]:  # `generate`'s loop, timing the decode steps apart from the prefill
            out = []
            for step in stream(m, prompt.tolist(), max_new_tokens=n, temperature=0, stop_ids=()):
                out.append(step[0])
                if len(out) == 1:
                    first = time.perf_counter()
            steps_s[id(m)] = time.perf_counter() - first
            return out
        return call

    def floor(m: GPT):  # n weight-read passes: the time n decode steps cannot beat
        one_pass = weight_read_pass(m)
        return lambda: [one_pass() for _ in range(n)]

    def theirs(m):
        # min_new_tokens: random weights may emit token 50256, which HF would treat as the end.
        return lambda: m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=0)[0, args.prompt_len:].tolist()

    model_fp32 = optimize_for_decoding(copy(torch.float32))
    runs = {"gpt2lab fp32": ours(model_fp32), "transformers fp32": theirs(hf),
            "gpt2lab fp32 row-major": ours(model)}
    models = {"gpt2lab fp32": model_fp32, "gpt2lab fp32 row-major": model}
    runs["floor fp32"] = floor(model_fp32)
    if args.bf16:
        model_bf16 = optimize_for_decoding(copy(torch.bfloat16))
        runs["gpt2lab bf16"] = ours(model_bf16)
        models["gpt2lab bf16"] = model_bf16
        runs["transformers bf16"] = theirs(hf_twin(model, torch.bfloat16))
        runs["floor bf16"] = floor(model_bf16)
    choice = resolve("auto", torch.device("cpu"), Decoding(copy(torch.float32))).choice  # as `gpt2lab sample` does

    print(f"{args.preset}, batch 1, prompt {args.prompt_len} tokens, {n} new tokens, greedy, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"{cpu_description()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"sample --dtype auto here: {choice.describe()}")
    names = list(runs)
    outputs = {name: runs[name]() for name in names}  # warm-up, and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in names}
    step_times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            dt, _ = time_call(runs[name])
            times[name].append(dt)
            if name in models:
                step_times[name].append(steps_s[id(models[name])])
        print(f"  rep {rep + 1}: " + "  ".join(f"{name} {n / times[name][-1]:.1f}" for name in names), flush=True)

    print(f"\n{'':<24} {'median tok/s':>12} {'min..max':>14} {'of floor':>9}")
    rate = {}
    for name in names:
        rates = [n / t for t in times[name]]
        rate[name] = statistics.median(rates)
    for name in names:
        rates = [n / t for t in times[name]]
        floor_times = times["floor bf16" if "bf16" in name else "floor fp32"]
        of_floor = statistics.median(f / t for f, t in zip(floor_times, times[name]))
        print(f"{name:<24} {rate[name]:>12.1f} {min(rates):>6.1f}..{max(rates):<6.1f} {of_floor:>8.1%}")
    print("(floor: one vector-matrix product per weight matrix and token, nothing else; timed in turn with the\n"
          " rest; 'of floor' is the median over repetitions of floor time / call time within one repetition)")
    print(f"\ndecode steps only (the {n - 1} tokens after the first; no prefill):")
    for name, ts in step_times.items():
        floor_times = times["floor bf16" if "bf16" in name else "floor fp32"]
        of_floor = statistics.median(f * (n - 1) / n / t for f, t in zip(floor_times, ts))
        print(f"{name:<24} {statistics.median((n - 1) / t for t in ts):>12.1f} {'':>14} {of_floor:>8.1%}")
    auto = f"gpt2lab {dtype_name(choice.dtype)}"
    if auto in rate:
        print(f"\ngpt2lab auto ({dtype_name(choice.dtype)}) / gpt2lab fp32: {rate[auto] / rate['gpt2lab fp32']:.2f}x, "
              f"/ transformers fp32: {rate[auto] / rate['transformers fp32']:.2f}x")
    print(f"\ngpt2lab / transformers, fp32: {rate['gpt2lab fp32'] / rate['transformers fp32']:.2f}x")
    agree = sum(a == b for a, b in zip(outputs["gpt2lab fp32"], outputs["transformers fp32"]))
    print(f"greedy tokens equal to transformers fp32: {agree}/{n}")
    if args.bf16:
        print(f"gpt2lab bf16 / gpt2lab fp32: {rate['gpt2lab bf16'] / rate['gpt2lab fp32']:.2f}x, "
              f"bf16 / transformers bf16: {rate['gpt2lab bf16'] / rate['transformers bf16']:.2f}x")
        report_bf16_closeness(model, model_bf16, prompt, outputs["gpt2lab fp32"], outputs["gpt2lab bf16"])


@torch.inference_mode()
def report_bf16_closeness(model: GPT, model_bf16: GPT, prompt: torch.Tensor, fp32_ids: list[int],
                          bf16_ids: list[int]) -> None:
    """How far bf16 weights move the model: free-running greedy agreement (diverges after the first
    different token), then teacher-forced on the fp32 continuation: top-1 agreement and logit error."""
    first_diff = next((i for i, (a, b) in enumerate(zip(fp32_ids, bf16_ids)) if a != b), len(fp32_ids))
    seq = torch.cat((prompt, torch.tensor([fp32_ids])), dim=1)
    ref, _ = model(seq)
    low, _ = model_bf16(seq)
    low = low.float()
    top1 = (ref.argmax(-1) == low.argmax(-1)).float().mean().item()
    diff = (ref - low).abs().max().item()
    margin = ""
    if first_diff < len(fp32_ids):  # a near-tie in fp32 there means either choice is as good
        top2 = ref[0, prompt.shape[1] + first_diff - 1].topk(2).values
        margin = f" (fp32 top-2 logit margin there: {(top2[0] - top2[1]).item():.4f})"
    print(f"bf16 vs fp32: greedy identical for the first {first_diff}/{len(fp32_ids)} tokens{margin}; "
          f"teacher-forced top-1 agreement {top1:.1%} over {seq.shape[1]} positions; max |logit diff| {diff:.3f} "
          f"(logit std {ref.std().item():.3f})")


if __name__ == "__main__":
    main()
