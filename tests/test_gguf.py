"""GGUF export (`gpt2lab convert --format gguf`): read back with gguf's own reader every tensor and the
tokenizer are the model's; llama.cpp itself (llama-cpp-python) loads the file, tokenizes as gpt2lab
does, continues greedily as gpt2lab does and gives the same logits (f32), and q8_0 picks the same
next token on WikiText-2 text; models llama.cpp's gpt2 cannot express are refused before any work."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gpt2lab.checkpoint import save_checkpoint  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.errors import UserError  # noqa: E402
from gpt2lab.gguf_export import check_gguf_compatible, is_gguf_export, save_gguf  # noqa: E402
from gpt2lab.model import GPT, GPTConfig  # noqa: E402
from gpt2lab.sampling import generate  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer, gpt2_encoding  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = GPT2Tokenizer()
LAYER_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
LOGITS_RTOL, LOGITS_MEAN_ATOL = 3e-3, 2e-3
"""llama.cpp f32 (KV cache in f32) against gpt2lab fp32: llama.cpp's CPU GELU reads a float16 table
(its input rounded to 11 bits), so at each position the logits differ by up to ~1e-3 of the largest
|logit| there (measured: 1.1e-3; the mean difference 5e-4 where |logits| reach ~120)."""
Q8_AGREEMENT = 0.95
GGML_TYPE_F32 = 0


def peaked_model(bias: bool = True, seed: int = 0, vocab_size: int = TOK.vocab_size) -> GPT:
    """A random GPT-2-tokenizer model whose next token is a clear, context-dependent choice, as in a
    trained model and unlike a fresh init: weights scaled up 3x, and token embeddings (the tied LM
    head) given log-normal lengths (sigma 0.75), so logits are heavy-tailed with a top-1 that stands
    out (median top-1 margin 6.2 logits on the WikiText-2 text of the q8_0 test, against ~0.2 for plain
    random weights, where q8_0's rounding
    decides near-ties and top-1 agreement says little)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64,
                          bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        model.transformer.wte.weight.mul_(torch.exp(0.75 * torch.randn(model.config.padded_vocab_size, 1)))
    return model


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: save_gguf(model, TOK, out / f"model-{t}.gguf", outtype=t) for t in ("f32", "f16", "q8_0")}


@functools.lru_cache(maxsize=8)
def read(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors by name, metadata values) of a GGUF file, through gguf's reader (~4 s for GPT-2's
    tokenizer: read once per file)."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return tensors, fields


def test_f32_export_holds_every_weight_of_the_model(model, exports):
    tensors, fields = read(exports["f32"])
    sd = model.state_dict()
    want = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"],
            "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(model.config.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                want[f"blk.{i}.{theirs}.{kind}"] = sd[f"transformer.h.{i}.{ours}.{kind}"]
    assert set(tensors) == set(want)  # the tied LM head is not written: llama.cpp reuses token_embd
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(w.shape))  # GGUF lists dimensions innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.numpy(), err_msg=name)
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.attention.head_count"],
            fields["gpt2.context_length"], fields["gpt2.feed_forward_length"]) == (2, 64, 4, 128, 256)


def test_tokenizer_embedded_is_gpt2s(exports):
    """Every token's text maps back (GPT-2's byte alphabet) to the bytes tiktoken gives that id, and
    the merges, in order, build exactly the multi-byte tokens in rank order."""
    _, fields = read(exports["f32"])
    tokens, merges, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"], \
        fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == TOK.vocab_size
    from gpt2lab.tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    enc = gpt2_encoding()
    assert all(bytes(to_byte[c] for c in tokens[i]) == enc.decode_single_token_bytes(i) for i in range(50256))
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}
    multi = [enc.decode_single_token_bytes(i) for i in range(50256) if len(enc.decode_single_token_bytes(i)) > 1]
    assert len(merges) == len(multi) == 50000
    assert all(bytes(to_byte[c] for c in m.replace(" ", "", 1)) == t for m, t in zip(merges, multi))
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256


def test_f16_and_q8_0_store_what_they_say(model, exports):
    w = model.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    for outtype, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        tensors, fields = read(exports[outtype])
        t = tensors["blk.0.ffn_up.weight"]
        assert t.tensor_type == qtype
        got = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(w.shape)
        # q8_0: one float16 scale per block of 32 = max |w| / 127; rounding errs by half a step, the
        # scale's own rounding (2^-11 relative) by up to 127 / 2048 of a step more
        step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127 if outtype == "q8_0" else None
        bound = (step * 0.57).repeat(32, axis=1).reshape(w.shape) if step is not None else np.abs(w) / 1024
        assert np.all(np.abs(got - w) <= bound + 1e-7), outtype
        assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert exports["q8_0"].stat().st_size < exports["f16"].stat().st_size < exports["f32"].stat().st_size


def test_bias_free_model_gets_zero_biases_and_unused_ids_placeholders(tmp_path):
    """A bias-free model with more ids than its tokenizer (nanoGPT's 50304): zero biases, and the ids
    past the tokenizer's are unused placeholder tokens, so token_embd and the token list agree."""
    model = peaked_model(bias=False, vocab_size=50304)
    tensors, fields = read(save_gguf(model, TOK, tmp_path / "m.gguf"))
    biases = [n for n in tensors if n.endswith(".bias")]
    assert len(biases) == 6 * 2 + 1
    assert all(not np.any(np.asarray(tensors[n].data)) for n in biases)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == list(tensors["token_embd.weight"].shape)[1] == 50304
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert set(types[50257:]) == {gguf.TokenType.UNUSED}


@pytest.mark.parametrize("change, said", [
    (dict(pos_emb="rope"), "pos_emb='rope'"),
    (dict(n_kv_head=1), "n_kv_head=1"),
    (dict(sliding_window=16), "sliding_window=16"),
])
def test_architectures_llama_cpp_gpt2_cannot_run_are_refused(tmp_path, change, said):
    config = GPTConfig(block_size=32, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=32, **change)
    with pytest.raises(UserError, match=f"cannot export to GGUF: {said}.*use the gpt2lab checkpoint itself") as e:
        check_gguf_compatible(config, TOK)
    assert "\n" not in str(e.value)
    # through the CLI: refused before any weight is read, nothing written
    save_checkpoint(tmp_path / "ckpt", GPT(config), config, TOK.to_dict())
    assert main(["convert", "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf"),
                 "--format", "gguf"]) == 2
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_char_tokenizer_is_refused_with_what_to_export_instead(tmp_path, capsys):
    tok = CharTokenizer.from_text("hello world")
    config = GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "ckpt", GPT(config), config, tok.to_dict())
    assert main(["convert", "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf"),
                 "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the char tokenizer" in err and "--format hf" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


def test_output_file_rules(tmp_path, capsys):
    """A new file is written; an earlier gpt2lab GGUF is replaced only with --force; any other file,
    a directory or another program's GGUF is never replaced."""
    cmd = ["convert", "--init", "random:gpt2-tiny", "--format", "gguf", "--out"]
    out = tmp_path / "sub" / "m.gguf"
    assert main([*cmd, str(out)]) == 0 and is_gguf_export(out)
    before = out.read_bytes()
    assert main([*cmd, str(out)]) == 2
    assert "add --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*cmd, str(out), "--force", "--outtype", "q8_0"]) == 0
    assert is_gguf_export(out) and out.stat().st_size < len(before) / 2  # the q8_0 export replaced the f32
    mine = tmp_path / "notes.gguf"
    mine.write_text("my notes")
    other = tmp_path / "other.gguf"  # a valid GGUF another program wrote
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    other_bytes = other.read_bytes()
    for path in (mine, other):
        assert main([*cmd, str(path), "--force"]) == 2
        assert "not an earlier GGUF file written by gpt2lab" in capsys.readouterr().err
    assert mine.read_text() == "my notes" and other.read_bytes() == other_bytes
    assert main([*cmd, str(tmp_path)]) == 2 and "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "other.gguf", "sub"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.gguf"]  # no temporary file left


def test_outtype_needs_gguf(tmp_path, capsys):
    assert main(["convert", "--init", "random:gpt2-tiny", "--out", str(tmp_path / "hf"), "--outtype", "q8_0"]) == 2
    assert "--format gguf only" in capsys.readouterr().err and not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------------
# llama.cpp itself


OPEN: list = []


@pytest.fixture(scope="module", autouse=True)
def close_llamas():
    """Close every llama.cpp model at the end (left to the garbage collector at interpreter exit,
    llama-cpp-python's destructor fails noisily)."""
    yield
    while OPEN:
        OPEN.pop().close()


def llama(path, n_ctx: int = 128):
    """llama.cpp (llama-cpp-python) with `path` loaded, one thread, logits of every position kept."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                    "llama-cpp-python: CI installs it)")
    OPEN.append(llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1,
                           verbose=False, seed=0, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32))
    return OPEN[-1]


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    """got, want (T, V): every position within LOGITS_RTOL of its largest |logit|, and close on average."""
    scale = np.abs(want).max(axis=1, keepdims=True)
    worst = float((np.abs(got - want) / scale).max())
    assert worst <= LOGITS_RTOL, f"a logit differs by {worst:.2e} of its position's largest"
    assert float(np.abs(got - want).mean()) < LOGITS_MEAN_ATOL


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) after each token of `ids`, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
        "tallest structure in Paris. Its base is square, measuring 125 metres on each side.")


def test_llama_cpp_tokenizes_as_gpt2lab(exports):
    llm = llama(exports["f32"])
    for text in (TEXT, " héllo   wörld\n\n  日本語 🙂 it's", "a<|endoftext|>b"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == TOK.encode(text)
    assert llm.token_eos() == llm.token_bos() == 50256
    ids = TOK.encode(TEXT)
    assert llm.detokenize(ids).decode() == TEXT


@torch.no_grad()
def test_llama_cpp_f32_logits_and_greedy_text_equal_gpt2lab(model, exports):
    llm = llama(exports["f32"])
    ids = TOK.encode(TEXT)[:40]
    want = model(torch.tensor([ids]))[0][0].numpy()
    got = llama_logits(llm, ids)
    assert float(want.std()) > 2  # logits far from uniform
    assert_logits_close(got, want)
    ours = generate(model, [ids], max_new_tokens=24, temperature=0.0)[0]
    llm.reset()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 24:
            break
    assert theirs == ours


@torch.no_grad()
def test_llama_cpp_bias_free_model_with_unused_ids_logits_equal(tmp_path):
    model = peaked_model(bias=False, seed=1, vocab_size=50304)
    llm = llama(save_gguf(model, TOK, tmp_path / "m.gguf"))
    ids = TOK.encode(TEXT)[:32]
    got, want = llama_logits(llm, ids), model(torch.tensor([ids]))[0][0].numpy()
    assert_logits_close(got, want)


@torch.no_grad()
def test_llama_cpp_q8_0_picks_gpt2labs_next_token_on_wikitext(model, exports, shared_data):
    """Teacher-forced on WikiText-2 test text: llama.cpp's q8_0 top-1 equals gpt2lab fp32's at
    >= 95% of positions. The model's next token is a clear, context-dependent choice (see
    `peaked_model`: many distinct top-1 tokens), so agreement measures the quantization error."""
    from gpt2lab.evaluate import wikitext

    pages = wikitext.read_pages(shared_data / wikitext.SHARED_FILE)
    ids = TOK.encode(wikitext.detokenize(pages[0]) + wikitext.detokenize(pages[1]))[: 8 * 128]
    llm = llama(exports["q8_0"])
    agree = total = 0
    top1 = set()
    for start in range(0, len(ids) - 127, 128):
        window = ids[start:start + 128]
        want = model(torch.tensor([window]))[0][0].argmax(-1).numpy()
        got = llama_logits(llm, window).argmax(-1)
        agree += int((got == want).sum())
        total += len(window)
        top1 |= set(want.tolist())
    assert total == 1024 and len(top1) >= 30  # context decides the next token: not one frequent token
    assert agree / total >= Q8_AGREEMENT, f"q8_0 top-1 agreement {agree / total:.3f}"


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16,
                                     b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\xff" * 8,
                                     b"not gguf at all"])
def test_a_file_that_is_not_a_whole_gpt2lab_gguf_is_not_one(tmp_path, content):
    """Truncated or hostile headers (a key claiming 2^64 bytes) are simply not gpt2lab's exports."""
    f = tmp_path / "x.gguf"
    f.write_bytes(content)
    assert not is_gguf_export(f)


@torch.no_grad()
def test_trained_bpe_model_runs_in_llama_cpp(trained_bpe, tmp_path):
    """A model on a tokenizer trained by `gpt2lab tokenizer train`: its vocabulary and merges are
    embedded, llama.cpp tokenizes as gpt2lab does and continues greedily as gpt2lab does."""
    from gpt2lab.tokenizer import BPETokenizer

    tok = BPETokenizer.from_dir(trained_bpe)
    model = peaked_model(seed=2, vocab_size=tok.vocab_size)
    path = save_gguf(model, tok, tmp_path / "bpe.gguf")
    _, fields = read(str(path))
    assert fields["tokenizer.ggml.tokens"] == [tok._hf.id_to_token(i) for i in range(tok.vocab_size)]
    llm = llama(path)
    text = "ROMEO:\nBut soft, what light through yonder window breaks? 🙂 日本"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    assert llm.detokenize(tok.encode(text)).decode() == text
    ids = tok.encode(text)
    assert_logits_close(llama_logits(llm, ids), model(torch.tensor([ids]))[0][0].numpy())
    ours = generate(model, [ids], max_new_tokens=16, temperature=0.0)[0]
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert theirs == ours
