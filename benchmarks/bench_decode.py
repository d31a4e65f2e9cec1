"""Decode speed of gpt2lab vs Hugging Face transformers, same weights, same process.

    python benchmarks/bench_decode.py                 # gpt2 (124M), batch 1, 16-token prompt, 128 new tokens
    python benchmarks/bench_decode.py --reps 9 --threads 2 --no-bf16

Both models get the same random GPT-2 weights (`gpt2` preset, copied through `gpt2lab.hf`). gpt2lab
runs as `gpt2lab sample` does, after `optimize_for_one_row` (the compiled one-row step of
`gpt2lab.native_decode` where it builds, over weights moved onto huge pages); "gpt2lab fp32 torch
step" is torch's own step over oneDNN-packed layers (`optimize_for_decoding`, as `serve` lays a model
out), for comparison. Each repetition times one
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

Against the machine and llama.cpp (decode steps only, same weights, same threads, in the same turns):
gpt2lab fp32 / bf16 / int8 (`--dtype int8`) next to llama.cpp (llama-cpp-python) f32 / f16 / q8_0 of
the same model exported by `gpt2lab.gguf_export`, each as a fraction of the memory-bandwidth floor:
bytes read per token (every weight matrix once, the tied head included, plus the KV cache at the mean
context of the decode steps) over the read bandwidth measured in the same run (the sum of a
--bandwidth-mb tensor, timed in turn with the rest; the fastest of the turns). Without llama-cpp-python its columns are skipped.
--compile adds gpt2lab's one-token step under torch.compile over a static cache (`generate(compile=True)`).

Run it on a quiet machine: while other processes hold cores, torch's multi-threaded kernels wait on
threads that are not running (on 2 busy cores a gpt2lab fp32 decode step took 2-4x its own
matrix-vector products, and bf16 ones up to 30x their one-thread time), whereas llama.cpp's thread
pool degrades little; a wide min..max spread of the gpt2lab rows is the sign. On a busy 2-core Zen 4,
torch.compile's CPU backend made the step slower (2x by default, 18x with inductor's freezing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch

from gpt2lab.bench import cpu_description, weight_read_pass
from gpt2lab.devices import dtype_name
from gpt2lab.dtype_choice import Decoding, decoding_int8, resolve
from gpt2lab.generate import optimize_for_decoding, optimize_for_one_row
from gpt2lab.hf import gpt2lab_to_hf_state, hf_config
from gpt2lab.int8 import quantize_int8
from gpt2lab.model import GPT, GPTConfig, model_stats
from gpt2lab.packed import PackedLinear
from gpt2lab.sampling import stream

LLAMA_PAIRS = (("gpt2lab fp32", "llama.cpp f32"), ("gpt2lab bf16", "llama.cpp f16"), ("gpt2lab int8", "llama.cpp q8_0"))
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "f32": 4, "f16": 2, "q8_0": 34 / 32}  # q8_0: 32 int8 + an f16 scale
KV_BYTES = {"fp32": 4, "bf16": 2, "int8": 4, "llama.cpp": 2}  # gpt2lab int8 keeps an fp32 cache; llama.cpp's is f16


def hf_twin(model: GPT, dtype: torch.dtype = torch.float32):
    """A transformers GPT2LMHeadModel holding `model`'s weights."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model.config)))
    missing, unexpected = hf.load_state_dict(gpt2lab_to_hf_state(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(dtype).eval()


def bytes_per_token(model: GPT, weight_bytes: float, kv_bytes: int, mean_context: float) -> float:
    """Bytes a batch-1 decode step reads: every weight matrix (the tied LM head once, as the head) and
    the KV cache of `mean_context` tokens."""
    matrices = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear)))
    return matrices * weight_bytes + mean_context * model_stats(model.config, dtype_bytes=kv_bytes).kv_cache_bytes_per_token


def read_bandwidth(megabytes: int):
    """A callable that reads a `megabytes` float32 tensor once (its sum), and the bytes it reads."""
    big = torch.ones(megabytes * 2**20 // 4)
    return (lambda: float(big.sum())), big.nbytes


def llama_runs(model: GPT, prompt: list[int], n: int, threads: int, folder: str, steps_s: dict) -> dict:
    """name -> call for llama.cpp f32, f16 and q8_0 of `model` (exported to GGUF in `folder`): greedy,
    `n` new tokens, recording the time of the steps after the first token in steps_s[name]."""
    import llama_cpp

    from gpt2lab.gguf_export import save_gguf
    from gpt2lab.tokenizer import GPT2Tokenizer

    runs = {}
    for outtype in ("f32", "f16", "q8_0"):
        path = save_gguf(model, GPT2Tokenizer(), os.path.join(folder, f"model-{outtype}.gguf"), outtype=outtype)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n, n_batch=len(prompt), n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        name = f"llama.cpp {outtype}"

        def call(llm=llm, name=name) -> list[int]:
            out = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                      reset=True):
                out.append(token)
                if len(out) == 1:
                    first = time.perf_counter()
                if len(out) == n:
                    break
            steps_s[name] = time.perf_counter() - first
            return out
        runs[name] = call
    return runs


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
    parser.add_argument("--llama", action=argparse.BooleanOptionalAction, default=True,
                        help="also time llama.cpp (llama-cpp-python) on the same weights: f32, f16, q8_0")
    parser.add_argument("--compile", action="store_true",
                        help="also time gpt2lab's decode step under torch.compile (its first call compiles: minutes)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024,
                        help="size of the tensor read to measure memory bandwidth (MB)")
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

    steps_s: dict[str, float] = {}  # run name -> seconds of its last call after the first token

    def ours(m: GPT, name: str, compile: bool = False):
        def call() -> list[int]:  # `generate`'s loop, timing the decode steps apart from the prefill
            out = []
            for step in stream(m, prompt.tolist(), max_new_tokens=n, temperature=0, stop_ids=(), compile=compile):
                out.append(step[0])
                if len(out) == 1:
                    first = time.perf_counter()
            steps_s[name] = time.perf_counter() - first
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

    # as `gpt2lab sample` lays it out (the compiled one-row step where it runs), and as `serve` does
    # (oneDNN-packed layers: torch's step)
    model_fp32 = optimize_for_one_row(copy(torch.float32))
    runs = {"gpt2lab fp32": ours(model_fp32, "gpt2lab fp32"), "transformers fp32": theirs(hf)}
    models = {"gpt2lab fp32": model_fp32, "gpt2lab fp32 torch step": optimize_for_decoding(copy(torch.float32))}
    runs["gpt2lab fp32 torch step"] = ours(models["gpt2lab fp32 torch step"], "gpt2lab fp32 torch step")
    runs["floor fp32"] = floor(model_fp32)
    if args.bf16:
        model_bf16 = optimize_for_one_row(copy(torch.bfloat16))
        runs["gpt2lab bf16"] = ours(model_bf16, "gpt2lab bf16")
        models["gpt2lab bf16"] = model_bf16
        models["gpt2lab bf16 torch step"] = optimize_for_decoding(copy(torch.bfloat16))
        runs["gpt2lab bf16 torch step"] = ours(models["gpt2lab bf16 torch step"], "gpt2lab bf16 torch step")
        runs["transformers bf16"] = theirs(hf_twin(model, torch.bfloat16))
        runs["floor bf16"] = floor(model_bf16)
    models["gpt2lab int8"] = quantize_int8(copy(torch.float32))  # as `gpt2lab sample --dtype int8` decodes
    runs["gpt2lab int8"] = ours(models["gpt2lab int8"], "gpt2lab int8")
    if args.compile:  # the one-token step under torch.compile, over a static cache (sampling.stream(compile=True))
        for name in [name for name in models if not name.endswith("torch step")]:
            runs[f"{name} compiled"] = ours(models[name], f"{name} compiled", compile=True)
    llama_note = ""
    if args.llama:
        try:
            import llama_cpp
        except ImportError:
            llama_note = "llama.cpp not timed: llama-cpp-python is not installed (pip install llama-cpp-python)"
        else:
            llama_note = f"llama-cpp-python {llama_cpp.__version__}, {torch.get_num_threads()} threads, KV cache f16"
            folder = tempfile.mkdtemp(prefix="bench_decode_gguf_")
            runs.update(llama_runs(model, prompt[0].tolist(), n, torch.get_num_threads(), folder, steps_s))
    read, read_bytes = read_bandwidth(args.bandwidth_mb)
    runs[f"read {args.bandwidth_mb} MB"] = read
    work = Decoding(copy(torch.float32), layout=optimize_for_one_row)  # as `gpt2lab sample` resolves auto
    resolved = resolve("auto", torch.device("cpu"), work)
    choice = decoding_int8(work, resolved) or resolved.choice

    print(f"{args.preset}, batch 1, prompt {args.prompt_len} tokens, {n} new tokens, greedy, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"{cpu_description()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"sample --dtype auto here: {choice.describe()}")
    names = list(runs)
    outputs = {name: runs[name]() for name in names}  # warm-up, and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in names}
    stepped = [name for name in names if name.startswith(("gpt2lab", "llama.cpp"))]
    step_times: dict[str, list[float]] = {name: [] for name in stepped}
    read_name = f"read {args.bandwidth_mb} MB"
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            dt, _ = time_call(runs[name])
            times[name].append(dt)
            if name in step_times:
                step_times[name].append(steps_s[name])
        print(f"  rep {rep + 1}: " + "  ".join(f"{name} {n / times[name][-1]:.1f}" for name in names
                                               if name != read_name), flush=True)
    bandwidth = read_bytes / min(times.pop(read_name))  # the fastest read: the floor is what the memory can give
    names.remove(read_name)

    print(f"\n{'':<24} {'median tok/s':>12} {'min..max':>14} {'of floor':>9}")
    rate = {}
    for name in names:
        rates = [n / t for t in times[name]]
        rate[name] = statistics.median(rates)
    for name in names:
        rates = [n / t for t in times[name]]
        floor_name = "floor bf16" if "bf16" in name else "floor fp32"
        if "int8" in name or "compiled" in name or name.startswith("llama.cpp"):  # see the table below
            print(f"{name:<24} {rate[name]:>12.1f} {min(rates):>6.1f}..{max(rates):<6.1f} {'-':>9}")
            continue
        of_floor = statistics.median(f / t for f, t in zip(times[floor_name], times[name]))
        print(f"{name:<24} {rate[name]:>12.1f} {min(rates):>6.1f}..{max(rates):<6.1f} {of_floor:>8.1%}")
    print("(floor: one vector-matrix product per weight matrix and token, nothing else; timed in turn with the\n"
          " rest; 'of floor' is the median over repetitions of floor time / call time within one repetition)")
    print(f"\ndecode steps only (the {n - 1} tokens after the first; no prefill):")
    for name, ts in step_times.items():
        if name not in models or "int8" in name:  # int8, compiled steps and llama.cpp: see the table below
            continue
        floor_times = times["floor bf16" if "bf16" in name else "floor fp32"]
        of_floor = statistics.median(f * (n - 1) / n / t for f, t in zip(floor_times, ts))
        print(f"{name:<24} {statistics.median((n - 1) / t for t in ts):>12.1f} {'':>14} {of_floor:>8.1%}")
    report_bandwidth_floor(model, step_times, n, args.prompt_len, bandwidth, args.bandwidth_mb, llama_note)
    auto = f"gpt2lab {dtype_name(choice.dtype)}"
    if auto in rate:
        print(f"\ngpt2lab auto ({dtype_name(choice.dtype)}) / gpt2lab fp32: {rate[auto] / rate['gpt2lab fp32']:.2f}x, "
              f"/ transformers fp32: {rate[auto] / rate['transformers fp32']:.2f}x")
    print(f"\ngpt2lab / transformers, fp32: {rate['gpt2lab fp32'] / rate['transformers fp32']:.2f}x")
    for name in [name for name in rate if name.endswith(" torch step")]:
        base = name.removesuffix(" torch step")
        print(f"{base} / {name}: {rate[base] / rate[name]:.2f}x "
              f"(greedy tokens equal: {sum(a == b for a, b in zip(outputs[base], outputs[name]))}/{n})")
    agree = sum(a == b for a, b in zip(outputs["gpt2lab fp32"], outputs["transformers fp32"]))
    print(f"greedy tokens equal to transformers fp32: {agree}/{n}")
    for name in [name for name in outputs if name.endswith(" compiled")]:
        base = name.removesuffix(" compiled")
        agree = sum(a == b for a, b in zip(outputs[base], outputs[name]))
        print(f"greedy tokens of {name} equal to {base}: {agree}/{n}")
    if "llama.cpp f32" in outputs:
        agree = sum(a == b for a, b in zip(outputs["gpt2lab fp32"], outputs["llama.cpp f32"]))
        print(f"greedy tokens of llama.cpp f32 equal to gpt2lab fp32: {agree}/{n}")
    if args.bf16:
        print(f"gpt2lab bf16 / gpt2lab fp32: {rate['gpt2lab bf16'] / rate['gpt2lab fp32']:.2f}x, "
              f"bf16 / transformers bf16: {rate['gpt2lab bf16'] / rate['transformers bf16']:.2f}x")
        report_bf16_closeness(model, model_bf16, prompt, outputs["gpt2lab fp32"], outputs["gpt2lab bf16"])


def report_bandwidth_floor(model: GPT, step_times: dict[str, list[float]], n: int, prompt_len: int,
                           bandwidth: float, megabytes: int, llama_note: str) -> None:
    """The decode-steps table against the memory-bandwidth floor, gpt2lab next to llama.cpp."""
    mean_context = prompt_len + n / 2
    print(f"\ndecode steps only, against the memory-bandwidth floor: read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(sum of a {megabytes} MB tensor, fastest of the turns); bytes per token = weight matrices + KV cache "
          f"at the mean context ({mean_context:.0f} tokens)" + (f"; {llama_note}" if llama_note else ""))
    print(f"{'':<24} {'tok/s':>8} {'MB/token':>9} {'floor tok/s':>12} {'of floor':>9}")
    rate = {}
    for ours_name, theirs_name in LLAMA_PAIRS:
        for name in (ours_name, f"{ours_name} compiled", theirs_name):
            if name not in step_times:
                continue
            precision = name.removesuffix(" compiled").split()[-1]
            kv = KV_BYTES["llama.cpp" if name.startswith("llama.cpp") else precision]
            per_token = bytes_per_token(model, WEIGHT_BYTES[precision], kv, mean_context)
            rate[name] = statistics.median((n - 1) / t for t in step_times[name])
            floor_rate = bandwidth / per_token
            print(f"{name:<24} {rate[name]:>8.1f} {per_token / 1e6:>9.1f} {floor_rate:>12.1f} "
                  f"{rate[name] / floor_rate:>8.1%}")
    pairs = [f"{a.split()[-1]}{c} / {b.split()[-1]} {rate[a + c] / rate[b]:.2f}x" for a, b in LLAMA_PAIRS
             for c in ("", " compiled") if a + c in rate and b in rate]
    if pairs:
        print("gpt2lab / llama.cpp, decode steps: " + ", ".join(pairs))
    if "gpt2lab int8" in rate:
        print(f"gpt2lab int8 / gpt2lab fp32, decode steps: {rate['gpt2lab int8'] / rate['gpt2lab fp32']:.2f}x")


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
