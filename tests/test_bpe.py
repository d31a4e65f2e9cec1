"""Trained byte-level BPE tokenizers: exact round trips on any text, deterministic training, identity
in data and checkpoints, `gpt2lab tokenizer`, exports `AutoTokenizer` reads with equal ids, and the
whole path: train a tokenizer, prepare, train a model, sample, convert, `pipeline` on the export."""

from __future__ import annotations

import json
import random

import pytest

from gpt2lab import cli
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    BPETokenizer,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

pytest.importorskip("tokenizers")

# code point ranges drawn from: ASCII with controls, Latin-1, combining marks, CJK, Hangul, emoji and
# their modifiers, private use, the last planes; surrogates are left out (str.encode refuses them)
RANGES = [(0, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
          (0x200B, 0x200F), (0xE000, 0xF8FF), (0xFFF0, 0xFFFF), (0x10000, 0x10FFFF)]
SPECIAL_TEXT = ["<|endoftext|>", *CHAT_SPECIAL_TOKENS, " ", "\n", "\r\n", "\t", "  ", "'s", "'ll"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.15:
                pieces.append(rng.choice(SPECIAL_TEXT))
            else:
                lo, hi = rng.choice(RANGES)
                pieces.append("".join(chr(c) for c in (rng.randint(lo, hi) for _ in range(rng.randint(1, 6)))
                                      if not 0xD800 <= c <= 0xDFFF))
        texts.append("".join(pieces))
    return texts


@pytest.fixture(scope="module")
def bpe(trained_bpe) -> BPETokenizer:
    return BPETokenizer.from_dir(trained_bpe)


def test_round_trip_is_exact_on_generated_text(bpe):
    texts = random_texts(400)
    for text, ids in zip(texts, bpe.encode_batch(texts)):
        assert ids == bpe.encode(text)
        assert bpe.decode_bytes(ids) == text.encode("utf-8")
        assert bpe.decode(ids) == text
    for text in texts[:100]:  # with special tokens allowed, their text comes back too
        assert bpe.decode_bytes(bpe.encode(text, allow_special=True)) == text.encode("utf-8")


def test_round_trip_is_exact_on_shared_data_and_invalid_utf8(bpe, shared_data):
    rng = random.Random(1)
    garbage = bytes(rng.randrange(256) for _ in range(20_000))  # invalid UTF-8, read with replacement
    texts = [garbage.decode("utf-8", errors="replace")]
    for f in ("wikitext-2/valid.txt", "tinyshakespeare/input.txt"):
        texts.append((shared_data / f).read_bytes()[:300_000].decode("utf-8", errors="replace"))
    for text in texts:
        assert bpe.decode_bytes(bpe.encode(text)) == text.encode("utf-8")


def test_special_tokens_are_reserved_ids(bpe):
    assert bpe.eot_id == 0
    assert [bpe.encode(t, allow_special=True) for t in CHAT_SPECIAL_TOKENS] == [[1], [2], [3], [4]]
    assert len(bpe.encode("<|endoftext|>")) > 1  # ordinary text unless allowed
    assert bpe.vocab_size == 2000


def test_training_is_deterministic_and_identity_survives_a_round_trip(bpe, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    again = train_bpe(text.split("\n\n"), 2000)
    assert again.json == bpe.json
    assert same_tokenizer(bpe, tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict()))))
    other = train_bpe(text.split("\n\n"), 1000)
    assert not same_tokenizer(bpe, other) and not same_tokenizer(bpe, "gpt2")
    with pytest.raises(UserError, match="needs at least 261 ids"):
        train_bpe(["abc"], 100)


def test_get_tokenizer_reads_a_directory(trained_bpe, tmp_path):
    assert get_tokenizer(str(trained_bpe)).to_dict() == BPETokenizer.from_dir(trained_bpe).to_dict()
    with pytest.raises(UserError, match="has no tokenizer.json; make one with `gpt2lab tokenizer train"):
        get_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a tokenizers tokenizer.json"):
        get_tokenizer(str(tmp_path))


def test_autotokenizer_on_the_export_gives_the_same_ids_on_wikitext(bpe, tmp_path, shared_data):
    transformers = pytest.importorskip("transformers")
    from gpt2lab.hf import read_hf_tokenizer, write_bpe_tokenizer_files

    write_bpe_tokenizer_files(tmp_path, bpe)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    lines = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for text in [*lines[:300], "".join(lines[:2000])]:
        assert hf_tok(text)["input_ids"] == bpe.encode(text)
    assert hf_tok.decode(bpe.encode("".join(lines[:200]))) == "".join(lines[:200])
    assert hf_tok.eos_token_id == bpe.eot_id
    assert same_tokenizer(read_hf_tokenizer(tmp_path), bpe)


def test_tokenizer_command(tmp_path, shared_data, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000])
    for out in ("a", "b"):
        assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / out)]) == 0
    printed = capsys.readouterr().out
    assert "bytes/token with this tokenizer" in printed and "with GPT-2's" in printed
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = BPETokenizer.from_dir(tmp_path / "a")
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "a"), "To be, or not"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("To be, or not")
    assert cli.main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "a"), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "To be, or not\n"
    assert cli.main(["tokenizer", "info", "--tokenizer", str(tmp_path / "a")]) == 0
    assert "<|user|>=2" in capsys.readouterr().out
    # an earlier tokenizer needs --force; a folder gpt2lab did not write is never replaced
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "a")]) == 2
    assert "add --force to replace it" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(tmp_path)]) == 2
    assert "is not empty and is not an earlier tokenizer" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "50", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "needs at least 261 ids" in err and "\n" not in err.strip()
    assert not (tmp_path / "c").exists()


def test_train_prepare_train_sample_convert_pipeline(tmp_path, shared_data, capsys):
    """The whole path with a 2k-vocabulary BPE on (a slice of) Tiny Shakespeare."""
    transformers = pytest.importorskip("transformers")
    import torch

    from gpt2lab.data.prepare import load_meta
    from gpt2lab.loading import load_model
    from gpt2lab.sampling import generate

    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:300_000])
    tok_dir, data, run, export = (tmp_path / n for n in ("tok", "data", "run", "export"))
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "2000", "--out", str(tok_dir)]) == 0
    tok = BPETokenizer.from_dir(tok_dir)
    assert cli.main(["prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data), "--no-progress"]) == 0
    meta = load_meta(data)
    assert meta["vocab_size"] == 2000 and same_tokenizer(meta["tokenizer"], tok)
    train = ["train", "--data.dir", str(data), "--data.prepare", "null", "--out", str(run), "--model.n_layer", "1",
             "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32", "--train.tokens_per_step",
             "128", "--train.micro_batch_size", "4", "--train.max_steps", "4", "--train.eval_every", "0",
             "--train.sample_tokens", "0", "--train.device", "cpu", "--log.progress", "false"]
    assert cli.main(train) == 0
    model, loaded = load_model(str(run))
    assert same_tokenizer(loaded, tok) and model.config.vocab_size >= 2000
    capsys.readouterr()
    assert cli.main(["sample", "--init", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "10",
                     "--temperature", "0", "--device", "cpu", "--dtype", "fp32"]) == 0
    sampled = capsys.readouterr().out
    new = generate(model, [tok.encode("ROMEO:")], max_new_tokens=10, temperature=0)[0]
    assert sampled.rstrip("\n") == "ROMEO:" + tok.decode(new[:new.index(0)] if 0 in new else new)
    assert cli.main(["convert", "--init", str(run), "--out", str(export)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    assert hf_tok("ROMEO: What, ho!")["input_ids"] == tok.encode("ROMEO: What, ho!")
    generator = transformers.pipeline("text-generation", model=str(export), device="cpu")
    text = generator("ROMEO:", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    idx = torch.tensor([tok.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(6):
            idx = torch.cat([idx, model(idx)[0][0, -1].argmax().view(1, 1)], dim=1)
    assert text == tok.decode(idx[0].tolist())
    # a run on data of another tokenizer is refused in one line
    other = tmp_path / "other"
    assert cli.main(["prepare", str(corpus), "--tokenizer", "gpt2", "--out", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--data.dir", str(other), "--data.prepare", "null", "--out", str(tmp_path / "run2"),
                     "--model.init", str(run), "--train.max_steps", "1", "--train.device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "uses the bpe 2000 (sha256" in err and "prepared with gpt2" in err and "\n" not in err


def test_finetune_with_the_special_template_and_its_export(tmp_path, trained_bpe, capsys):
    """A model with a trained BPE finetuned on chat records with the `special` template: the template is
    recorded, `gpt2lab.load(...).chat` prompts with it, and the export's apply_chat_template gives its ids."""
    transformers = pytest.importorskip("transformers")
    import torch

    import gpt2lab
    from gpt2lab.chat_template import get_chat_template
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.sampling import generate

    tok = BPETokenizer.from_dir(trained_bpe)
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "base", base, base.config, tok.to_dict())
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}"},
                             {"role": "assistant", "content": " ".join(map(str, range(1, i + 1)))}]} for i in range(1, 9)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["finetune", "--data", str(tmp_path / "chats.jsonl"), "--init", str(tmp_path / "base"),
                     "--out", str(tmp_path / "ft"), "--data.sft.template", "special", "--data.sft.val_fraction", "0",
                     "--train.max_steps", "3", "--train.tokens_per_step", "256", "--train.micro_batch_size", "4",
                     "--train.eval_every", "0", "--train.sample_tokens", "0", "--log.progress", "false",
                     "--train.device", "cpu"]) == 0
    lm = gpt2lab.load(tmp_path / "ft", device="cpu")
    assert lm.chat_template.name == "special"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 3"}]
    prompt = get_chat_template("special").encode(messages, tok)
    assert prompt[:1] == [1] and prompt[-1] == 3  # <|system|> ... <|assistant|>
    assert lm.encode_chat(messages) == prompt
    new = generate(lm.model, [prompt], max_new_tokens=8, temperature=0)[0]
    expected = tok.decode(new[:new.index(0)] if 0 in new else new).split("<|user|>")[0].strip()
    assert lm.chat(messages, max_new_tokens=8, temperature=0) == expected
    capsys.readouterr()
    assert cli.main(["convert", "--init", str(tmp_path / "ft"), "--out", str(tmp_path / "export")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == prompt
    assert gpt2lab.load(tmp_path / "export", device="cpu").chat_template.name == "special"  # read back from the export


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_long_text_pieces_encode_to_the_ids_of_the_whole_text(name, bpe, shared_data):
    """prepare encodes one long text in pieces on all cores; the cuts never change an id."""
    from gpt2lab.data.prepare import encode_long, long_text_pieces

    tok = bpe if name == "bpe" else get_tokenizer("gpt2")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    tricky = "".join(random_texts(300, seed=3)) + "a \nb  \n\nc\r\nd\n e\n'll\n\n\n 'x\n"
    for t in (text, tricky * 3):
        pieces = long_text_pieces(t, size=500)
        assert "".join(pieces) == t and len(pieces) > 10
        assert encode_long(tok, t, size=500).tolist() == tok.encode(t)


def test_tiktoken_encoding_equals_the_tokenizers_library(bpe, shared_data):
    """Encoding runs on tiktoken; `tokenizers` (what the export runs) gives the same ids."""
    from tokenizers import Tokenizer

    assert bpe._enc is not None
    plain = Tokenizer.from_str(bpe.json)
    plain.encode_special_tokens = True
    special = Tokenizer.from_str(bpe.json)
    texts = random_texts(300, seed=5)
    for f in ("wikitext-2/test.txt", "tinyshakespeare/input.txt"):
        texts += (shared_data / f).read_text(encoding="utf-8").split("\n\n")[:3000]
    assert bpe.encode_batch(texts) == [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    assert bpe.encode_batch(texts, allow_special=True) == [e.ids for e in special.encode_batch(texts, add_special_tokens=False)]


def test_merges_out_of_id_order_are_encoded_by_tokenizers(bpe):
    spec = json.loads(bpe.json)
    spec["model"]["merges"] = spec["model"]["merges"][1:]  # the first merged token is now unreachable
    odd = BPETokenizer(json.dumps(spec))
    assert odd._enc is None
    for text in random_texts(50, seed=7):
        ids = odd.encode(text)
        assert odd.decode_bytes(ids) == text.encode("utf-8") and odd.encode_batch([text]) == [ids]
    assert odd.encode("<|user|>", allow_special=True) == [2] and len(odd.encode("<|user|>")) > 1


def test_a_damaged_stored_tokenizer_is_one_line(bpe):
    with pytest.raises(UserError, match="says vocab_size 7 but its tokenizer.json has 2000 ids"):
        tokenizer_from_dict({**bpe.to_dict(), "vocab_size": 7})
    with pytest.raises(UserError, match="stored in the dataset or checkpoint is not a tokenizers tokenizer.json"):
        tokenizer_from_dict({"kind": "bpe", "vocab_size": 7, "json": "[1, 2"})


def test_a_tokenizer_json_of_another_kind_is_refused(bpe):
    spec = json.loads(bpe.json)
    spec["normalizer"] = {"type": "NFC"}  # would change text before encoding: no exact round trip
    with pytest.raises(UserError, match="is not a byte-level BPE with GPT-2's pre-tokenization and no normalizer"):
        BPETokenizer(json.dumps(spec))


def test_without_the_tokenizers_package_it_says_what_to_install(bpe, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(UserError, match=r"need the tokenizers package: pip install gpt2lab\[hf\]"):
        BPETokenizer(bpe.json)
    with pytest.raises(UserError, match="need the tokenizers package"):
        train_bpe(["some text"], 300)
