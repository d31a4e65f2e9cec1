"""The compiled one-row decode step (`gpt2lab.native_decode`): its logits and KV cache equal torch's
step at every precision and architecture it covers, generation through it equals generation without a
cache, it gives way to torch wherever it does not apply, and its build survives a missing compiler, a
failing one, a damaged cached library and two processes building at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from gpt2lab import native_decode
from gpt2lab.config import LoraConfig
from gpt2lab.generate import optimize_for_decoding, optimize_for_one_row
from gpt2lab.int8 import quantize_int8
from gpt2lab.lora import apply_lora
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.native_decode import NativeStep, library, native_step, runs
from gpt2lab.sampling import decode_one_token, generate, generate_uncached, one_token_step

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler (cc)")

ARCHITECTURES = {
    # On AVX-512: n_embd 128 takes the unrolled loops, 192 their tails too, 48 the portable loops
    "gpt2": dict(n_embd=128, n_head=4),
    "tails": dict(n_embd=192, n_head=4),
    "narrow": dict(n_embd=48, n_head=4),
    "no-bias": dict(n_embd=128, n_head=4, bias=False),
    "rope-gqa": dict(n_embd=128, n_head=4, n_kv_head=2, pos_emb="rope"),
    "window": dict(n_embd=128, n_head=4, sliding_window=[6, None]),
}

RTOL = {"fp32": 2e-5, "bf16": 2.5e-2, "int8": 2.5e-2}
"""Largest |native - torch| over the step's largest |logit|. float32: summation order only (measured
<= 1.2e-6 at gpt2's size). bfloat16 and int8 round every stored tensor to bfloat16 (8-bit mantissa,
0.4% a step); sums in another order flip a rounding now and then (measured <= 1.4e-2 at gpt2's size)."""


def build(arch: str, precision: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, **ARCHITECTURES[arch])).eval()
    with torch.no_grad():
        for p in model.parameters():  # logits spread over a few units: greedy choices mostly clear
            p.mul_(2.0)
    if precision == "int8":
        return quantize_int8(model)
    return model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])


def prefilled(model: GPT, prompt: list[int], max_len: int):
    cache = model.new_cache(1, max_len)
    logits, _ = model(torch.tensor([prompt]), cache=cache)
    return cache, logits[:, -1]


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_step_equals_torch_step(arch, precision):
    """20 steps (past the 6-slot window of "window"): logits and stored keys/values as torch's."""
    model = build(arch, precision)
    prompt = [5, 17, 42, 7]
    ours, logits = prefilled(model, prompt, 32)
    theirs, _ = prefilled(model, prompt, 32)
    step = native_step(model, ours)
    assert isinstance(step, NativeStep)
    token = logits.argmax(-1)[:, None]
    for i in range(20):
        pos = torch.tensor([[len(prompt) + i]])
        got = step(model, ours, token, pos)
        want = decode_one_token(model, theirs, token, pos).float()
        assert got.shape == want.shape == (1, 300) and got.dtype == torch.float32
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= RTOL[precision], (i, err)
        token = want.argmax(-1)[:, None]  # both follow torch's choice
    assert ours.next_col == theirs.next_col == len(prompt) + 20
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.slot_pos, b.slot_pos)
        tol = 1e-5 if precision == "fp32" else 3e-2
        assert torch.allclose(a.k.float(), b.k.float(), rtol=tol, atol=tol)
        assert torch.allclose(a.v.float(), b.v.float(), rtol=tol, atol=tol)


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_error_is_rounding_not_a_mistake(precision):
    """At bfloat16 / int8 the step differs from torch's own low-precision step far less than that step
    differs from float32."""
    reference = build("gpt2", "fp32")
    model = build("gpt2", precision)
    prompt = list(range(1, 9))
    exact, _ = prefilled(reference, prompt, 16)
    ours, logits = prefilled(model, prompt, 16)
    theirs, _ = prefilled(model, prompt, 16)
    step = native_step(model, ours)
    token, pos = torch.tensor([[3]]), torch.tensor([[len(prompt)]])
    want = decode_one_token(reference, exact, token, pos)
    ours_err = float((step(model, ours, token, pos) - want).abs().max())
    torch_err = float((decode_one_token(model, theirs, token, pos).float() - want).abs().max())
    assert ours_err < 1.5 * torch_err and torch_err > 0, (ours_err, torch_err)


@pytest.mark.parametrize("arch", ["gpt2", "rope-gqa", "window"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_generation_through_it_equals_generation_without_a_cache(arch, precision, monkeypatch):
    """sampling.stream takes the C step for one row: greedy text equal to recomputing every step
    without a cache; 70 tokens overrun a learned-position model's 64 (the context slides and the cache
    is refilled) and the window's 6 slots."""
    calls = []
    original = NativeStep.__call__
    monkeypatch.setattr(NativeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    model = build(arch, precision)
    prompt = [[5, 17, 42, 7, 99]]
    got = generate(model, prompt, max_new_tokens=70, temperature=0, stop_ids=[])
    assert len(calls) >= 60
    assert got == generate_uncached(model, prompt, max_new_tokens=70, temperature=0)


def test_sampled_text_follows_the_seed_as_torch_does():
    """Sampling (temperature, top-k, top-p) draws from the same distribution as the torch step: with
    one seed, the same ids (float32, where the logits agree to 1e-6)."""
    model = build("gpt2", "fp32")
    packed = optimize_for_decoding(build("gpt2", "fp32"))  # packed layers: torch's step
    kwargs = dict(max_new_tokens=30, temperature=0.8, top_k=50, top_p=0.95, seed=3, stop_ids=[])
    assert runs(model) and not runs(packed)
    assert generate(model, [[1, 2, 3]], **kwargs) == generate(packed, [[1, 2, 3]], **kwargs)


@torch.inference_mode()
def test_logits_do_not_depend_on_the_thread_count():
    model = build("gpt2", "bf16")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cache, logits = prefilled(model, [1, 2, 3], 8)
            results.append(native_step(model, cache)(model, cache, torch.tensor([[4]]), torch.tensor([[3]])))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_nan_weights_give_nan_logits_as_torch_does(precision):
    model = build("gpt2", precision)
    with torch.no_grad():
        model.transformer.h[1].ln_2.weight[3] = float("nan")
    cache, _ = prefilled(model, [1, 2], 4)
    twin, _ = prefilled(model, [1, 2], 4)
    token, pos = torch.tensor([[5]]), torch.tensor([[2]])
    assert torch.isnan(decode_one_token(model, twin, token, pos)).all()
    assert torch.isnan(native_step(model, cache)(model, cache, token, pos)).all()


def test_it_gives_way_to_torch_where_it_does_not_apply():
    model = build("gpt2", "fp32")
    assert native_step(model, model.new_cache(2, 8)) is None  # two rows: a batch
    assert native_step(model, model.new_cache(1, 8, dtype=torch.bfloat16)) is None  # cache of another dtype
    assert one_token_step(model, model.new_cache(2, 8)) is decode_one_token
    model.train()
    assert native_step(model, model.new_cache(1, 8)) is None
    packed = optimize_for_decoding(build("gpt2", "fp32"))
    assert native_step(packed, packed.new_cache(1, 8)) is None
    adapted = build("gpt2", "fp32")
    apply_lora(adapted, LoraConfig(r=2, targets=["c_attn"]))
    assert native_step(adapted.eval(), adapted.new_cache(1, 8)) is None
    fp16 = build("gpt2", "fp32").half()
    assert native_step(fp16, fp16.new_cache(1, 8)) is None
    # where it runs, the one-row layout leaves the weights for it; a batch layout packs them
    one_row = optimize_for_one_row(build("gpt2", "bf16"))
    assert runs(one_row) and type(one_row.lm_head) is torch.nn.Linear


@torch.inference_mode()
def test_the_step_refuses_calls_it_was_not_built_for():
    model = build("gpt2", "fp32")
    cache, _ = prefilled(model, [1, 2, 3], 4)
    step = native_step(model, cache)
    other = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="bound to another"):
        step(model, other, torch.tensor([[1]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        step(model, cache, torch.tensor([[300]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="outside the model's vocabulary or positions"):
        step(model, cache, torch.tensor([[1]]), torch.tensor([[64]]))
    step(model, cache, torch.tensor([[1]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="room left"):  # the cache's 4 columns are full
        step(model, cache, torch.tensor([[1]]), torch.tensor([[4]]))


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """library() built anew into an empty cache folder; the process's library restored afterwards."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    library.cache_clear()
    yield tmp_path
    library.cache_clear()


@pytest.mark.parametrize("setting", ["no compiler", "failing compiler", "switched off"])
def test_without_a_build_decoding_goes_through_torch(setting, fresh_build, monkeypatch):
    if setting == "no compiler":
        monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    elif setting == "failing compiler":
        monkeypatch.setenv("CC", shutil.which("false"))
    else:
        monkeypatch.setenv(native_decode.ENV_SWITCH, "0")
    model = build("gpt2", "fp32")
    assert library() is None and native_decode.build_error()
    assert not runs(model) and native_step(model, model.new_cache(1, 8)) is None
    assert type(optimize_for_one_row(model).lm_head) is not torch.nn.Linear  # packed for torch's step instead
    prompt = [[5, 17, 42]]
    assert generate(model, prompt, max_new_tokens=8, temperature=0) == generate_uncached(model, prompt, max_new_tokens=8,
                                                                                         temperature=0)
    assert not list(fresh_build.rglob("*.so"))  # nothing half-built left behind


def test_a_damaged_cached_library_is_rebuilt(fresh_build):
    env = {**os.environ, "GPT2LAB_CACHE": str(fresh_build)}  # built by another process, then damaged
    subprocess.run([sys.executable, "-m", "gpt2lab.native_decode"], env=env, check=True, capture_output=True)
    (built,) = fresh_build.rglob("*.so")
    built.write_bytes(b"not a shared library")
    assert library() is not None and built.read_bytes()[:4] == b"\x7fELF"
    model = build("gpt2", "fp32")
    assert native_step(model, model.new_cache(1, 8)) is not None


def test_two_processes_building_at_once_both_get_it(tmp_path):
    env = {**os.environ, "GPT2LAB_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "gpt2lab.native_decode"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (built,) = [p for p in tmp_path.rglob("*") if p.is_file()]  # one library, no temporary files left
    assert outs[0][0].strip() == outs[1][0].strip() == str(built)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_sample_decodes_through_it_and_equals_the_api(dtype, monkeypatch, capsys):
    """`gpt2lab sample` lays the model out for one row and decodes through the C step (counted): its text
    equals `gpt2lab.load` + `generate` with the step switched off (torch's step)."""
    import gpt2lab
    from gpt2lab.cli import main

    calls = []
    original = NativeStep.__call__
    monkeypatch.setattr(NativeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    args = ["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--dtype", dtype, "--prompt", "Hello",
            "--max-new-tokens", "12", "--temperature", "0", "--ignore-eot"]
    assert main(args) == 0
    ours = capsys.readouterr()
    assert len(calls) == 11 and "note:" not in ours.err
    loaded = gpt2lab.load("random:gpt2-tiny", device="cpu", dtype=dtype)
    ids = loaded.tokenizer.encode("Hello")
    monkeypatch.setattr("gpt2lab.sampling.one_token_step", lambda model, cache: decode_one_token)
    want = generate(loaded.model, [ids], max_new_tokens=12, temperature=0.0, stop_ids=[])[0]
    assert len(calls) == 11  # the reference went through torch
    assert ours.out == "Hello" + loaded.tokenizer.decode(want) + "\n"


def test_sample_says_when_it_cannot_build_the_step(fresh_build, monkeypatch, capsys):
    from gpt2lab.cli import main

    monkeypatch.setenv("CC", shutil.which("false"))
    assert main(["sample", "--init", "random:gpt2-tiny", "--device", "cpu", "--dtype", "fp32", "--prompt", "Hi",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "note: decoding through torch's step: the compiled one-row step could not be built" in err
    assert "false could not build native_decode.c" in err


@torch.inference_mode()
def test_under_cpu_autocast_torch_steps():
    """Autocast changes what torch's step computes; the C step would not follow, so it stands aside."""
    model = build("gpt2", "fp32")
    cache = model.new_cache(1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native_step(model, cache) is None
    assert native_step(model, cache) is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_one_row_layout_moves_weights_without_changing_them(precision):
    """`optimize_for_one_row` moves the streamed matrices into one page-aligned memory map: the same
    values, the head still tied to the embedding, the same greedy text, and a copy still possible."""
    import copy

    before = build("tails", precision)
    after = optimize_for_one_row(build("tails", precision))
    want, got = before.state_dict(), after.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    streamed = after.lm_head.weight_int8 if precision == "int8" else after.lm_head.weight
    assert streamed.data_ptr() % 4096 == 0 and after.transformer.h[1].mlp.c_fc.state_dict()[
        "weight_int8" if precision == "int8" else "weight"].data_ptr() % 4096 == 0
    if precision != "int8":
        assert after.lm_head.weight is after.transformer.wte.weight
    prompt = [[5, 17, 42]]
    assert generate(after, prompt, max_new_tokens=12, temperature=0) == generate(before, prompt, max_new_tokens=12,
                                                                                   temperature=0)
    twin = copy.deepcopy(after)
    assert generate(twin, prompt, max_new_tokens=12, temperature=0) == generate(after, prompt, max_new_tokens=12,
                                                                                 temperature=0)


def test_threads_decoding_at_once_get_what_each_gets_alone():
    """The step releases the GIL (ctypes) and each stream has its own cache and scratch: four Python
    threads generating at once from one model get the tokens each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    model = build("rope-gqa", "bf16")
    prompts = [[5, 17, 42], [7, 7], [250, 1, 2, 3], [99]]
    alone = [generate(model, [p], max_new_tokens=24, temperature=0, stop_ids=[]) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: generate(model, [p], max_new_tokens=24, temperature=0, stop_ids=[]),
                                 prompts))
    assert together == alone
