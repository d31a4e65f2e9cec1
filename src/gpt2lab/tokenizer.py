"""Tokenizers: GPT-2 byte-level BPE (offline), byte-level BPEs trained on a corpus, and a character
tokenizer, behind one small interface.

    tok = get_tokenizer("gpt2")
    ids = tok.encode("Hello, I'm a language model,")   # [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    tok.decode(ids)

The GPT-2 rank table ships with the package (`assets/gpt2.tiktoken`, 50,256 byte sequences, taken
from the MIT-licensed openai-whisper sdist), so no network is needed. It is checked against a pinned
sha256 when loaded; tiktoken does the encoding.

A trained BPE (`train_bpe`, `gpt2lab tokenizer train`) is a Hugging Face `tokenizers` tokenizer.json:
GPT-2's pre-tokenization and byte-level alphabet, <|endoftext|> and the reserved chat tokens as its
first ids. Its `to_dict()` holds the whole tokenizer.json, so data and checkpoints made with it
describe it completely.

Every tokenizer describes itself with `to_dict()` (JSON-able); datasets and checkpoints store that
dict, `tokenizer_from_dict` rebuilds the tokenizer and `same_tokenizer` detects a mismatch between
the data a model is trained on and the model.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpt2lab.errors import UserError
from gpt2lab.fileio import Tagged

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_RANKS_FILE = "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
CHAT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""Reserved in every trained BPE tokenizer, after <|endoftext|>, for the `special` chat template."""
TOKENIZER_SHAPE = Tagged("kind", {"gpt2": {}, "char": {"chars": str}, "bpe": {"vocab_size": int, "json": str}})
"""A tokenizer's `to_dict()` as files store it (dataset meta, shard headers, checkpoints, adapters)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of gpt2lab needs from a tokenizer."""

    name: str  # identity, e.g. "gpt2" or "char"
    vocab_size: int
    eot_id: int | None  # end-of-text id separating documents; None when the tokenizer has none

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def to_dict(self) -> dict: ...


def _read_gpt2_ranks() -> bytes:
    return resources.files("gpt2lab").joinpath("assets", GPT2_RANKS_FILE).read_bytes()


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The GPT-2 `tiktoken.Encoding`, built from the shipped rank table (cached; ~0.3 s the first time)."""
    import tiktoken

    raw = _read_gpt2_ranks()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise UserError(
            f"gpt2lab/assets/{GPT2_RANKS_FILE} has sha256 {digest}, expected {GPT2_RANKS_SHA256}; "
            "the package is damaged: reinstall gpt2lab"
        )
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer:
    """GPT-2 byte-level BPE: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT_ID

    def __init__(self) -> None:
        self._enc = gpt2_encoding()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; "<|endoftext|>" in the text is the special id only if `allow_special`."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` of each text, run by tiktoken on several threads."""
        if allow_special:
            return self._enc.encode_batch(list(texts), allowed_special="all")
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; a UTF-8 sequence cut by the end of `ids` becomes U+FFFD instead of an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}

    def __repr__(self) -> str:
        return "GPT2Tokenizer()"


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters of a corpus."""

    name = "char"
    eot_id = None

    def __init__(self, chars: str) -> None:
        if not chars:
            raise UserError("char tokenizer needs at least one character; the corpus is empty")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise UserError("char tokenizer 'chars' must be sorted distinct characters; rebuild it with from_text")
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is every character that occurs in `text`."""
        return cls("".join(sorted(set(text))))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of the characters of `text` (there are no special tokens, `allow_special` changes nothing)."""
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise UserError(
                f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary of "
                f"{self.vocab_size} characters; prepare the dataset from a corpus that contains it"
            ) from None

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = (EOT_TEXT, *CHAT_SPECIAL_TOKENS)
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (how byte-level BPE vocabularies
    spell bytes): printable Latin-1 bytes stand for themselves, the other 68 bytes are shifted to code
    points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# What `train_bpe` writes; a tokenizer.json that differs here would not encode as gpt2lab assumes
BYTE_LEVEL_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
BPE_MODEL_SETTINGS = {"type": "BPE", "dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "byte_fallback": False}


def _tokenizers():
    """The Hugging Face `tokenizers` package (an optional dependency of gpt2lab)."""
    try:
        import tokenizers
    except ImportError:
        raise UserError("trained BPE tokenizers need the tokenizers package: pip install gpt2lab[hf]") from None
    return tokenizers


class BPETokenizer:
    """A byte-level BPE trained by `train_bpe`, read from its tokenizer.json (Hugging Face `tokenizers`).

    Every byte sequence has ids (the 256 bytes are in the vocabulary), so `decode_bytes(encode(text))`
    is `text.encode()` for any text; <|endoftext|> is `eot_id`.

    Encoding runs on tiktoken (several times faster than `tokenizers`) when the merges are in the
    order of the ids they make, as `tokenizers`' trainer writes them (each merge makes a new token,
    id = 256 + specials + its rank): tiktoken's rule, merge the adjacent pair whose joined bytes have
    the lowest id, is then the merge list's rule. Otherwise `tokenizers` encodes."""

    name = "bpe"

    def __init__(self, json_text: str, source: str = "tokenizer.json") -> None:
        HFTokenizer = _tokenizers().Tokenizer

        try:
            self._hf = HFTokenizer.from_str(json_text)
            spec = json.loads(json_text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{source} is not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]}); "
                            "train one with `gpt2lab tokenizer train`") from None
        pre, model = spec.get("pre_tokenizer"), spec.get("model")
        if (spec.get("normalizer") is not None or not isinstance(pre, dict) or not isinstance(model, dict)
                or any(pre.get(k) != v for k, v in BYTE_LEVEL_PRE_TOKENIZER.items())
                or any(model.get(k) != v for k, v in BPE_MODEL_SETTINGS.items())):
            raise UserError(f"{source} is not a byte-level BPE with GPT-2's pre-tokenization and no normalizer; "
                            "train one with `gpt2lab tokenizer train`")
        self.json = json_text
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        eot = self._hf.token_to_id(EOT_TEXT)
        if eot is None:
            raise UserError(f"{source} has no {EOT_TEXT} token; train the tokenizer with `gpt2lab tokenizer train`")
        self.eot_id = eot
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self._added = {t.content: i for i, t in self._hf.get_added_tokens_decoder().items()}
        added_ids = set(self._added.values())
        table = []
        for i in range(self.vocab_size):
            token = self._hf.id_to_token(i)
            if token is None:
                raise UserError(f"{source}: token id {i} is missing (ids must run from 0 to {self.vocab_size - 1})")
            if i in added_ids:
                table.append(token.encode("utf-8"))
            elif all(c in to_byte for c in token):
                table.append(bytes(to_byte[c] for c in token))
            else:
                raise UserError(f"{source}: token {token!r} is not byte-level BPE; train the tokenizer with "
                                "`gpt2lab tokenizer train`")
        self._bytes = table
        self._enc = self._tiktoken_encoding(model)
        self._plain = None
        if self._enc is None:
            self._plain = HFTokenizer.from_str(json_text)
            self._plain.encode_special_tokens = True  # "<|endoftext|>" in ordinary text is text

    def _tiktoken_encoding(self, model: dict):
        """A tiktoken Encoding with the same ids, or None when the merges are not in id order."""
        import tiktoken

        merges = model.get("merges") or []
        vocab = model.get("vocab") or {}
        added = set(self._added.values())
        first = self.vocab_size - len(merges)  # ids below: the special tokens and the 256 bytes, nothing else
        if first != len(added) + 256 or any(i not in added and len(self._bytes[i]) != 1 for i in range(first)):
            return None
        for rank, merge in enumerate(merges):
            a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
            if vocab.get(a + b) != first + rank:
                return None
        ranks = {self._bytes[i]: i for i in range(self.vocab_size) if i not in added}
        if len(ranks) + len(added) != self.vocab_size:
            return None
        return tiktoken.Encoding(name=f"bpe-{self.vocab_size}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=dict(self._added), explicit_n_vocab=self.vocab_size)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """The tokenizer of a tokenizer.json file."""
        from gpt2lab.fileio import read_text

        return cls(read_text(path), source=str(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> BPETokenizer:
        """The tokenizer of a directory written by `gpt2lab tokenizer train` (its tokenizer.json)."""
        f = Path(path) / TOKENIZER_FILE
        if not f.is_file():
            raise UserError(f"{path} has no {TOKENIZER_FILE}; make one with `gpt2lab tokenizer train CORPUS --out {path}`")
        return cls.from_file(f)

    @functools.cached_property
    def sha256(self) -> str:
        """Short digest of the tokenizer.json text (how messages name the tokenizer)."""
        return hashlib.sha256(self.json.encode("utf-8")).hexdigest()[:12]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special token text (<|endoftext|>, <|user|>, ...) is the special id only if `allow_special`."""
        if self._enc is not None:
            return self._enc.encode(text, allowed_special="all") if allow_special else self._enc.encode_ordinary(text)
        tok = self._hf if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` of each text, on several threads."""
        if self._enc is not None:
            if allow_special:
                return self._enc.encode_batch(list(texts), allowed_special="all")
            return self._enc.encode_ordinary_batch(list(texts))
        tok = self._hf if allow_special else self._plain
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[int(i)] for i in ids)

    def token_bytes(self, i: int) -> bytes:
        """The bytes of token `i`."""
        return self._bytes[i]

    def to_dict(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "json": self.json}

    def byte_level_bpe(self) -> ByteLevelBPE:
        """The vocabulary (in id order) and merges of tokenizer.json, for the exports."""
        model = json.loads(self.json)["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges") or []]
        tokens = [self._hf.id_to_token(i) for i in range(self.vocab_size)]
        return ByteLevelBPE(tokens=tokens, merges=merges, special_ids=frozenset(self._added.values()))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, sha256={self.sha256})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE with `vocab_size` ids learnt from `texts` (GPT-2's pre-tokenization, no
    normalization): <|endoftext|>, the reserved chat tokens, the 256 bytes, then the merges.
    The same texts and vocab_size give the same tokenizer."""
    tokenizers = _tokenizers()
    HFTokenizer, decoders, models = tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models
    pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB} "
                        f"ids ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok.to_str())


def tokenizer_label(d: dict) -> str:
    """How messages name the tokenizer of a `to_dict()`: "gpt2", "char", "bpe 8192 (sha256 1a2b...)"."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "bpe" and isinstance(d.get("json"), str):
        return f"bpe {d.get('vocab_size')} (sha256 {hashlib.sha256(d['json'].encode('utf-8')).hexdigest()[:12]})"
    return str(kind)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()`."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise UserError("tokenizer dict of kind 'char' has no 'chars' string; the dataset meta is damaged")
        return CharTokenizer(chars)
    if kind == "bpe":
        if not isinstance(d.get("json"), str):
            raise UserError("tokenizer dict of kind 'bpe' has no 'json' string; the dataset meta is damaged")
        tok = _bpe_from_json(d["json"])
        if d.get("vocab_size") != tok.vocab_size:
            raise UserError(f"tokenizer dict of kind 'bpe' says vocab_size {d.get('vocab_size')} but its tokenizer.json "
                            f"has {tok.vocab_size} ids; the dataset or checkpoint that holds it is damaged")
        return tok
    raise UserError(f"unknown tokenizer kind {kind!r}: expected 'gpt2', 'char' or 'bpe'; the dataset or checkpoint that "
                    "names it comes from another program or a newer gpt2lab")


@functools.lru_cache(maxsize=4)
def _bpe_from_json(json_text: str) -> BPETokenizer:
    return BPETokenizer(json_text, source="the tokenizer.json stored in the dataset or checkpoint")


def get_tokenizer(name_or_dict: str | dict | Tokenizer) -> Tokenizer:
    """A tokenizer from a name ("gpt2"), a directory holding a trained BPE's tokenizer.json, a
    `to_dict()` dict, or a tokenizer (returned as is)."""
    if isinstance(name_or_dict, dict):
        return tokenizer_from_dict(name_or_dict)
    if isinstance(name_or_dict, str):
        if name_or_dict == "gpt2":
            return GPT2Tokenizer()
        if name_or_dict == "char":
            raise UserError(
                "the char tokenizer is built from a corpus: use CharTokenizer.from_text(text) "
                "or the 'tokenizer' dict stored in a prepared dataset's meta.json"
            )
        if Path(name_or_dict).is_dir() or name_or_dict.endswith(TOKENIZER_FILE):
            path = Path(name_or_dict)
            return BPETokenizer.from_dir(path) if path.is_dir() else BPETokenizer.from_file(path)
        raise UserError(f"unknown tokenizer '{name_or_dict}': use 'gpt2', 'char' or a directory made by "
                        "`gpt2lab tokenizer train`")
    if isinstance(name_or_dict, Tokenizer):
        return name_or_dict
    raise UserError(f"cannot make a tokenizer from {type(name_or_dict).__name__}")


def _identity(t: str | dict | Tokenizer) -> dict:
    if isinstance(t, str):
        return {"kind": t}
    if isinstance(t, dict):
        return t
    return t.to_dict()


def same_tokenizer(a: str | dict | Tokenizer, b: str | dict | Tokenizer) -> bool:
    """True when `a` and `b` map text to the same ids (compared by identity dict, nothing is loaded)."""
    return _identity(a) == _identity(b)


# --------------------------------------------------------------------------------------------------
# Byte-level BPE as vocabulary + merges (what HF's vocab.json/merges.txt and GGUF files hold)


@dataclass(frozen=True)
class ByteLevelBPE:
    """A byte-level BPE tokenizer written as text: each token's bytes in GPT-2's printable-byte
    alphabet (`bytes_to_unicode`), in id order, and the merges in rank order."""

    tokens: list[str]
    """The text of every id, 0 .. vocab_size - 1."""
    merges: list[tuple[str, str]]
    """The pairs merged, first merge first."""
    special_ids: frozenset[int]
    """Ids that are control tokens (end-of-text), never produced by merging bytes."""
    pre_tokenizer: str = "gpt-2"
    """llama.cpp's name of the regex that splits text before BPE ("gpt-2": `GPT2_PATTERN`)."""


def byte_level_bpe(tokenizer: Tokenizer) -> ByteLevelBPE | None:
    """The vocabulary and merges of a byte-level BPE tokenizer, or None for a tokenizer that is not
    one (the char tokenizer). A new byte-level BPE kind is one more branch here; every export
    (HF vocab.json/merges.txt, GGUF) then embeds it."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return _gpt2_bpe()
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.byte_level_bpe()
    return None


@functools.lru_cache(maxsize=1)
def _gpt2_bpe() -> ByteLevelBPE:
    """GPT-2's vocabulary and merges, derived from the rank table (~1 s, then cached)."""
    enc = gpt2_encoding()
    pieces = [enc.decode_single_token_bytes(i) for i in range(GPT2_EOT_ID)]
    ranks = {t: i for i, t in enumerate(pieces)}
    to_uni = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(to_uni[x] for x in b)

    merges = [tuple(map(show, _merge_parts(t, i, ranks))) for i, t in enumerate(pieces) if len(t) > 1]
    return ByteLevelBPE(tokens=[show(t) for t in pieces] + [EOT_TEXT], merges=merges,
                        special_ids=frozenset({GPT2_EOT_ID}))


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge created `token`: run BPE on its bytes with the merges ranked before it
    until two parts remain."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by earlier merges")
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


class StreamDecoder:
    """Incremental decoding for streaming generation: feed ids, get back only newly completed text.

    A character whose UTF-8 bytes are split across tokens is held back until its last byte arrives,
    so it comes out whole, never as U+FFFD halves.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """The text completed by `ids` (one id or several); may be "" while a character is incomplete."""
        # a single id may be a Python int, a numpy scalar or a 0-d tensor
        ids = list(ids) if isinstance(ids, Iterable) and getattr(ids, "ndim", 1) != 0 else [int(ids)]
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
