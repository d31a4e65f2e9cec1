"""How fast a model runs on this machine: training tokens/s and MFU, prefill and decode tokens/s, memory.

    from gpt2lab.bench import measure_train_step, measure_decode, peak_flops, weight_read_pass
    m = measure_train_step(model, batch_size=8, seq_len=1024, steps=10, repeats=5)
    m.median, m.min, m.max                   # tokens/s over the repeats, after warm-up
    flops, source = peak_flops(device, torch.bfloat16)
    mfu = model_stats(model.config, 1024).flops_per_token_train * m.median / flops
    weight_read_pass(model)()               # the floor of a batch-1 decode step: every weight read once

Every measurement is a callable that runs one timed repeat and returns tokens/s (`train_step_bench`,
`prefill_bench`, `decode_bench`); `measure` warms it up and repeats it, `measure_interleaved` takes
turns between several (ours and transformers', say) so drifting clocks and thermals hit all alike.
Models are called through a `ModelAdapter`: `GPTAdapter` for gpt2lab's GPT and `HFAdapter` for
transformers' GPT2LMHeadModel, so both run the very same loops.

Peak FLOP/s for MFU: a table of dense tensor-core peaks by GPU name (datasheet numbers, no sparsity);
on the CPU, and on GPUs not in the table, the peak measured by a short large-matmul benchmark.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.devices import cpu_flags, cpu_name, dtype_name
from gpt2lab.errors import UserError
from gpt2lab.sampling import one_token_step
from gpt2lab.timing import take_turns, time_call

# --------------------------------------------------------------------------------------------------
# Peak FLOP/s

# (name pattern, {dtype: dense peak FLOP/s}); the first pattern found in the device name wins, so
# more specific names come first ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    ("H200 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("A6000", {"bf16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12}),
    ("4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


@torch.no_grad()
def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                seconds: float = 0.5) -> float:
    """Measured FLOP/s of square n x n matmuls: the best of repeated timings over about `seconds`.

    The product is taken as nn.Linear takes it, x @ W.T with W stored (out, in): the layout the model's
    matmuls run in. Layouts differ by more than an order of magnitude on some CPUs (bf16 on an AVX2
    CPU: 0.9 GFLOP/s for a @ b, 17 for a @ b.T), so another layout would not be this model's peak."""
    device = torch.device(device)
    n = n or (1024 if device.type == "cpu" else 8192)
    # A private generator: the measurement runs inside training, whose dropout and data draws must not move
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    reps = 1

    def batch() -> None:
        for _ in range(reps):
            F.linear(a, b)

    time_call(batch, device)  # warm-up: first-call setup is not the steady state
    best, spent = 0.0, 0.0
    while spent < seconds:
        dt, _ = time_call(batch, device)
        spent += dt
        best = max(best, 2 * n**3 * reps / dt)
        if dt < 0.05:
            reps *= 2  # time batches of at least ~50 ms, so timer resolution does not matter
    return best


@functools.lru_cache(maxsize=1)
def cpu_matmul_peak() -> float:
    """Measured fp32 matmul FLOP/s of this CPU with torch's current thread count (cached per process)."""
    return matmul_peak("cpu", torch.float32)


def peak_flops(device: str | torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for matmuls in `dtype` on `device`.

    CUDA GPUs in GPU_PEAK_FLOPS get the datasheet dense peak (fp32 counts as TF32 when torch allows
    TF32 matmuls); the CPU gets `cpu_matmul_peak()` in fp32 or a measurement in other dtypes; other
    devices get a measurement.
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            name = "tf32"
        for pattern, peaks in GPU_PEAK_FLOPS:
            if pattern in gpu and name in peaks:
                return peaks[name], f"datasheet {name} dense peak of {gpu}"
        return matmul_peak(device, dtype), f"measured {name} matmul peak of {gpu}"
    if device.type == "cpu" and dtype == torch.float32:
        return cpu_matmul_peak(), f"measured fp32 matmul peak of the CPU ({torch.get_num_threads()} threads)"
    return matmul_peak(device, dtype), f"measured {name} matmul peak of {device.type}"


def cpu_description() -> str:
    """The CPU's model name (as lscpu gives it) and which of its bf16 instructions it has, e.g.
    "AMD EPYC 7B13 (no AVX-512, AVX512-BF16 or AMX)" or "Intel Xeon ... (avx512f, avx512_bf16, amx_bf16)"."""
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{cpu_name()} ({', '.join(have) if have else 'no AVX-512, AVX512-BF16 or AMX'})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {cpu_description()} ({torch.get_num_threads()} threads)"
    return device.type


# --------------------------------------------------------------------------------------------------
# Memory


def _max_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or on the CPU the process's max RSS
    (its growth over the block is `growth`; RSS includes the Python process and libraries)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.growth = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _max_rss_bytes()
        self.peak = max(self.peak, peak)
        self.growth = max(self.growth, peak - self._start)


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Measurement:
    """Tokens/s of the timed repeats (after warm-up), and the peak memory while they ran."""

    values: list[float]
    peak_memory_bytes: int = 0
    memory_growth_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def to_dict(self) -> dict:
        return {
            "tokens_per_s": self.median, "tokens_per_s_min": self.min, "tokens_per_s_max": self.max,
            "tokens_per_s_all": self.values, "peak_memory_bytes": self.peak_memory_bytes,
            "memory_growth_bytes": self.memory_growth_bytes, **self.extra,
        }


def measure(run_once: Callable[[], float], repeats: int = 5, warmup: int = 1,
            device: str | torch.device = "cpu") -> Measurement:
    """Call `run_once` `warmup` times untimed, then `repeats` times; collect what it returns (tokens/s)."""
    return measure_interleaved({"_": run_once}, repeats, warmup, device)["_"]


def measure_interleaved(runs: dict[str, Callable[[], float]], repeats: int = 5, warmup: int = 1,
                        device: str | torch.device = "cpu") -> dict[str, Measurement]:
    """Like `measure` for several callables, taking turns (`timing.take_turns`): a1 b1 a2 b2 ...
    (after warming each up, also in turns)."""
    device = torch.device(device)
    memories = {name: PeakMemory(device) for name in runs}

    def with_memory(name: str) -> Callable[[], float]:
        def run() -> float:
            with memories[name]:
                return runs[name]()
        return run

    turns = take_turns({name: with_memory(name) for name in runs}, rounds=repeats, warmup=warmup)
    return {
        name: Measurement(turns.values[name], memories[name].peak, memories[name].growth) for name in runs
    }


# --------------------------------------------------------------------------------------------------
# Models


class ModelAdapter(abc.ABC):
    """The calls the benchmarks make, so gpt2lab's and transformers' models run the same loops."""

    model: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abc.abstractmethod
    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of idx (B, T) against targets (B, T)."""

    @abc.abstractmethod
    def prefill(self, idx: torch.Tensor, max_len: int, cache_dtype: torch.dtype) -> tuple[torch.Tensor, object]:
        """Run the prompt idx (B, T) into a fresh KV cache for `max_len` tokens: (last logits (B, V), state)."""

    @abc.abstractmethod
    def decode(self, token: torch.Tensor, state: object, position: int) -> tuple[torch.Tensor, object]:
        """One token (B, 1) at `position` through the cache: (logits (B, V), state)."""


class GPTAdapter(ModelAdapter):
    """gpt2lab's GPT with its preallocated KV cache."""

    def __init__(self, model: nn.Module, train_model: nn.Module | None = None) -> None:
        self.model = model
        self.train_model = model if train_model is None else train_model  # e.g. the torch.compile'd module

    def loss(self, idx, targets):
        return self.train_model(idx, targets)[1]

    def prefill(self, idx, max_len, cache_dtype):
        cache = self.model.new_cache(idx.shape[0], max_len, dtype=cache_dtype)
        logits, _ = self.model(idx, cache=cache, last_only=True)
        return logits[:, -1], (cache, one_token_step(self.model, cache))  # the step `gpt2lab sample` takes

    def decode(self, token, state, position):
        cache, step = state
        return step(self.model, cache, token, torch.full_like(token, position)), state


class HFAdapter(ModelAdapter):
    """transformers' GPT2LMHeadModel with its own (dynamic) KV cache."""

    def __init__(self, model: nn.Module, train_model: nn.Module | None = None) -> None:
        self.model = model
        self.train_model = model if train_model is None else train_model

    def loss(self, idx, targets):
        # HF shifts labels itself; passing idx keeps the work identical (a (B, T) forward and backward).
        return self.train_model(input_ids=idx, labels=idx).loss

    def prefill(self, idx, max_len, cache_dtype):
        out = self.model(input_ids=idx, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def decode(self, token, state, position):
        out = self.model(input_ids=token, past_key_values=state, use_cache=True)
        return out.logits[:, -1], out.past_key_values


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _random_tokens(vocab_size: int, shape: Sequence[int], device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, tuple(shape), generator=g).to(device)


def train_step_bench(adapter: ModelAdapter, vocab_size: int, batch_size: int, seq_len: int, steps: int = 10,
                     dtype: torch.dtype | None = None, lr: float = 0.0) -> Callable[[], float]:
    """A callable that runs `steps` training steps (forward, backward, AdamW step) on random tokens and
    returns tokens/s. `dtype` bf16/fp16 runs the step under autocast (weights stay fp32). With the
    default lr=0 AdamW does all its work but leaves the weights as they were loaded."""
    device = adapter.device
    tokens = _random_tokens(vocab_size, (batch_size, seq_len + 1), device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(adapter.model.parameters(), lr=lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train() -> None:
        for _ in range(steps):
            with _autocast(device, dtype):
                loss = adapter.loss(x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    def run_once() -> float:
        adapter.model.train()
        return batch_size * seq_len * steps / time_call(train, device)[0]

    return run_once


def prefill_bench(adapter: ModelAdapter, vocab_size: int, batch_size: int, seq_len: int, steps: int = 10,
                  dtype: torch.dtype | None = None) -> Callable[[], float]:
    """A callable that runs `steps` prefills of (batch_size, seq_len) random prompts into a fresh KV
    cache and returns prompt tokens/s."""
    device = adapter.device
    prompt = _random_tokens(vocab_size, (batch_size, seq_len), device)
    cache_dtype = dtype or next(adapter.model.parameters()).dtype

    @torch.no_grad()
    def prefill() -> None:
        for _ in range(steps):
            with _autocast(device, dtype):
                adapter.prefill(prompt, seq_len, cache_dtype)

    def run_once() -> float:
        adapter.model.eval()
        return batch_size * seq_len * steps / time_call(prefill, device)[0]

    return run_once


def decode_bench(adapter: ModelAdapter, vocab_size: int, batch_size: int, prompt_len: int, new_tokens: int,
                 dtype: torch.dtype | None = None) -> Callable[[], float]:
    """A callable that prefills a (batch_size, prompt_len) random prompt, then greedily decodes
    `new_tokens` tokens one at a time through the KV cache; returns generated tokens/s of the decode
    loop alone (the prefill is not timed). Argmax sampling: this measures the model, not the sampler."""
    device = adapter.device
    prompt = _random_tokens(vocab_size, (batch_size, prompt_len), device)
    cache_dtype = dtype or next(adapter.model.parameters()).dtype

    @torch.no_grad()
    def run_once() -> float:
        adapter.model.eval()
        with _autocast(device, dtype):
            logits, state = adapter.prefill(prompt, prompt_len + new_tokens, cache_dtype)

            def decode() -> None:
                nonlocal logits, state
                for i in range(new_tokens):
                    token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                    logits, state = adapter.decode(token, state, prompt_len + i)

            seconds, _ = time_call(decode, device)
        return batch_size * new_tokens / seconds

    return run_once


def weight_read_pass(model: nn.Module) -> Callable[[], None]:
    """A callable doing what a batch-1 decode step cannot do without: one vector-matrix product per
    weight matrix (every Linear, the LM head included; packed ones through their own kernel), in model
    order, layout and dtype, nothing else. Each call streams all the weights, as a decode step does;
    its time is the step's floor."""
    from gpt2lab.packed import PackedLinear

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    weights = [m.weight_packed if isinstance(m, PackedLinear) else m.weight for m in layers]
    inputs = [torch.zeros(1, m.in_features, dtype=w.dtype, device=w.device) for m, w in zip(layers, weights)]

    @torch.no_grad()
    def one_pass() -> None:
        for m, x in zip(layers, inputs):
            m(x)

    return one_pass


def measure_train_step(model: nn.Module, batch_size: int, seq_len: int, steps: int = 10, repeats: int = 5,
                       warmup: int = 1, dtype: torch.dtype | None = None) -> Measurement:
    """Training tokens/s of a gpt2lab GPT (forward + backward + AdamW) on random tokens."""
    adapter = as_adapter(model)
    run = train_step_bench(adapter, _vocab_size(adapter.model), batch_size, seq_len, steps, dtype)
    return measure(run, repeats, warmup, adapter.device)


def measure_prefill(model: nn.Module, batch_size: int, seq_len: int, steps: int = 10, repeats: int = 5,
                    warmup: int = 1, dtype: torch.dtype | None = None) -> Measurement:
    """Prefill (prompt) tokens/s of a gpt2lab GPT."""
    adapter = as_adapter(model)
    run = prefill_bench(adapter, _vocab_size(adapter.model), batch_size, seq_len, steps, dtype)
    return measure(run, repeats, warmup, adapter.device)


def measure_decode(model: nn.Module, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 5,
                   warmup: int = 1, dtype: torch.dtype | None = None) -> Measurement:
    """Greedy decode tokens/s of a gpt2lab GPT through its KV cache (prefill not timed)."""
    adapter = as_adapter(model)
    run = decode_bench(adapter, _vocab_size(adapter.model), batch_size, prompt_len, new_tokens, dtype)
    return measure(run, repeats, warmup, adapter.device)


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """An adapter for `model`: transformers models get HFAdapter, everything else GPTAdapter."""
    if isinstance(model, ModelAdapter):
        return model
    if type(model).__module__.startswith("transformers."):
        return HFAdapter(model)
    return GPTAdapter(model)


def _vocab_size(model: nn.Module) -> int:
    return model.config.vocab_size


# --------------------------------------------------------------------------------------------------
# transformers twin


def hf_twin(model: nn.Module) -> nn.Module:
    """transformers' GPT2LMHeadModel holding the same weights as `model`, on the same device and dtype."""
    import tempfile

    from gpt2lab.hf import save_hf_model

    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError("--compare hf needs transformers: pip install 'gpt2lab[hf]'") from None
    param = next(model.parameters())
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_hf_model(model, tmp)
        except UserError as e:
            raise UserError(f"--compare hf: {e}") from None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no progress bar or notes about our own config.json
        hf_logging.disable_progress_bar()
        try:
            twin = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa")
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    twin.loss_type = "ForCausalLM"  # the loss it falls back to anyway, without a warning about the class name
    return twin.to(device=param.device, dtype=param.dtype)
