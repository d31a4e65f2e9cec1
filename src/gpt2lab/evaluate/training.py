"""Eval tasks during training: what the run config's `eval` section asks for and what the trainer's hook calls.

    tasks, every, limit = task_schedule(cfg.eval)            # old hellaswag_* keys resolved, checked
    evaluator = TaskEvaluator([get_task(t) for t in tasks], limit, model, tokenizer, env)
    evaluator()                                              # {"hellaswag/acc": ..., "wikitext/bits_per_byte": ...}

The trainer logs the dict as event "eval", so each number is eval/<task>/<metric> in TensorBoard and
W&B. The section itself, `EvalConfig`, is in gpt2lab.config (torch-free, for --help).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from gpt2lab.config import EvalConfig
from gpt2lab.errors import UserError
from gpt2lab.evaluate.task import EvalTask


def task_schedule(cfg: EvalConfig) -> tuple[list[str], int, int | None]:
    """The eval section as (task names, every, limit), older keys resolved; a UserError for settings that cannot run."""
    from gpt2lab.evaluate.registry import get_task

    tasks, every, limit = list(cfg.tasks), cfg.every, cfg.limit
    if cfg.hellaswag_every:
        if tasks or every:
            raise UserError("eval.hellaswag_every and eval.tasks/eval.every are both set; keep one "
                            "(eval.tasks [hellaswag] with eval.every N is the newer spelling)")
        tasks, every, limit = ["hellaswag"], cfg.hellaswag_every, cfg.hellaswag_limit
    if every < 0:
        raise UserError(f"eval.every must be >= 0, got {every}")
    if limit is not None and limit <= 0:
        raise UserError(f"eval.limit must be positive or null (= all), got {limit}")
    if tasks and not every:
        raise UserError(f"eval.tasks is set ({', '.join(tasks)}) but eval.every is 0; set --eval.every N")
    if every and not tasks:
        raise UserError("eval.every is set but eval.tasks is empty; name them, e.g. --eval.tasks hellaswag,wikitext")
    for name in tasks:
        if not get_task(name, where="eval.tasks").has_default_data():
            raise UserError(f"eval.tasks: '{name}' needs --data PATH, which training cannot pass; "
                            "run it with `gpt2lab eval` instead")
    return tasks, every, limit


class TaskEvaluator:
    """Runs eval tasks on the model being trained, for the trainer's "eval" hook.

    Data is what `gpt2lab eval TASK` would use without --data, except that nothing is downloaded;
    it is read once, on first use. A task without data, or one the model cannot run (a character
    tokenizer on a word task), warns once and is skipped from then on: evaluation never stops
    training. Every rank must call it (the work is split over ranks); the model's train/eval mode is
    restored afterwards.
    """

    def __init__(self, tasks: Sequence[EvalTask], limit: int | None, model: Any, tokenizer: Any,
                 env: Any = None) -> None:
        self.tasks = list(tasks)
        self.limit = limit
        self.model, self.tokenizer, self.env = model, tokenizer, env
        self._examples: dict[str, Sequence] = {}
        self._skipped: set[str] = set()

    def __call__(self) -> dict[str, float]:
        """{"<task>/<metric>": value} for the training_metrics of every task that ran."""
        from gpt2lab.parallel import unwrap

        inner = unwrap(self.model)
        was_training = inner.training
        inner.eval()
        results: dict[str, float] = {}
        try:
            for task in self.tasks:
                if task.name not in self._skipped:
                    results.update(self._run(task))
        finally:
            inner.train(was_training)
        return results

    def estimate_seconds(self, timed: int = 2) -> float:
        """Seconds one call is expected to take: each task's first `timed` examples are run and timed,
        and scaled to the examples a call runs (for train.max_time; the results are not logged)."""
        import time

        from gpt2lab.parallel import unwrap

        inner = unwrap(self.model)
        was_training = inner.training
        inner.eval()
        seconds = 0.0
        try:
            for task in self.tasks:
                if task.name in self._skipped:
                    continue
                t0 = time.perf_counter()
                examples = self._examples_of(task)
                if examples:
                    self._run(task, examples[:timed])
                    seconds += (time.perf_counter() - t0) / min(timed, len(examples)) * len(examples)
        finally:
            inner.train(was_training)
        return seconds

    def _examples_of(self, task: EvalTask) -> Sequence:
        """The task's examples of one call (read on first use); [] when the task is skipped."""
        try:
            if task.name not in self._examples:
                path = task.find_data(download=False)
                if path is None:
                    raise UserError(f"no data (set GPT2LAB_SHARED_DATA, or run `gpt2lab eval {task.name}` once "
                                    "online to cache it)")
                self._examples[task.name] = task.load(path, task.default_options())
        except UserError as e:
            self._skip(task, e)
            return []
        return self._examples[task.name][: self.limit]

    def _skip(self, task: EvalTask, error: UserError) -> None:
        self._skipped.add(task.name)
        warnings.warn(f"{task.name} skipped during training: {error}", stacklevel=4)

    def _run(self, task: EvalTask, examples: Sequence | None = None) -> dict[str, float]:
        options = task.default_options()
        if task.unit is None:  # a task that limits its own examples (lm-eval: documents per task)
            options.limit = self.limit
        if examples is None:
            examples = self._examples_of(task)
            if task.name in self._skipped:
                return {}
        try:
            result = task.run(self.model, self.tokenizer, examples, options, env=self.env)
        except UserError as e:
            self._skip(task, e)
            return {}
        return {f"{task.name}/{metric}": value for metric, value in task.training_values(result).items()}
