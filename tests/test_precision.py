"""`dtype: auto` on CPU is decided by measurement (gpt2lab.precision): the rule, the probes' bounds and
side effects, the cache, the GPT2LAB_CPU_DTYPE override, and what train / sample / bench say.

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

import pytest
import torch

from gpt2lab import precision
from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.generate import optimize_for_decoding
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.precision import Choice, compute_dtype, decide, decode_precision, train_precision

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
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny")).train()  # training mode: the probe must not use dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    start = time.perf_counter()
    choice = decode_precision(model, layout=optimize_for_decoding)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5, (elapsed, choice.describe())
    assert torch.equal(torch.get_rng_state(), rng)
    assert choice.source == "measured" and choice.kind == "decode" and choice.rates["fp32"] > 0 < choice.rates["bf16"]
    assert choice.dtype is decide(choice.rates["fp32"], choice.rates["bf16"])
    assert model.training and model.transformer.wte.weight.dtype == torch.float32
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # same values (layout aside)
    with pytest.raises(ValueError, match="fp32 weights"):
        decode_precision(GPT(GPTConfig.from_preset("gpt2-tiny")).to(torch.bfloat16))


def test_a_bf16_copy_keeps_ties_and_rope_tables():
    model = GPT(GPTConfig.from_preset("gpt2-tiny", pos_emb="rope"))
    twin = precision._copy_in(model, torch.bfloat16)
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


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1, "entries": {"k": "junk"}}', "\x00\xff"])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake_rates, content):
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    assert train_precision(768, 1024).source == "measured"
    data = json.loads(path.read_text())
    assert data["version"] == 1 and len([k for k in data["entries"] if k.startswith("train")]) == 1
    assert train_precision(768, 1024).source == "cached"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the atomic write left no temp file


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(fake_rates, monkeypatch):
    quiet = precision._on_a_busy_machine
    monkeypatch.setattr(precision, "_on_a_busy_machine", lambda timing, threads: (timing(), True))
    choice = train_precision(768, 1024)
    assert choice.busy and choice.dtype is torch.bfloat16 and not precision.cache_path().exists()
    assert choice.describe().endswith(" on a busy machine, not cached)")
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    assert decode_precision(model).busy and decode_precision(model).source == "measured"
    monkeypatch.setattr(precision, "_on_a_busy_machine", lambda timing, threads: (timing(), False))
    assert decode_precision(model).source == "measured"
    assert decode_precision(model).source == "cached"
    monkeypatch.setattr(precision, "_on_a_busy_machine", quiet)
    _, busy = precision._on_a_busy_machine(lambda: time.sleep(0.05), 1)  # asleep: no CPU time used
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
    assert compute_dtype("auto", CPU, n_embd=768, rows=1024) == (torch.bfloat16, choice)
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    assert decode_precision(model).source == "GPT2LAB_CPU_DTYPE"
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "float32")
    assert compute_dtype("auto", CPU, n_embd=768, rows=1024)[0] is torch.float32
    assert not precision.cache_path().exists()


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
    assert compute_dtype("auto", CPU, n_embd=64, rows=64, forward_only=True)[0] is torch.bfloat16
    assert compute_dtype("auto", CPU, n_embd=64, rows=64)[0] is torch.float32


def test_compute_dtype_measures_only_auto_on_cpu(fake_rates, monkeypatch):
    assert compute_dtype("fp32", CPU, n_embd=64, rows=64, check_explicit=True) == (torch.float32, None)
    assert compute_dtype("bf16", CPU, n_embd=64, rows=64) == (torch.bfloat16, None)
    assert fake_rates.calls == 0
    fake_rates.rates = (100e9, 1e9)
    dtype, choice = compute_dtype("bf16", CPU, n_embd=64, rows=64, check_explicit=True)
    assert dtype is torch.bfloat16 and choice.speedup == pytest.approx(0.01) and choice.note("train.dtype", "bf16").startswith("warning")
    dtype, choice = compute_dtype("auto", CPU, n_embd=64, rows=64)
    assert dtype is torch.float32 and choice.source == "cached"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto", torch.device("cuda"), n_embd=64, rows=64) == (torch.bfloat16, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = """
import os, torch, torch.distributed as dist
from gpt2lab import precision
rank = int(os.environ["RANK"])
rates = (1e9, 3e9) if rank == 0 else (3e9, 1e9)  # were rank 1 to measure, it would pick fp32
precision._compare_matmuls = lambda ops, low, **kwargs: rates
dist.init_process_group("gloo", rank=rank, world_size=2)
dtype, choice = precision.compute_dtype("auto", torch.device("cpu"), n_embd=32, rows=64)
print(rank, dtype, choice.source)
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
    assert [o.strip() for o, _ in outs] == ["0 torch.bfloat16 measured", "1 torch.bfloat16 measured"]


# --------------------------------------------------------------------------------------------------
# What the commands say


def test_train_prints_what_auto_chose(default_data, tmp_path, capsys):
    assert main(tiny_train_args(default_data, tmp_path / "run")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.dtype" in line]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: train.dtype auto -> "), lines
    assert " (bf16 matmuls " in lines[0] and "; measured in " in lines[0]
    assert "dtype: auto" in (tmp_path / "run" / "resolved_config.yaml").read_text()  # the setting, not the choice


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
    monkeypatch.setattr(precision, "_on_a_busy_machine", lambda timing, threads: (timing(), False))
    args = ["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--max-new-tokens", "3", "--seed", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --dtype auto -> ") and " (bf16 decoding " in err[0], err
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


def test_the_low_precision_copy_is_row_major_whatever_the_fp32_layout():
    """A column-major fp32 model (the fp32 decode layout) must not hand its strides to the bf16 copy:
    bf16 matrix-vector products are ~10x slower column-major, and the probe would pick fp32 wrongly."""
    from gpt2lab.generate import optimize_for_decoding
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.precision import _copy_in

    model = optimize_for_decoding(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)))
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
    assert precision.muon_dtype("auto", torch.device("cuda"), n_embd=64) == (torch.bfloat16, None)
    assert precision.muon_dtype("fp32", CPU, n_embd=64) == (torch.float32, None)


def test_muon_probe_is_quick_and_measures_both():
    t0 = time.perf_counter()
    choice = precision.muon_precision(768, use_cache=False)
    assert time.perf_counter() - t0 < 2.0
    assert choice.source == "measured" and all(math.isfinite(r) and r > 0 for r in choice.rates.values())
    assert set(choice.rates) == {"fp32", "bf16"}
