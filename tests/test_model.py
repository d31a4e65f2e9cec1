"""The model: preset sizes, GPT-2 init, tied weights, attention variants against a naive reference,
config validation, the loss and vocabulary padding. Tiny models, CPU, a few seconds."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.errors import UserError
from gpt2lab.model import GPT, CausalSelfAttention, GPTConfig, KVCache, model_stats

PRESET_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                 "gpt2-xl": 1_557_611_200}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32), **overrides})


def make(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides)).eval()


# --------------------------------------------------------------------------------------------------
# Sizes, init, tying


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_preset_parameter_counts(name):
    config = GPTConfig.from_preset(name)
    assert model_stats(config).params == PRESET_PARAMS[name]
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == PRESET_PARAMS[name]


@pytest.mark.parametrize("overrides", [
    dict(n_kv_head=2), dict(n_kv_head=1, pos_emb="rope"), dict(sliding_window=[4, None]),
    dict(padded_vocab_size=64, bias=False),
])
def test_model_stats_counts_variants(overrides):
    config = tiny(**overrides)
    stats = model_stats(config)
    model = GPT(config)
    assert stats.params == model.num_params()
    assert stats.non_embedding_params == model.num_params(non_embedding=True)


def test_weight_tying():
    model = make()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # counted once
    idx = torch.randint(0, 50, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None  # gets gradient from the embedding and the head


def test_gpt2_init_stds():
    torch.manual_seed(0)
    L = 4
    model = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=L, n_head=4, n_embd=128))
    block = model.transformer.h[0]
    for w in (block.attn.c_attn.weight, block.mlp.c_fc.weight, model.transformer.wte.weight,
              model.transformer.wpe.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.mlp.c_proj.bias == 0)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)


# --------------------------------------------------------------------------------------------------
# A naive reference: the model computed with explicit loops over heads and an explicit mask


def naive_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a learned-position model with per-layer windows, written out by hand."""
    c = model.config
    B, T = idx.shape
    hs, nh, nkv = c.head_size, c.n_head, c.n_kv_head
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    x = model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:T]
    for block, window in zip(model.transformer.h, c.layer_windows()):
        allowed = j <= i
        if window is not None:
            allowed = allowed & (i - j < window)  # banded causal mask
        h = F.layer_norm(x, (c.n_embd,), block.ln_1.weight, block.ln_1.bias, c.layer_norm_eps)
        qkv = h @ block.attn.c_attn.weight.T + block.attn.c_attn.bias
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        heads = []
        for head in range(nh):
            g = head // (nh // nkv)  # the kv head this query head shares
            qh, kh, vh = (t[..., a * hs:(a + 1) * hs] for t, a in ((q, head), (k, g), (v, g)))
            scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hs)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(scores.softmax(-1) @ vh)
        y = torch.cat(heads, dim=-1) @ block.attn.c_proj.weight.T + block.attn.c_proj.bias
        x = x + y
        h = F.layer_norm(x, (c.n_embd,), block.ln_2.weight, block.ln_2.bias, c.layer_norm_eps)
        h = F.gelu(h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias, approximate="tanh")
        x = x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    x = F.layer_norm(x, (c.n_embd,), model.transformer.ln_f.weight, model.transformer.ln_f.bias, c.layer_norm_eps)
    return (x @ model.transformer.wte.weight.T)[..., : c.vocab_size]


@pytest.mark.parametrize("overrides", [
    dict(), dict(n_kv_head=2), dict(n_kv_head=1), dict(sliding_window=1), dict(sliding_window=5),
    dict(sliding_window=5, n_kv_head=2), dict(sliding_window=[3, None]), dict(sliding_window=[None, 7]),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mha")
@torch.no_grad()
def test_matches_naive_reference(overrides):
    model = make(**overrides)
    idx = torch.randint(0, 50, (2, 20))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, naive_forward(model, idx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(n_kv_head=2)
    mha = make(seed=1)
    state = gqa.state_dict()
    hs, nh, nkv = 8, 4, 2
    for i in range(2):
        for name in ("weight", "bias"):
            w = state[f"transformer.h.{i}.attn.c_attn.{name}"]
            q, k, v = w.split([nh * hs, nkv * hs, nkv * hs], dim=0)
            # Query head h reads kv head h // (nh // nkv): repeat each kv head for its group.
            rep = [t.reshape(nkv, hs, *t.shape[1:]).repeat_interleave(nh // nkv, 0).reshape(nh * hs, *t.shape[1:])
                   for t in (k, v)]
            state[f"transformer.h.{i}.attn.c_attn.{name}"] = torch.cat([q, *rep], dim=0)
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], atol=1e-6, rtol=1e-6)
    assert GPTConfig(n_head=4, n_embd=32).n_kv_head == 4  # None means MHA


@torch.no_grad()
def test_window_at_least_T_equals_full_attention():
    full = make()
    windowed = make(sliding_window=20)
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(windowed(idx)[0], full(idx)[0], atol=0, rtol=0)


def test_per_layer_windows():
    model = make(sliding_window=[3, 0])
    assert [b.attn.window for b in model.transformer.h] == [3, None]
    assert model.config.layer_windows() == [3, None]


# --------------------------------------------------------------------------------------------------
# Incremental decoding with the cache


@pytest.mark.parametrize("overrides", [dict(), dict(pos_emb="rope", n_kv_head=2, sliding_window=4)])
@torch.no_grad()
def test_cache_without_pos_continues_positions(overrides):
    """Decoding step by step through a cache without passing `pos` gives the full forward's logits
    (positions continue after the cached tokens instead of restarting at 0)."""
    model = make(**overrides)
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = model.new_cache(2, 12)
    steps = [model(idx[:, :6], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_attention_mask_from_positions():
    """The one mask builder: causal, within the window, never padding or an empty slot (-1)."""
    attn = make(sliding_window=3).transformer.h[0].attn
    pos = torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])  # row 0 left padded by two columns
    mask = attn.attention_mask(pos, pos, torch.float32)  # a prefill: keys are the same columns
    want = torch.tensor([
        [[0, 0, 0, 0, 0, 1],  # a padding query sees only the last key (finite softmax, output unused)
         [0, 0, 0, 0, 0, 1],
         [0, 0, 1, 0, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 1, 0],
         [0, 0, 0, 1, 1, 1]],
        [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [0, 1, 1, 1, 0, 0],
         [0, 0, 1, 1, 1, 0],
         [0, 0, 0, 1, 1, 1]]], dtype=torch.bool)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    assert torch.equal(mask[:, 0] == 0, want) and torch.isneginf(mask[:, 0][~want]).all()
    # A decode step over ring slots holding positions 8, 5, 6, 7 (window 3) and over a full cache
    # with one empty slot; q_pos (1, 1) broadcasts over the rows of k_pos.
    slots = torch.tensor([[8, 5, 6, 7], [-1, 5, 6, 7]])
    ring = attn.attention_mask(torch.tensor([[8]]), slots, torch.float32)
    assert (ring[:, 0, 0] == 0).tolist() == [[True, False, True, True], [False, False, True, True]]
    full = CausalSelfAttention(tiny(), window=None)
    step = full.attention_mask(torch.tensor([[2]]), torch.tensor([[0, 1, 2, -1]]), torch.float32)
    assert (step[0, 0, 0] == 0).tolist() == [True, True, True, False]


def test_cache_update_returns_what_the_queries_may_see():
    """A window-3 ring (layer 0) and a full cache (layer 1), GQA: update returns the keys and their
    positions; a multi-token step into the ring gets [old slots, new keys], keeps the newest 3 in slots
    c % 3, and later one-token steps wrap around (also in static mode)."""
    cache = KVCache(tiny(sliding_window=[3, None], n_kv_head=2), 2, 8, torch.float32, "cpu")
    ring, full = cache.layers

    def keys(p: list[int]) -> torch.Tensor:  # (2, nkv, T, hs), every entry the column's index
        return torch.tensor(p, dtype=torch.float32).view(1, 1, -1, 1).expand(2, 2, -1, 8)

    pos = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    k, v, k_pos = ring.update(keys([0, 1, 2, 3, 4]), keys([0, 1, 2, 3, 4]), pos)
    assert k.shape == (2, 2, 8, 8) and k[0, 0, :, 0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert k_pos.tolist() == [[-1, -1, -1, -1, 0, 1, 2, 3], [-1, -1, -1, 0, 1, 2, 3, 4]]
    assert ring.slot_pos.tolist() == [[2, 3, 1], [3, 4, 2]]  # columns 3, 4, 2 in slots 0, 1, 2
    k, v, k_pos = full.update(keys([0, 1, 2, 3, 4]), keys([0, 1, 2, 3, 4]), pos)
    assert k.shape == (2, 2, 5, 8) and torch.equal(k_pos, pos)
    assert cache.next_col == 5

    step = torch.tensor([[4], [5]])
    k, v, k_pos = ring.update(keys([5]), keys([5]), step)  # column 5 -> slot 2 (position 1/2 leaves)
    assert k_pos.tolist() == [[2, 3, 4], [3, 4, 5]] and v[0, 0, :, 0].tolist() == [3, 4, 5]
    k, v, k_pos = full.update(keys([5]), keys([5]), step)
    assert k_pos.tolist() == [[-1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]

    cache.start_static_decoding()
    k, v, k_pos = ring.update(keys([6]), keys([6]), step + 1)  # column 6 -> slot 0, all slots returned
    assert k_pos.tolist() == [[5, 3, 4], [6, 4, 5]] and k[0, 0, :, 0].tolist() == [6, 4, 5]
    k, v, k_pos = full.update(keys([6]), keys([6]), step + 1)
    assert k_pos.tolist() == [[-1, 0, 1, 2, 3, 4, 5, -1], [0, 1, 2, 3, 4, 5, 6, -1]]
    assert ring.col.tolist() == [7] and full.col.tolist() == [7]
    with pytest.raises(ValueError, match="one token"):
        ring.update(keys([7, 8]), keys([7, 8]), torch.tensor([[7, 8]]))
    cache.reset()
    with pytest.raises(ValueError, match="holds 8 tokens"):
        full.update(keys(list(range(9))), keys(list(range(9))), torch.arange(9)[None])


@torch.no_grad()
def test_one_mask_per_window_per_forward(monkeypatch):
    """Layers of equal (window, keys) share one mask per forward pass (the decode step's speed);
    full causal attention without a cache builds none (is_causal, the flash kernels), nor does a
    one-token step that may see every key (no padding stored, ring full)."""
    built = []
    original = CausalSelfAttention.attention_mask
    monkeypatch.setattr(CausalSelfAttention, "attention_mask",
                        lambda self, *args: built.append(self.window) or original(self, *args))
    model = make(n_layer=4, sliding_window=[4, None, 4, None])
    idx = torch.randint(0, 50, (2, 10))
    cache = model.new_cache(2, 12)
    model(idx, cache=cache)
    assert built == [4, None]
    model(idx[:, :1], cache=cache)
    assert built == [4, None]
    padded = torch.tensor([[-1, -1] + list(range(8)), list(range(10))])
    model(idx, pos=padded, cache=cache.reset() or cache)
    model(idx[:, :1], pos=torch.tensor([[8], [10]]), cache=cache)
    assert built == [4, None] * 3
    built.clear()
    ring = make(n_layer=2, sliding_window=[16, None])
    cache = ring.new_cache(2, 12)
    ring(idx[:, :3], cache=cache)
    ring(idx[:, :1], cache=cache)  # the ring of 16 still has empty slots: only it needs a mask
    assert built == [16, None, 16]
    built.clear()
    make(n_layer=3, sliding_window=[None, 20, 4])(idx)  # a window of 20 >= T is full attention too
    assert built == [4]


# --------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("overrides, field", [
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_embd=30), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(sliding_window=[4]), "sliding_window"),
    (dict(sliding_window=-2), "sliding_window"),
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(padded_vocab_size=10), "padded_vocab_size"),
    (dict(dropout=1.5), "dropout"),
    (dict(pos_emb="rope", n_embd=36, n_head=4), "head size"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(UserError, match=field) as e:
        tiny(**overrides)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(UserError, match="unknown model preset 'gpt2-smal'.*did you mean"):
        GPTConfig.from_preset("gpt2-smal")
    with pytest.raises(UserError, match="n_heads"):
        GPTConfig.from_dict({"n_heads": 4})


def test_sequence_longer_than_block_size():
    model = make()
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Loss and vocabulary padding


@torch.no_grad()
def test_loss_ignores_minus_100():
    model = make()
    idx = torch.randint(0, 50, (2, 10))
    targets = torch.randint(0, 50, (2, 10))
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, manual)
    _, loss_sum = model(idx, targets, loss_reduction="sum")
    torch.testing.assert_close(loss_sum, manual * keep.sum())


@torch.no_grad()
def test_padded_vocab_returns_vocab_size_logits():
    padded = make(padded_vocab_size=64)
    plain = make(seed=1)
    state = padded.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:50]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    plain.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 10))
    logits, loss = padded(idx, idx)
    assert logits.shape == (2, 10, 50)
    ref_logits, ref_loss = plain(idx, idx)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


# --------------------------------------------------------------------------------------------------
# gpt2lab model-info


def test_model_info_cli(capsys):
    from gpt2lab.cli import main

    assert main(["model-info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "85,056,000" in out  # total and non-embedding
    assert "72.0 KiB" in out and "36.0 MiB" in out  # KV cache: fp32 per token, bf16 at 1024 tokens

    assert main(["model-info", "gpt2", "--compare"]) == 0
    out = capsys.readouterr().out
    for n_kv_head in (3, 1):  # GQA and MQA shrink only the k/v projections
        assert f"{model_stats(GPTConfig.from_preset('gpt2', n_kv_head=n_kv_head)).params:,}" in out

    assert main(["model-info", "gpt2-tiny", "--model.n_kv_head", "2", "--model.sliding_window", "[16, null]",
                 "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "n_kv_head=2" in out and "sliding_window=[16, None]" in out
    # KV cache at 64 tokens, fp32: (16 + 64) token-layers x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes
    assert "20.0 KiB" in out

    assert main(["model-info", "gpt2", "--model.n_kv_head", "5"]) == 2
    assert "n_kv_head" in capsys.readouterr().err


def test_rope_tables_stay_fp32_when_weights_are_cast():
    # Regression: model.to(bfloat16) used to cast the rotary tables too, losing angle precision.
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16, pos_emb="rope"))
    reference = model.rope_cos.clone()
    model = model.to(torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32
    assert torch.equal(model.rope_cos, reference)


def test_empty_model_loads_to_identical_logits():
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_emb="rope")
    model = GPT(config).eval()
    clone = GPT.empty(config)
    clone.load_state_dict(model.state_dict())
    assert clone.lm_head.weight is clone.transformer.wte.weight
    idx = torch.randint(0, 100, (2, 40))  # longer than block_size: rope tables extend on demand
    assert torch.equal(model(idx)[0], clone.eval()(idx)[0])
