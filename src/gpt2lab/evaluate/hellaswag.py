"""HellaSwag, zero-shot: which of four endings does the model find most likely after the context?

Each ending is scored as a completion, the way lm-evaluation-harness scores it: the continuation is
" " + ending after the context, and its log-likelihood is the sum over its tokens. Three labelled
accuracies come from the same four numbers per task:

    acc             argmax of the summed log-likelihood                 (lm-evaluation-harness `acc`)
    acc_norm        argmax of summed log-likelihood / len(ending) in characters, the ending without
                    its leading space                                   (lm-evaluation-harness `acc_norm`)
    acc_token_mean  argmax of the mean log-likelihood per ending token  (what build-nanogpt calls acc_norm)

Data: the validation split, 10,042 tasks, in either of two formats that parse to the same `Task`:

    official jsonl  rowanz/hellaswag `hellaswag_val.jsonl` (fields activity_label, ctx_a, ctx_b, ctx,
                    endings, label, ...), downloaded into the cache when online;
    llama.cpp text  6 lines per task: "activity_label: ctx", the gold label 0-3, the four endings
                    (e.g. klosax/hellaswag_text_data `hellaswag_val_full.txt`).

The text file was made from the jsonl by an extractor that deletes the WikiHow markup ([header],
[step], [substeps]; " [title]" becomes ". "), collapses double spaces and trims one space at either
end. The default context style "llamacpp" applies exactly that to the jsonl, so both formats give
identical tasks and scores. lm-evaluation-harness builds its context differently:
`activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, then deletes every [bracketed] span. That
is the "harness" style; it needs ctx_a/ctx_b, so it is available for the jsonl only.

No sha256 of `hellaswag_val.jsonl` is published by its authors (or anywhere we could find), so a
download is verified by what is known about it instead: 10,042 lines, each a record of the expected
schema with a label 0-3.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2lab.errors import UserError
from gpt2lab.evaluate import RemoteFile, multiple_choice
from gpt2lab.evaluate import find_data_file as find_task_data
from gpt2lab.evaluate.multiple_choice import METRICS as METRICS
from gpt2lab.evaluate.multiple_choice import MultipleChoiceTask
from gpt2lab.evaluate.task import MetricRow
from gpt2lab.fileio import LineError, iter_jsonl, iter_lines

if TYPE_CHECKING:
    import torch

HELLASWAG_VAL = RemoteFile("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl")
N_VAL_TASKS = 10042
SHARED_FILE = "hellaswag/hellaswag_val_full.txt"
CONTEXT_STYLES = ("llamacpp", "harness")


@dataclass(frozen=True)
class Task:
    """One HellaSwag item: the context, its four candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int

    @property
    def choices(self) -> tuple[str, ...]:
        """The endings, as `multiple_choice` calls a question's candidates."""
        return self.endings


# --------------------------------------------------------------------------------------------------
# Parsing


def clean_llamacpp(text: str) -> str:
    """The llama.cpp-format extractor's cleanup: WikiHow markup deleted, double spaces collapsed once,
    one leading and one trailing space trimmed."""
    for markup, replacement in (
        ("[header]", ""), ("[step]", ""), ("[substeps]", ""), (" [title]", ". "), ("[title] ", ""),
        ("[title].", ""), ("  ", " "),
    ):
        text = text.replace(markup, replacement)
    if text.startswith(" "):
        text = text[1:]
    if text.endswith(" "):
        text = text[:-1]
    return text


def clean_harness(text: str) -> str:
    """lm-evaluation-harness's cleanup: " [title]" becomes ". ", every [bracketed] span is deleted."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def task_from_record(record: object, style: str = "llamacpp", where: str = "") -> Task:
    """A Task from one official jsonl record; schema problems raise UserError naming `where` (file:line)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the HF copy stores labels as strings
    if label is None:
        raise UserError(f"{where}: no 'label' (the test split is unlabeled: use hellaswag_val.jsonl)")
    if isinstance(label, bool) or label not in (0, 1, 2, 3):
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {record.get('label')!r}")
    endings = record.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    needed = ("activity_label", "ctx") if style == "llamacpp" else ("activity_label", "ctx_a", "ctx_b")
    for key in needed:
        if not isinstance(record.get(key), str):
            raise UserError(f"{where}: missing string field '{key}' (needed by context style '{style}')")
    if style == "llamacpp":
        context = clean_llamacpp(record["activity_label"]) + ": " + clean_llamacpp(record["ctx"])
        return Task(context, tuple(clean_llamacpp(e) for e in endings), label)
    raw = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return Task(clean_harness(raw), tuple(clean_harness(e) for e in endings), label)


def read_jsonl(path: Path, style: str = "llamacpp") -> list[Task]:
    """Tasks of an official-format jsonl file (one record per line; blank lines are skipped)."""
    return [task_from_record(record, style, f"{path}:{line}") for line, record in iter_jsonl(path)]


def read_text(path: Path) -> list[Task]:
    """Tasks of a llama.cpp-format text file: 6 lines per task (context, label 0-3, four endings)."""
    lines = [line for _, line in iter_lines(path)]
    tasks = []
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        if len(block) < 6:
            raise LineError(path, start + 1, f"truncated task: {len(block)} of its 6 lines (context, label 0-3, "
                            "four endings) are present")
        if block[1].strip() not in ("0", "1", "2", "3"):
            raise LineError(path, start + 2, f"the label line must be 0, 1, 2 or 3, got {block[1]!r} "
                            "(each task is 6 lines: context, label, four endings)")
        tasks.append(Task(block[0], tuple(block[2:6]), int(block[1])))
    return tasks


def load_tasks(path: str | Path, style: str = "llamacpp") -> list[Task]:
    """Tasks of a HellaSwag file in either format (a first character '{' means jsonl)."""
    path = Path(path)
    if style not in CONTEXT_STYLES:
        raise UserError(f"unknown HellaSwag context style '{style}'; use one of {', '.join(CONTEXT_STYLES)}")
    if not path.is_file():
        raise UserError(f"HellaSwag data file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        tasks = read_jsonl(path, style)
    elif style == "harness":
        raise UserError(
            f"{path} is in the llama.cpp text format, which has no ctx_a/ctx_b: the 'harness' context "
            f"style needs the official hellaswag_val.jsonl"
        )
    else:
        tasks = read_text(path)
    if not tasks:
        raise UserError(f"{path} holds no HellaSwag tasks")
    return tasks


def _validate_official(path: Path) -> None:
    """A downloaded hellaswag_val.jsonl must be 10,042 well-formed labelled records."""
    tasks = read_jsonl(path)
    if len(tasks) != N_VAL_TASKS:
        raise UserError(
            f"downloaded {HELLASWAG_VAL.resolved_url()} has {len(tasks)} tasks, not {N_VAL_TASKS}; "
            f"retry, or pass --data PATH"
        )


def find_data_file(download: bool = True) -> Path | None:
    """The HellaSwag validation file to use when none is given: the shared text file if present,
    else the cached official jsonl, else (when `download`) the official jsonl fetched now."""
    return find_task_data(SHARED_FILE, HELLASWAG_VAL, download, _validate_official)


# --------------------------------------------------------------------------------------------------
# Scoring


def encode_task(tokenizer, task: Task) -> list[tuple[list[int], list[int]]]:
    """The four (context ids, " " + ending ids) pairs of a task."""
    return multiple_choice.encode_question(tokenizer, task)


def predictions(task: Task, logprobs: list[float], n_tokens: list[int]) -> dict[str, int]:
    """The ending each metric picks, given the four summed log-likelihoods and token counts."""
    return multiple_choice.predictions(task.endings, logprobs, n_tokens)


def evaluate(model: torch.nn.Module, tokenizer, tasks: list[Task], batch_size: int = 8, env=None,
             show_progress: bool = False) -> dict:
    """Accuracies of `model` on `tasks` (every rank gets the same dict); `batch_size` tasks (4 rows each)
    per forward pass; under torchrun the tasks are split over ranks (`multiple_choice.evaluate`)."""
    return multiple_choice.evaluate(model, tokenizer, tasks, batch_size=batch_size, env=env,
                                    show_progress=show_progress, description="hellaswag")


# --------------------------------------------------------------------------------------------------
# The task


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    description = "zero-shot HellaSwag validation accuracy (acc, acc_norm, acc_token_mean)"
    data_help = ("hellaswag_val.jsonl or a llama.cpp-format text file (default: "
                 "$GPT2LAB_SHARED_DATA/hellaswag/hellaswag_val_full.txt if present, else the official jsonl, "
                 "downloaded and cached)")
    unit = batch_unit = "tasks"
    shared_file = SHARED_FILE
    remote = HELLASWAG_VAL

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--context-style", choices=CONTEXT_STYLES, default="llamacpp",
                            help="llamacpp: the same tasks from either file format (default); harness: "
                                 "lm-evaluation-harness's context, official jsonl only")

    def validate_download(self, path: Path) -> None:
        _validate_official(path)

    def load(self, path: Path, options: argparse.Namespace) -> list[Task]:
        return load_tasks(path, options.context_style)

    def run(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence, options: argparse.Namespace,
            env: Any = None, batch_size: int | None = None, show_progress: bool = False) -> dict:
        return {**super().run(model, tokenizer, examples, options, env, batch_size, show_progress),
                "context_style": options.context_style}

    def rows(self, result: dict) -> list[MetricRow]:
        *rows, _ = super().rows(result)
        return [*rows, MetricRow("n", str(result["n"]), f"tasks (context style {result['context_style']})")]


TASK = HellaSwag()
