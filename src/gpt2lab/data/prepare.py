"""Corpora -> token shards + `meta.json`: what `gpt2lab prepare` does.

A prepared dataset is a directory:

    train_000000.bin ...   token shards (see `gpt2lab.data.shards`), packed to `shard_tokens` each
    val_000000.bin ...
    meta.json              format_version, tokenizer, vocab_size, splits {train, val: shards, tokens},
                           source, settings; written last, so a directory without it is unfinished

Sources:

- `default`: the Python language reference that ships with every Python (`pydoc_data.topics`:
  79 topics, ~465k characters of plain English with code examples; 103 distinct characters on
  Python 3.11), char tokenizer. It needs no network and no files, so the quickstart runs anywhere.
  We chose it over the standard library's `.py` sources because English prose with short code
  samples gives samples a reader recognises after a few CPU minutes, while a model of a few M
  parameters trained on raw source mostly learns indentation and `self.`. The text changes a
  little between Python versions (its sha256 is stored in meta.json). Char-level because with
  ~0.5M characters a 50,257-id BPE table would hold most of a small model's parameters and most
  of its CPU time (the output softmax), and would see each BPE token only a few times.
- `shakespeare` (GPT-2 BPE) / `shakespeare_char` (char): Tiny Shakespeare from char-rnn,
  sha256-checked and cached under `$GPT2LAB_CACHE` (default ~/.cache/gpt2lab), or `--input PATH`.
  Split as nanoGPT: first 90% of the characters train, last 10% val (char: 1,003,854 / 111,540).
- `openwebtext`, `fineweb-edu` (`--subset sample-10BT`), `hf:NAME`: Hugging Face datasets,
  streamed. Documents are tokenized by a pool of worker processes, each prefixed with
  <|endoftext|> as in build-nanogpt, and packed into shards (default 100M tokens). Val is the
  first shard for fineweb-edu (as build-nanogpt), an evenly spread fraction of documents otherwise
  (0.05% for openwebtext, as nanoGPT). A re-run resumes: `progress.json` records how many
  documents are in finished shards, plus the unfinished shards' tokens, and the stream is skipped
  to that point.
- a local path: a .txt file, a folder of .txt files (sorted, one document each), or a .jsonl /
  .parquet file with a `text` column (`text_field` to choose another). With many documents val is
  a fraction of the documents (same streaming code as above); with few, the last `val_fraction`
  of the token stream (of the characters, for a single text, as nanoGPT).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from gpt2lab.data.shards import open_shard, shard_is_complete, token_dtype, write_shard
from gpt2lab.download import cache_dir, download
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

FORMAT_VERSION = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.1
CHAR_DOC_SEPARATOR = "\n\n"  # the char tokenizer has no <|endoftext|>: documents end with a blank line
MIN_VAL_DOCUMENTS = 10  # below this many val documents, split the token stream instead
DOCS_PER_TASK = 256  # documents per worker task: large enough to amortise pickling

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Streamed Hugging Face corpora: dataset path, default subset, val rule, approximate GPT-2 tokens (for ETA).
HF_SOURCES = {
    "openwebtext": {"path": "Skylion007/openwebtext", "subset": None, "val_fraction": 0.0005,
                    "tokens": {None: 9_040_000_000}},
    "fineweb-edu": {"path": "HuggingFaceFW/fineweb-edu", "subset": "sample-10BT", "val_fraction": None,
                    "tokens": {"sample-10BT": 10_000_000_000, "sample-100BT": 100_000_000_000,
                               "sample-350BT": 350_000_000_000}},
}
SOURCES = ("default", "shakespeare", "shakespeare_char", *HF_SOURCES)


# ----------------------------------------------------------------------------- small helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_min_tokens(tokens: int, block_size: int, what: str) -> None:
    """UserError unless `tokens` (the size of `what`, e.g. "val split of DIR") fills one block plus its target."""
    if tokens < block_size + 1:
        raise UserError(
            f"{what} has {tokens} tokens, fewer than block_size+1={block_size + 1}; "
            "use a larger corpus or smaller block_size"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None


def shakespeare_text(input_path: str | os.PathLike | None = None, url: str | None = None) -> str:
    """Tiny Shakespeare: from `input_path`, else the cache, else downloaded (URL: `url`, $GPT2LAB_SHAKESPEARE_URL)."""
    if input_path is not None:
        path = Path(input_path)
        if not path.is_file():
            raise UserError(f"--input {path} does not exist; pass the path of Tiny Shakespeare's input.txt")
        return _read_text(path)
    url = url or os.environ.get("GPT2LAB_SHAKESPEARE_URL") or SHAKESPEARE_URL
    cached = cache_dir() / "tinyshakespeare.txt"
    if not (cached.is_file() and _sha256(cached.read_bytes()) == SHAKESPEARE_SHA256):
        download(url, cached, sha256=SHAKESPEARE_SHA256, fix="download it yourself and pass --input PATH")
    return _read_text(cached)


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


# ----------------------------------------------------------------------------- documents


def _count_jsonl_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def local_documents(path: str | os.PathLike, text_field: str = "text") -> tuple[Callable[[], Iterator[str]], int]:
    """The documents of a local corpus: (function returning a fresh iterator over them, their count).

    `path` is a .txt file (one document), a folder of .txt files (sorted by path, one document each),
    or a .jsonl / .parquet file with one document per record in column `text_field`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist; pass a .txt/.jsonl/.parquet file or a folder of .txt files")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(f"folder {path} has no .txt files; put the corpus in .txt files (UTF-8)")
        return (lambda: (_read_text(f) for f in files)), len(files)
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
        return (lambda: iter([_read_text(path)])), 1
    raise UserError(f"input {path}: unknown file type '{suffix}'; use .txt, .jsonl, .parquet or a folder of .txt files")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path} line {lineno} has no string field '{text_field}'; pass --text-field NAME")
            yield text


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


def hf_documents(path: str, *, name: str | None = None, split: str = "train", data_files=None,
                 text_field: str = "text") -> Iterator[str]:
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


# ----------------------------------------------------------------------------- output directory


def _settings_summary(config: dict) -> str:
    return json.dumps({k: config[k] for k in ("source", "settings")}, sort_keys=True)


def _tokenizer_label(d: dict) -> str:
    return d.get("kind", "?") if d.get("kind") != "char" else f"char ({len(d.get('chars', ''))} characters)"


def _remove_outputs(out_dir: Path) -> None:
    """Delete what a previous prepare wrote into `out_dir` (only our own file names)."""
    for p in out_dir.iterdir():
        ours = p.name in (META_FILE, PROGRESS_FILE) or (
            p.suffix == ".bin" and (p.name.startswith(("train_", "val_")) or ".partial" in p.name)
        ) or (p.name.startswith(".") and ".tmp" in p.name)  # left by a crash inside an atomic write
        if ours and p.is_file():
            p.unlink()


def _prepare_out_dir(out_dir: Path, config: dict, overwrite: bool) -> str:
    """Check `out_dir` against `config`; returns "done" (same dataset already there), "resume" or "fresh"."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a folder")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out_dir} is not writable ({parent} is read-only); choose another folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir} ({e.strerror}); choose another folder") from None
    if overwrite:
        _remove_outputs(out_dir)
        return "fresh"
    for fname, state in ((META_FILE, "done"), (PROGRESS_FILE, "resume")):
        path = out_dir / fname
        if not path.exists():
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{path} is unreadable; pass --overwrite to prepare {out_dir} again") from None
        if old.get("tokenizer") != config["tokenizer"]:
            raise UserError(
                f"{out_dir} already holds a dataset with the {_tokenizer_label(old.get('tokenizer') or {})} tokenizer, "
                f"not {_tokenizer_label(config['tokenizer'])}; pass --overwrite to replace it or choose another --out"
            )
        if _settings_summary(old) != _settings_summary(config):
            raise UserError(
                f"{out_dir} already holds a dataset from other settings ({_settings_summary(old)}); "
                "pass --overwrite to replace it or choose another --out"
            )
        return state
    _remove_outputs(out_dir)  # shards without meta or progress are leftovers of an interrupted run
    return "fresh"


def _write_meta(out_dir: Path, config: dict, splits: dict[str, dict]) -> dict:
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": config["tokenizer"],
        "vocab_size": get_tokenizer(config["tokenizer"]).vocab_size,
        "splits": {name: {"shards": s["shards"], "tokens": s["tokens"]} for name, s in splits.items()},
        "source": config["source"],
        "settings": config["settings"],
    }
    _write_json_atomic(out_dir / META_FILE, meta)  # last, so its presence means the dataset is complete
    return load_meta(out_dir)


def load_meta(data_dir: str | os.PathLike) -> dict:
    """`meta.json` of a prepared dataset, with `dir` and each split's shard `paths` added."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        if (data_dir / PROGRESS_FILE).exists():
            raise UserError(f"{data_dir} is a half-finished dataset; re-run the gpt2lab prepare command that made it")
        raise UserError(f"{data_dir} is not a prepared dataset (no {META_FILE}): run gpt2lab prepare SOURCE --out {data_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); re-run gpt2lab prepare with --overwrite") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {meta.get('format_version')!r}, this gpt2lab reads {FORMAT_VERSION}; "
            "re-run gpt2lab prepare with --overwrite"
        )
    for key in ("tokenizer", "vocab_size", "splits"):
        if key not in meta:
            raise UserError(f"{path} has no '{key}' field; re-run gpt2lab prepare with --overwrite")
    meta["dir"] = data_dir
    for name, split in meta["splits"].items():
        split["paths"] = [data_dir / s for s in split["shards"]]
        for p in split["paths"]:
            if not p.is_file():
                raise UserError(f"{path} lists {p.name} ({name} split) but it is missing; re-run gpt2lab prepare with --overwrite")
    return meta


# ----------------------------------------------------------------------------- writing shards


class _SplitWriter:
    """Packs one split's token stream into shards of exactly `shard_tokens` tokens (the last may be shorter)."""

    def __init__(self, out_dir: Path, split: str, tokenizer_dict: dict, vocab_size: int, shard_tokens: int) -> None:
        self.out_dir, self.split, self.tokenizer_dict = out_dir, split, tokenizer_dict
        self.shard_tokens = shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=token_dtype(vocab_size))
        self.fill = 0
        self.shards: list[str] = []
        self.tokens = 0  # in finished shards

    def add(self, tokens: np.ndarray) -> bool:
        """Append `tokens`; True if a shard was finished."""
        finished, pos = False, 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.buffer[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()
                finished = True
        return finished

    def flush(self) -> None:
        """Write the buffered tokens as the next shard (nothing if the buffer is empty)."""
        if self.fill == 0:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, self.buffer[:self.fill], self.tokenizer_dict)
        self.shards.append(name)
        self.tokens += self.fill
        self.fill = 0

    def save_partial(self, generation: int) -> str | None:
        """Save the unfinished shard's tokens for a resume; returns the file name (None if empty)."""
        if self.fill == 0:
            return None
        name = f".{self.split}.partial{generation}.bin"
        write_shard(self.out_dir / name, self.buffer[:self.fill], self.tokenizer_dict)
        return name

    def state(self, partial: str | None) -> dict:
        return {"shards": list(self.shards), "tokens": self.tokens, "partial": partial}

    def restore(self, state: dict) -> None:
        self.shards, self.tokens = list(state["shards"]), int(state["tokens"])
        if state.get("partial"):
            tokens, _ = open_shard(self.out_dir / state["partial"])
            self.buffer[:len(tokens)] = tokens
            self.fill = len(tokens)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dict: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer_dict)


def _init_pool_worker(tokenizer_dict: dict) -> None:
    # Ctrl-C is the parent's to handle: a worker killed mid-task would leave the pool hanging
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(tokenizer_dict)


def _tokenize_documents(docs: list[str]) -> list[np.ndarray]:
    """Token arrays of `docs` (runs in a worker): <|endoftext|> before each for BPE, a blank line after each for char."""
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    if tok.eot_id is None:
        return [np.array(ids, dtype=dtype) for ids in tok.encode_batch([d + CHAR_DOC_SEPARATOR for d in docs])]
    return [np.array([tok.eot_id, *ids], dtype=dtype) for ids in tok.encode_batch(docs)]


def _tokenized(batches: Iterator[list[str]], pool, workers: int) -> Iterator[list[np.ndarray]]:
    """Token arrays of each batch, in order; with a pool, at most 2*workers batches in flight.

    (`Pool.imap` would read the whole document stream into memory ahead of the workers.)
    """
    if pool is None:
        yield from map(_tokenize_documents, batches)
        return
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_tokenize_documents, (batch,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _val_documents_rule(val_fraction: float) -> Callable[[int], bool]:
    # document i is val when (i+1)*f passes an integer: floor(n*f) of the first n, evenly spread;
    # f = p/q exactly (0.1 -> 1/10), so float rounding cannot move a document between splits
    fraction = Fraction(str(val_fraction))
    p, q = fraction.numerator, fraction.denominator
    return lambda i: (i + 1) * p // q > i * p // q


def _progress(enabled: bool, total: int | None):
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f} tok/s")

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f} tokens"),
               TokensPerSecond(), TimeElapsedColumn()]
    if total:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=False)


def prepare_documents(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    source: dict,
    val_fraction: float | None = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 1,
    overwrite: bool = False,
    block_size: int | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize a stream of documents into train/val shards in `out_dir`; returns `load_meta(out_dir)`.

    Val is document i when `(i+1)*val_fraction` passes an integer (an even spread), or, with
    `val_fraction=None`, the first `shard_tokens` tokens of the stream (build-nanogpt's fineweb rule).
    An interrupted run resumes from `progress.json`: documents already in finished shards are skipped
    without being tokenized. `source` describes the documents; a different one refuses to resume.
    """
    out_dir = Path(out_dir)
    tok_dict = tokenizer.to_dict()
    val_rule = "first_shard" if val_fraction is None else {"documents": val_fraction}
    config = {"tokenizer": tok_dict, "source": source, "settings": {"val": val_rule, "shard_tokens": shard_tokens}}
    state = _prepare_out_dir(out_dir, config, overwrite)
    if state == "done":
        return load_meta(out_dir)

    writers = {s: _SplitWriter(out_dir, s, tok_dict, tokenizer.vocab_size, shard_tokens) for s in SPLITS}
    n_docs, stream_tokens, generation = 0, 0, 0
    if state == "resume":
        progress_state = json.loads((out_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
        n_docs, stream_tokens = progress_state["documents"], progress_state["stream_tokens"]
        generation = progress_state["generation"]
        for name, w in writers.items():
            split_state = progress_state["splits"][name]
            if not all(shard_is_complete(out_dir / s) for s in split_state["shards"]):
                raise UserError(f"{out_dir} has a damaged shard from an interrupted run; pass --overwrite to start again")
            w.restore(split_state)
    is_val = None if val_fraction is None else _val_documents_rule(val_fraction)

    def save_progress() -> None:
        nonlocal generation
        old = [f".{s}.partial{generation}.bin" for s in SPLITS]
        generation += 1
        splits = {name: w.state(w.save_partial(generation)) for name, w in writers.items()}
        _write_json_atomic(out_dir / PROGRESS_FILE, {**config, "documents": n_docs, "stream_tokens": stream_tokens,
                                                     "generation": generation, "splits": splits})
        for name in old:  # only now, so a crash above leaves the previous progress.json usable
            (out_dir / name).unlink(missing_ok=True)

    remaining = itertools.islice(iter(documents), n_docs, None)  # resume: skip documents already in shards
    batches = iter(lambda: list(itertools.islice(remaining, DOCS_PER_TASK)), [])
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(tok_dict,))
    else:
        _init_worker(tok_dict)
    try:
        with _progress(progress, total_tokens) as bar:
            task = bar.add_task(out_dir.name, total=total_tokens, completed=stream_tokens)
            for doc_tokens in _tokenized(batches, pool, workers):
                for tokens in doc_tokens:
                    if is_val is not None:
                        finished = writers["val" if is_val(n_docs) else "train"].add(tokens)
                    else:
                        head = max(0, min(len(tokens), shard_tokens - stream_tokens))
                        finished = writers["val"].add(tokens[:head])
                        finished = writers["train"].add(tokens[head:]) or finished
                    n_docs += 1
                    stream_tokens += len(tokens)
                    if finished:
                        save_progress()
                bar.update(task, completed=stream_tokens)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    separator_tokens = 1 if tokenizer.eot_id is not None else len(CHAR_DOC_SEPARATOR)
    if stream_tokens == n_docs * separator_tokens:
        raise UserError(f"the corpus for {out_dir} is empty: no documents with text ({source})")
    for name, w in writers.items():
        _check_split_size(name, w.tokens + w.fill, block_size, out_dir)
    for w in writers.values():
        w.flush()
    meta = _write_meta(out_dir, config, {name: w.state(None) for name, w in writers.items()})
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    for p in out_dir.glob(".*.partial*.bin"):
        p.unlink()
    return meta


def _check_split_size(name: str, tokens: int, block_size: int | None, out_dir: Path) -> None:
    # without a block size, a split still needs one (input, target) pair
    check_min_tokens(tokens, block_size if block_size else 1, f"{name} split of {out_dir}")


def prepare_tokens(
    splits: dict[str, np.ndarray],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    source: dict,
    settings: dict,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    block_size: int | None = None,
) -> dict:
    """Write already-tokenized splits ({"train": ids, "val": ids}) as shards + meta; returns `load_meta(out_dir)`."""
    out_dir = Path(out_dir)
    config = {"tokenizer": tokenizer.to_dict(), "source": source, "settings": {**settings, "shard_tokens": shard_tokens}}
    for name in SPLITS:  # before touching the folder, so a too-small corpus overwrites nothing
        _check_split_size(name, len(splits[name]), block_size, out_dir)
    if _prepare_out_dir(out_dir, config, overwrite) == "done":
        return load_meta(out_dir)
    written = {}
    for name in SPLITS:
        w = _SplitWriter(out_dir, name, config["tokenizer"], tokenizer.vocab_size, shard_tokens)
        for start in range(0, len(splits[name]), shard_tokens):
            w.add(splits[name][start:start + shard_tokens])
        w.flush()
        written[name] = w.state(None)
    return _write_meta(out_dir, config, written)


def _split_text(text: str, val_fraction: float) -> tuple[str, str]:
    n = int(len(text) * (1 - val_fraction))  # nanoGPT: train = data[:int(n*0.9)]
    return text[:n], text[n:]


def prepare_text(
    text: str,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | str,
    *,
    source: dict,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    block_size: int | None = None,
) -> dict:
    """One text -> dataset: the first 1-val_fraction of its characters train, the rest val (nanoGPT's split).

    `tokenizer` "char" builds the character vocabulary from the whole text.
    """
    if not text.strip():
        raise UserError(f"the corpus for {out_dir} is empty ({source}); give it some text")
    tok = CharTokenizer.from_text(text) if tokenizer == "char" else get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    train, val = _split_text(text, val_fraction)
    splits = {"train": np.array(tok.encode(train), dtype=dtype), "val": np.array(tok.encode(val), dtype=dtype)}
    return prepare_tokens(splits, out_dir, tok, source={**source, "sha256": _sha256(text.encode("utf-8"))},
                          settings={"val": {"characters": val_fraction}}, shard_tokens=shard_tokens,
                          overwrite=overwrite, block_size=block_size)


# ----------------------------------------------------------------------------- entry point


def _fingerprint(path: Path) -> dict:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {"files": len(files), "bytes": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def _default_workers() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def prepare(
    source: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    val_fraction: float | None = None,
    shard_tokens: int | None = None,
    workers: int | None = None,
    input_path: str | os.PathLike | None = None,
    subset: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    block_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare `source` (a name in SOURCES, "hf:NAME" or a local path) into `out_dir`; returns `load_meta(out_dir)`.

    Re-running with the same arguments returns the finished dataset at once (or resumes a streamed one).
    """
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    if shard_tokens is not None and shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} must be a positive number of tokens")
    if tokenizer not in (None, "gpt2", "char"):
        raise UserError(f"--tokenizer {tokenizer}: use gpt2 or char")
    if input_path is not None and source not in ("shakespeare", "shakespeare_char"):
        raise UserError("--input applies to shakespeare and shakespeare_char; for a local corpus pass its path as SOURCE")
    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    workers = workers or _default_workers()
    common = {"shard_tokens": shard_tokens, "overwrite": overwrite, "block_size": block_size}

    if source in ("default", "shakespeare", "shakespeare_char"):
        if source == "default":
            text = default_corpus_text()
            info = {"name": "default", "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
        else:
            text = shakespeare_text(input_path)
            info = {"name": source}
        tok = tokenizer or ("gpt2" if source == "shakespeare" else "char")
        return prepare_text(text, out_dir, tok, source=info, val_fraction=val_fraction or DEFAULT_VAL_FRACTION, **common)

    if source in HF_SOURCES or source.startswith("hf:"):
        if tokenizer == "char":
            raise UserError(f"{source} is streamed: the char tokenizer needs a local corpus; use --tokenizer gpt2")
        spec = HF_SOURCES.get(source, {"path": source[3:], "subset": None, "val_fraction": DEFAULT_VAL_FRACTION, "tokens": {}})
        subset = subset or spec["subset"]
        fraction = val_fraction if val_fraction is not None else spec["val_fraction"]
        docs = hf_documents(spec["path"], name=subset, text_field=text_field)
        info = {"name": source, "path": spec["path"], "subset": subset, "text_field": text_field}
        return prepare_documents(docs, out_dir, get_tokenizer("gpt2"), source=info, val_fraction=fraction,
                                 workers=workers, total_tokens=spec["tokens"].get(subset), progress=progress, **common)

    path = Path(source)
    if not path.exists():
        raise UserError(
            f"unknown source '{source}': not one of {', '.join(SOURCES)}, hf:NAME, or an existing file or folder"
        )
    open_docs, n_docs = local_documents(path, text_field)
    fraction = val_fraction or DEFAULT_VAL_FRACTION
    info = {"name": "local", "path": str(path.resolve()), "text_field": text_field, **_fingerprint(path)}
    if n_docs == 1:
        return prepare_text(next(open_docs()), out_dir, tokenizer or "gpt2", source=info, val_fraction=fraction, **common)
    if tokenizer == "char":
        chars = set(CHAR_DOC_SEPARATOR)
        for doc in open_docs():
            chars.update(doc)
        tok = CharTokenizer("".join(sorted(chars)))
    else:
        tok = get_tokenizer("gpt2")
    if n_docs * fraction >= MIN_VAL_DOCUMENTS:
        return prepare_documents(open_docs(), out_dir, tok, source=info, val_fraction=fraction, workers=workers,
                                 progress=progress, **common)
    # few documents: val is the end of the token stream, which needs the whole stream in memory
    _init_worker(tok.to_dict())
    stream = np.concatenate(_tokenize_documents(list(open_docs())))
    n_train = int(len(stream) * (1 - fraction))
    return prepare_tokens({"train": stream[:n_train], "val": stream[n_train:]}, out_dir, tok, source=info,
                          settings={"val": {"tokens": fraction}}, **common)
