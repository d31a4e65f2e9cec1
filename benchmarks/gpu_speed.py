"""GPU speed sweep: every training and decoding lever of GPT-2 124M, measured in one run (see docs/gpu.md).

    python benchmarks/gpu_speed.py --out docs/gpu_speed.json               # ~9 min on one H100
    python benchmarks/gpu_speed.py --out docs/gpu_speed.json --merge       # a second run: what is missing
    python benchmarks/gpu_speed.py --dry-run                               # tiny model on the CPU, < 60 s

Parts, in the order they run (each measurement is guarded: an error, an out-of-memory or a time
limit is recorded and the sweep goes on; a measurement that no longer fits the time budget is
recorded as skipped, and a second run with `--merge` runs only what is missing, into the same JSON):

  levers      gpt2, T=1024, bf16 autocast, micro-batch 16, no compile: the straightforward path
              (vocab 50257, F.cross_entropy on full logits, foreach AdamW, SDPA's own choice), then
              each cheap lever alone on top of it: padded vocab 50304, fused loss, fused AdamW, and
              each SDPA backend (flash, cudnn, efficient, math).
  compiled    the levers cumulatively: padded -> + fused AdamW -> + the best SDPA backend ->
              + torch.compile -> + fused loss.
  decode      greedy generate() tokens/s at batch 1 and 16 (bf16 weights): gpt2lab eager KV cache,
              gpt2lab compiled static cache (CUDA graphs), transformers' generate on the same weights.
  curve       200 steps from the same weights on the same batches (Python's language reference in
              GPT-2 BPE, random windows): the straightforward path vs the fastest configuration;
              max |delta loss| per step.
  optimizer   + the compiled optimizer step (torch.compile of AdamW.step, lr a tensor) on the fastest.
  sweep       micro-batch 8 / 32 / 64 with the fastest configuration.
  medium      gpt2-medium training tokens/s, eager with the cheap levers, then compiled.
  compile_alone  torch.compile alone on the straightforward path.

One step = forward + backward + grad-norm clip + AdamW step + zero_grad, on fixed random tokens.
tokens/s is the median of `--repeats` timed runs of `--steps` steps after one warm-up run (which
holds the compilation; its wall time is reported as `first_run_s`). MFU counts the FLOPs of the
unpadded model (6N + attention, `gpt2lab.model.model_stats`): padding computes more for the same
work. Results are written to --out after every measurement; the markdown tables at the end are
ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:
    import gpt2lab  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402  (after the sys.path fallback above)

from gpt2lab.bench import measure, peak_flops  # noqa: E402
from gpt2lab.fileio import write_atomic  # noqa: E402
from gpt2lab.model import GPT, GPTConfig, model_stats  # noqa: E402
from gpt2lab.optim import cosine_lr, param_groups  # noqa: E402
from gpt2lab.timing import synchronize  # noqa: E402
from gpt2lab.trainer import sdpa_context  # noqa: E402

PARTS = ("levers", "compiled", "decode", "curve", "optimizer", "sweep", "medium", "compile_alone")
SDPA_CHOICES = ("flash", "cudnn", "efficient", "math")

# --------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    """What is measured and how long it may take."""

    device: str
    dtype: torch.dtype
    model: GPTConfig
    """The 124M model, unpadded (vocab 50257)."""
    medium: GPTConfig
    padded_vocab: int
    seq_len: int
    micro_batch: int
    batch_sweep: tuple[int, ...]
    steps: int
    """Training steps per timed run."""
    repeats: int
    curve_steps: int
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    decode_dtype: torch.dtype
    compile_backend: str
    budget_s: float
    eager_cost_s: float
    """Rough wall time of one eager training measurement: a measurement is skipped when less
    budget is left than its estimate (compiled ones count compile_cost_s more)."""
    compile_cost_s: float
    lr: float = 6e-4


def gpu_settings(budget_s: float) -> Settings:
    return Settings(
        device="cuda", dtype=torch.bfloat16, model=GPTConfig.from_preset("gpt2"),
        medium=GPTConfig.from_preset("gpt2-medium"), padded_vocab=50304, seq_len=1024, micro_batch=16,
        batch_sweep=(8, 32, 64), steps=10, repeats=3, curve_steps=200, decode_batches=(1, 16), prompt_len=16,
        new_tokens=256, decode_dtype=torch.bfloat16, compile_backend="inductor", budget_s=budget_s,
        eager_cost_s=12, compile_cost_s=60,
    )


def dry_run_settings(budget_s: float) -> Settings:
    """A tiny model on the CPU, every code path of the GPU run (compile through dynamo's eager backend)."""
    tiny = dict(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
    return Settings(
        device="cpu", dtype=torch.bfloat16, model=GPTConfig(**tiny),
        medium=GPTConfig(**{**tiny, "n_layer": 3, "n_embd": 96}), padded_vocab=1024, seq_len=64, micro_batch=4,
        batch_sweep=(2, 8), steps=2, repeats=1, curve_steps=8, decode_batches=(1, 4), prompt_len=8, new_tokens=8,
        decode_dtype=torch.float32, compile_backend="eager", budget_s=budget_s, eager_cost_s=0.5,
        compile_cost_s=1,
    )


@dataclass(frozen=True)
class Lever:
    """One training configuration; defaults are the straightforward path."""

    padded: bool = False
    fused_adamw: bool = False
    sdpa: str = "auto"
    compile: bool = False
    fused_loss: bool = False
    compile_optimizer: bool = False
    micro_batch: int | None = None
    """None = Settings.micro_batch."""

    def describe(self) -> str:
        on = [name for name, flag in (("padded vocab", self.padded), ("fused AdamW", self.fused_adamw),
                                      ("compile", self.compile), ("fused loss", self.fused_loss),
                                      ("compiled optimizer", self.compile_optimizer)) if flag]
        if self.sdpa != "auto":
            on.append(f"SDPA {self.sdpa}")
        return ", ".join(on) or "straightforward (eager, vocab 50257, full logits, foreach AdamW)"


# --------------------------------------------------------------------------------------------------
# Guarded measurements


class Sweep:
    """Runs measurements in order within a time budget, recording each result (or why there is none)
    and rewriting the JSON after every one."""

    def __init__(self, s: Settings, out: Path | None, previous: dict | None) -> None:
        self.s = s
        self.out = out
        self.deadline = time.monotonic() + s.budget_s
        self.results: dict[str, dict] = dict((previous or {}).get("results", {}))
        # Merged from an earlier run: what succeeded there is kept, what failed or was skipped runs again.
        self.done = {k for k, r in self.results.items() if "error" not in r and "skipped" not in r}
        self.meta = environment(s)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, key: str, estimate_s: float, fn: Callable[[], dict]) -> dict | None:
        """fn() -> a result dict; None when it was skipped or failed."""
        if key in self.done:
            return self.results[key]
        left = self.remaining()
        if left < estimate_s:
            self.record(key, {"skipped": f"needs ~{estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left"})
            return None
        print(f"[{self.s.budget_s - left:6.1f} s] {key} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        result: dict | None
        try:
            with time_limit(left):
                result = fn()
        except Exception as e:  # one failing lever must not lose the rest
            result = None
            self.record(key, {"error": f"{type(e).__name__}: {str(e).strip()[:500]}",
                              "wall_s": time.monotonic() - t0})
            e.__traceback__ = None  # drop references to the failed step's tensors
        finally:
            free_memory()
        if result is not None:
            result["wall_s"] = time.monotonic() - t0
            self.record(key, result)
        return result

    def record(self, key: str, result: dict) -> None:
        self.results[key] = result
        brief = {k: v for k, v in result.items() if k in ("tokens_per_s", "mfu", "error", "skipped",
                                                           "max_abs_delta_loss")}
        print(f"    {key}: {brief}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        doc = {**self.meta, "results": self.results, "markdown": markdown(self.results, self.meta)}
        write_atomic(self.out, json.dumps(doc, indent=1, default=str) + "\n")

    def training(self, key: str) -> dict | None:
        r = self.results.get(key)
        return r if r and "tokens_per_s" in r else None


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; no limit where there is none)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"stopped after {seconds:.0f} s (the time budget)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory() -> None:
    """Forget compiled graphs (so the next configuration traces under its own settings) and free memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(s: Settings) -> dict:
    device = torch.device(s.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "commit": commit, "python": platform.python_version(),
        "settings": {k: str(v) if isinstance(v, (torch.dtype, GPTConfig)) else v
                     for k, v in dataclasses.asdict(s).items() if k not in ("model", "medium")},
        "model": s.model.to_dict(), "medium": s.medium.to_dict(),
    }


# --------------------------------------------------------------------------------------------------
# Training


def build_model(s: Settings, config: GPTConfig, lever: Lever, seed: int = 0) -> GPT:
    """The model of `config` (padded to s.padded_vocab with lever.padded), initialised on the device."""
    vocab = s.padded_vocab if lever.padded else config.vocab_size
    torch.manual_seed(seed)
    with torch.device(s.device):
        return GPT(dataclasses.replace(config, padded_vocab_size=vocab))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a compiled step reads the tensor: no recompile per value
        else:
            group["lr"] = lr


def make_optimizer(s: Settings, model: GPT, lever: Lever) -> tuple[torch.optim.AdamW, Callable[[], None]]:
    """AdamW with GPT-2's groups: foreach (the default), fused, or foreach under torch.compile with a
    tensor lr (PyTorch's compiled-optimizer recipe; capturable keeps its step count on the device)."""
    groups = param_groups(model.named_parameters(), 0.1)
    kwargs: dict[str, Any] = dict(betas=(0.9, 0.95), eps=1e-8)
    if lever.compile_optimizer:
        optimizer = torch.optim.AdamW(groups, lr=torch.tensor(s.lr, device=s.device), foreach=True,
                                      capturable=True, **kwargs)

        @torch.compile(backend=s.compile_backend, fullgraph=False)
        def step() -> None:
            optimizer.step()

        return optimizer, step
    optimizer = torch.optim.AdamW(groups, lr=s.lr, fused=lever.fused_adamw, foreach=not lever.fused_adamw, **kwargs)
    return optimizer, optimizer.step


def make_train_step(s: Settings, model: GPT, lever: Lever) -> tuple[Callable, torch.optim.AdamW]:
    """step(x, y) -> the loss (a device tensor; nothing waits for the device)."""
    device = torch.device(s.device)
    module = torch.compile(model, backend=s.compile_backend) if lever.compile else model
    optimizer, optimizer_step = make_optimizer(s, model, lever)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = s.dtype != torch.float32
    sdpa_context(lever.sdpa, device)  # an unusable backend fails before any work

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with sdpa_context(lever.sdpa, device):
            with torch.autocast(device.type, dtype=s.dtype, enabled=autocast):
                _, loss = module(x, y, fused_loss=lever.fused_loss)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer


def random_batch(s: Settings, config: GPTConfig, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (rows, s.seq_len + 1), generator=g).to(s.device)
    return tokens[:, :-1], tokens[:, 1:]


def measure_training(s: Settings, lever: Lever, config: GPTConfig | None = None) -> dict:
    """Tokens/s, MFU and peak memory of `lever` (fresh model and optimizer, lr 0 is not used: real updates)."""
    config = config or s.model
    rows = lever.micro_batch or s.micro_batch
    model = build_model(s, config, lever)
    step, _ = make_train_step(s, model, lever)
    x, y = random_batch(s, config, rows)
    device = torch.device(s.device)
    last: list[torch.Tensor] = []

    def run_once() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(s.steps):
            last[:] = [step(x, y)]
        synchronize(device)
        return rows * s.seq_len * s.steps / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    run_once()  # warm-up: compilation, autotuning, allocator growth
    first_run_s = time.perf_counter() - t0
    m = measure(run_once, repeats=s.repeats, warmup=0, device=device)
    flops = model_stats(config, s.seq_len).flops_per_token_train  # unpadded: the useful work
    peak, peak_source = device_peak_flops(s.device, s.dtype)
    loss = last[0].item()
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"loss is {loss}")
    return {
        "lever": dataclasses.asdict(lever), "describe": lever.describe(), "model": config_name(config),
        "micro_batch": rows, "seq_len": s.seq_len, "tokens_per_s": m.median, "tokens_per_s_all": m.values,
        "mfu": flops * m.median / peak, "flops_per_token": flops, "peak_flops": peak, "peak_flops_source": peak_source,
        "peak_memory_gb": m.peak_memory_bytes / 1e9, "first_run_s": first_run_s, "last_loss": loss,
    }


@functools.cache
def device_peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """`gpt2lab.bench.peak_flops`, once per run (on the CPU it is a measurement)."""
    return peak_flops(torch.device(device), dtype)


def config_name(config: GPTConfig) -> str:
    return f"{config.n_layer}L-{config.n_embd}C"


# --------------------------------------------------------------------------------------------------
# Loss curve


def curve_tokens(vocab_size: int) -> torch.Tensor:
    """Python's language reference (ships with Python) in GPT-2 BPE: ~139k tokens, no network needed."""
    from gpt2lab.data.sources import default_corpus_text
    from gpt2lab.tokenizer import get_tokenizer

    ids = torch.tensor(get_tokenizer("gpt2").encode(default_corpus_text()), dtype=torch.long)
    return ids % vocab_size  # the dry run's tiny vocabulary


def copy_weights(dst: GPT, src_state: dict[str, torch.Tensor]) -> None:
    """Load `src_state` into `dst`, whose vocabulary rows may be padded: extra rows start at zero
    (padding ids are never inputs or predictions)."""
    with torch.no_grad():
        for name, p in dst.state_dict().items():
            value = src_state[name]
            p.zero_()
            p[tuple(slice(0, n) for n in value.shape)].copy_(value)


def train_curve(s: Settings, lever: Lever, init: dict[str, torch.Tensor], batches: torch.Tensor) -> dict:
    """Losses of s.curve_steps steps (warmup + cosine lr) from the weights `init` on `batches` (steps, rows, T+1)."""
    model = build_model(s, s.model, lever)
    copy_weights(model, init)
    step, optimizer = make_train_step(s, model, lever)
    losses = []
    device = torch.device(s.device)
    t_start = None
    for i in range(s.curve_steps):
        if i == min(10, s.curve_steps - 1):  # after compilation and warm-up
            synchronize(device)
            t_start, start_step = time.perf_counter(), i
        set_lr(optimizer, cosine_lr(i, lr=s.lr, min_lr=s.lr / 10, warmup_steps=max(1, s.curve_steps // 10),
                                    max_steps=s.curve_steps))
        batch = batches[i].to(device, non_blocking=True)
        losses.append(step(batch[:, :-1], batch[:, 1:]))
    synchronize(device)
    tokens = (s.curve_steps - start_step) * batches.shape[1] * s.seq_len
    return {"losses": torch.stack(losses).tolist(), "tokens_per_s": tokens / (time.perf_counter() - t_start)}


def compare_curves(s: Settings, fastest: Lever) -> dict:
    straightforward = Lever()
    fast = dataclasses.replace(fastest, micro_batch=None)  # the same batches for both
    tokens = curve_tokens(s.model.vocab_size)
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(tokens) - s.seq_len - 1, (s.curve_steps, s.micro_batch), generator=g)
    batches = torch.stack([torch.stack([tokens[a:a + s.seq_len + 1] for a in row]) for row in starts])
    init = {k: v.clone() for k, v in build_model(s, s.model, straightforward, seed=42).state_dict().items()}
    a = train_curve(s, straightforward, init, batches)
    free_memory()
    b = train_curve(s, fast, init, batches)
    delta = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    tail = delta[-min(50, len(delta)):]
    return {
        "fastest": dataclasses.asdict(fast), "describe": fast.describe(), "steps": s.curve_steps,
        "tokens_per_step": s.micro_batch * s.seq_len, "max_abs_delta_loss": max(delta),
        "max_abs_delta_loss_last_50": max(tail), "mean_abs_delta_loss_last_50": statistics.fmean(tail),
        "first_loss": [a["losses"][0], b["losses"][0]], "final_loss": [a["losses"][-1], b["losses"][-1]],
        "tokens_per_s": [a["tokens_per_s"], b["tokens_per_s"]], "losses_straightforward": a["losses"],
        "losses_fastest": b["losses"], "abs_delta_loss": delta,
    }


# --------------------------------------------------------------------------------------------------
# Decoding


def measure_decode(s: Settings, batch: int, impl: str) -> dict:
    """Greedy generate() tokens/s (prefill of a s.prompt_len prompt included) at `batch` rows."""
    from gpt2lab.sampling import generate

    torch.manual_seed(0)
    with torch.device(s.device):
        model = GPT(s.model).to(s.decode_dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, s.model.vocab_size, (batch, s.prompt_len), generator=g)
    n = s.new_tokens
    if impl == "transformers":
        from gpt2lab.bench import hf_twin

        hf = hf_twin(model).eval()
        del model
        idx = prompts.to(s.device)

        def run() -> list[list[int]]:
            with torch.inference_mode():
                # min_new_tokens: random weights may emit id 50256, which would end the row early.
                out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
            return out[:, s.prompt_len:].tolist()
    else:
        compile_ = impl == "gpt2lab compiled static cache"

        def run() -> list[list[int]]:
            return generate(model, prompts.tolist(), max_new_tokens=n, temperature=0, stop_ids=(), compile=compile_)

    device = torch.device(s.device)
    tokens: list[list[list[int]]] = []

    def run_once() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        tokens[:] = [run()]
        synchronize(device)
        return batch * n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    run_once()
    first_run_s = time.perf_counter() - t0
    m = measure(run_once, repeats=s.repeats, warmup=0, device=device)
    return {"impl": impl, "batch": batch, "new_tokens": n, "prompt_len": s.prompt_len, "tokens_per_s": m.median,
            "tokens_per_s_all": m.values, "first_run_s": first_run_s, "peak_memory_gb": m.peak_memory_bytes / 1e9,
            "dtype": str(s.decode_dtype), "first_tokens": tokens[0][0][:16]}


def use_compile_backend(backend: str) -> None:
    """Make generate(compile=True) use `backend` (the dry run cannot afford inductor on the CPU)."""
    if backend == "inductor":
        return
    import gpt2lab.sampling as gen

    compiled = torch.compile(gen.decode_one_token, backend=backend, fullgraph=True)
    gen.compiled_decode_one_token = lambda: compiled


# --------------------------------------------------------------------------------------------------
# The sweep


def fastest_lever(sweep: Sweep, prefix: str = "train/") -> Lever | None:
    best = None
    for key, r in sweep.results.items():
        if key.startswith(prefix) and "tokens_per_s" in r and r.get("model") == config_name(sweep.s.model):
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                best = r
    return Lever(**best["lever"]) if best else None


def run_sweep(sweep: Sweep, parts: set[str]) -> None:
    s = sweep.s
    eager, compiled = s.eager_cost_s, s.eager_cost_s + s.compile_cost_s
    base = Lever()
    if "levers" in parts:
        singles = {"baseline": base, "padded": Lever(padded=True), "fused_loss": Lever(fused_loss=True),
                   "fused_adamw": Lever(fused_adamw=True)}
        singles.update({f"sdpa_{b}": Lever(sdpa=b) for b in SDPA_CHOICES})
        for name, lever in singles.items():
            sweep.run(f"train/{name}", eager, lambda lever=lever: measure_training(s, lever))

    if "compiled" in parts:
        timed = {b: sweep.training(f"train/sdpa_{b}") for b in SDPA_CHOICES}
        timed["auto"] = sweep.training("train/baseline")
        best_sdpa = max((b for b in timed if timed[b]), key=lambda b: timed[b]["tokens_per_s"], default="auto")
        steps = [("cum1_padded", Lever(padded=True))]
        steps.append(("cum2_fused_adamw", dataclasses.replace(steps[-1][1], fused_adamw=True)))
        if best_sdpa != "auto":
            steps.append((f"cum3_sdpa_{best_sdpa}", dataclasses.replace(steps[-1][1], sdpa=best_sdpa)))
        steps.append(("cum4_compile", dataclasses.replace(steps[-1][1], compile=True)))
        steps.append(("cum5_fused_loss", dataclasses.replace(steps[-1][1], fused_loss=True)))
        for name, lever in steps:
            cost = compiled if lever.compile else eager
            sweep.run(f"train/{name}", cost, lambda lever=lever: measure_training(s, lever))

    if "decode" in parts:
        use_compile_backend(s.compile_backend)
        for batch in s.decode_batches:
            for impl, cost in (("gpt2lab eager", eager), ("gpt2lab compiled static cache", compiled),
                               ("transformers", eager)):
                sweep.run(f"decode/{impl}/b{batch}", cost, lambda b=batch, i=impl: measure_decode(s, b, i))

    fastest = fastest_lever(sweep)
    if "curve" in parts:
        if fastest is None:
            sweep.record("curve", {"skipped": "no training measurement to pick the fastest configuration from"})
        else:
            cost = 2 * eager + (s.compile_cost_s if fastest.compile else 0) + s.curve_steps * eager / (4 * s.steps)
            sweep.run("curve", cost, lambda: compare_curves(s, fastest))

    if "optimizer" in parts and fastest is not None:
        lever = dataclasses.replace(fastest, compile_optimizer=True, fused_adamw=False)
        sweep.run("train/compiled_optimizer", compiled + s.compile_cost_s, lambda: measure_training(s, lever))
        fastest = fastest_lever(sweep)

    if "sweep" in parts and fastest is not None:
        for rows in s.batch_sweep:
            lever = dataclasses.replace(fastest, micro_batch=rows)
            cost = compiled if lever.compile else eager
            sweep.run(f"train/micro_batch_{rows}", cost, lambda lever=lever: measure_training(s, lever))

    if "medium" in parts:
        cheap = Lever(padded=True, fused_adamw=True, fused_loss=True)
        sweep.run("medium/eager_levers", 2 * eager, lambda: measure_training(s, cheap, s.medium))
        best = fastest_lever(sweep) or cheap
        best = dataclasses.replace(best, micro_batch=min(best.micro_batch or s.micro_batch, s.micro_batch))
        if best.compile:
            sweep.run("medium/fastest", 2 * compiled, lambda: measure_training(s, best, s.medium))

    if "compile_alone" in parts:
        sweep.run("train/compile_alone", compiled, lambda: measure_training(s, Lever(compile=True)))


# --------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict[str, dict], meta: dict) -> str:
    """Tables for docs/benchmarks.md from the results recorded so far."""
    lines = [f"Measured {meta['date'][:10]} on {meta['device']}, torch {meta['torch']}, commit {meta['commit']} "
             f"(`python benchmarks/gpu_speed.py`).", ""]
    base = results.get("train/baseline", {}).get("tokens_per_s")
    rows = [(k, r) for k, r in results.items() if k.startswith(("train/", "medium/"))]
    if rows:
        lines += ["| measurement | configuration | model | micro-batch | tokens/s | MFU | peak memory | vs straightforward |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, r in rows:
            if "tokens_per_s" not in r:
                lines.append(f"| {key} | {r.get('error') or r.get('skipped', '')} | | | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and key.startswith("train/") else ""
            lines.append(f"| {key} | {r['describe']} | {r['model']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
                         f"{100 * r['mfu']:.1f}% | {r['peak_memory_gb']:.1f} GB | {ratio} |")
        lines.append("")
    decode = [(k, r) for k, r in results.items() if k.startswith("decode/")]
    if decode:
        lines += ["| decoding (greedy generate, prefill included) | batch | new tokens/s |", "|---|---|---|"]
        for key, r in decode:
            value = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else (r.get("error") or r.get("skipped", ""))
            lines.append(f"| {key.split('/')[1]} | {key.split('/')[2][1:]} | {value} |")
        lines.append("")
    curve = results.get("curve")
    if curve and "max_abs_delta_loss" in curve:
        lines.append(f"Loss curves, {curve['steps']} steps of {curve['tokens_per_step']:,} tokens, straightforward vs "
                     f"{curve['describe']}: max |delta loss| {curve['max_abs_delta_loss']:.4f} "
                     f"(last 50 steps: max {curve['max_abs_delta_loss_last_50']:.4f}, mean "
                     f"{curve['mean_abs_delta_loss_last_50']:.4f}); final loss {curve['final_loss'][0]:.4f} vs "
                     f"{curve['final_loss'][1]:.4f}.")
    elif curve:
        lines.append(f"Loss curves: {curve.get('error') or curve.get('skipped')}")
    return "\n".join(lines)


def earlier_results(out: Path | None, merge: bool, parser: argparse.ArgumentParser) -> dict | None:
    """The earlier sweep in `out` to keep (with `merge`), or None; refuses (parser.error, before any
    work) an `out` this script would replace that is not one of its own result files, and one of its
    own without `merge`: a finished sweep's numbers are not thrown away by a rerun."""
    if out is None or not out.exists():
        return None
    if not out.is_file():
        parser.error(f"--out {out} is not a file; name a JSON file for the results")
    try:
        doc = json.loads(out.read_text())
        ours = isinstance(doc, dict) and isinstance(doc.get("results"), dict) and "markdown" in doc
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        parser.error(f"--out {out} exists and is not a result file of this script; name a new file")
    if not merge:
        parser.error(f"--out {out} holds an earlier sweep's results; pass --merge to keep them and run only "
                     "what is missing, or name a new file")
    return doc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, help="JSON file for the results (rewritten after every measurement; "
                                                 "an existing one only with --merge)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run ({', '.join(PARTS)})")
    parser.add_argument("--merge", action="store_true",
                        help="keep the successful results already in --out and run only the missing ones")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting measurements after this many seconds (default 530; dry run 50)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: checks every code path")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    budget = args.budget_s
    if args.dry_run:
        s = dry_run_settings(50 if budget is None else budget)
        torch.set_num_threads(1)  # tiny tensors: more threads only spin, on a shared CPU above all
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: this sweep is for GPUs (use --dry-run to check it on the CPU)")
        s = gpu_settings(530 if budget is None else budget)
        torch.set_float32_matmul_precision("high")
    if args.compile_backend:
        s.compile_backend = args.compile_backend
    previous = earlier_results(args.out, args.merge, parser)
    sweep = Sweep(s, args.out, previous)
    run_sweep(sweep, parts)
    sweep.save()
    report = markdown(sweep.results, sweep.meta)
    print(report)
    return {**sweep.meta, "results": sweep.results, "markdown": report}


if __name__ == "__main__":
    main()
