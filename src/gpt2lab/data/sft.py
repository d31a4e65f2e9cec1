"""Instruction records -> token rows with the prompt masked out of the loss.

Records come from a JSON array or a JSONL file (told apart by content, not by extension):

    alpaca  {"instruction": str, "input": str (optional), "output": str}
    chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    custom  any fields, rendered by a template string such as "Q: {instruction}\\nA: {output}"

A record renders to segments (text, is_response). Each segment is tokenized on its own (adjacent
segments of the same kind are joined first) and the token lists are concatenated, so the
prompt/response boundary is exact; every response is followed by `<|endoftext|>`. The labels are
the ids with -100 on every prompt token (when `mask_prompt`) and on padding; every response token
and each closing `<|endoftext|>` is counted. Inference renders prompts with the same functions
(`render_prompt`, `encode_chat_prompt`), so what `chat` sends the model matches what it was trained on.

Batches follow the loader convention of docs/design.md: `get_batch(step)` is this rank's contiguous
share of the global batch of that step, a pure function of (seed, step). Epochs are shuffled by a
permutation seeded with (seed, epoch); rows are right-padded to the longest row of the batch. With
`packing`, whole examples are laid end to end in rows of block_size + 1 tokens (an example never
straddles two rows); attention then crosses example boundaries inside a row, as in common practice:
the `<|endoftext|>` between them is the only separator (positions are not reset).

The settings are `SFTConfig` (the `data.sft` section of a run config, defined here beside its only
consumer). A bad record is reported as "FILE:LINE: problem; fix", the format of `gpt2lab.fileio`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import string
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt2lab.config import SFTConfig, Truncation
from gpt2lab.console import say
from gpt2lab.download import cache_dir, download
from gpt2lab.errors import UserError
from gpt2lab.fileio import (
    LineError,
    iter_jsonl,
    json_type,
    lone_surrogate,
    parse_json,
    read_text,
    show_json,
    str_field_problem,
)

if TYPE_CHECKING:  # torch is imported where batches are built, so config.py can import SFTConfig cheaply
    import torch

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
CHAT_TURN_END = "\n\n"  # after system and user turns; an assistant turn ends with <|endoftext|>
BUILTIN_TEMPLATES = ("alpaca", "chat")
# Text that starts a new turn: a model that forgets to emit <|endoftext|> is cut there (chat, serve).
TURN_STARTS = {"alpaca": ["### Instruction:"], "chat": ["### User:"]}

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_FILE = "alpaca_data.json"

Segment = tuple[str, bool]  # (text, is_response)
SKIP_HINT = "pass --data.sft.skip_invalid true to skip invalid records"


# --------------------------------------------------------------------------------------------------
# Templates


def _template_fields(template: str) -> list[str]:
    """Placeholder names of a custom template, in order; it must contain `{output}`."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise UserError(f"data.sft.template {template!r} is not a valid format string: {e}") from None
    names = [name for name, _, _ in parsed]
    for name, spec, conversion in parsed:
        if spec or conversion:  # "{instruction:d}" fails on text, "{instruction:>99999999}" fills the memory
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(f"data.sft.template {template!r}: {shown} has a format spec or conversion; "
                            f"placeholders are plain field names like {{{name}}}")
    if "{output}" not in template:
        raise UserError(
            f"data.sft.template {template!r} has no {{output}} placeholder; use 'alpaca', 'chat' or a string "
            "like '### Q: {instruction}\\n### A: {output}' (the prompt is everything before {output})"
        )
    if any(not name.isidentifier() for name in names):
        raise UserError(f"data.sft.template {template!r}: placeholders must be plain field names like {{instruction}}")
    return names


def check_template(template: str) -> None:
    """Raise UserError unless `template` is 'alpaca', 'chat' or a valid custom template string."""
    if template not in BUILTIN_TEMPLATES:
        _template_fields(template)


def render_prompt(instruction: str, input: str | None = None, template: str = "alpaca") -> str:
    """The text a model is prompted with for one instruction (the response follows it).

    alpaca: the Stanford Alpaca prompt (with the "### Input:" block only when `input` is non-empty);
    chat: a single user turn (the input, if any, on the lines after the instruction) then the
    assistant header; custom: the template up to its `{output}` placeholder.
    """
    if template == "alpaca":
        if input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT.format(instruction=instruction)
    if template == "chat":
        user = f"{instruction}\n\n{input}" if input else instruction
        return CHAT_HEADERS["user"] + user + CHAT_TURN_END + CHAT_HEADERS["assistant"]
    _template_fields(template)
    prompt_part = template[: template.index("{output}")]
    return string.Formatter().vformat(prompt_part, (), _DefaultDict(instruction=instruction, input=input or ""))


class _DefaultDict(dict):
    """Format mapping whose missing optional fields render as empty strings."""

    def __missing__(self, key: str) -> str:
        return ""


def render_segments(record: dict, template: str) -> list[Segment]:
    """A validated record as (text, is_response) segments; each response is later followed by EOT."""
    if template == "alpaca":
        return [(render_prompt(record["instruction"], record.get("input"), "alpaca"), False),
                (record["output"], True)]
    if template == "chat":
        return _chat_segments(record["messages"])
    fields = _DefaultDict({k: v for k, v in record.items() if isinstance(v, str)})
    cut = template.index("{output}")
    fmt = string.Formatter()
    return [(fmt.vformat(template[:cut], (), fields), False), (fmt.vformat(template[cut:], (), fields), True)]


def _chat_segments(messages: Sequence[dict]) -> list[Segment]:
    segments: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [(CHAT_HEADERS["assistant"], False), (m["content"], True)]
        else:
            segments.append((CHAT_HEADERS[m["role"]] + m["content"] + CHAT_TURN_END, False))
    return segments


def encode_segments(segments: Sequence[Segment], tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of the segments and, per id, whether it is counted in the loss.

    Adjacent segments of the same kind are joined and tokenized together; each response segment is
    followed by the tokenizer's EOT id (counted). With `mask_prompt` False every id is counted.
    """
    ids: list[int] = []
    counted: list[bool] = []
    for text, is_response in _merge_segments(segments):
        piece = tokenizer.encode(text)
        if is_response:
            piece.append(tokenizer.eot_id)
        ids += piece
        counted += [is_response or not mask_prompt] * len(piece)
    return ids, counted


def _merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for text, is_response in segments:
        if merged and merged[-1][1] == is_response and not is_response:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, is_response))
    return merged


def encode_chat_prompt(turns: Sequence[tuple[str, str]], message: str, tokenizer, template: str = "alpaca",
                       max_tokens: int | None = None) -> list[int]:
    """Prompt ids for `message` after the previous (user, assistant) `turns`, oldest first.

    Earlier turns are rendered exactly as training examples (the answer followed by EOT), so a
    model finetuned on packed or multi-turn data sees the same format. The oldest turns are
    dropped until the prompt fits in `max_tokens`; the new message alone is cut from the left.
    """
    check_template(template)
    turns = list(turns)
    while True:
        if template == "chat":
            messages = [m for u, a in turns for m in ({"role": "user", "content": u},
                                                      {"role": "assistant", "content": a})]
            segments = _chat_segments(messages) + [(render_prompt(message, None, "chat"), False)]
        else:
            segments = [seg for u, a in turns for seg in ((render_prompt(u, None, template), False), (a, True))]
            segments.append((render_prompt(message, None, template), False))
        ids, _ = encode_segments(segments, tokenizer)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        if not turns:
            return ids[-max_tokens:]
        turns.pop(0)


# --------------------------------------------------------------------------------------------------
# Reading and validating records


@dataclass
class Record:
    """One record as read from a file, with where it came from (for error messages)."""

    line: int
    index: int | None  # position in a JSON array; None for a JSONL line
    data: Any

    @property
    def label(self) -> str:
        """What a message says after FILE:LINE: "record 17: " in a JSON array, nothing for JSONL."""
        return "" if self.index is None else f"record {self.index}: "


def read_records(path: str | Path) -> list[Record]:
    """Parse a JSON array or JSONL file into records. A JSON syntax error in an array, an empty
    file or a file that is neither format raises UserError; a bad JSONL line becomes a Record
    whose data is a `_ParseError`, so it can be reported or skipped with the other invalid records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data file {path} does not exist")
    text = read_text(path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise UserError(f"{path} is empty; expected a JSON array of records or JSONL (one record per line)")
    if stripped[0] == "[":
        return _read_json_array(path, text)
    if stripped[0] == "{":
        return _read_jsonl(path)
    line = text[: len(text) - len(stripped)].count("\n") + 1
    raise LineError(
        path, line, f"neither a JSON array nor JSONL (starts with {stripped[0]!r}); expected "
        '[{"instruction": ..., "output": ...}, ...] or one {...} record per line'
    )


class _ParseError(str):
    """A record unusable as read: not JSON, not a JSON object, a lone surrogate (the message says why)."""


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []

    def invalid(error: LineError) -> None:  # kept in line order, to be reported or skipped with the rest
        records.append(Record(error.line, None, _ParseError(f"{error.field}: {error.problem}" if error.field
                                                            else error.problem)))

    for line, data in iter_jsonl(path, invalid):
        records.append(Record(line, None, data))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    """Decode element by element so every record knows its line."""
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    ws = " \t\r\n\ufeff"
    pos = text.index("[") + 1
    records: list[Record] = []
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos >= len(text):
            raise LineError(path, line_of(pos), "invalid JSON: the array is not closed with ']'")
        if text[pos] == "]" and (not records or not expect_value):
            break
        if not expect_value:
            if text[pos] != ",":
                raise LineError(path, line_of(pos), f"invalid JSON: expected ',' or ']' after record {len(records) - 1}")
            pos += 1
            expect_value = True
            continue
        try:
            data, end = parse_json(text, pos)
        except json.JSONDecodeError as e:
            raise LineError(path, e.lineno, f"record {len(records)}: invalid JSON at column {e.colno}: {e.msg}") from None
        surrogate = lone_surrogate(data, text[pos:end])
        if surrogate is not None:  # reported (or skipped) with the other invalid records
            data = _ParseError(f"{surrogate[0]}: {surrogate[1]}" if surrogate[0] else surrogate[1])
        records.append(Record(line_of(pos), len(records), data))
        pos, expect_value = end, False
    rest = text[pos + 1:].strip()
    if rest:
        raise LineError(path, line_of(pos + 1 + text[pos + 1:].index(rest[0])), "unexpected text after the closing ']'")
    return records


def record_problem(data: Any, template: str) -> str | None:
    """Why `data` is not a valid record for `template` (a short phrase naming the field), or None."""
    if isinstance(data, _ParseError):
        return str(data)
    if not isinstance(data, dict):
        return f"expected a JSON object, got {json_type(data)}"
    if template == "chat":
        return _messages_problem(data)
    if template == "alpaca":
        if "messages" in data and "instruction" not in data:
            return "has 'messages' but no 'instruction': chat records need data.sft.template=chat"
        required: Sequence[str] = ("instruction", "output")
    else:
        required = tuple(dict.fromkeys(n for n in _template_fields(template) if n != "input"))
    problems = [str_field_problem(data, name) for name in required] + [str_field_problem(data, "input", optional=True)]
    return next((p for p in problems if p is not None), None)


def _messages_problem(data: dict) -> str | None:
    messages = data.get("messages")
    if "messages" not in data:
        hint = ": Alpaca records need data.sft.template=alpaca" if "instruction" in data else ""
        return f"missing 'messages'{hint}"
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"field 'messages[{i}]' must be an object with 'role' and 'content'"
        if not isinstance(m.get("role"), str) or m["role"] not in CHAT_HEADERS:
            return f"field 'messages[{i}].role' must be 'system', 'user' or 'assistant', got {show_json(m.get('role'))}"
        if m["role"] == "system" and i:
            return f"field 'messages[{i}].role': a 'system' message may only come first"
        if not isinstance(m.get("content"), str):
            return f"field 'messages[{i}].content' must be a string, got {json_type(m.get('content'))}"
    if not any(m["role"] == "assistant" for m in messages):
        return "field 'messages' has no 'assistant' turn (nothing to learn)"
    return None


def load_records(path: str | Path, template: str, skip_invalid: bool = False,
                 log: Any = print) -> list[dict]:
    """Valid records of a file. The first invalid one raises UserError (file, line/record, field)
    unless `skip_invalid`, which drops them all and logs the exact count and reasons."""
    check_template(template)
    records = read_records(path)
    valid, skipped = [], []
    for rec in records:
        problem = record_problem(rec.data, template)
        if problem is None:
            valid.append(rec.data)
        elif skip_invalid:
            skipped.append(f"line {rec.line}: {rec.label}{problem}")
        else:
            raise LineError(path, rec.line, f"{rec.label}{problem}; {SKIP_HINT}")
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; ... {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log(f"{path}: skipped {len(skipped)} invalid record{'s' if len(skipped) != 1 else ''} ({shown})")
    if not valid:
        raise UserError(f"{path}: no valid records (read {len(records)})")
    return valid


# --------------------------------------------------------------------------------------------------
# Alpaca download


def fetch_alpaca(url: str | None = None, cache: Path | None = None, log: Any = print) -> Path:
    """The 52K Alpaca file, downloaded once into the cache (URL overridable by $GPT2LAB_ALPACA_URL)."""
    url = url or os.environ.get("GPT2LAB_ALPACA_URL") or ALPACA_URL
    target = (cache or cache_dir()) / "alpaca" / ALPACA_FILE
    if target.is_file():
        return target
    log(f"downloading {url} -> {target}")
    download(url, target, what="Alpaca data from ", timeout=30,
             fix="download it elsewhere and pass --data path/to/alpaca_data.json")
    return target


def resolve_data_path(path: str) -> Path:
    """`path` itself, or the cached (downloaded if needed) 52K Alpaca file for the name 'alpaca'."""
    if path == "alpaca" and not Path(path).exists():
        return fetch_alpaca()
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Tokenized examples and batches


@dataclass
class Examples:
    """Tokenized examples: ids (int32) and counted-in-loss flags (bool), one array pair each."""

    ids: list[np.ndarray]
    counted: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LengthReport:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return f"kept {self.kept}, truncated {self.truncated}, dropped {self.dropped}"


def tokenize_records(records: Sequence[dict], tokenizer, template: str, block_size: int,
                     mask_prompt: bool = True, truncation: str = "truncate") -> tuple[Examples, LengthReport]:
    """Tokenize records and apply the context-length policy.

    A row holds block_size + 1 tokens (inputs are the first block_size, targets the last). Longer
    examples are dropped (`truncation="drop"`) or cut at the end ("truncate"); a cut example that
    keeps no counted target (the prompt alone fills the row) is dropped.
    """
    if truncation not in typing.get_args(Truncation):
        raise UserError(f"data.sft.truncation must be one of {', '.join(map(repr, typing.get_args(Truncation)))}, "
                        f"got {truncation!r}")
    limit = block_size + 1
    out = Examples([], [])
    report = LengthReport()
    for record in records:
        ids, counted = encode_segments(render_segments(record, template), tokenizer, mask_prompt)
        if len(ids) > limit:
            if truncation == "drop" or not any(counted[1:limit]):
                report.dropped += 1
                continue
            ids, counted = ids[:limit], counted[:limit]
            report.truncated += 1
        else:
            report.kept += 1
        out.ids.append(np.asarray(ids, dtype=np.int32))
        out.counted.append(np.asarray(counted, dtype=np.bool_))
    return out, report


def collate(examples: Examples, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (B, T) int64 for rows given as lists of example indices (several per
    row when packed, none for an all-padding row), right-padded to the longest row; y is -100 on
    masked and padding positions."""
    import torch

    seqs = []
    for row in rows:
        ids = np.concatenate([examples.ids[i] for i in row] or [np.array([pad_id], np.int32)])
        counted = np.concatenate([examples.counted[i] for i in row] or [np.zeros(1, np.bool_)])
        seqs.append((ids, np.where(counted, ids, IGNORE_INDEX)))
    T = max(1, max(len(ids) for ids, _ in seqs) - 1)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(seqs):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1].astype(np.int64))
        y[b, :n] = torch.from_numpy(labels[1:].astype(np.int64))
    return x, y


def pack(order: Sequence[int], lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Greedy packing in the given order: whole examples laid end to end in rows of at most `limit` tokens."""
    rows: list[list[int]] = []
    used = limit
    for i in order:
        if used + lengths[i] > limit:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += lengths[i]
    return rows


class SFTData:
    """Step-indexed batches of SFT examples (see the module docstring); the same object serves
    training (`get_batch`) and validation (`iter_eval_batches`)."""

    def __init__(self, examples: Examples, *, block_size: int, global_batch_size: int, rank: int,
                 world_size: int, seed: int, packing: bool, pad_id: int, fingerprint: str) -> None:
        if len(examples) == 0:
            raise UserError("no SFT examples left after the context-length policy; raise model.block_size "
                            "or use data.sft.truncation=truncate")
        if global_batch_size % world_size:
            raise UserError(f"the global batch of {global_batch_size} rows is not divisible by "
                            f"{world_size} ranks")
        self.examples = examples
        self.block_size = block_size
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.packing = packing
        self.pad_id = pad_id
        self.fingerprint = fingerprint
        self._lengths = [len(ids) for ids in examples.ids]
        self._epoch_rows: dict[int, list[list[int]]] = {}
        self._epoch_starts = [0]  # global row index at which each epoch begins

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        """The rows (lists of example indices) of an epoch, in the order they are served."""
        if epoch not in self._epoch_rows:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            rows = pack(order, self._lengths, self.block_size + 1) if self.packing else [[int(i)] for i in order]
            if len(self._epoch_rows) > 4:  # keep a few epochs: a step's batch spans at most two
                self._epoch_rows.pop(min(self._epoch_rows))
            self._epoch_rows[epoch] = rows
        return self._epoch_rows[epoch]

    def _row(self, g: int) -> list[int]:
        """Global row g of the endless stream of epochs."""
        while g >= self._epoch_starts[-1]:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.rows_of_epoch(e)))
        e = bisect.bisect_right(self._epoch_starts, g) - 1
        return self.rows_of_epoch(e)[g - self._epoch_starts[e]]

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`: x, y (B, T) int64, T <= block_size."""
        per_rank = self.global_batch_size // self.world_size
        start = step * self.global_batch_size + self.rank * per_rank
        return collate(self.examples, [self._row(g) for g in range(start, start + per_rank)], self.pad_id)

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int | None = None,
                          world_size: int | None = None,
                          max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example once (the first `max_rows` when given), in file order, one per row. `batch_size` is the GLOBAL batch (divisible by
        `world_size`), as for the token loader: batch j holds examples [j*batch_size, (j+1)*batch_size)
        and rank r yields its contiguous rows of it. Rows past the last example are padding with no
        counted target, so every rank yields the same number of batches of the same height."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"eval batch of {batch_size} rows does not divide among {world_size} ranks")
        per_rank = batch_size // world_size
        n = len(self.examples) if max_rows is None else min(len(self.examples), max_rows)
        num_batches = math.ceil(n / batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for j in range(num_batches):
            start = j * batch_size + rank * per_rank
            yield collate(self.examples, [[i] if i < n else [] for i in range(start, start + per_rank)],
                          self.pad_id)

    def state_dict(self) -> dict:
        """Batches are a function of (seed, step): the state only guards against resuming on other data."""
        return {"kind": "sft", "seed": self.seed, "fingerprint": self.fingerprint,
                "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            raise UserError(
                "cannot resume: the SFT data (file, template, masking, block_size or seed) differs from the "
                f"checkpoint's ({state.get('num_examples')} examples then, {self.num_examples} now)"
            )


# --------------------------------------------------------------------------------------------------
# Entry point used by run.py


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation record indices (each sorted): a seeded random `val_fraction` of records,
    at least one when the fraction is positive, never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.sft.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(max(1, round(n * val_fraction)), n - 1) if val_fraction > 0 and n > 1 else 0
    order = np.random.default_rng([seed, 0x5F7]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_sft_data(sft: SFTConfig, tokenizer, block_size: int, global_batch_size: int, rank: int,
                   world_size: int, seed: int, log: Any = None) -> tuple[SFTData, SFTData | None]:
    """Train and validation SFTData of the records `sft` names. Validation is None when its
    val_fraction is 0."""
    log = say if log is None else log
    if tokenizer.eot_id is None:
        raise UserError("SFT needs a tokenizer with an end-of-text token (use the gpt2 tokenizer)")
    if not sft.path:
        raise UserError("data.sft.path is not set: pass --data FILE.json|FILE.jsonl|alpaca")
    path = resolve_data_path(str(sft.path))
    records = load_records(path, sft.template, sft.skip_invalid, log)
    train_idx, val_idx = split_indices(len(records), sft.val_fraction, seed)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    ident = json.dumps([digest, sft.template, sft.mask_prompt, sft.truncation, block_size, sft.packing,
                        sft.val_fraction])
    fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]
    splits = []
    for name, idx in (("train", train_idx), ("val", val_idx)):
        if name == "val" and len(idx) == 0:
            splits.append(None)
            continue
        examples, report = tokenize_records([records[i] for i in idx], tokenizer, sft.template, block_size,
                                            sft.mask_prompt, sft.truncation)
        log(f"{path} {name}: {len(idx)} records, {report} (block_size={block_size})")
        splits.append(SFTData(examples, block_size=block_size, global_batch_size=global_batch_size, rank=rank,
                              world_size=world_size, seed=seed, packing=sft.packing and name == "train",
                              pad_id=tokenizer.eot_id, fingerprint=fingerprint))
    return splits[0], splits[1]
