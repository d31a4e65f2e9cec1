"""The interface every eval task implements; `gpt2lab eval`, `--json` and in-training evaluation use
nothing else, so a new task is one module with one `EvalTask` subclass plus one line in registry.py.

    class MyTask(EvalTask):
        name = "mytask"
        description = "one line for `gpt2lab eval --help`"
        data_help = "what --data takes and where the data comes from without it"
        unit, batch_unit, default_batch_size = "items", "items", 8

        def find_data(self, download): ...                  # shared dir / cache / download, or None
        def load(self, path, options): ...                  # -> the examples (--limit keeps the first N)
        def run(self, model, tokenizer, examples, options, env=None, batch_size=None,
                show_progress=False): ...                   # -> {"metric": value, ...}, same on every rank
        def rows(self, result): ...                         # -> [MetricRow(name, value text, label)]

    TASK = MyTask()

Declarations (names, help, options) must import without torch: `gpt2lab eval --help` builds a parser
from every task, so torch and the scoring helpers are imported inside `run`.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gpt2lab.errors import UserError


@dataclass(frozen=True)
class MetricRow:
    """One row of the printed result table."""

    metric: str
    value: str
    """The value as shown, e.g. "0.2891 ± 0.0045"."""
    label: str
    """What the number is, in a few words."""


def positive_int(text: str) -> int:
    """An argparse `type` for options that count something (N >= 1)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class EvalTask(ABC):
    """A zero-shot evaluation: where its data comes from, how to score a model on it, how to show it."""

    name: ClassVar[str]
    """The task's name on the command line (`gpt2lab eval NAME`) and in logs (`eval/NAME/<metric>`)."""
    description: ClassVar[str]
    """One line: what is measured (listed by `gpt2lab eval --help`)."""
    data_help: ClassVar[str]
    """Help of --data: what file it takes and which file is used without it."""
    unit: ClassVar[str | None] = "examples"
    """What one example is, for --limit N (None: no --limit, the data is scored as a whole)."""
    batch_unit: ClassVar[str] = "examples"
    """What --batch-size counts."""
    default_batch_size: ClassVar[int] = 8
    training_metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics logged during training as eval/<task>/<metric>."""

    # ---------------------------------------------------------------------------------------------
    # Command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--data, --limit, --batch-size, then the task's own options (`add_options`)."""
        parser.add_argument("--data", metavar="PATH", required=not self.has_default_data(), help=self.data_help)
        if self.unit is not None:
            parser.add_argument("--limit", type=positive_int, metavar="N", help=f"only the first N {self.unit}")
        parser.add_argument("--batch-size", type=positive_int, default=self.default_batch_size, metavar="N",
                            help=f"{self.batch_unit} per forward pass (default: {self.default_batch_size})")
        self.add_options(parser)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """The task's own options; their defaults are what in-training evaluation uses (none by default)."""
        return None

    def default_options(self) -> argparse.Namespace:
        """The task's options at their defaults (in-training evaluation has no command line)."""
        parser = argparse.ArgumentParser(add_help=False)
        self.add_options(parser)
        return parser.parse_args([])

    # ---------------------------------------------------------------------------------------------
    # Data

    def has_default_data(self) -> bool:
        """Whether the task finds its data without --data (the class overrides `find_data`)."""
        return type(self).find_data is not EvalTask.find_data

    def find_data(self, download: bool = True) -> Path | None:
        """The data file used without --data: the shared data folder, else the download cache, else
        (when `download`) a fresh download; None when there is none."""
        return None

    def resolve_data(self, path: str | Path | None, download: bool = True) -> Path:
        """`path` when given (it must exist), else `find_data(download)`; a UserError when neither works."""
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise UserError(f"--data {path} does not exist; pass the path of a {self.name} data file")
            return path
        found = self.find_data(download)
        if found is None:
            raise UserError(f"{self.name}: no data file found; pass --data PATH ({self.data_help})")
        return found

    @abstractmethod
    def load(self, path: Path, options: argparse.Namespace) -> Sequence:
        """The examples of the data file `path` (malformed input raises UserError naming file:line)."""

    # ---------------------------------------------------------------------------------------------
    # Scoring and reporting

    @abstractmethod
    def run(self, model: Any, tokenizer: Any, examples: Sequence, options: argparse.Namespace, env: Any = None,
            batch_size: int | None = None, show_progress: bool = False) -> dict[str, Any]:
        """The metrics of `model` on `examples` (every rank must call it and gets the same dict; under
        torchrun `env` is the DistEnv and the examples are split over ranks). `batch_size` None = the
        task's default. `show_progress`: a progress bar is wanted (`gpt2lab.console.ProgressDisplay`
        draws it on a terminal, on rank 0)."""

    def training_values(self, result: dict[str, Any]) -> dict[str, float]:
        """The numbers logged during training as eval/<task>/<metric> (default: `training_metrics`)."""
        return {metric: result[metric] for metric in self.training_metrics}

    @abstractmethod
    def rows(self, result: dict[str, Any]) -> list[MetricRow]:
        """The rows of the printed table for `result` (what `run` returned)."""
