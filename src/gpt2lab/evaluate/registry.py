"""Eval tasks by name. Each entry is the module that defines `TASK`, an `EvalTask` (task.py); the
modules import without torch, so listing the tasks for `--help` stays instant. Order = help order."""

from __future__ import annotations

import difflib
import importlib

from gpt2lab.errors import UserError
from gpt2lab.evaluate.task import EvalTask

TASK_MODULES: dict[str, str] = {
    "hellaswag": "gpt2lab.evaluate.hellaswag",
    "lambada": "gpt2lab.evaluate.lambada",
    "perplexity": "gpt2lab.evaluate.perplexity",
    "wikitext": "gpt2lab.evaluate.wikitext",
    "lm-eval": "gpt2lab.evaluate.lm_eval_task",
}


def get_task(name: str, where: str = "task") -> EvalTask:
    """The task registered as `name`, or lm-eval's task TASK for "lm-eval:TASK"; an unknown name is a
    UserError naming `where` and the known tasks."""
    from gpt2lab.evaluate.lm_eval_task import PREFIX, LmEval

    if name.startswith(PREFIX):
        return LmEval(name[len(PREFIX):])
    return _registered(name, where)


def _registered(name: str, where: str) -> EvalTask:
    if name not in TASK_MODULES:
        close = difflib.get_close_matches(name, TASK_MODULES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{where} '{name}' is not an eval task; {hint}known: {', '.join(TASK_MODULES)} "
                        "(and lm-eval:TASK for any lm-evaluation-harness task)")
    task = importlib.import_module(TASK_MODULES[name]).TASK
    assert task.name == name, f"{TASK_MODULES[name]}.TASK is named {task.name!r}, registered as {name!r}"
    return task


def all_tasks() -> list[EvalTask]:
    """Every registered task, in registry order."""
    return [get_task(name) for name in TASK_MODULES]
