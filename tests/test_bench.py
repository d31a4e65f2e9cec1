"""Benchmarks: `gpt2lab bench` reports every figure on the CPU, the helpers measure what they say,
and MFU uses the right peak for the device."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab import bench
from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig

TINY = ["--init", "random:gpt2-tiny", "--device", "cpu", "--steps", "1", "--repeats", "2", "--warmup", "1",
        "--batch-size", "2", "--seq-len", "16", "--prompt-len", "4", "--new-tokens", "4"]
PHASES = ("train", "prefill", "decode_b1", "decode_b8")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_json_has_every_figure(capsys):
    assert main(["bench", *TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "random:gpt2-tiny" and result["dtype"] == "fp32" and result["seq_len"] == 16
    assert result["peak_flops"] > 0 and "measured fp32 matmul peak" in result["peak_flops_source"]
    assert result["params"] == GPT(GPTConfig.from_preset("gpt2-tiny")).num_params()
    for phase in PHASES:
        figures = result["gpt2lab"][phase]
        assert len(figures["tokens_per_s_all"]) == 2
        assert figures["tokens_per_s_min"] <= figures["tokens_per_s"] <= figures["tokens_per_s_max"]
        assert figures["tokens_per_s"] > 0 and figures["peak_memory_bytes"] > 0
    for phase in ("train", "prefill"):
        assert result["gpt2lab"][phase]["mfu"] > 0  # (not < 1: a busy shared CPU can under-measure its peak)
    train = result["gpt2lab"]["train"]
    expected_mfu = result["flops_per_token_train"] * train["tokens_per_s"] / result["peak_flops"]
    assert train["mfu"] == pytest.approx(expected_mfu)


def test_bench_table_and_hf_comparison(capsys):
    assert main(["bench", *TINY, "--decode-batch-sizes", "2", "--compare", "hf"]) == 0
    out = capsys.readouterr().out
    for text in ("train (B=2 T=16)", "prefill (B=2 T=16)", "decode_b2", "gpt2lab tok/s", "gpt2lab MFU",
                 "hf tok/s", "gpt2lab / hf", "peak RSS", "GFLOP/s"):
        assert text in out, text


def test_hf_twin_has_our_weights_and_refuses_what_hf_cannot_express():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=300)).eval()
    twin = bench.hf_twin(model)
    idx = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], twin(input_ids=idx).logits, atol=1e-5)
    with pytest.raises(UserError, match="--compare hf: .*pos_emb='rope'"):
        bench.hf_twin(GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=300, pos_emb="rope")))


def test_measure_helpers_on_a_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=300))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = bench.measure_train_step(model, batch_size=2, seq_len=8, steps=1, repeats=3, warmup=0)
    assert len(train.values) == 3 and train.min <= train.median <= train.max
    # lr=0: the optimizer does its work but the weights stay as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    decode = bench.measure_decode(model, batch_size=2, prompt_len=4, new_tokens=3, repeats=2, warmup=0)
    prefill = bench.measure_prefill(model, batch_size=2, seq_len=8, steps=1, repeats=2, warmup=0)
    assert decode.median > 0 and prefill.median > 0


def test_measure_interleaves_runs():
    calls = []
    runs = {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}
    result = bench.measure_interleaved(runs, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert result["a"].values == [1.0, 1.0] and result["b"].median == 2.0


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
    ("NVIDIA H200", torch.bfloat16, 989.5e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
])
def test_gpu_peak_table(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = bench.peak_flops(torch.device("cuda"), dtype)
    assert flops == expected and name in source


def test_tf32_counts_as_tf32_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert bench.peak_flops(torch.device("cuda"), torch.float32)[0] == 494.7e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_cpu_matmul_peak_is_measured():
    flops = bench.cpu_matmul_peak()
    assert flops > 1e8  # any CPU does a 1024^3 matmul faster than 0.1 GFLOP/s
    assert bench.peak_flops("cpu", torch.float32) == (flops, bench.peak_flops("cpu")[1])


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--init", "random:gpt2-tiny", "--device", "cpu", "--seq-len", "65"]) == 2
    assert "block_size=64" in capsys.readouterr().err
    assert main(["bench", "--init", "random:gpt2-tiny", "--device", "cpu", "--decode-batch-sizes", "1,x"]) == 2


def test_adapter_keeps_a_compiled_training_module():
    # regression: `compiled or model` raised, an OptimizedModule has no truth value
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=300))
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert bench.GPTAdapter(model, compiled).train_model is compiled
    assert bench.GPTAdapter(model).train_model is model


def test_the_peak_is_measured_in_the_layout_linear_layers_multiply_in(monkeypatch):
    """x @ W.T, as nn.Linear: on an AVX2 CPU bf16 a @ b ran 18x slower than a @ b.T, which made the
    bf16 "peak" lower than what the model reached (a log line showed MFU 508%)."""
    from gpt2lab import bench

    layouts = []
    monkeypatch.setattr(torch, "mm", lambda a, b: layouts.append("a @ b") or a @ b)
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b, *rest: layouts.append("a @ b.T") or linear(a, b, *rest))
    bench.matmul_peak("cpu", torch.float32, n=32, seconds=0.01)
    assert layouts and set(layouts) == {"a @ b.T"}


def test_the_peak_measurement_leaves_the_global_rng_alone():
    """It runs inside training (for MFU): drawing from the global RNG there made the first run of a
    process differ from every later one (other dropout masks)."""
    from gpt2lab.bench import matmul_peak

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    matmul_peak("cpu", torch.float32, n=64, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)
