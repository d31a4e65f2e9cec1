"""int8 weight-only decoding on a CPU (`--dtype int8`, `gpt2lab.load(..., dtype="int8")`): logits
within int8 rounding of fp32, the same greedy text where fp32's choices are clear, a KV-cached
decode equal to recomputing without a cache, and the command line and the Python API on it."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab import native_decode
from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.int8 import Int8Linear, check_int8, is_int8, quantize_int8
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.sampling import generate

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="torch has no int8 weight-pack")]

INT8_RTOL = 0.04
"""int8 weights (per output row, |error| <= max|W[r]| / 254) and bfloat16 activations into the kernel
(8-bit mantissa): logits within 4% of each position's largest |logit| (measured 2.5% on `tiny`, whose
2x weights amplify errors; 1.3% at GPT-2's initialisation)."""


def tiny(seed: int = 0, bias: bool = True) -> GPT:
    """A random tiny GPT with weights scaled up 2x: logits spread over a few units, so greedy
    choices are mostly clear (a fresh init's logits are nearly uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def int8_copy(model: GPT) -> GPT:
    twin = GPT(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return quantize_int8(twin)


def test_every_linear_becomes_int8_and_the_embedding_stays():
    model = int8_copy(tiny())
    assert is_int8(model) and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.transformer.wte.weight.dtype == torch.float32
    assert model.transformer.h[0].mlp.c_fc.weight_int8.dtype == torch.int8


@torch.no_grad()
@pytest.mark.parametrize("bias", [True, False])
def test_int8_logits_close_to_fp32(bias):
    model = tiny(bias=bias)
    q = int8_copy(model)
    idx = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    want, got = model(idx)[0], q(idx)[0]
    scale = want.abs().amax(-1, keepdim=True)
    worst = float(((got - want).abs() / scale).max())
    assert worst <= INT8_RTOL, worst
    assert float(want.std()) > 0.5  # not near-uniform logits, where any small error looks large
    # and the quantization is the stated one: each weight within half a step of its row's scale
    w = model.transformer.h[1].attn.c_proj.weight
    layer = q.transformer.h[1].attn.c_proj
    step = w.abs().amax(1, keepdim=True) / 127
    assert torch.all((layer.weight_int8.float() * layer.scale.float()[:, None] - w).abs() <= step * 0.51 + step / 128)


@torch.no_grad()
def test_greedy_text_equals_fp32_where_fp32_choices_are_clear():
    """Along fp32's greedy path, int8 picks the same tokens up to the first step where fp32's top-1
    margin is within twice int8's largest logit error there (a near tie, where either token is right)."""
    model = tiny(seed=2)
    q = int8_copy(model)
    compared = 0
    for prompt in ([1, 2, 3], [100, 7, 300, 42, 9], [511, 0, 256, 17], [64, 65, 66]):
        ours = generate(model, [prompt], max_new_tokens=16, temperature=0.0)[0]
        seq = torch.tensor([prompt + ours])
        logits, qlogits = model(seq)[0][0, len(prompt) - 1:-1], q(seq)[0][0, len(prompt) - 1:-1]  # (16, V)
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (qlogits - logits).abs().amax(-1)
        n = int(clear.long().cumprod(0).sum())  # steps before the first near tie
        assert generate(q, [prompt], max_new_tokens=n, temperature=0.0)[0] == ours[:n] if n else True
        compared += n
    assert compared >= 24


@torch.no_grad()
def test_int8_cached_decoding_equals_uncached():
    q = int8_copy(tiny(seed=3))
    prompt = [5, 6, 7, 8]
    cached = generate(q, [prompt], max_new_tokens=20, temperature=0.0)[0]
    seq = list(prompt)
    for _ in range(20):  # no cache: the whole sequence again for every token
        seq.append(int(q(torch.tensor([seq]))[0][0, -1].argmax()))
    assert cached == seq[len(prompt):]
    # and one cached step's logits equal the full forward's last position
    cache = q.new_cache(1, 32)
    q(torch.tensor([seq[:10]]), cache=cache)
    step = q(torch.tensor([[seq[10]]]), cache=cache)[0][0, -1]
    full = q(torch.tensor([seq[:11]]))[0][0, -1]
    torch.testing.assert_close(step, full, atol=1e-4 * float(full.abs().max()), rtol=0)


def test_load_and_sample_with_int8(tmp_path, capsys):
    loaded = gpt2lab.load("random:gpt2-tiny", device="cpu", dtype="int8")
    assert is_int8(loaded.model)
    prompt = "Hello"
    ids = loaded.tokenizer.encode(prompt)
    want = loaded.tokenizer.decode(generate(loaded.model, [ids], max_new_tokens=8, temperature=0.0)[0])
    assert main(["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--dtype", "int8", "--prompt", prompt,
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"


def test_int8_is_cpu_only():
    with pytest.raises(UserError, match="int8 decoding runs on the CPU only"):
        check_int8("cuda")
    check_int8("cpu")


def test_eval_measures_int8_against_fp32(shared_data, tmp_path, monkeypatch, capsys):
    """`gpt2lab eval wikitext --dtype int8` scores the int8 model (its cost in quality, next to fp32's)."""
    import json

    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.tokenizer import GPT2Tokenizer

    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(shared_data))
    tok = GPT2Tokenizer()
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "ckpt", model, model.config, tok.to_dict())
    results = {}
    for dtype in ("fp32", "int8"):
        assert main(["eval", "wikitext", "--init", str(tmp_path / "ckpt"), "--limit", "1", "--device", "cpu",
                     "--dtype", dtype, "--json", "-"]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert results["int8"]["dtype"] == "int8"
    ratio = results["int8"]["word_perplexity"] / results["fp32"]["word_perplexity"]
    assert ratio != 1.0 and abs(ratio - 1) < 0.01  # a different model, within 1%


def test_chat_with_int8(monkeypatch, capsys):
    """`chat --dtype int8` answers with an int8 model (and `--dtype fp32` without one)."""
    import io
    import sys

    import gpt2lab.int8

    quantized = []
    real = gpt2lab.int8.quantize_int8
    monkeypatch.setattr(gpt2lab.int8, "quantize_int8", lambda model: quantized.append(real(model)) or quantized[-1])
    for dtype in ("int8", "fp32"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi.\n"))
        assert main(["chat", "--init", "random:gpt2-tiny", "--dtype", dtype, "--device", "cpu", "--max-new-tokens",
                     "6", "--temperature", "0", "--history", "0"]) == 0
        assert capsys.readouterr().out.strip()
        assert len(quantized) == 1 and is_int8(quantized[0])


@pytest.mark.parametrize("bf16_rate, int8_rate, picked", [
    (50.0, 200.0, "int8"),    # int8 2x fp32, bf16 slower: int8
    (50.0, 110.0, "fp32"),    # int8 only 1.1x fp32: not worth its precision
    (200.0, 220.0, "bf16"),   # int8 faster than fp32 but not 1.3x the bf16 auto takes
    (200.0, 300.0, "int8"),   # 1.5x bf16: int8
])
def test_auto_picks_int8_only_where_it_measures_faster(bf16_rate, int8_rate, picked, monkeypatch, tmp_path, capsys):
    """`--dtype auto` on a CPU times int8 decoding too (rates faked here: fp32 = 100 tokens/s) and takes
    it only when 1.3x faster than fp32 and than bf16 where bf16 was taken, saying so."""
    import argparse

    from gpt2lab import dtype_choice
    from gpt2lab.commands.sample import load_for_decoding
    from gpt2lab.loading import load_model

    monkeypatch.delenv("GPT2LAB_CPU_DTYPE", raising=False)
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(dtype_choice, "_compare_decoding",
                        lambda model, twin: (100.0, int8_rate if is_int8(twin) else bf16_rate))
    args = argparse.Namespace(device="cpu", dtype="auto")
    model, _ = load_for_decoding(args, lambda device, dtype: load_model("random:gpt2-tiny", device, dtype))
    got = "int8" if is_int8(model) else {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.transformer.wte.weight.dtype]
    assert got == picked
    if native_decode.library() is not None:  # the int8 probe lays the model out as sample does, never packs it
        assert native_decode.runs(model)
    err = capsys.readouterr().err
    assert f"--dtype auto -> {picked} (" in err
