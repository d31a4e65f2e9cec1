"""Generation: the KV-cache path against the full-recompute reference for every attention variant,
batching by left padding, sampling controls, stopping and streaming. Tiny models, CPU."""

import itertools

import pytest
import torch

from gpt2lab.errors import UserError
from gpt2lab.generate import optimize_for_decoding, stream_text
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.sampling import filter_logits, generate, generate_uncached, stream
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

V = 64
CHARS = "".join(chr(c) for c in range(ord("0"), ord("0") + V))  # 64 distinct sorted characters


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> GPT:
    """A tiny model with weights large enough that next-token logits are far apart (no argmax near-ties),
    in float64 so the cached and uncached paths cannot disagree by rounding."""
    config = GPTConfig(**{**dict(block_size=64, vocab_size=V, n_layer=2, n_head=4, n_embd=32), **overrides})
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


VARIANTS = {
    f"{pos}-{attn}-{'win' if window else 'full'}": dict(pos_emb=pos, n_kv_head=kv, sliding_window=window)
    for pos, (attn, kv), window in itertools.product(["learned", "rope"], [("mha", 4), ("gqa", 2), ("mqa", 1)],
                                                    [None, 4])
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_greedy_equals_uncached(name):
    model = tiny_model(**VARIANTS[name])
    # Prompts longer than the window (the ring's multi-token path) and of different lengths (left padding);
    # 12 new tokens take every sequence past the window.
    prompts = prompts_of([7, 3])
    cached = generate(model, prompts, max_new_tokens=12, temperature=0)
    reference = generate_uncached(model, prompts, max_new_tokens=12, temperature=0)
    assert cached == reference
    assert all(len(row) == 12 for row in cached)


@pytest.mark.parametrize("name", ["learned-gqa-win", "rope-mqa-full"])
@torch.no_grad()
def test_cached_logits_equal_full_forward(name):
    """Prefill + one-token steps through the cache reproduce the full forward's logits (float32)."""
    model = tiny_model(dtype=torch.float32, **VARIANTS[name])
    idx = torch.tensor(prompts_of([24])[0])[None]
    full, _ = model(idx)
    cache = model.new_cache(1, 24)
    parts = [model(idx[:, :7], cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], pos=torch.tensor([[t]]), cache=cache)[0] for t in range(7, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_optimize_for_decoding_changes_layout_not_results():
    from gpt2lab.packed import PackedLinear, packable

    model = tiny_model(dtype=torch.float32)
    idx = torch.tensor(prompts_of([10]))
    before = model(idx)[0]
    greedy = generate(model, idx.tolist(), max_new_tokens=8, temperature=0)
    optimize_for_decoding(model)
    assert packable(torch.float32)  # torch's CPU wheels have oneDNN
    assert isinstance(model.transformer.h[0].attn.c_attn, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.transformer.wte.weight, torch.nn.Parameter)  # the embedding keeps its rows
    torch.testing.assert_close(model(idx)[0], before, atol=1e-5, rtol=1e-5)
    assert generate(model, idx.tolist(), max_new_tokens=8, temperature=0) == greedy
    torch.testing.assert_close(model.lm_head.dense_weight(), model.transformer.wte.weight)


@torch.no_grad()
def test_optimize_for_decoding_without_onednn_keeps_the_mkl_layout(monkeypatch):
    """Where oneDNN cannot pack (a torch built without it), float32 weights go column-major as before."""
    import gpt2lab.packed as packed

    monkeypatch.setattr(packed, "_AVAILABLE", {torch.float32: False, torch.bfloat16: False})
    model = tiny_model(dtype=torch.float32)
    idx = torch.tensor(prompts_of([10]))
    before = model(idx)[0]
    optimize_for_decoding(model)
    w = model.transformer.h[0].attn.c_attn.weight
    assert w.shape == (96, 32) and w.stride() == (1, 96)  # column-major on CPU in float32
    assert model.transformer.h[0].mlp.c_proj.weight.is_contiguous()  # more inputs than outputs: row-major
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model(idx)[0], before, atol=1e-5, rtol=1e-5)
    optimize_for_decoding(model.to(torch.bfloat16))
    assert model.transformer.h[0].attn.c_attn.weight.is_contiguous()  # bf16 prefers row-major


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_do_not_depend_on_their_batch(dtype):
    """A row's logits are the same bits alone or among 15 others (what lets a served request's
    greedy text equal its solo run whatever shares the batch); F.linear through MKL does not promise that."""
    from gpt2lab.packed import packable

    if not packable(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    model = optimize_for_decoding(tiny_model(dtype=torch.float32).to(dtype))
    idx = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    together = model(idx)[0]
    for r in (0, 7, 15):
        assert torch.equal(model(idx[r:r + 1])[0], together[r:r + 1])


@torch.no_grad()
def test_a_packed_model_moves_dtype_copies_and_refuses_what_it_cannot_do():
    import copy

    from gpt2lab.errors import UserError
    from gpt2lab.packed import PackedLinear, is_packed, packable

    model = optimize_for_decoding(tiny_model(dtype=torch.float32))
    idx = torch.tensor(prompts_of([10]))
    before = model(idx)[0]
    twin = copy.deepcopy(model)
    assert is_packed(twin) and twin.lm_head is not model.lm_head
    assert torch.equal(twin(idx)[0], before)
    if packable(torch.bfloat16):
        twin.to(torch.bfloat16)  # repacks every layer in the new dtype
        assert twin.lm_head.weight_packed.dtype == torch.bfloat16
        torch.testing.assert_close(twin(idx)[0].float(), before, atol=0.1, rtol=0.1)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, PackedLinear) and "dtype=torch.float32" in repr(layer)
    with pytest.raises(UserError, match="float32 or bfloat16"):
        layer.to(torch.float16)


def test_batched_prompts_equal_each_alone():
    model = tiny_model(n_kv_head=2, sliding_window=5)
    prompts = prompts_of([1, 9, 4])
    batched = generate(model, prompts, max_new_tokens=10, temperature=0)
    alone = [generate(model, [p], max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_rope_generates_past_block_size():
    model = tiny_model(pos_emb="rope", sliding_window=4, block_size=16)
    prompts = prompts_of([10])
    assert generate(model, prompts, max_new_tokens=20, temperature=0) == \
        generate_uncached(model, prompts, max_new_tokens=20, temperature=0)


def test_sliding_window_cache_is_bounded_by_the_window():
    model = tiny_model(pos_emb="rope", n_kv_head=2, sliding_window=8, dtype=torch.float32)
    long = model.new_cache(batch_size=3, max_len=1000)
    # 2 layers x (k and v) x B x n_kv_head x window x head_size x 4 bytes
    assert long.nbytes() == 2 * 2 * 3 * 2 * 8 * 8 * 4
    full = tiny_model(pos_emb="rope", n_kv_head=2, dtype=torch.float32).new_cache(batch_size=3, max_len=1000)
    assert full.nbytes() == 2 * 2 * 3 * 2 * 1000 * 8 * 4


def test_learned_positions_slide_past_block_size():
    # A learned-position model sees at most block_size tokens: the context slides (keeping half a
    # block) and the cached path equals the recomputing reference token for token.
    model = tiny_model(block_size=16)
    for prompt_len in (10, 16, 30):  # a prompt longer than the block keeps its last 16 tokens
        prompts = prompts_of([prompt_len])
        cached = generate(model, prompts, max_new_tokens=40, temperature=0)
        assert len(cached[0]) == 40
        assert cached == generate_uncached(model, prompts, max_new_tokens=40, temperature=0)
        assert cached == generate(model, prompts, max_new_tokens=40, temperature=0, static_cache=True)
    # What follows a slide is exactly a fresh generation from the last half block of the text.
    prompt = prompts_of([10])[0]
    text = prompt + generate(model, [prompt], max_new_tokens=7, temperature=0)[0]  # fills the 16 positions
    assert generate(model, [prompt], max_new_tokens=12, temperature=0)[0][7:] == \
        generate(model, [text[-8:]], max_new_tokens=5, temperature=0)[0]
    with pytest.raises(UserError, match="empty"):
        generate(model, [[]], max_new_tokens=3)


# --------------------------------------------------------------------------------------------------
# Sampling


def test_seeds_reproduce():
    model = tiny_model()
    prompts = prompts_of([5, 2])
    a = generate(model, prompts, max_new_tokens=20, seed=0, top_p=0.9)
    b = generate(model, prompts, max_new_tokens=20, seed=0, top_p=0.9)
    c = generate(model, prompts, max_new_tokens=20, seed=1, top_p=0.9)
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model()
    prompts = prompts_of([5, 8])
    greedy = generate(model, prompts, max_new_tokens=15, temperature=0)
    assert generate(model, prompts, max_new_tokens=15, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, prompts, max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_filter_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).tolist() == [[inf, 4.0, 3.0, inf]]
    # softmax of [1, 4, 3, 2] ~ [0.03, 0.64, 0.24, 0.09]: 0.64 < 0.7 <= 0.64 + 0.24
    assert filter_logits(logits, top_p=0.7).tolist() == [[inf, 4.0, 3.0, inf]]
    assert filter_logits(logits, top_p=0.6).tolist() == [[inf, 4.0, inf, inf]]
    assert filter_logits(logits, top_k=10, top_p=1.0).tolist() == logits.tolist()


def test_bad_sampling_arguments():
    model = tiny_model()
    for kwargs, match in ((dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(UserError, match=match):
            generate(model, prompts_of([3]), **{"max_new_tokens": 5, **kwargs})


def test_restores_training_mode_and_ignores_dropout():
    model = tiny_model(dropout=0.5)
    prompts = prompts_of([4])
    expected = generate(model, prompts, max_new_tokens=10, temperature=0)
    model.train()
    assert generate(model, prompts, max_new_tokens=10, temperature=0) == expected
    assert model.training


# --------------------------------------------------------------------------------------------------
# Stopping and streaming


def test_stop_ids():
    model = tiny_model()
    prompts = prompts_of([5, 3])
    free = generate(model, prompts, max_new_tokens=20, temperature=0)
    stop = free[0][6]
    out = generate(model, prompts, max_new_tokens=20, temperature=0, stop_ids=[stop])
    for row, full in zip(out, free):
        assert row == (full[:full.index(stop)] if stop in full else full)
    # Default stop id: the tokenizer's end of text.
    tok = CharTokenizer(CHARS)
    tok.eot_id = stop
    assert generate(model, prompts, max_new_tokens=20, temperature=0, tokenizer=tok) == out


def test_stop_strings():
    model = tiny_model()
    tok = CharTokenizer(CHARS)
    prompts = prompts_of([5, 3])
    free = generate(model, prompts, max_new_tokens=20, temperature=0)
    text = tok.decode(free[0])
    stop = text[8:10]
    end = text.index(stop) + len(stop)  # one char per token: the token completing the stop string
    out = generate(model, prompts, max_new_tokens=20, temperature=0, stop_strings=[stop], tokenizer=tok,
                   stop_ids=())
    assert out[0] == free[0][:end]
    other = tok.decode(free[1])
    assert out[1] == (free[1][:other.index(stop) + len(stop)] if stop in other else free[1])
    pieces = list(stream_text(model, tok, prompts[0], max_new_tokens=20, temperature=0, stop_strings=[stop]))
    assert "".join(pieces) == text[:text.index(stop)]
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, prompts, max_new_tokens=5, stop_strings=["x"])


def test_stream_yields_the_same_tokens_as_generate():
    model = tiny_model()
    prompts = prompts_of([5, 3])
    free = generate(model, prompts, max_new_tokens=12, temperature=0)
    stop = free[1][4]
    steps = list(stream(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[stop]))
    assert all(len(step) == 2 for step in steps)
    rows = [[step[r] for step in steps if step[r] is not None] for r in range(2)]
    assert rows == generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[stop])
    cut = free[1].index(stop)
    assert all(step[1] is None for step in steps[cut:])  # a stopped row emits nothing


def test_stream_text_joins_to_the_decoded_ids():
    """Streamed pieces of GPT-2 BPE text (byte-level tokens, split characters) join to the full decode."""
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = tok.encode("héllo wörld")
    ids = generate(model, [prompt], max_new_tokens=30, seed=5, stop_ids=())[0]
    pieces = list(stream_text(model, tok, prompt, max_new_tokens=30, seed=5, stop_ids=()))
    assert len(pieces) > 1
    assert "".join(pieces) == tok.decode(ids)


def test_cli_sample_prompt_file(tmp_path, capsys):
    from gpt2lab.cli import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    args = ["sample", "--init", "random:gpt2-tiny", "--prompt-file", str(prompt), "--max-new-tokens", "5",
            "--num-samples", "2", "--seed", "0", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once upon a time") and first.count("Once upon a time") == 2
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same samples
    assert main(["sample", "--init", "random:gpt2-tiny", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# nanoGPT's interface on the model: predict and generate


@pytest.mark.parametrize("pos_emb, n_kv_head", [("learned", 4), ("learned", 2), ("rope", 4), ("rope", 2)])
def test_model_generate_equals_the_generator(pos_emb, n_kv_head):
    model = tiny_model(pos_emb=pos_emb, n_kv_head=n_kv_head)
    idx = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 12, temperature=0)
    assert out.shape == (3, 17) and torch.equal(out[:, :5], idx)
    assert out[:, 5:].tolist() == generate(model, idx.tolist(), max_new_tokens=12, temperature=0, stop_ids=())
    sampled = model.generate(idx, 12, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    expected = generate(model, idx.tolist(), max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, seed=3,
                        stop_ids=())
    assert sampled[:, 5:].tolist() == expected


def test_model_generate_pads_a_stopped_row_with_its_stop_id():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(1))
    free = model.generate(idx, 10, temperature=0)
    stop = int(free[0, 6])  # the third new token of row 0 becomes a stop id
    out = model.generate(idx, 10, temperature=0, stop_ids=(stop,))
    row = out[0, 4:].tolist()
    first = row.index(stop)
    assert row[:first] == free[0, 4:4 + first].tolist() and set(row[first:]) == {stop}


def test_predict_equals_forward_logits():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = model(idx)[0]
    assert torch.equal(model.predict(idx), logits)
    last = model.predict(idx, targets=False)
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, logits[:, -1:], rtol=0, atol=1e-12)  # float64: one row's matmul
