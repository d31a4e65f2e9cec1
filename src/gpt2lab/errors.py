"""Errors meant for the person at the keyboard.

Raise `UserError` with one line that says what is wrong and how to fix it (file, line, field).
The CLI prints it without a traceback and exits with status 2; Python callers catch `UserError`
(or one of its kinds below).
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem with the user's input (file, config, arguments), reported as one line."""


class FileError(UserError):
    """A problem in one file, as one line: str() is "FILE[:LINE]: [FIELD: ]PROBLEM[; FIX]".

    `field` is the dotted path of the value inside the file ("model.n_embd", "splits.train.shards[0]"),
    `fix` says how to get a good file back; `problem` is what is wrong, without either."""

    def __init__(self, path: str | os.PathLike, problem: str, *, line: int | None = None, field: str = "",
                 fix: str = "") -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
        super().__init__(f"{text}; {fix}" if fix else text)
        self.path, self.line, self.field, self.problem, self.fix = path, line, field, problem, fix


class ArgumentError(UserError):
    """A value passed to gpt2lab's Python API (`gpt2lab.load`, `LoadedModel`) that it cannot use."""
