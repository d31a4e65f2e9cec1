"""Console output: the lines gpt2lab shows the person running it, and its live progress displays.

    from gpt2lab.console import ProgressDisplay, say
    say(f"gpt2lab: preparing '{name}' into {data_dir} (first use)")   # stderr, rank 0 only
    say(f"gpt2lab {command}: interrupted", all_ranks=True)            # every rank says it
    say(format_train_line(step, total, metrics), stdout=True)         # training's step lines
    with ProgressDisplay("items", total=len(batches), description="hellaswag") as bar:
        bar.advance(1)

Every line goes through the standard `logging` logger "gpt2lab". Its one handler writes the message
as it is, plus a newline, to the stream that is `sys.stderr` (or `sys.stdout`) when the line is
emitted, so redirections see it: pytest's capture, `contextlib.redirect_stderr`, and a rich live
display, which then shows the line above itself. Its one filter drops the line on torchrun ranks
other than 0 (the rank is the RANK variable torchrun sets) unless it is for all ranks.
`logging.getLogger("gpt2lab").setLevel(logging.WARNING)` silences gpt2lab. What a command was
asked for (sampled text, `--json -`, tables) is printed to stdout by the command, not through here.

`ProgressDisplay` is the one place that decides whether a live display is drawn (a terminal, on
rank 0) and that builds it (rich, imported only then) with the columns of each kind of work.
This module imports no torch and nothing of gpt2lab, so every layer can use it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger("gpt2lab")


def rank() -> int:
    """This process's rank in a torchrun job (RANK), 0 in a single process."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class _RankZero(logging.Filter):
    """Lines of rank 0, and lines made with all_ranks=True."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or rank() == 0


class _StreamAtEmit(logging.Handler):
    """Writes the bare message to whatever sys.stderr (or sys.stdout) is when the line is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if getattr(record, "stdout", False) else sys.stderr
            stream.write(record.getMessage() + "\n")
            stream.flush()
        except Exception:  # logging's convention: report, never raise from a log call
            self.handleError(record)


def _configure() -> None:
    """Give the "gpt2lab" logger its handler, once per process (a reloaded module adds no second one)."""
    if not any(type(h).__name__ == _StreamAtEmit.__name__ for h in LOGGER.handlers):
        handler = _StreamAtEmit()
        handler.addFilter(_RankZero())
        LOGGER.addHandler(handler)
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the application's root handlers would print each line a second time


_configure()


def say(message: str, *, all_ranks: bool = False, stdout: bool = False) -> None:
    """Show `message` (one or more lines, no trailing newline) to the person running gpt2lab: on
    stderr, or stdout with `stdout=True`; on rank 0 only unless `all_ranks`."""
    LOGGER.info(message, extra={"all_ranks": all_ranks, "stdout": stdout})


# --------------------------------------------------------------------------------------------------
# Live progress


@dataclass(frozen=True)
class _Kind:
    stdout: bool
    """Drawn on stdout (where the lines it stands for go), else stderr."""
    transient: bool
    """Erased when done, else its last state stays on screen."""
    final_line: bool = False
    """Off a terminal, its finished state is written once (a record of totals and time in logs)."""
    refresh_per_second: float = 10


KINDS = {
    "steps": _Kind(stdout=True, transient=False, refresh_per_second=4),  # training: stands for the step lines
    "tokens": _Kind(stdout=True, transient=False, final_line=True),      # tokenizing a corpus (gpt2lab prepare)
    "items": _Kind(stdout=False, transient=True),                        # scoring eval items
    "status": _Kind(stdout=False, transient=True),                       # one piece of work of unknown length
}


def _columns(kind: str, total: float | None) -> list[Any]:
    """The rich columns of each kind of progress."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:,.0f} tok/s")

    if kind == "steps":  # the step, a short bar, and the metrics the trainer passes as `info`
        return [TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=12), TextColumn("{task.fields[info]}")]
    if kind == "tokens":
        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f} tokens"),
                   TokensPerSecond(), TimeElapsedColumn()]
        return columns + [TimeRemainingColumn()] if total else columns
    if kind == "items":
        return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    return [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]  # status


class ProgressDisplay:
    """One task on a live rich display of `kind` (a key of KINDS: "steps" for training, "tokens" for
    tokenizing a corpus, "items" for scoring eval items, "status" for one piece of work), drawn when
    its stream is a terminal (or `console`, a rich Console, is one) on rank 0 and the caller
    `enabled` it; otherwise nothing, and every method is a no-op. A context manager, or call close().
    """

    def __init__(self, kind: str, *, total: float | None = None, description: str = "", completed: float = 0,
                 enabled: bool = True, console: Any = None) -> None:
        spec = KINDS[kind]
        self.shown = False
        """True while a live display is drawn (a terminal on rank 0)."""
        self._progress = self._task = None
        if not enabled or rank() != 0:
            return
        stream = sys.stdout if spec.stdout else sys.stderr
        terminal = console.is_terminal if console is not None else getattr(stream, "isatty", lambda: False)()
        if not terminal and not spec.final_line:
            return
        if console is None and not spec.stdout:
            from rich.console import Console

            console = Console(stderr=True)  # (on stdout: rich's own console)
        from rich.progress import Progress

        self._progress = Progress(*_columns(kind, total), console=console, transient=spec.transient,
                                  refresh_per_second=spec.refresh_per_second)
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")
        self._progress.start()
        self.shown = terminal

    def advance(self, n: float = 1) -> None:
        """`n` more units done."""
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, total: float | None = None, info: str | None = None) -> None:
        """Move to `completed`, change the total, or change the text the "steps" columns show."""
        if self._progress is not None:
            fields = {"info": info} if info is not None else {}
            self._progress.update(self._task, completed=completed, total=total, **fields)

    def refresh(self) -> None:
        """Redraw now (before a long piece of work, so the display names what runs)."""
        if self._progress is not None:
            self._progress.refresh()

    def close(self) -> None:
        """Stop the display (a transient one is erased; the others leave their last state)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self.shown = False

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_bytes(n: float) -> str:
    """A byte count for people: "512 B", "1.5 MiB", "3.2 TiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
