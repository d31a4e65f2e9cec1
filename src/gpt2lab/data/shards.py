"""Token shard files: a small self-describing header followed by the raw token ids.

Layout (little-endian):

    offset  size  field
    0       8     magic b"GPT2LABT"
    8       4     format version (uint32), currently 1
    12      4     dtype code (uint32): 1 = uint16, 2 = uint32 (vocabularies above 65,536 ids)
    16      4     header size in bytes (uint32): 1024, or the next multiple of 1024 for a long tokenizer
    20      4     tokenizer JSON length in bytes (uint32)
    24      8     token count (uint64)
    32      n     tokenizer identity: JSON of `Tokenizer.to_dict()`, UTF-8, then zero padding
    header  ...   token ids, `count * itemsize` bytes

The header names the tokenizer so a shard on its own says how to read it, and the token count lets
`open_shard` tell a complete file from one cut short by a crash or a full disk.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from gpt2lab.errors import UserError
from gpt2lab.fileio import atomic_file, check_shape, parse_json
from gpt2lab.tokenizer import TOKENIZER_SHAPE

MAGIC = b"GPT2LABT"
VERSION = 1
HEADER_ALIGN = 1024
_FIXED = struct.Struct("<8sIIIIQ")  # magic, version, dtype code, header size, json length, count
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


def vocab_size_of(tokenizer_dict: dict) -> int:
    """Number of ids of the tokenizer described by `tokenizer_dict`, without building it."""
    from gpt2lab.tokenizer import GPT2_VOCAB_SIZE

    if tokenizer_dict.get("kind") == "char":
        return len(tokenizer_dict["chars"])
    if tokenizer_dict.get("kind") == "bpe":
        return tokenizer_dict["vocab_size"]
    if tokenizer_dict.get("kind") == "gpt2":
        return GPT2_VOCAB_SIZE
    raise UserError(f"unknown tokenizer {tokenizer_dict!r} in shard header: expected kind 'gpt2', 'char' or 'bpe'")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id of a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return DTYPES[1] if vocab_size <= 2**16 else DTYPES[2]


def _encode_header(count: int, dtype: np.dtype, tokenizer_dict: dict) -> bytes:
    code = {v: k for k, v in DTYPES.items()}[dtype]
    tok_json = json.dumps(tokenizer_dict, ensure_ascii=False, sort_keys=True).encode("utf-8")
    used = _FIXED.size + len(tok_json)
    size = -(-used // HEADER_ALIGN) * HEADER_ALIGN  # round up so the tokens stay aligned for memmap
    fixed = _FIXED.pack(MAGIC, VERSION, code, size, len(tok_json), count)
    return fixed + tok_json + b"\0" * (size - used)


def write_shard(path: str | os.PathLike, tokens, tokenizer_dict: dict) -> Path:
    """Write `tokens` (a 1-D array or list of ids) to a shard at `path`, atomically.

    The file appears complete or not at all: it is written next to `path` and renamed into place.
    """
    path = Path(path)
    dtype = token_dtype(vocab_size_of(tokenizer_dict))
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size_of(tokenizer_dict)):
        raise ValueError(f"token ids out of range [0, {vocab_size_of(tokenizer_dict)}) for {path}")
    arr = arr.astype(dtype, copy=False)
    with atomic_file(path, "wb") as f:
        f.write(_encode_header(arr.size, dtype, tokenizer_dict))
        f.write(arr.tobytes())
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The header of the shard at `path` as a dict; UserError if the file is not a complete shard.

    Keys: version, dtype (numpy dtype), tokens (count), tokenizer (dict), header_bytes.
    """
    path = Path(path)
    hint = "re-run gpt2lab prepare"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            fixed = f.read(_FIXED.size)
            if len(fixed) < _FIXED.size:
                raise UserError(f"{path} is truncated: {size} bytes is shorter than a shard header; {hint}")
            magic, version, code, header_bytes, json_len, count = _FIXED.unpack(fixed)
            if magic != MAGIC:
                raise UserError(f"{path} is not a gpt2lab token shard (bad magic bytes {magic!r}); {hint}")
            if version != VERSION:
                raise UserError(
                    f"{path} has shard format version {version}, this gpt2lab reads version {VERSION}; "
                    f"{hint} with this version"
                )
            if code not in DTYPES or header_bytes < _FIXED.size + json_len:
                raise UserError(f"{path} has a damaged header (dtype code {code}); {hint}")
            tok_json = f.read(json_len)
    except FileNotFoundError:
        raise UserError(f"shard {path} does not exist; {hint}") from None
    try:
        tokenizer = parse_json(tok_json.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} has a damaged header (tokenizer JSON unreadable); {hint}") from None
    check_shape(tokenizer, TOKENIZER_SHAPE, path, field="header.tokenizer", fix=hint)
    dtype = DTYPES[code]
    held = (size - header_bytes) // dtype.itemsize if size >= header_bytes else 0
    if size != header_bytes + count * dtype.itemsize:
        raise UserError(f"{path} is truncated: header says {count} tokens but file holds {held}; {hint}")
    return {"version": version, "dtype": dtype, "tokens": count, "tokenizer": tokenizer, "header_bytes": header_bytes}


def open_shard(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Memory-map the tokens of the shard at `path`: (read-only 1-D array of ids, header dict)."""
    header = read_header(path)
    if header["tokens"] == 0:
        return np.zeros(0, dtype=header["dtype"]), header
    tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=header["header_bytes"], shape=(header["tokens"],))
    return tokens, header


def shard_is_complete(path: str | os.PathLike, tokens: int | None = None) -> bool:
    """True if `path` is a valid, complete shard (holding exactly `tokens` ids, when given)."""
    try:
        header = read_header(path)
    except UserError:
        return False
    return tokens is None or header["tokens"] == tokens
