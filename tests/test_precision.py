"""`dtype: auto` on CPU is decided by measurement (gpt2lab.precision's probes, gpt2lab.dtype_choice's
resolver): the rule, the probes' bounds and side effects, the cache, the GPT2LAB_CPU_DTYPE override,
the decision by timing what the run repeats, and what train / sample / bench say.

tests/conftest.py sets GPT2LAB_CPU_DTYPE=fp32 for the suite; the tests here that exercise the
measurement remove it, and every test gets its own GPT2LAB_CACHE.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from gpt2lab import dtype_choice, parallel, precision, timing
from gpt2lab.cli import main
from gpt2lab.dtype_choice import Decoding, MuonIterations, TrainingSteps, resolve
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.precision import Choice, decide, train_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh measurement cache per test, and the probe itself rather than the suite's fp32 override."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)


@pytest.fixture
def fake_rates(monkeypatch):
    """Replace the matmul timing by fixed (fp32, bf16) FLOP/s; `calls` counts the timings made."""
    class Fake:
        rates = (100e9, 300e9)
        calls = 0

    def compare(ops, low, **kwargs):
        Fake.calls += 1
        return Fake.rates

    monkeypatch.setattr(precision, "_compare_matmuls", compare)
    return Fake


@pytest.fixture
def simulated(monkeypatch):
    """The model's own work takes simulated time where gpt2lab.dtype_choice times it (on a quiet
    machine): each call of the model advances the clock by `cost(what, dtype, n)` seconds for the n-th
    call (from 0) of `what` ("train": with gradients, "forward": without, "decode": through a KV cache)
    in `dtype` (autocast's, else the weights'); `calls` lists (what, dtype) of every call."""
    clock = SimpleNamespace(now=0.0, calls=[], cost=lambda what, dtype, n: 0.0)
    forward = GPT.forward

    def timed_forward(self, idx, *args, **kwargs):
        what = "decode" if kwargs.get("cache") is not None else "train" if torch.is_grad_enabled() else "forward"
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.transformer.wte.weight.dtype
        n = clock.calls.count((what, dtype))
        clock.calls.append((what, dtype))
        clock.now += clock.cost(what, dtype, n)
        return forward(self, idx, *args, **kwargs)

    def on_the_clock(*args, **kwargs):  # the resolver's timings read the simulated clock, nothing else does
        real = timing.time
        timing.time = SimpleNamespace(perf_counter=lambda: clock.now, process_time=real.process_time)
        try:
            return take_turns(*args, **kwargs)
        finally:
            timing.time = real

    take_turns = dtype_choice.take_turns
    monkeypatch.setattr(GPT, "forward", timed_forward)
    monkeypatch.setattr(dtype_choice, "take_turns", on_the_clock)
    monkeypatch.setattr(dtype_choice, "on_a_busy_machine", lambda timing, threads: (timing(), False))
    return clock


def tiny(**overrides) -> GPT:
    """A one-layer, 32-wide GPT with 64 token ids: fast enough in bf16 even on a CPU without bf16 units."""
    return GPT(GPTConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 64, **overrides}))


def tiny_train_args(data_dir, out, **overrides) -> list[str]:
    """`gpt2lab train` arguments for a 2-layer, 32-wide model on the quickstart corpus (as tests/test_trainer.py)."""
    base = {
        "data.dir": str(data_dir), "data.prepare": "null", "checkpoint.out_dir": str(out),
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "train.tokens_per_step": 128, "train.micro_batch_size": 4, "train.max_steps": 2, "train.device": "cpu",
        "train.eval_every": 0, "train.eval_batches": 1, "train.sample_tokens": 0, "train.log_every": 1,
        "checkpoint.every": 0, "checkpoint.keep_last": 0, "log.progress": "false",
    }
    base.update(overrides)
    return ["train", *(f"--{k}={v}" for k, v in base.items())]


# --------------------------------------------------------------------------------------------------
# The rule and its description


def test_decide_wants_bf16_at_least_1_3x_faster():
    assert decide(100.0, 129.0) is torch.float32
    assert decide(100.0, 130.0) is torch.bfloat16
    assert decide(100.0, 131.0) is torch.bfloat16
    assert decide(100.0, 1.0) is torch.float32  # slower
    assert decide(100.0, 101.0, threshold=1.0) is torch.bfloat16
    assert decide(100.0, 300.0, low=torch.float16) is torch.float16


def test_a_choice_describes_itself_in_one_line():
    choice = Choice(torch.bfloat16, {"fp32": 169e9, "bf16": 582e9}, 582 / 169, "cached", "train",
                    "256x768 @ 768x{3072,768}")
    assert choice.describe() == "bf16 (bf16 matmuls 3.44x fp32 at 256x768 @ 768x{3072,768}: 582 vs 169 GFLOP/s; cached)"
    assert choice.note("train.dtype", "auto") == f"train.dtype auto -> {choice.describe()}"
    assert choice.note("train.dtype", "bf16") is None  # explicit and faster: nothing to say
    slow = Choice(torch.float32, {"fp32": 30e9, "bf16": 0.7e9}, 0.7 / 30, "measured", "train",
                  "16x768 @ 768x768, 1 thread, stopped early", 0.06)
    assert slow.describe() == ("fp32 (bf16 matmuls 0.02x fp32 at 16x768 @ 768x768, 1 thread, stopped early: "
                               "0.7 vs 30 GFLOP/s; measured in 60 ms)")
    warning = slow.note("train.dtype", "bfloat16")
    assert warning.startswith("warning: train.dtype=bf16 on this CPU is slower than fp32 (bf16 matmuls 0.02x")
    decode = Choice(torch.bfloat16, {"fp32": 23.3, "bf16": 39.9}, 39.9 / 23.3, "measured", "decode",
                    "this model (124.4M params, batch 1)", 0.3)
    assert decode.describe() == ("bf16 (bf16 decoding 1.71x fp32 of this model (124.4M params, batch 1): "
                                 "39.9 vs 23.3 tokens/s; measured in 0.30 s)")
    forced = Choice(torch.float32, source=precision.OVERRIDE_ENV)
    assert forced.describe() == "fp32 (GPT2LAB_CPU_DTYPE=fp32)" and forced.note("--dtype", "auto") is None
    assert Choice.from_dict(decode.to_dict()) == decode


# --------------------------------------------------------------------------------------------------
# The probes, for real on this machine


def test_train_probe_is_quick_valid_and_leaves_the_rng_and_threads_alone():
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    start = time.perf_counter()
    choice = train_precision(768, 8 * 1024)  # gpt2's width, a typical micro-batch
    elapsed = time.perf_counter() - start
    # Well under a second on a quiet machine even where bf16 is ~100x slower; slack for a busy CI box.
    assert elapsed < 2.5, (elapsed, choice.describe())
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert choice.source == "measured" and choice.kind == "train" and 0 < choice.seconds <= elapsed
    assert choice.rates["fp32"] > 0 and choice.rates["bf16"] > 0
    assert choice.speedup == pytest.approx(choice.rates["bf16"] / choice.rates["fp32"])
    assert choice.dtype is decide(choice.rates["fp32"], choice.rates["bf16"])
    assert "\n" not in choice.describe()
    assert torch.is_grad_enabled()  # no_grad was left behind


def test_decode_probe_is_quick_valid_and_leaves_the_model_and_rng_alone():
    from gpt2lab.packed import PackedLinear

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny")).train()  # training mode: the probe must not use dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    start = time.perf_counter()
    choice = Decoding(model).measure()
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5, (elapsed, choice.describe())
    assert torch.equal(torch.get_rng_state(), rng)
    assert choice.source == "measured" and choice.kind == "decode" and choice.rates["fp32"] > 0 < choice.rates["bf16"]
    assert choice.dtype is decide(choice.rates["fp32"], choice.rates["bf16"])
    assert model.training and model.transformer.wte.weight.dtype == torch.float32
    # laid out for decoding in place (packed linear layers): the same values
    weights = {**model.state_dict(), **{f"{name}.weight": m.dense_weight() for name, m in model.named_modules()
                                        if isinstance(m, PackedLinear)}}
    assert weights.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="fp32 weights"):
        Decoding(GPT(GPTConfig.from_preset("gpt2-tiny")).to(torch.bfloat16)).measure()


def test_a_bf16_copy_keeps_ties_and_rope_tables():
    model = GPT(GPTConfig.from_preset("gpt2-tiny", pos_emb="rope"))
    twin = dtype_choice._copy_in(model, torch.bfloat16)
    assert twin.lm_head.weight is twin.transformer.wte.weight and twin.lm_head.weight.dtype == torch.bfloat16
    assert twin.rope_cos.dtype == torch.float32  # the model keeps its rotary tables in fp32
    assert model.transformer.wte.weight.dtype == torch.float32  # the original is untouched


# --------------------------------------------------------------------------------------------------
# The cache


def test_the_cache_is_used_and_keyed_by_cpu_torch_threads_and_shape(fake_rates, monkeypatch):
    first = train_precision(768, 1024)
    assert (first.source, first.dtype, fake_rates.calls) == ("measured", torch.bfloat16, 2)  # small, then full
    again = train_precision(768, 1024)
    assert (again.source, again.dtype, again.rates, fake_rates.calls) == ("cached", torch.bfloat16, first.rates, 2)
    assert again.describe().endswith("; cached)")
    assert train_precision(768, 1024, threshold=4.0).dtype is torch.float32  # re-decided from the cached rates
    assert fake_rates.calls == 2

    train_precision(1024, 1024)  # another width
    assert fake_rates.calls == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        train_precision(768, 1024)
    finally:
        torch.set_num_threads(threads)
    assert fake_rates.calls == 6
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    train_precision(768, 1024)
    assert fake_rates.calls == 8
    monkeypatch.setattr(precision, "cpu_name", lambda: "Some Other CPU")
    train_precision(768, 1024)
    assert fake_rates.calls == 10
    keys = list(json.loads(precision.cache_path().read_text())["entries"])
    assert len(keys) == 5 and any("Some Other CPU" in k and "torch 9.9.9" in k for k in keys)
    assert any(f"| {threads + 1} threads" in k for k in keys) and all(k.startswith("train | bf16 ") for k in keys)
    assert train_precision(768, 1024, use_cache=False).source == "measured" and fake_rates.calls == 12


def test_a_bf16_that_is_far_slower_stops_at_the_small_call(fake_rates):
    fake_rates.rates = (100e9, 1e9)
    choice = train_precision(768, 1024)
    assert fake_rates.calls == 1 and choice.dtype is torch.float32 and "stopped early" in choice.detail


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 2, "entries": {"k": "junk"}}', "\x00\xff"])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake_rates, content):
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    assert train_precision(768, 1024).source == "measured"
    data = json.loads(path.read_text())
    assert data["version"] == precision._CACHE_VERSION and len([k for k in data["entries"] if k.startswith("train")]) == 1
    assert train_precision(768, 1024).source == "cached"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the atomic write left no temp file


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(fake_rates, monkeypatch):
    quiet = precision.on_a_busy_machine
    busy = lambda timing, threads: (timing(), True)  # noqa: E731
    monkeypatch.setattr(precision, "on_a_busy_machine", busy)
    monkeypatch.setattr(dtype_choice, "on_a_busy_machine", busy)
    choice = train_precision(768, 1024)
    assert choice.busy and choice.dtype is torch.bfloat16 and not precision.cache_path().exists()
    assert choice.describe().endswith(" on a busy machine, not cached)")
    decoding = Decoding(GPT(GPTConfig.from_preset("gpt2-tiny")))
    assert decoding.measure().busy and decoding.measure().source == "measured"
    monkeypatch.setattr(dtype_choice, "on_a_busy_machine", lambda timing, threads: (timing(), False))
    assert decoding.measure().source == "measured"
    assert decoding.measure().source == "cached"
    _, busy = quiet(lambda: time.sleep(0.05), 1)  # asleep: no CPU time used
    assert busy is True


def test_an_unusable_cache_costs_a_measurement_not_a_traceback(fake_rates):
    precision.cache_path().mkdir(parents=True)  # a directory where the file should be
    assert train_precision(768, 1024).source == "measured"
    assert train_precision(768, 1024).source == "measured" and fake_rates.calls == 4


# --------------------------------------------------------------------------------------------------
# The override and compute_dtype


def test_the_override_decides_without_measuring(fake_rates, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "bf16")
    choice = train_precision(768, 1024)
    assert (choice.dtype, choice.source, fake_rates.calls) == (torch.bfloat16, "GPT2LAB_CPU_DTYPE", 0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    resolved = resolve("auto", CPU, TrainingSteps(model, 4, 32))
    assert (resolved.dtype, resolved.line, resolved.choice.source) == (torch.bfloat16, None, "GPT2LAB_CPU_DTYPE")
    assert Decoding(model).measure().source == "GPT2LAB_CPU_DTYPE"
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "float32")
    assert resolve("auto", CPU, TrainingSteps(model, 4, 32)).dtype is torch.float32
    assert not precision.cache_path().exists() and fake_rates.calls == 0


@pytest.mark.parametrize("value", ["fp16", "bf8", "auto"])
def test_a_bad_override_is_one_line(monkeypatch, value):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", value)
    with pytest.raises(UserError) as info:
        train_precision(768, 1024)
    message = str(info.value)
    assert "\n" not in message and "GPT2LAB_CPU_DTYPE" in message and "fp32 or bf16" in message and value in message


def test_a_bad_override_exits_2_through_the_cli(monkeypatch, capsys):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "fp8")
    assert main(["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GPT2LAB_CPU_DTYPE='fp8'" in err and "fp32 or bf16" in err


def test_a_bad_override_stops_train_before_any_work(default_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "half")
    assert main(tiny_train_args(default_data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GPT2LAB_CPU_DTYPE='half'" in err and not (tmp_path / "run").exists()


def _layouts_timed(monkeypatch, probe) -> set[str]:
    """The matmul layouts `probe()` times, as "a @ b", "a @ b.T" or "a.T @ b"."""
    seen = set()
    mm = torch.mm

    def spy(a, b):
        seen.add(("a.T" if not a.is_contiguous() else "a") + " @ " + ("b.T" if not b.is_contiguous() else "b"))
        return mm(a, b)

    monkeypatch.setattr(torch, "mm", spy)
    probe()
    monkeypatch.setattr(torch, "mm", mm)
    return seen


def test_forward_passes_time_the_forward_matmul_only(monkeypatch):
    """Evaluation has no backward: on an AVX2 CPU bf16 x @ W.T ran 17 GFLOP/s but g @ W 0.9, so a
    training step's probe would misjudge a forward pass wherever the layouts differ."""
    assert _layouts_timed(monkeypatch, lambda: precision.train_precision(64, 64, use_cache=False)) == {
        "a @ b.T", "a @ b", "a.T @ b"}
    assert _layouts_timed(monkeypatch, lambda: precision.forward_precision(64, 64, use_cache=False)) == {"a @ b.T"}
    choice = precision.forward_precision(64, 64)
    assert choice.kind == "forward" and "forward matmuls" in choice.describe()


def test_forward_and_training_choices_are_taken_and_cached_apart(monkeypatch):
    def compare(ops, low, backward=True, **kwargs):  # bf16 fast forward, slow backward
        return (100e9, 50e9) if backward else (100e9, 300e9)

    monkeypatch.setattr(precision, "_compare_matmuls", compare)
    assert precision.train_precision(64, 64).dtype is torch.float32
    assert precision.forward_precision(64, 64).dtype is torch.bfloat16
    assert precision.forward_precision(64, 64).source == "cached"
    model = tiny(n_embd=64)
    assert resolve("auto", CPU, TrainingSteps(model, 2, 32)).dtype is torch.float32


def test_eval_times_forward_passes_with_converted_weights(monkeypatch, simulated):
    monkeypatch.setattr(precision, "_compare_matmuls", lambda ops, low, **kwargs: (100e9, 300e9))
    simulated.cost = lambda what, dtype, n: 0.40 if dtype == torch.float32 else 0.20
    resolved = resolve("auto", CPU, dtype_choice.ForwardPasses(tiny(), 2, 32))
    assert resolved.dtype is torch.bfloat16 and resolved.choice.kind == "forward_pass"
    assert {what for what, _ in simulated.calls} == {"forward"}
    assert set(simulated.calls) == {("forward", torch.float32), ("forward", torch.bfloat16)}  # bf16 weights
    assert resolved.line.startswith("--dtype auto -> bf16 (bf16 forward passes 2.00x fp32 at 2x32 tokens")


def test_resolve_measures_only_auto_on_cpu_and_an_explicit_low_precision_when_asked(fake_rates, monkeypatch):
    model = tiny()
    steps = TrainingSteps(model, 4, 32)
    assert resolve("fp32", CPU, steps, check_explicit=True) == dtype_choice.Resolution(torch.float32, None, None)
    assert resolve("bf16", CPU, steps) == dtype_choice.Resolution(torch.bfloat16, None, None)
    assert fake_rates.calls == 0
    fake_rates.rates = (100e9, 1e9)
    resolved = resolve("bf16", CPU, steps, setting="train.dtype", check_explicit=True)
    assert resolved.dtype is torch.bfloat16 and resolved.choice.speedup == pytest.approx(0.01)
    assert resolved.line.startswith("warning: train.dtype=bf16 on this CPU is slower than fp32 (bf16 matmuls 0.01x")
    resolved = resolve("auto", CPU, steps, setting="train.dtype")
    assert resolved.dtype is torch.float32 and resolved.choice.source == "cached"
    assert resolved.line.startswith("train.dtype auto -> fp32 (bf16 matmuls 0.01x fp32")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert resolve("auto", cuda, steps) == dtype_choice.Resolution(torch.bfloat16, None, None)
    assert resolve("auto", cuda, Decoding(model)).dtype is None  # sample and eval keep the stored weights
    assert resolve("auto", cuda, MuonIterations(64)).dtype is torch.bfloat16
    with pytest.raises(UserError, match="optim.muon_dtype='fp16' is not one of 'auto', 'bf16', 'fp32'"):
        resolve("fp16", CPU, MuonIterations(64), setting="optim.muon_dtype")
    assert parallel.from_rank0(lambda: {"dtype": "bf16"}) == {"dtype": "bf16"}  # one process: computed here


# --------------------------------------------------------------------------------------------------
# Deciding by what the run repeats


def test_training_steps_decide_where_bf16_matmuls_are_faster(fake_rates, simulated):
    """On an AMD Zen 4 CPU (AVX512-BF16, no AMX) the quickstart's bf16 matmuls ran 1.9x faster than
    fp32 and dtype auto took bf16, though its small steps are mostly other work. Where the matmuls
    pass the gate, a training step of the model at its micro-batch decides, either way."""
    fake_rates.rates = (100e9, 190e9)
    simulated.cost = lambda what, dtype, n: 0.010 if dtype == torch.float32 else 0.013
    choice = TrainingSteps(tiny(), 4, 32).measure()
    assert choice.dtype is torch.float32 and choice.kind == "train_step" and choice.source == "measured"
    assert choice.speedup == pytest.approx(10 / 13) and choice.matmul_speedup == pytest.approx(1.9)
    assert choice.describe().startswith("fp32 (bf16 training steps 0.77x fp32 at 4x32 tokens of this model (")
    assert "tokens/s (matmuls 1.90x); measured in " in choice.describe()
    assert set(simulated.calls) == {("train", torch.float32), ("train", torch.bfloat16)}  # autocast, with gradients
    rounds = simulated.calls.count(("train", torch.float32)) - 1  # after one untimed step
    assert dtype_choice.STEP_ROUNDS[0] <= rounds <= dtype_choice.STEP_ROUNDS[1]

    fake_rates.rates = (100e9, 110e9)  # the matmuls alone would keep fp32 (1.1x < 1.3x) ...
    assert train_precision(32, 2 * 32).dtype is torch.float32
    simulated.cost = lambda what, dtype, n: 0.45 if dtype == torch.float32 else 0.30  # ... the steps run 1.5x
    choice = TrainingSteps(tiny(), 2, 32).measure()
    assert choice.dtype is torch.bfloat16 and choice.speedup == pytest.approx(1.5)


def test_the_matmul_gate_stops_at_once_where_bf16_matmuls_are_slower(fake_rates, simulated):
    fake_rates.rates = (100e9, 60e9)
    choice = TrainingSteps(tiny(), 4, 32).measure()
    assert choice.dtype is torch.float32 and choice.kind == "train" and simulated.calls == []  # no step taken
    assert choice.describe().startswith("fp32 (bf16 matmuls 0.60x fp32 at ")


def test_a_step_too_long_to_time_is_left_to_the_matmuls(fake_rates, simulated):
    fake_rates.rates = (1e6, 3e6)  # at 1 MFLOP/s fp32 a step would take minutes: matmul-bound, not timed
    choice = TrainingSteps(tiny(), 4, 32).measure()
    assert choice.dtype is torch.bfloat16 and choice.kind == "train" and simulated.calls == []
    assert "; a step of this model too long to time: " in choice.describe()


def test_the_training_choice_is_cached_by_model_and_micro_batch(fake_rates, simulated):
    fake_rates.rates = (100e9, 300e9)
    simulated.cost = lambda what, dtype, n: 0.40 if dtype == torch.float32 else 0.20  # 2 rounds fill the budget
    model = tiny()
    first = TrainingSteps(model, 4, 32).measure()
    timed = len(simulated.calls)
    again = TrainingSteps(model, 4, 32).measure()
    assert (again.source, again.dtype, again.rates, len(simulated.calls)) == ("cached", torch.bfloat16, first.rates, timed)
    for other in (TrainingSteps(model, 2, 32), TrainingSteps(tiny(n_layer=2), 4, 32),
                  TrainingSteps(model, 4, 32, fused_loss=True)):
        assert other.measure().source == "measured" and len(simulated.calls) > timed
        timed = len(simulated.calls)
    keys = [k for k in json.loads(precision.cache_path().read_text())["entries"] if k.startswith("train_step | ")]
    assert len(keys) == 4 and all("n_embd 32, n_head 2, n_kv_head 2, vocab 64" in k for k in keys)
    assert {k.split(" | ")[1].split(", micro-batch ")[1] for k in keys} == {"4x32", "2x32", "4x32, fused loss"}
    assert sum("n_layer 2" in k for k in keys) == 1


def test_timing_training_steps_leaves_the_model_its_gradients_and_the_rng_alone(fake_rates):
    fake_rates.rates = (100e9, 300e9)  # the gate passes: real steps of the model are timed
    model = tiny(dropout=0.1).eval()  # dropout draws from the RNG in training mode
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    choice = TrainingSteps(model, 2, 16).measure()
    assert choice.kind == "train_step" and choice.rates["fp32"] > 0 < choice.rates["bf16"]
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert all(p.grad is None for p in model.parameters() if p is not model.lm_head.weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_decode_probe_times_enough_steps_after_warm_up_and_takes_the_median(simulated):
    """On an AMD Zen 4 CPU `sample --dtype auto` chose fp32 for gpt2 while benchmarks/bench_decode.py
    measured bf16 weights decoding 1.42x faster. The probe timed 3 tokens of each (a 0.15 s budget at
    ~40 ms a token), its first bf16 steps carrying one-time setup (kernel selection, JIT), took the
    best of them, and gave up after two when bf16 looked 2x slower. Warm-up is now excluded and the
    median of ~10 rounds decides, one slow step (a preemption) aside."""
    def cost(what, dtype, n):
        if dtype == torch.float32:
            return 0.040
        return 0.120 if n < 2 else 0.200 if n == 6 else 0.028

    simulated.cost = cost
    choice = Decoding(tiny(block_size=64)).measure()
    assert choice.dtype is torch.bfloat16 and choice.speedup == pytest.approx(40 / 28)
    assert {what for what, _ in simulated.calls} == {"decode"}
    rounds = simulated.calls.count(("decode", torch.float32)) - dtype_choice.DECODE_WARMUP
    assert rounds >= 8 and rounds * 0.068 <= dtype_choice.DECODE_BUDGET_S + 0.068 + 0.2  # bounded time
    assert choice.describe().startswith("bf16 (bf16 decoding 1.43x fp32 of this model (")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = """
import os, torch, torch.distributed as dist
from gpt2lab import dtype_choice, precision
from gpt2lab.model import GPT, GPTConfig
rank = int(os.environ["RANK"])
precision._compare_matmuls = lambda ops, low, **kwargs: (1e9, 3e9)
steps = (1e3, 3e3) if rank == 0 else (3e3, 1e3)  # were rank 1 to time its steps, it would pick fp32
dtype_choice._compare_steps = lambda calls, tokens: steps
dist.init_process_group("gloo", rank=rank, world_size=2)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
resolved = dtype_choice.resolve("auto", torch.device("cpu"), dtype_choice.TrainingSteps(model, 2, 32))
print(rank, resolved.dtype, resolved.choice.source, resolved.choice.kind)
dist.destroy_process_group()
"""


def test_every_rank_takes_rank_0s_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != precision.OVERRIDE_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               GPT2LAB_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["0 torch.bfloat16 measured train_step", "1 torch.bfloat16 measured train_step"]


# --------------------------------------------------------------------------------------------------
# What the commands say


def test_train_prints_what_auto_chose(default_data, tmp_path, capsys):
    assert main(tiny_train_args(default_data, tmp_path / "run")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.dtype" in line]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: train.dtype auto -> "), lines
    assert (" (bf16 matmuls " in lines[0] or " (bf16 training steps " in lines[0]) and "; measured in " in lines[0]
    assert "dtype: auto" in (tmp_path / "run" / "resolved_config.yaml").read_text()  # the setting, not the choice


def test_train_says_what_timing_its_steps_chose(default_data, tmp_path, capsys, fake_rates, simulated):
    """The quickstart's case on an AMD Zen 4 CPU: bf16 matmuls 1.9x faster, its training steps not; the
    startup line keeps its form and the run trains in what it names."""
    fake_rates.rates = (100e9, 190e9)
    simulated.cost = lambda what, dtype, n: 0.40 if dtype == torch.float32 else 0.52  # 2 rounds fill the budget
    assert main(tiny_train_args(default_data, tmp_path / "run", **{"train.max_steps": 1})) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "train.dtype" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "gpt2lab: train.dtype auto -> fp32 (bf16 training steps 0.77x fp32 at 4x32 tokens of this model ("), lines
    assert "| cpu torch.float32 |" in captured.out


def test_train_warns_when_an_explicit_bf16_measures_slower(default_data, tmp_path, capsys, fake_rates):
    fake_rates.rates = (100e9, 1e9)
    assert main(tiny_train_args(default_data, tmp_path / "run", **{"train.dtype": "bf16", "train.max_steps": 1})) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.dtype" in line]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: warning: train.dtype=bf16 on this CPU is slower"), lines


def test_train_says_nothing_when_the_override_decides(default_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "fp32")
    assert main(tiny_train_args(default_data, tmp_path / "run", **{"train.max_steps": 1})) == 0
    assert "train.dtype" not in capsys.readouterr().err


def test_sample_auto_times_decoding_and_says_so(capsys, monkeypatch):
    # A busy machine (the suite running beside other work) would keep the result out of the cache.
    monkeypatch.setattr(dtype_choice, "on_a_busy_machine", lambda timing, threads: (timing(), False))
    args = ["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--max-new-tokens", "3", "--seed", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --dtype auto -> "), err
    assert " (bf16 decoding " in err[0] or err[0].startswith("note: --dtype auto -> int8 (int8 decoding "), err
    assert main(args) == 0
    assert capsys.readouterr().err.strip().endswith("; cached)")


def test_bench_auto_shows_the_choice(capsys, fake_rates):
    fake_rates.rates = (100e9, 1e9)
    args = ["bench", "--init", "random:gpt2-tiny", "--device", "cpu", "--steps", "1", "--repeats", "1", "--warmup", "0",
            "--batch-size", "1", "--seq-len", "8", "--prompt-len", "2", "--new-tokens", "2",
            "--decode-batch-sizes", "1", "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["dtype"] == "fp32" and result["dtype_choice"].startswith("fp32 (bf16 matmuls 0.01x fp32")
    assert "note: --dtype auto -> fp32" in out.err


def test_the_low_precision_copy_is_row_major_whatever_the_fp32_layout(monkeypatch):
    """A column-major fp32 model (the fp32 decode layout where oneDNN cannot pack) must not hand its
    strides to the bf16 copy: bf16 matrix-vector products are ~10x slower column-major, and the probe
    would pick fp32 wrongly. A packed model's copy is packed again in bf16."""
    import gpt2lab.packed as packed
    from gpt2lab.dtype_choice import _copy_in
    from gpt2lab.generate import optimize_for_decoding
    from gpt2lab.model import GPT, GPTConfig

    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    if packed.packable(torch.bfloat16):
        twin = _copy_in(optimize_for_decoding(GPT(config)), torch.bfloat16)
        assert {m.weight_packed.dtype for m in twin.modules() if isinstance(m, packed.PackedLinear)} == {torch.bfloat16}
    monkeypatch.setattr(packed, "_AVAILABLE", {torch.float32: False, torch.bfloat16: False})
    model = optimize_for_decoding(GPT(config))
    assert not model.transformer.h[0].mlp.c_fc.weight.is_contiguous()
    twin = _copy_in(model, torch.bfloat16)
    assert all(p.is_contiguous() and p.dtype == torch.bfloat16 for p in twin.parameters())
    assert twin.lm_head.weight is twin.transformer.wte.weight  # still tied


def test_muon_probe_times_its_iteration_and_keeps_bf16_unless_fp32_is_faster(monkeypatch):
    """Muon's orthogonalisation is bf16 by design (torch.optim.Muon): the probe keeps it on a tie and
    picks fp32 only where fp32 measures faster; a bf16 far slower at the small one-thread call (a CPU
    without bf16 units, where it ran 100x slower) ends the probe there; the choice is cached as its own kind."""
    widths = []

    def compare(width, low, **kwargs):
        widths.append((width, torch.get_num_threads()))
        return rates

    monkeypatch.setattr(precision, "_compare_newton_schulz", compare)
    rates = (100e9, 100e9)
    tie = precision.muon_precision(768)
    assert tie.dtype is torch.bfloat16 and tie.kind == "muon" and tie.detail == "512x2048"
    assert widths == [(precision.MUON_SMALL_WIDTH, 1), (precision.MUON_MAX_WIDTH, torch.get_num_threads())]
    assert precision.muon_precision(768).source == "cached" and len(widths) == 2
    assert precision.train_precision(768, 256, use_cache=False).kind == "train"  # its own key
    rates = (100e9, 1e9)
    slow = precision.muon_precision(128, use_cache=False)
    assert slow.dtype is torch.float32 and widths[-1] == (precision.MUON_SMALL_WIDTH, 1)
    assert "bf16 Newton-Schulz matmuls 0.01x fp32 at 64x256, 1 thread, stopped early" in slow.describe()
    rates = (100e9, 90e9)
    assert precision.muon_precision(32, use_cache=False).dtype is torch.float32 and widths[-1] == (32, torch.get_num_threads())
    assert resolve("auto", torch.device("cuda"), MuonIterations(64)).dtype is torch.bfloat16
    assert resolve("fp32", CPU, MuonIterations(64), check_explicit=True).choice is None


def test_muon_probe_is_quick_and_measures_both():
    t0 = time.perf_counter()
    choice = precision.muon_precision(768, use_cache=False)
    assert time.perf_counter() - t0 < 2.0
    assert choice.source == "measured" and all(math.isfinite(r) and r > 0 for r in choice.rates.values())
    assert set(choice.rates) == {"fp32", "bf16"}
