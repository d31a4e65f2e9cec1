"""Tokenizers: GPT-2 BPE ids, unicode round trips, streaming decode, char tokenizer, integrity check."""

import pytest

from gpt2lab import tokenizer as tokmod
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    StreamDecoder,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_dict,
)

UNICODE_SAMPLES = [
    "Hello, world!",
    "emoji 🤖🧠👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト, 한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0315",
    "whitespace runs:   \t\t  \n\n\n   end  ",
    "the literal <|endoftext|> stays text",
    "",
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2):
    # nanoGPT/build-nanogpt's sampling prompt, and GPT-2 encoder.json entries "Ġthe"=262, "Ċ"=198, "!"=0
    assert gpt2.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("\n") == [198]
    assert gpt2.encode("!") == [0]
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.name) == (50257, 50256, "gpt2")


def test_gpt2_special_token(gpt2):
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]
    plain = gpt2.encode("<|endoftext|>")
    assert 50256 not in plain and len(plain) > 1
    assert gpt2.decode(plain) == "<|endoftext|>"
    assert gpt2.encode_batch(["a<|endoftext|>b"], allow_special=True) == [gpt2.encode("a<|endoftext|>b", True)]
    assert gpt2.encode("a<|endoftext|>b", True) == gpt2.encode("a") + [50256] + gpt2.encode("b")


@pytest.mark.parametrize("tok_name", ["gpt2", "char"])
def test_unicode_round_trip(gpt2, tok_name):
    tok = gpt2 if tok_name == "gpt2" else CharTokenizer.from_text("".join(UNICODE_SAMPLES))
    for text in UNICODE_SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(UNICODE_SAMPLES) == [tok.encode(t) for t in UNICODE_SAMPLES]


def test_decode_partial_utf8_does_not_crash(gpt2):
    ids = gpt2.encode("🤖")
    assert len(ids) > 1  # the emoji's 4 bytes are split over tokens, so ids[:1] is half a character
    assert gpt2.decode(ids[:1]) == "\ufffd"


def test_stream_decoder_emits_whole_characters(gpt2):
    text = "Robots 🤖 sprechen Grüße, 中文 and e\u0301 — done."
    ids = gpt2.encode(text)
    pieces = [gpt2.decode_bytes([i]) for i in ids]
    assert any(_not_utf8(p) for p in pieces)  # the test exercises characters split across tokens
    decoder = StreamDecoder(gpt2)
    out = [decoder.feed(i) for i in ids]
    assert "".join(out) + decoder.flush() == text
    assert not any("\ufffd" in o for o in out)
    assert decoder.feed(gpt2.encode("ok")) == "ok"  # a list of ids works too


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_char_tokenizer_round_trip_and_dict():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.chars == "\n dehlorw" and tok.vocab_size == 9 and tok.eot_id is None
    assert tok.encode("hold") == [4, 6, 5, 2]
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    d = tok.to_dict()
    assert d == {"kind": "char", "chars": "\n dehlorw"}
    again = tokenizer_from_dict(d)
    assert again.encode("low") == tok.encode("low")
    assert same_tokenizer(tok, d) and same_tokenizer(d, again.to_dict())


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"character 'z' \(U\+007A\) is not in the char tokenizer"):
        tok.encode("abz")


def test_same_tokenizer_and_lookup(gpt2):
    assert same_tokenizer("gpt2", gpt2.to_dict()) and same_tokenizer(gpt2, GPT2Tokenizer())
    assert not same_tokenizer(gpt2, CharTokenizer.from_text("abc"))
    assert not same_tokenizer(CharTokenizer.from_text("abc"), CharTokenizer.from_text("abd"))
    assert isinstance(get_tokenizer({"kind": "gpt2"}), GPT2Tokenizer)
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")
    with pytest.raises(UserError, match="built from a corpus"):
        get_tokenizer("char")
    with pytest.raises(UserError, match="unknown tokenizer"):
        tokenizer_from_dict({"kind": "sentencepiece"})


def test_rank_table_checksum(monkeypatch):
    monkeypatch.setattr(tokmod, "GPT2_RANKS_SHA256", "0" * 64)
    tokmod.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match="gpt2.tiktoken has sha256 306cd27f.*expected 0000.*reinstall"):
            tokmod.gpt2_encoding()
    finally:
        tokmod.gpt2_encoding.cache_clear()
