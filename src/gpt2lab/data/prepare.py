"""Corpora -> token shards + `meta.json`: what `gpt2lab prepare` does.

A prepared dataset is a directory:

    train_000000.bin ...   token shards (see `gpt2lab.data.shards`), packed to `shard_tokens` each
    val_000000.bin ...
    meta.json              format_version, tokenizer, vocab_size, splits {train, val: shards, tokens},
                           source, settings; written last, so a directory without it is unfinished

Sources (`gpt2lab.data.sources`) are registry entries; `prepare` opens one and picks the pipeline
from its corpus alone, with no per-source code:

- one document (a single text): the first 1-val_fraction of its characters train, the rest val
  (nanoGPT's split), `prepare_text`;
- a stream, or many documents: tokenized by a pool of worker processes, each document prefixed with
  <|endoftext|> as in build-nanogpt, and packed into shards (default 100M tokens); val is an evenly
  spread fraction of the documents, or the first shard (val_fraction None), `prepare_documents`.
  A re-run resumes: `progress.json` records how many documents are in finished shards, plus the
  unfinished shards' tokens, and the stream is skipped to that point;
- a few documents: val is the last val_fraction of the token stream.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import os
import re
import signal
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.console import ProgressDisplay
from gpt2lab.data.shards import open_shard, shard_is_complete, token_dtype, write_shard
from gpt2lab.data.sources import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, find_source, source_args
from gpt2lab.devices import check_fits
from gpt2lab.errors import FileError, UserError
from gpt2lab.fileio import Map, inside, read_json, write_atomic
from gpt2lab.tokenizer import TOKENIZER_SHAPE, CharTokenizer, Tokenizer, get_tokenizer, tokenizer_label

FORMAT_VERSION = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
CHAR_DOC_SEPARATOR = "\n\n"  # the char tokenizer has no <|endoftext|>: documents end with a blank line
MIN_VAL_DOCUMENTS = 10  # below this many val documents, split the token stream instead
DOCS_PER_TASK = 256  # documents per worker task: large enough to amortise pickling
META_SHAPE = {"format_version": int, "tokenizer": TOKENIZER_SHAPE, "vocab_size": int,
              "splits": Map({"shards": [str], "tokens": int}), "source?": object, "settings?": object}
"""What meta.json holds (see `fileio.shape_problem`)."""
_PROGRESS_SPLIT = {"shards": [str], "tokens": int, "partial": (str, None)}
PROGRESS_SHAPE = {"tokenizer": TOKENIZER_SHAPE, "source?": object, "settings?": object, "documents": int,
                  "stream_tokens": int, "generation": int, "splits": {s: _PROGRESS_SPLIT for s in SPLITS}}
"""What progress.json holds: the state an interrupted `prepare` resumes from."""


# ----------------------------------------------------------------------------- small helpers


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def check_min_tokens(tokens: int, block_size: int, what: str) -> None:
    """UserError unless `tokens` (the size of `what`, e.g. "val split of DIR") fills one block plus its target."""
    if tokens < block_size + 1:
        raise UserError(
            f"{what} has {tokens} tokens, fewer than block_size+1={block_size + 1}; "
            "use a larger corpus or smaller block_size"
        )


# ----------------------------------------------------------------------------- output directory


def _settings_summary(config: dict) -> str:
    return json.dumps({k: config.get(k) for k in ("source", "settings")}, sort_keys=True)


def _tokenizer_label(d: dict) -> str:
    return tokenizer_label(d) if d.get("kind") != "char" else f"char ({len(d.get('chars', ''))} characters)"


def _is_output(p: Path) -> bool:
    """True for a file name `prepare` writes (meta, progress, shards, temp files of an atomic write)."""
    return p.is_file() and (p.name in (META_FILE, PROGRESS_FILE) or (
        p.suffix == ".bin" and (p.name.startswith(("train_", "val_")) or ".partial" in p.name)
    ) or (p.name.startswith(".") and ".tmp" in p.name))


def _remove_outputs(out_dir: Path) -> None:
    """Delete what a previous prepare wrote into `out_dir` (only our own file names)."""
    for p in out_dir.iterdir():
        if _is_output(p):
            p.unlink()


def _one_writer(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Run `fn` (prepare_documents, prepare_tokens) holding an exclusive lock on its `out_dir`.

    Two prepares into one folder at once would each find it empty, write their shards over each
    other's and both report success; the second is refused instead. A folder this call created and
    left empty (a refused corpus, an empty one) is removed again, while the lock is held: a prepare
    refused because another one holds the folder leaves it to that one, even when it is still empty."""
    from gpt2lab.fileio import exclusive_dir

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs) -> dict:
        out_dir = Path(signature.bind(*args, **kwargs).arguments["out_dir"])
        created = _check_out_dir(out_dir)
        busy = (f"--out {out_dir} is being written by another gpt2lab prepare; wait for it to finish, "
                "or choose another --out")
        with exclusive_dir(out_dir, busy):
            try:
                return fn(*args, **kwargs)
            except BaseException:
                if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                    out_dir.rmdir()
                raise

    return locked


def _check_out_dir(out_dir: Path) -> bool:
    """Refuse an `out_dir` that is a file, a run directory, a folder of other files or not writable;
    create it; True if it was created now."""
    from gpt2lab.fileio import is_run_dir

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.is_dir():
        if is_run_dir(out_dir):
            raise UserError(f"--out {out_dir} is a training run directory; write the dataset to its own folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_output(p))
        if foreign:
            raise UserError(f"--out {out_dir} holds files that are not a gpt2lab dataset ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out_dir} is not writable ({parent} is read-only); choose another folder")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir} ({e.strerror}); choose another folder") from None
    return created


def _prepare_out_dir(out_dir: Path, config: dict, overwrite: bool) -> str:
    """Check `out_dir` (checked by `_check_out_dir`, and locked) against `config`; returns "done" (same
    dataset already there), "resume" or "fresh"."""
    if overwrite:
        _remove_outputs(out_dir)
        return "fresh"
    for fname, state in ((META_FILE, "done"), (PROGRESS_FILE, "resume")):
        path = out_dir / fname
        if not path.exists():
            continue
        old = read_json(path, META_SHAPE if fname == META_FILE else PROGRESS_SHAPE,
                        fix=f"pass --overwrite to prepare {out_dir} again")
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
    fix = "re-run gpt2lab prepare with --overwrite"
    meta = read_json(path, META_SHAPE, fix=fix)
    if meta["format_version"] != FORMAT_VERSION:
        raise FileError(path, f"{meta['format_version']}, this gpt2lab reads {FORMAT_VERSION}",
                        field="format_version", fix=fix)
    meta["dir"] = data_dir
    for name, split in meta["splits"].items():
        split["paths"] = []
        for i, shard in enumerate(split["shards"]):
            field = f"splits.{name}.shards[{i}]"
            split["paths"].append(inside(data_dir, shard, path, field, fix))
            if not split["paths"][-1].is_file():
                raise FileError(path, f"{shard} is missing from {data_dir}", field=field, fix=fix)
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


class _TokenizerWorkers:
    """Tokenizer processes, each with a pipe of its own: batches go to them in turn, so their token
    arrays come back in order.

    Not multiprocessing.Pool or ProcessPoolExecutor: their workers share one result pipe and its lock,
    and a worker killed while it writes there (a SIGTERM sent to the whole process group) leaves the
    parent waiting forever, or, when the parent dies first, the workers print BrokenPipeError
    tracebacks. Here a worker that dies closes only its own pipe, and one whose parent is gone leaves
    quietly."""

    def __init__(self, n: int, tokenizer_dict: dict) -> None:
        import multiprocessing

        self.pipes, self.procs = [], []
        self.sent = self.received = 0
        for _ in range(n):
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(target=_tokenizer_worker, args=(child, tokenizer_dict, os.getpid()),
                                           daemon=True)
            proc.start()
            child.close()  # the worker holds the only other end: its death is an end of file here
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pending(self) -> int:
        return self.sent - self.received

    def submit(self, docs: list[str]) -> None:
        i = self.sent % len(self.pipes)
        try:
            self.pipes[i].send(docs)
        except OSError:
            raise self._stopped(i) from None
        self.sent += 1

    def next_result(self) -> list[np.ndarray]:
        """The token arrays of the oldest batch submitted."""
        i = self.received % len(self.pipes)
        try:
            ok, value = self.pipes[i].recv()
        except (EOFError, OSError):
            raise self._stopped(i) from None
        self.received += 1
        if not ok:
            raise value
        return value

    def _stopped(self, i: int) -> UserError:
        self.procs[i].join(timeout=1)
        code = self.procs[i].exitcode
        names = {s.value: s.name for s in signal.Signals}
        how = f"killed by {names.get(-code, f'signal {-code}')}" if code and code < 0 else f"exit status {code}"
        return UserError(f"a tokenizer process of gpt2lab prepare stopped ({how}); run the same command again "
                         "to continue where it stopped")

    def close(self, finished: bool) -> None:
        """Stop the workers: idle ones are told to leave; after an error or a signal (`finished` False)
        they are killed at once, with the batches they hold (a pipe of their own: nothing else breaks)."""
        for pipe, proc in zip(self.pipes, self.procs):
            if finished:
                with contextlib.suppress(OSError):
                    pipe.send(None)
            else:
                proc.kill()
        for pipe, proc in zip(self.pipes, self.procs):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            pipe.close()


def _tokenizer_worker(conn: Any, tokenizer_dict: dict, parent_pid: int) -> None:
    """A worker of `_TokenizerWorkers`: (True, token arrays) or (False, exception) back for each batch."""
    # Ctrl-C is the parent's to handle; SIGTERM ends a worker at once and quietly (not through the
    # parent's handler, inherited by fork, which raises)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer_dict)
    try:
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return  # the parent is gone
            docs = conn.recv()
            if docs is None:
                return
            try:
                reply = (True, _tokenize_documents(docs))
            except Exception as e:
                reply = (False, e)
            conn.send(reply)
    except (EOFError, OSError):  # the parent closed its end or died: nothing to report to
        return


def _tokenize_documents(docs: list[str]) -> list[np.ndarray]:
    """Token arrays of `docs` (runs in a worker): <|endoftext|> before each for BPE, a blank line after each for char."""
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    if tok.eot_id is None:
        return [np.array(ids, dtype=dtype) for ids in tok.encode_batch([d + CHAR_DOC_SEPARATOR for d in docs])]
    return [np.array([tok.eot_id, *ids], dtype=dtype) for ids in tok.encode_batch(docs)]


def _tokenized(batches: Iterator[list[str]], pool: _TokenizerWorkers | None, workers: int
               ) -> Iterator[list[np.ndarray]]:
    """Token arrays of each batch, in order; with workers, at most 2*workers batches in flight (not the
    whole document stream read into memory ahead of them)."""
    if pool is None:
        yield from map(_tokenize_documents, batches)
        return
    for batch in batches:
        pool.submit(batch)
        if pool.pending >= 2 * workers:
            yield pool.next_result()
    while pool.pending:
        yield pool.next_result()


def _val_documents_rule(val_fraction: float) -> Callable[[int], bool]:
    # document i is val when (i+1)*f passes an integer: floor(n*f) of the first n, evenly spread;
    # f = p/q exactly (0.1 -> 1/10), so float rounding cannot move a document between splits
    fraction = Fraction(str(val_fraction))
    p, q = fraction.numerator, fraction.denominator
    return lambda i: (i + 1) * p // q > i * p // q


@_one_writer
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
        progress_file = out_dir / PROGRESS_FILE
        fix = f"pass --overwrite to prepare {out_dir} again"
        progress_state = read_json(progress_file, PROGRESS_SHAPE, fix=fix)
        for name, split in progress_state["splits"].items():
            for i, shard in enumerate([*split["shards"], *([split["partial"]] if split["partial"] else [])]):
                inside(out_dir, shard, progress_file, f"splits.{name}.shards[{i}]", fix)
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
    pool = _TokenizerWorkers(workers, tok_dict) if workers > 1 else None
    if pool is None:
        _init_worker(tok_dict)
    finished = False
    try:
        with ProgressDisplay("tokens", total=total_tokens, description=out_dir.name, completed=stream_tokens,
                             enabled=progress) as bar:
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
                bar.update(completed=stream_tokens)
        finished = True
    finally:
        if pool is not None:
            pool.close(finished)

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


@_one_writer
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


# A cut after a newline between two non-space characters is a pre-token boundary of GPT-2's regex
# (shared by trained BPEs) whether the text goes on or ends there, so pieces cut there encode to the
# ids of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
LONG_TEXT_PIECE = 1 << 20


def long_text_pieces(text: str, size: int = LONG_TEXT_PIECE) -> list[str]:
    """`text` cut into pieces of about `size` characters at safe cuts (see _SAFE_CUT)."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def encode_long(tok: Tokenizer, text: str, dtype: Any = None, size: int = LONG_TEXT_PIECE) -> np.ndarray:
    """The ids of one long text, its pieces encoded on all cores (`encode_batch`): the ids of `tok.encode(text)`."""
    arrays = [np.array(ids, dtype=dtype or token_dtype(tok.vocab_size)) for ids in tok.encode_batch(long_text_pieces(text, size))]
    return np.concatenate(arrays)


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
    progress: bool = True,
) -> dict:
    """One text -> dataset: the first 1-val_fraction of its characters train, the rest val (nanoGPT's split).

    `tokenizer` "char" builds the character vocabulary from the whole text. With `progress` and a
    terminal, a status line shows the size being tokenized while it runs.
    """
    if not text.strip():
        raise UserError(f"the corpus for {out_dir} is empty ({source}); give it some text")
    tok = CharTokenizer.from_text(text) if tokenizer == "char" else get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    train, val = _split_text(text, val_fraction)
    with ProgressDisplay("status", description=f"tokenizing {len(text.encode('utf-8')) / 1e6:,.1f} MB of text "
                         f"({len(text):,} characters)", enabled=progress):
        splits = {"train": encode_long(tok, train, dtype), "val": encode_long(tok, val, dtype)}
    return prepare_tokens(splits, out_dir, tok, source={**source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()},
                          settings={"val": {"characters": val_fraction}}, shard_tokens=shard_tokens,
                          overwrite=overwrite, block_size=block_size)


# ----------------------------------------------------------------------------- entry point


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
    text_field: str | None = None,
    overwrite: bool = False,
    block_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare `source` (an entry of `gpt2lab.data.sources.SOURCES`: a name, "hf:NAME" or a local path)
    into `out_dir`; returns `load_meta(out_dir)`. Unset arguments take the source's defaults.

    Re-running with the same arguments returns the finished dataset at once (or resumes a streamed one).
    """
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    if shard_tokens is not None and shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} must be a positive number of tokens")
    if shard_tokens is not None:  # a shard is gathered in memory: at least 2 bytes a token
        check_fits(2 * shard_tokens, "cpu", f"--shard-tokens {shard_tokens:,} (the buffer of one shard)",
                   "choose fewer tokens per shard")
    if tokenizer not in (None, "gpt2", "char"):
        get_tokenizer(tokenizer)  # a trained BPE's directory, checked before any work
    entry = find_source(source)
    args = source_args(entry, input=input_path, subset=subset, text_field=text_field)
    tokenizer = tokenizer or entry.tokenizer
    fraction = val_fraction if val_fraction is not None else entry.val_fraction
    workers = workers or _default_workers()
    common = {"shard_tokens": shard_tokens or DEFAULT_SHARD_TOKENS, "overwrite": overwrite, "block_size": block_size}
    corpus = entry.open(source, args)

    if corpus.count == 1:
        return prepare_text(next(corpus.documents()), out_dir, tokenizer, source=corpus.info,
                            val_fraction=fraction, progress=progress, **common)
    if corpus.count is None:  # a stream: one pass, so no char vocabulary can be built first
        if tokenizer == "char":
            raise UserError(f"{source} is streamed: the char tokenizer needs a local corpus; use --tokenizer gpt2")
        return prepare_documents(corpus.documents(), out_dir, get_tokenizer(tokenizer), source=corpus.info,
                                 val_fraction=fraction, workers=workers, total_tokens=entry.tokens.get(args.subset),
                                 progress=progress, **common)
    if tokenizer == "char":
        chars = set(CHAR_DOC_SEPARATOR)
        for doc in corpus.documents():
            chars.update(doc)
        tok = CharTokenizer("".join(sorted(chars)))
    else:
        tok = get_tokenizer(tokenizer)
    if fraction is None or corpus.count * fraction >= MIN_VAL_DOCUMENTS:
        return prepare_documents(corpus.documents(), out_dir, tok, source=corpus.info, val_fraction=fraction,
                                 workers=workers, progress=progress, **common)
    # few documents: val is the end of the token stream, which needs the whole stream in memory
    _init_worker(tok.to_dict())
    stream = np.concatenate(_tokenize_documents(list(corpus.documents())))
    n_train = int(len(stream) * (1 - fraction))
    return prepare_tokens({"train": stream[:n_train], "val": stream[n_train:]}, out_dir, tok, source=corpus.info,
                          settings={"val": {"tokens": fraction}}, **common)
