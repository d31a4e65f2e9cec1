"""The corpora `gpt2lab prepare` reads: one `Source` entry each in `SOURCES`.

An entry names a source, opens it as a `Corpus` (a function returning a fresh iterator over its
documents, their count, what meta.json records about it), and carries its defaults (tokenizer, val
fraction, subset), which of prepare's source arguments it accepts, a size hint and the one-line
description shown by `gpt2lab prepare --help`. `gpt2lab.data.prepare.prepare` dispatches through
the table with no per-source code, so adding a source is one entry here (plus its open function).

Why the built-in entries are what they are (their defaults are in the entries, not here):

- `default` is the Python language reference that ships with every Python (`pydoc_data.topics`:
  79 topics, ~465k characters of English with code examples on Python 3.11), so the quickstart
  needs no network and no files. English prose with short code samples gives samples a reader
  recognises after a few CPU minutes, while a model of a few M parameters trained on raw `.py`
  source mostly learns indentation and `self.`. The text changes a little between Python
  versions (its sha256 is stored in meta.json). Char-level because with ~0.5M characters a
  50,257-id BPE table would hold most of a small model's parameters and most of its CPU time
  (the output softmax), and would see each BPE token only a few times.
- `shakespeare` / `shakespeare_char` are nanoGPT's: Tiny Shakespeare from char-rnn, cached under
  `$GPT2LAB_CACHE` (default ~/.cache/gpt2lab), split 90/10 by characters (char: 1,003,854 /
  111,540 tokens).
- `openwebtext` holds out 0.05% of the documents as nanoGPT does; `fineweb-edu` its first shard
  as build-nanogpt does.

Nothing heavy is imported at module level (pyarrow and datasets inside the functions that need
them), so `gpt2lab prepare --help` builds its text from this table instantly.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.download import cache_dir, download
from gpt2lab.errors import UserError
from gpt2lab.fileio import JSON_WHITESPACE, iter_jsonl, read_text, str_field

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SHARD_TOKENS = 100_000_000  # the pipeline's, kept here so `prepare --help` needs no numpy
DEFAULT_TEXT_FIELD = "text"

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class SourceArgs:
    """The source arguments of `prepare`, defaults filled in (an entry's `options` says which it reads)."""

    input: str | os.PathLike | None = None
    """--input: a local copy of a downloaded file."""
    subset: str | None = None
    """--subset: the dataset config of a Hugging Face source."""
    text_field: str = DEFAULT_TEXT_FIELD
    """--text-field: the record field holding the text."""


@dataclass(frozen=True)
class Corpus:
    """An opened source."""

    documents: Callable[[], Iterator[str]]
    """A fresh iterator over the documents at each call (prepare may read them twice)."""
    count: int | None
    """How many documents; None for a stream, whose length is known only at its end."""
    info: dict
    """meta.json's "source": the name and what identifies the data (path, subset, fingerprint)."""


@dataclass(frozen=True)
class Source:
    """One registry entry: how to open a source and its defaults."""

    name: str
    """SOURCE on the command line; for an entry with `matches`, a pattern such as "hf:NAME"."""
    description: str
    """One line for `gpt2lab prepare --help`."""
    open: Callable[[str, SourceArgs], Corpus]
    """(SOURCE as given, its arguments) -> Corpus; downloads or reads what it needs."""
    tokenizer: str = "gpt2"
    """Default --tokenizer ("gpt2" or "char"; char needs a corpus that is not streamed)."""
    val_fraction: float | None = DEFAULT_VAL_FRACTION
    """Default --val-fraction; None (streamed sources only) holds out the first shard instead."""
    options: tuple[str, ...] = ()
    """The `SourceArgs` fields it reads; giving another one is an error."""
    subset: str | None = None
    """Default --subset."""
    tokens: Mapping[str | None, int] = field(default_factory=dict)
    """Size hint: approximate tokens with the default tokenizer, per subset (for the ETA and --help)."""
    matches: Callable[[str], bool] | None = None
    """For a pattern entry: whether a SOURCE string is one of its kind."""


# ----------------------------------------------------------------------------- opening sources


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_text(text: str, info: dict) -> Corpus:
    return Corpus(lambda: iter([text]), 1, info)


def default_corpus_text() -> str:
    """The quickstart corpus: every topic of Python's own language reference, in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError(
            "this Python has no pydoc_data (some distributions strip it); "
            "prepare another corpus, e.g. gpt2lab prepare shakespeare_char"
        ) from None
    return "\n\n".join(topics[name].strip("\n") for name in sorted(topics)) + "\n"


def _open_default(spec: str, args: SourceArgs) -> Corpus:
    return _one_text(default_corpus_text(),
                     {"name": spec, "python": f"{sys.version_info.major}.{sys.version_info.minor}"})


def shakespeare_text(input_path: str | os.PathLike | None = None, url: str | None = None) -> str:
    """Tiny Shakespeare: from `input_path`, else the cache, else downloaded (URL: `url`, $GPT2LAB_SHAKESPEARE_URL)."""
    if input_path is not None:
        path = Path(input_path)
        if not path.is_file():
            raise UserError(f"--input {path} does not exist; pass the path of Tiny Shakespeare's input.txt")
        return read_text(path)
    url = url or os.environ.get("GPT2LAB_SHAKESPEARE_URL") or SHAKESPEARE_URL
    cached = cache_dir() / "tinyshakespeare.txt"
    if not (cached.is_file() and _sha256(cached.read_bytes()) == SHAKESPEARE_SHA256):
        download(url, cached, sha256=SHAKESPEARE_SHA256, fix="download it yourself and pass --input PATH")
    return read_text(cached)


def _open_shakespeare(spec: str, args: SourceArgs) -> Corpus:
    return _one_text(shakespeare_text(args.input), {"name": spec})


def hf_documents(path: str, *, name: str | None = None, split: str = "train", data_files=None,
                 text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """Stream the `text_field` of each record of a Hugging Face dataset (`datasets.load_dataset(..., streaming=True)`)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset {path} needs the 'datasets' package: pip install gpt2lab[data]") from None
    try:
        ds = datasets.load_dataset(path, name=name, split=split, data_files=data_files, streaming=True)
    except Exception as e:  # network, auth and naming errors all arrive here with many types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not open dataset {path} ({first_line}); check the name, --subset and your network") from None
    count = 0
    try:
        for record in ds:
            if text_field not in record:
                raise UserError(f"dataset {path} has no field '{text_field}' (fields: {', '.join(record)}); pass --text-field NAME")
            count += 1
            yield record[text_field] or ""
    except UserError:
        raise
    except Exception as e:  # a dropped connection mid-stream: the finished shards are kept
        raise UserError(f"reading dataset {path} failed after {count} documents ({e}); re-run the same command to resume") from None


def _hf_opener(dataset: str | None) -> Callable[[str, SourceArgs], Corpus]:
    """The open function of a Hugging Face source: `dataset`, or for None the NAME of "hf:NAME"."""
    def open_hf(spec: str, args: SourceArgs) -> Corpus:
        path = dataset or spec.removeprefix("hf:")
        return Corpus(lambda: hf_documents(path, name=args.subset, text_field=args.text_field), None,
                      {"name": spec, "path": path, "subset": args.subset, "text_field": args.text_field})

    return open_hf


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install gpt2lab[data]") from None
    return pq


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    pq = _import_pyarrow_parquet()
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield text or ""


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for line, record in iter_jsonl(path):
        yield str_field(record, text_field, path, line, fix="pass --text-field NAME")


def _count_jsonl_lines(path: Path) -> int:
    blank = JSON_WHITESPACE.encode()  # the lines iter_jsonl skips
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip(blank))


def _fingerprint(path: Path) -> dict:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {"files": len(files), "bytes": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def _local_documents(path: Path, text_field: str) -> tuple[Callable[[], Iterator[str]], int]:
    """(function returning a fresh iterator over the documents of a local corpus, their count)."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"folder {path} has no .txt files; put the corpus in .txt files (UTF-8)")
        for f in files:
            if f.is_symlink() and not f.exists():
                raise UserError(f"{f} in corpus folder {path} is a link to {os.readlink(f)}, which does not exist; "
                                "remove the link or restore its target")
            if not f.is_file():
                raise UserError(f"{f} in corpus folder {path} is not a file; rename it or move it out of the folder")
        return (lambda: (read_text(f) for f in files)), len(files)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return (lambda: _jsonl_documents(path, text_field)), _count_jsonl_lines(path)
    if suffix == ".parquet":
        pq = _import_pyarrow_parquet()
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path} is not a readable parquet file ({e})") from None
        if text_field not in meta.schema_arrow.names:
            raise UserError(
                f"{path} has no column '{text_field}' (columns: {', '.join(meta.schema_arrow.names)}); "
                "pass --text-field NAME"
            )
        return (lambda: _parquet_documents(path, text_field)), meta.metadata.num_rows
    if suffix in (".txt", ".text", ".md", ""):
        return (lambda: iter([read_text(path)])), 1
    raise UserError(f"input {path}: unknown file type '{suffix}'; use .txt, .jsonl, .parquet or a folder of .txt files")


def _open_local(spec: str, args: SourceArgs) -> Corpus:
    path = Path(spec)
    documents, count = _local_documents(path, args.text_field)
    info = {"name": "local", "path": str(path.resolve()), "text_field": args.text_field, **_fingerprint(path)}
    return Corpus(documents, count, info)


# ----------------------------------------------------------------------------- the registry

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("default", "Python's language reference (pydoc_data), offline: the quickstart corpus",
           _open_default, tokenizer="char", tokens={None: 465_000}),
    Source("shakespeare", "Tiny Shakespeare (char-rnn), downloaded and sha256-checked, or --input PATH",
           _open_shakespeare, options=("input",), tokens={None: 338_000}),
    Source("shakespeare_char", "Tiny Shakespeare at character level (nanoGPT's shakespeare_char)",
           _open_shakespeare, tokenizer="char", options=("input",), tokens={None: 1_115_394}),
    Source("openwebtext", "OpenWebText (Skylion007/openwebtext), streamed from Hugging Face",
           _hf_opener("Skylion007/openwebtext"), val_fraction=0.0005, options=("text_field",),
           tokens={None: 9_040_000_000}),
    Source("fineweb-edu", "FineWeb-Edu (HuggingFaceFW/fineweb-edu), streamed; --subset sample-100BT for more",
           _hf_opener("HuggingFaceFW/fineweb-edu"), val_fraction=None, options=("subset", "text_field"),
           subset="sample-10BT", tokens={"sample-10BT": 10_000_000_000, "sample-100BT": 100_000_000_000,
                                         "sample-350BT": 350_000_000_000}),
    Source("hf:NAME", "another Hugging Face dataset, streamed", _hf_opener(None),
           options=("subset", "text_field"), matches=lambda spec: spec.startswith("hf:")),
    Source("PATH", "a local .txt file, folder of .txt files (one document each), .jsonl or .parquet",
           _open_local, options=("text_field",), matches=lambda spec: Path(spec).exists()),
)}


def find_source(spec: str) -> Source:
    """The entry for a SOURCE string: an exact name, else the first pattern entry it matches."""
    exact = SOURCES.get(spec)
    if exact is not None and exact.matches is None:
        return exact
    for source in SOURCES.values():
        if source.matches is not None and source.matches(spec):
            return source
    raise UserError(f"unknown source '{spec}': use one of {', '.join(SOURCES)} (a PATH must exist); "
                    "see gpt2lab prepare --help")


def sources_taking(option: str) -> list[str]:
    """Names of the entries that accept a `SourceArgs` field (for help and error messages)."""
    return [s.name for s in SOURCES.values() if option in s.options]


def source_args(source: Source, *, input: str | os.PathLike | None, subset: str | None,
                text_field: str | None) -> SourceArgs:
    """The arguments given for `source` with its defaults filled in; one it does not accept is a UserError."""
    given = {"input": input, "subset": subset, "text_field": text_field}
    for option, value in given.items():
        if value is not None and option not in source.options:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} applies to {', '.join(sources_taking(option))}, not {source.name}; "
                            f"drop {flag}")
    return SourceArgs(input=input, subset=subset or source.subset, text_field=text_field or DEFAULT_TEXT_FIELD)
