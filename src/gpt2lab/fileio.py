"""Files on disk, below every format that uses them: one place for each way gpt2lab reads or writes.

    iter_jsonl / iter_lines   records of a JSONL or text file, one message format for bad lines
    read_text / str_field     a whole UTF-8 file; a checked string field of a record
    read_json / check_shape   a JSON file (or value) checked against its declared shape: every file
                              gpt2lab reads reports a problem as "FILE[:LINE]: FIELD: what; how to fix"
    read_versioned_json       a JSON config that names its format and version, and its shape
    inside                    a file name read from a file, refused if it leads outside its directory
    read_safetensors          weights, their header checked first (truncated, hostile, malformed)
    atomic_dir                a directory written under a temporary name and renamed into place
    atomic_file / write_atomic  the same for one file
    parse_json                JSON decoding, with nesting too deep for Python's decoder an ordinary error
    clean_state_dict          a state dict with wrapper prefixes stripped, ready to save

Imports torch only where a function needs it; the modules above (checkpoint, hf, lora, data,
evaluate) build their formats from these pieces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gpt2lab.console import format_bytes
from gpt2lab.errors import FileError, UserError

if TYPE_CHECKING:
    import torch

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# --------------------------------------------------------------------------------------------------
# Files and directories written atomically


def atomic_dir(final: Path):
    """Context manager yielding a temp directory next to `final`; on success it is renamed to `final`
    (replacing an older one of the same name); on error it is removed and `final` is untouched."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path) -> None:
        self.final = final

    def __enter__(self) -> Path:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-", dir=self.final.parent))
        except OSError as e:
            raise write_error(self.final, e) from None
        self.tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; a shared run dir must stay readable
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            written = _tree_bytes(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, Exception) and not isinstance(exc, UserError) and _is_write_failure(exc):
                raise write_error(self.final, exc, written) from None
            return
        _fsync_dir_contents(self.tmp)
        if self.final.exists():
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing (`mode` "w", text in UTF-8, or "wb") that replaces `path` only once
    the block ends without error: written beside `path` under a temporary name, synced and renamed
    into place, so a reader (or a crash) sees the old file or the new one, never a part. On error the
    temporary file is removed and `path` is untouched; a full disk or a refused write is the one-line
    UserError of `write_error`. The file's mode follows the umask, as a plain open() would make it."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path`, for writers that open files by name (`atomic_file`, the
    GGUF writer): once the block ends without error the file is synced and renamed to `path`, else
    removed and `path` is untouched; a full disk or a refused write is the one-line UserError of
    `write_error`. The file's mode follows the umask, as a plain open() would make it."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (write_error(path, e) if _is_write_failure(e) else e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it owner-only
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and _is_write_failure(e):
            raise write_error(path, e) from None
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (text in UTF-8, or bytes) atomically: see `atomic_file`."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `tensors` to `path` in the safetensors format, with the mode a plain open() would give
    (safetensors itself makes the file owner-only, whatever the umask)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


# torch.save and safetensors report a failed write in their own words, not as OSError(ENOSPC): a full
# disk under torch.save is "[enforce fail at inline_container.cc] unexpected pos N vs M" (its zip writer
# found the file shorter than what it wrote), or "file write failed".
_NO_SPACE = ("no space left", "storagefull", "file write failed", "unexpected pos", "errno 28", "os error 28")
_WRITE_FAILURES = (*_NO_SPACE, "permission denied", "read-only file system")


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
        return True
    return any(marker in str(exc).lower() for marker in _WRITE_FAILURES)


def write_error(path: Path, exc: BaseException, written: int = 0) -> UserError:
    """The one-line error for a write to `path` that failed: no space (with what is free and what the
    write had reached), no permission, or the OS's own words."""
    text = str(exc).lower()
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT or any(m in text for m in _NO_SPACE):
        where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(where).free
        need = f"; the write had reached {format_bytes(written)}" if written else ""
        return UserError(f"no space left on device writing {path} ({format_bytes(free)} free{need}); "
                         "free some space or choose another output directory")
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in text:
        return UserError(f"permission denied writing {path}; choose a directory you can write to")
    if code == errno.EROFS or "read-only file system" in text:
        return UserError(f"cannot write {path}: the file system is read-only; choose another output directory")
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160]
    return UserError(f"cannot write {path} ({reason})")


def _fsync_dir_contents(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------
# One writer per run directory

LOCK_FILE = ".gpt2lab.lock"
RESOLVED_CONFIG_FILE = "resolved_config.yaml"
"""The config a run used, written by gpt2lab into its run directory under a name of its own, so a
`config.yaml` of the user's there (`--config DIR/config.yaml --out DIR`) is never replaced."""


class RunLock:
    """An exclusive lock on a run directory, held for the whole run (`with RunLock(run_dir): ...`).

    `fcntl.flock` on <run_dir>/.gpt2lab.lock, which names the holder (pid, host, start time). The OS
    drops the lock when its holder exits, however it dies, so a lock left by a killed run never
    blocks `--resume`; a second live run into the same directory is refused with a one-line error.
    """

    def __init__(self, run_dir: str | os.PathLike, flag: str = "--out") -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.flag = flag
        self._fh = None

    def check_free(self) -> None:
        """Refuse now, creating nothing, if a live run holds the lock: its directory's other contents
        (checkpoints it is writing) are then not this run's concern."""
        if self.path.is_file():
            with open(self.path, "a+", encoding="utf-8") as fh:
                self._take(fh)  # released again when `fh` closes

    def _take(self, fh: Any) -> None:
        import fcntl

        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = " ".join(fh.read().split()) or "another process"
            fh.close()
            raise UserError(f"{self.path.parent} is in use by another gpt2lab run ({holder}); wait for it to "
                            f"finish, or give this run another directory with {self.flag} DIR") from None

    def __enter__(self) -> RunLock:
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until __exit__)
        self._take(fh)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the flock
            self._fh = None


@contextlib.contextmanager
def exclusive_dir(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the existing directory `path` for the block; if another process (or
    another open of it in this one) holds it, raise UserError(`busy`) at once.

    The lock is a `fcntl.flock` on the directory itself, so nothing is written into it (a dataset
    folder holds only its own files) and the OS drops it when its holder dies, however it dies.
    A file system that cannot lock directories is written unlocked, as before."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # removed since it was checked: by a holder that found nothing to write
        raise UserError(busy) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


# --------------------------------------------------------------------------------------------------
# Output targets: never replace what gpt2lab did not write

RUN_DIR_MARKERS = ("checkpoints", "metrics.jsonl", RESOLVED_CONFIG_FILE, LOCK_FILE)


def is_run_dir(path: Path) -> bool:
    """A gpt2lab run directory (checkpoints, metrics, resolved config) or a checkpoint inside one."""
    return any((path / m).exists() for m in RUN_DIR_MARKERS) or path.parent.name == "checkpoints"


def check_output_dir(path: str | os.PathLike, *, kind: str, is_same_kind: Callable[[Path], bool],
                     force: bool, flag: str = "--out") -> Path:
    """Check, before any work, that directory `path` may receive an export of `kind` ("HF export").

    A missing or empty directory is fine (its parent is created); an earlier export of the same kind
    (`is_same_kind`) is replaced only with --force; a file, a run directory, a checkpoint or any other
    non-empty directory is refused: gpt2lab never replaces what it did not write."""
    path = Path(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise UserError(f"{flag} {path} is a file; give a directory for the {kind}")
    if path.is_dir() and any(path.iterdir()):
        if is_run_dir(path):
            raise UserError(f"{flag} {path} is a gpt2lab run directory or checkpoint; write the {kind} to a "
                            "new directory")
        if not is_same_kind(path):
            raise UserError(f"{flag} {path} is not empty and is not an earlier {kind}; choose a new or empty "
                            "directory")
        if not force:
            raise UserError(f"{flag} {path} holds an earlier {kind}; add --force to replace it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(parent, e) from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"permission denied writing {path}; choose a directory you can write to")
    return path


def check_export_file(path: str | os.PathLike, *, kind: str, is_same_kind: Callable[[Path], bool],
                      force: bool, flag: str = "--out") -> Path:
    """Check, before any work, that file `path` may receive an export of `kind` ("GGUF file"): a new
    file is fine (its folder is created); an earlier export of the same kind (`is_same_kind`) is
    replaced only with --force; a directory or any other file is refused: gpt2lab never replaces what
    it did not write."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name for the {kind}")
    if path.exists() or path.is_symlink():
        if not is_same_kind(path):
            raise UserError(f"{flag} {path} exists and is not an earlier {kind} written by gpt2lab; choose a new "
                            "file name")
        if not force:
            raise UserError(f"{flag} {path} holds an earlier {kind}; add --force to replace it")
    return check_output_file(path, flag)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that file `path` can be written: not a directory, its folder creatable
    and writable (an existing file is replaced: it is the output the user named)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"permission denied writing {path}; choose a path you can write to")
    return path


# --------------------------------------------------------------------------------------------------
# JSON


def parse_json(text: str, start: int | None = None) -> Any:
    """`json.loads(text)`, or with `start` `JSONDecoder().raw_decode(text, start)` -> (value, end): the JSON
    decoding of every gpt2lab reader. Arrays or objects nested deeper than Python's decoder can follow (its
    recursion limit: a hostile file nests 100,000 levels) raise json.JSONDecodeError at the point where the
    nesting gets deep, like any other invalid JSON, instead of RecursionError."""
    try:
        return json.loads(text) if start is None else _DECODER.raw_decode(text, start)
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deep", text, _deep_point(text, start or 0)) from None


_DECODER = json.JSONDecoder()


def _deep_point(text: str, start: int, depth_limit: int = 100) -> int:
    """Where the nesting of the JSON in `text` from `start` first passes `depth_limit` levels."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > depth_limit:
                return i
        elif c in "]}":
            depth -= 1
    return start


# State dicts


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (torch.compile, DDP, FSDP, activation checkpointing) from every key,
    drop the tied `lm_head.weight` duplicate, and make tensors contiguous CPU copies for saving."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        if key == "lm_head.weight":
            continue
        out[key] = value.detach().to("cpu").contiguous()
    return out


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load clean weights into `model`, with a one-line error naming the first mismatch."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not match the model config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"{source}: weight {k} has shape {tuple(v.shape)} but the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False)


_SAFETENSORS_ENTRY = {"dtype": str, "shape": [int], "data_offsets": [int]}
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's length


def check_safetensors(f: Path, fix: str) -> None:
    """FileError naming `f` (with `fix`) if it is missing, not a safetensors file, its header is malformed,
    or it is shorter than its header says. Reads the header only."""
    import struct

    if not f.is_file():
        raise FileError(f, "missing", fix=fix)
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8)) if size >= 8 else (0,)
            raw = fh.read(n) if 0 < n <= min(size - 8, _MAX_HEADER) else None
    except OSError as e:
        raise FileError(f, f"cannot be read ({e.strerror or e})", fix=fix) from None
    if raw is None:
        if size - 8 < n <= _MAX_HEADER:  # a plausible header length past the end of the file
            raise FileError(f, f"truncated ({size:,} bytes, its header alone is {n + 8:,})", fix=fix)
        raise FileError(f, f"not a safetensors file (damaged or overwritten: header length {n:,})", fix=fix)
    try:
        header = parse_json(raw.decode("utf-8"))  # text: parse_json locates too-deep nesting in a str
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileError(f, "not a safetensors file (damaged or overwritten: its header is not JSON)", fix=fix) from None
    check_shape(header, dict, f, field="header", fix=fix)
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            check_shape(entry, Map(str), f, field="header.__metadata__", fix=fix)
            continue
        check_shape(entry, _SAFETENSORS_ENTRY, f, field=_key("header", name), fix=fix)
        offsets = entry["data_offsets"]
        if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise FileError(f, f"data_offsets {offsets} is not [begin, end]", field=_key("header", name), fix=fix)
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise FileError(f, f"truncated ({size:,} of {8 + n + end:,} bytes)", fix=fix)


def read_safetensors(f: Path, fix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `f` (no pickle involved), its header checked first by
    `check_safetensors`; whatever else the reader refuses is a FileError naming `f` too."""
    from safetensors.torch import load_file

    check_safetensors(f, fix)
    try:
        return load_file(str(f), device=str(device))
    except Exception as e:  # safetensors' own error for a corrupt body (dtype, shape and offsets disagree)
        raise FileError(f, f"cannot be read ({' '.join(str(e).split())[:120]})", fix=fix) from None


# --------------------------------------------------------------------------------------------------
# Line records: JSONL and text files, every problem reported as "FILE:LINE: what is wrong; how to fix it"

JSON_WHITESPACE = " \t\r\n"  # all JSON allows between values: a line of only these is blank
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
               type(None): "null"}


class LineError(FileError):
    """A problem at one line of a file: str() is "FILE:LINE: [FIELD: ]PROBLEM[; FIX]"."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str, *, field: str = "", fix: str = "") -> None:
        super().__init__(path, problem, line=line, field=field, fix=fix)


def _not_utf8(path: str | os.PathLike, line: int, offset: int) -> LineError:
    return LineError(path, line, f"not UTF-8 text (byte offset {offset}); convert the file to UTF-8")


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file, unchanged; unreadable or non-UTF-8 bytes raise UserError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw[:e.start].count(b"\n") + 1, e.start) from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a UTF-8 text file, each line without its "\n" and a trailing "\r".

    Splits on "\n" only, never `str.splitlines()`: that also cuts at U+2028, U+0085, \x0b, \x0c and
    others, which are valid inside a line (and inside a JSON string). The file is streamed; a BOM
    before the first line is dropped; bytes that are not UTF-8 raise LineError with their byte offset.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    offset = 0
    with f:
        for number, raw in enumerate(f, 1):  # a binary file iterates on b"\n" alone
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, number, offset + e.start) from None
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")  # editors on Windows write one; json.loads refuses it
            yield number, line.removesuffix("\n").removesuffix("\r")


def iter_jsonl(path: str | os.PathLike, invalid: Callable[[LineError], None] | None = None, *,
               shape: Any = dict, fix: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file.

    A line that is not JSON, not a JSON object, holds a lone surrogate (see `read_json`) or does not fit
    `shape` (an object shape, see `shape_problem`) raises LineError "FILE:LINE: [FIELD: ]problem[; fix]";
    with `invalid`, the error is passed to it instead and the line skipped (so a caller can report every
    bad line at once).
    """
    for number, line in iter_lines(path):
        if not line.strip(JSON_WHITESPACE):
            continue
        record, problem = _decode(line, shape)
        if problem is None:
            yield number, record
            continue
        _, field, what = problem
        error = LineError(path, number, what, field=field, fix=fix)
        if invalid is None:
            raise error
        invalid(error)


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type ("string", "number", "array", ...), for messages."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def str_field_problem(record: dict, name: str, optional: bool = False) -> str | None:
    """Why `record[name]` is not a string ("missing 'x'", "field 'x' must be a string, got number"), or None.

    With `optional`, an absent or null field is fine.
    """
    if name not in record:
        return None if optional else f"missing '{name}'"
    value = record[name]
    if isinstance(value, str) or (optional and value is None):
        return None
    return f"field '{name}' must be a string, got {json_type(value)}"


def str_field(record: dict, name: str, path: str | os.PathLike, line: int, fix: str = "") -> str:
    """`record[name]`, a string; anything else raises LineError "FILE:LINE: problem; fix"."""
    problem = str_field_problem(record, name)
    if problem is not None:
        raise LineError(path, line, problem, fix=fix)
    return record[name]


# --------------------------------------------------------------------------------------------------
# Shapes: what a JSON file must hold, declared next to its format and checked once where it is read.
# Every problem is one FileError: "FILE[:LINE]: FIELD: what is wrong; how to fix".
#
#     str, int, float, bool, None      a value of that JSON type (an integer is a number; true is neither)
#     object / dict / list             any value / any JSON object / any JSON array
#     {"a": shape, "b?": shape}        an object with key a, and b if present ("?"); other keys are allowed
#     [shape]                          an array of values of `shape`
#     Map(shape)                       an object of any keys whose values all have `shape`
#     {"x", "y"} (a set)               one of these values
#     (shape, shape, ...)              any one of these shapes
#     Tagged("kind", {"a": {...}})     an object whose "kind" says which object shape it has
#     a dataclass                      an object of its fields, typed by their annotations; others are errors


class Map:
    """Shape of a JSON object with any keys, whose values all have `shape`."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape


class Tagged:
    """Shape of a JSON object whose `tag` field names its kind; `shapes` maps each kind to its object shape."""

    def __init__(self, tag: str, shapes: dict[str, dict]) -> None:
        self.tag, self.shapes = tag, shapes


_EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
             dict: "a JSON object", list: "a JSON array"}


def show_json(value: Any) -> str:
    """A decoded JSON value for a message: `string "abc"`, `number 2.5`, `array`, `null`, ..."""
    if isinstance(value, (dict, list)):
        return json_type(value)
    text = json.dumps(value)  # escapes quotes, newlines and surrogates: the message stays one line
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{json_type(value)} {text}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else text


def _key(field: str, key: Any) -> str:
    key = str(key)
    shown = key if key.isprintable() and len(key) <= 60 else json.dumps(key[:60])
    return f"{field}.{shown}" if field else shown


def _expected(shape: Any) -> str:
    if shape is None:
        shape = type(None)
    if isinstance(shape, tuple):
        return " or ".join(_expected(s) for s in shape)
    if isinstance(shape, (set, frozenset)):
        return "one of " + ", ".join(json.dumps(v) for v in sorted(shape, key=str))
    if isinstance(shape, list):
        return "a JSON array"
    if isinstance(shape, (dict, Map, Tagged)) or dataclasses.is_dataclass(shape):
        return "a JSON object"
    return _EXPECTED.get(shape, "a value")


def shape_problem(value: Any, shape: Any, field: str = "") -> tuple[str, str] | None:
    """(FIELD, what is wrong) for the first part of decoded JSON `value` that does not fit `shape`
    (see the table above), or None when all of it fits. FIELD is a dotted path ("model.n_embd",
    "splits.train.shards[0]"); "" is the value itself."""
    if shape is object:
        return None
    if isinstance(shape, tuple):
        problems = [shape_problem(value, s, field) for s in shape]
        if any(p is None for p in problems):
            return None
        inner = [p for p in problems if p[0] != field]  # the value had the right type for one of them
        return inner[0] if len(inner) == 1 else (field, f"expected {_expected(shape)}, got {show_json(value)}")
    if isinstance(shape, (set, frozenset)):
        if any(type(value) is type(v) and value == v for v in shape):
            return None
        return field, f"expected {_expected(shape)}, got {show_json(value)}"
    if dataclasses.is_dataclass(shape):
        return _fields_problem(value, shape, field)
    if isinstance(shape, (dict, Map, Tagged)):
        if not isinstance(value, dict):
            return field, f"expected a JSON object, got {show_json(value)}"
        if isinstance(shape, Map):
            return next(filter(None, (shape_problem(v, shape.shape, _key(field, k)) for k, v in value.items())), None)
        if isinstance(shape, Tagged):
            tag_field, kinds = _key(field, shape.tag), set(shape.shapes)
            problem = shape_problem(value[shape.tag], kinds, tag_field) if shape.tag in value else (tag_field, "missing")
            return problem or shape_problem(value, shape.shapes[value[shape.tag]], field)
        for key, sub in shape.items():
            name = key.removesuffix("?")
            if name not in value:
                if name == key:
                    return _key(field, name), "missing"
                continue
            problem = shape_problem(value[name], sub, _key(field, name))
            if problem is not None:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return field, f"expected a JSON array, got {show_json(value)}"
        return next(filter(None, (shape_problem(v, shape[0], f"{field}[{i}]") for i, v in enumerate(value))), None)
    if shape is None:
        shape = type(None)
    if shape is float:
        fits = type(value) in (int, float)
    elif shape in (dict, list):
        fits = isinstance(value, shape)
    else:
        fits = type(value) is shape
    return None if fits else (field, f"expected {_expected(shape)}, got {show_json(value)}")


@functools.cache
def _dataclass_shape(cls: type) -> dict[str, Any]:
    """The object shape of a dataclass: each field's annotation as a shape; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name if required else f.name + "?"] = _hint_shape(hints[f.name])
    return out


def _hint_shape(hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return frozenset(args)
    if origin in (typing.Union, types.UnionType):
        return tuple(_hint_shape(a) for a in args)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        return [_hint_shape(args[0])] if args else list
    if origin is dict:
        return Map(_hint_shape(args[1])) if args else dict
    if hint in (str, int, float, bool, type(None)) or dataclasses.is_dataclass(hint):
        return hint
    return object


def _fields_problem(value: Any, cls: type, field: str) -> tuple[str, str] | None:
    import difflib

    if not isinstance(value, dict):
        return field, f"expected a JSON object, got {show_json(value)}"
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            return _key(field, key), "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
    return shape_problem(value, _dataclass_shape(cls), field)


def surrogate_problem(text: str) -> str | None:
    """What is wrong with a str that holds a lone surrogate ("\\udc80", half a character, which no UTF-8
    file or tokenizer can hold: only a JSON escape or Python's surrogateescape makes one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"\\u{ord(text[e.start]):04x} at character {e.start} is half of a UTF-16 surrogate pair, "
                "not a character; remove it or write the whole character")
    return None


def lone_surrogate(value: Any, text: str) -> tuple[str, str] | None:
    """(FIELD, problem) for the first string of `value` (decoded from JSON or YAML `text`) holding a lone
    surrogate. Only a "\\ud800"-style escape makes one: a text without such an escape is never walked."""
    if "\\ud" not in text and "\\uD" not in text and "\\U" not in text:  # YAML also has \U0000DC80
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        field, v = stack.pop()
        for s in (v, *(v if isinstance(v, dict) else ())):
            problem = surrogate_problem(s) if isinstance(s, str) else None
            if problem is not None:
                return field, problem
        if isinstance(v, dict):
            stack += [(_key(field, k), x) for k, x in reversed(v.items())]
        elif isinstance(v, list):
            stack += [(f"{field}[{i}]", x) for i, x in reversed(list(enumerate(v)))]
    return None


def _decode(text: str, shape: Any) -> tuple[Any, tuple[int | None, str, str] | None]:
    """(decoded JSON, None), or (None, (LINE within `text` or None, FIELD, problem)): not JSON, a lone
    surrogate, or not `shape`."""
    try:
        value = parse_json(text)
    except json.JSONDecodeError as e:
        return None, (e.lineno, "", f"invalid JSON at column {e.colno}: {e.msg}")
    problem = lone_surrogate(value, text) or shape_problem(value, shape)
    return value, None if problem is None else (None, *problem)


def check_shape(value: Any, shape: Any, path: str | os.PathLike, *, field: str = "", fix: str = "") -> Any:
    """`value` (decoded from file `path`, at `field`) if it fits `shape`; FileError otherwise."""
    problem = shape_problem(value, shape, field)
    if problem is not None:
        raise FileError(path, problem[1], field=problem[0], fix=fix)
    return value


def read_json(path: str | os.PathLike, shape: Any = object, *, fix: str = "") -> Any:
    """The decoded JSON of file `path`, checked against `shape`. Every problem is one FileError naming the
    file (and line or field) with `fix`: unreadable, not UTF-8, invalid JSON, a string holding a lone
    surrogate ("\\ud800": half a character, which no UTF-8 file or tokenizer can hold), a value that does
    not fit the shape."""
    value, problem = _decode(read_text(path).removeprefix("\ufeff"), shape)
    if problem is not None:
        line, field, what = problem
        raise FileError(path, what, line=line, field=field, fix=fix)
    return value


def read_versioned_json(file: Path, fmt: str, version: int, what: str, shape: Any = dict, fix: str = "") -> dict:
    """A JSON config that names its `format` and `version` (checkpoint and adapter configs), checked against
    `shape`; `what` says what the directory should be ("gpt2lab checkpoint", "LoRA adapter")."""
    if not file.is_file():
        raise UserError(f"{file.parent} is not a {what}: {file.name} is missing")
    config = read_json(file, dict, fix=fix)
    if config.get("format") != fmt:
        raise FileError(file, f"expected {json.dumps(fmt)}, got {show_json(config.get('format'))}", field="format",
                        fix=f"it is not a {what} config")
    check_shape(config.get("version", 0), int, file, field="version", fix=fix)
    if config.get("version", 0) > version:
        raise FileError(file, f"{what} version {config['version']}; this gpt2lab reads up to {version}",
                        field="version", fix="upgrade gpt2lab")
    return check_shape(config, shape, file, fix=fix)


@contextlib.contextmanager
def in_file(path: str | os.PathLike, fix: str = "") -> Iterator[None]:
    """Report a UserError raised inside the block (a config's own validation, e.g. `GPTConfig`) as a
    FileError of `path`, so the message names the file the values came from."""
    try:
        yield
    except FileError:
        raise
    except UserError as e:
        raise FileError(path, str(e), fix=fix) from None


def inside(base: Path, name: str, file: str | os.PathLike, field: str, fix: str = "") -> Path:
    """`base / name` for a file name read from `file` (at `field`); a name that could reach outside `base`
    (absolute, "..", a drive) is a FileError and is never opened. Links inside `base` are followed
    as they are (a Hugging Face cache links every file to its blob)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or ":" in name.split("/")[0]:
        raise FileError(file, f"{json.dumps(name)} is not a file name inside {base}; gpt2lab reads no file "
                        "outside a model or dataset directory", field=field, fix=fix)
    return base / name
