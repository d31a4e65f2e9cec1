"""Multiple-choice tasks: which of a question's choices does the model find most likely after its context?

Each choice is scored as a completion, the way lm-evaluation-harness scores `multiple_choice` tasks:
the continuation is `delimiter + choice` (" " by default) after the context, and its log-likelihood is
the sum over its tokens. Three labelled accuracies come from the same numbers:

    acc             argmax of the summed log-likelihood                 (lm-evaluation-harness `acc`)
    acc_norm        argmax of summed log-likelihood / len(choice) in characters, the choice without
                    the delimiter                                       (lm-evaluation-harness `acc_norm`)
    acc_token_mean  argmax of the mean log-likelihood per choice token  (what build-nanogpt calls acc_norm)

A new multiple-choice task is a parser and a registry line:

    class Piqa(MultipleChoiceTask):
        name = "piqa"
        description = "zero-shot PIQA validation accuracy (acc, acc_norm, acc_token_mean)"
        data_help = "a jsonl of {goal, sol1, sol2, label} (default: $GPT2LAB_SHARED_DATA/piqa/valid.jsonl)"
        shared_file = "piqa/valid.jsonl"

        def load(self, path, options):
            return [Question(r["goal"], (r["sol1"], r["sol2"]), r["label"]) for _, r in iter_jsonl(path)]

    TASK = Piqa()

Questions may have any number of choices. The scoring (`scoring.score_continuations`) computes each
context once and shares it between its choices through the KV cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from gpt2lab.console import ProgressDisplay
from gpt2lab.evaluate import RemoteFile, find_data_file
from gpt2lab.evaluate.task import EvalTask, MetricRow

if TYPE_CHECKING:
    import torch

METRICS = {
    "acc": "argmax of summed log-likelihood of the choice tokens (lm-evaluation-harness acc)",
    "acc_norm": "summed log-likelihood / choice length in characters (lm-evaluation-harness acc_norm)",
    "acc_token_mean": "mean log-likelihood per choice token (build-nanogpt's acc_norm)",
}


class MultipleChoice(Protocol):
    """What the scoring reads of a question: its context, its choices and the index of the right one."""

    context: str
    label: int

    @property
    def choices(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Question:
    """One multiple-choice question."""

    context: str
    choices: tuple[str, ...]
    label: int


def encode_question(tokenizer: Any, question: MultipleChoice, delimiter: str = " ") -> list[tuple[list[int], list[int]]]:
    """The (context ids, delimiter + choice ids) pair of each choice."""
    from gpt2lab.evaluate.scoring import encode_pair

    return [encode_pair(tokenizer, question.context, delimiter + choice) for choice in question.choices]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima, like numpy


def predictions(choices: Sequence[str], logprobs: list[float], n_tokens: list[int]) -> dict[str, int]:
    """The choice each metric picks, given the summed log-likelihoods and token counts of the choices."""
    return {
        "acc": _argmax(logprobs),
        "acc_norm": _argmax([lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]),
        "acc_token_mean": _argmax([lp / n for lp, n in zip(logprobs, n_tokens)]),
    }


def evaluate(model: torch.nn.Module, tokenizer: Any, questions: Sequence[MultipleChoice], batch_size: int = 8,
             env: Any = None, show_progress: bool = False, delimiter: str = " ", description: str = "questions") -> dict:
    """Accuracies of `model` on `questions` (every rank gets the same dict): {"n", metric, metric_stderr}.

    `batch_size` questions (all their choices) go through the model at once. Under torchrun each rank
    scores the questions i with i % world_size == rank and the counts are summed over ranks.
    """
    from gpt2lab.evaluate import scoring

    # Every rank tokenizes every question, so a tokenizer error is raised on all ranks alike, before any collective.
    encoded = [encode_question(tokenizer, q, delimiter) for q in questions]
    mine_idx = scoring.shard(range(len(questions)), env)
    pairs = [pair for i in mine_idx for pair in encoded[i]]
    most_choices = max((len(encoded[i]) for i in mine_idx), default=1)
    with ProgressDisplay("items", total=len(pairs), description=description, enabled=show_progress) as bar:
        scores = scoring.score_continuations(model, pairs, batch_size=most_choices * batch_size, env=env,
                                             on_batch=bar.advance)
    correct = dict.fromkeys(METRICS, 0)
    start = 0
    for i in mine_idx:
        question, k = questions[i], len(encoded[i])
        mine = scores[start : start + k]
        start += k
        picked = predictions(question.choices, [s.logprob for s in mine], [s.n_tokens for s in mine])
        for metric, choice in picked.items():
            correct[metric] += int(choice == question.label)
    totals = scoring.all_reduce_sum([*correct.values(), len(mine_idx)], env)
    n = int(totals[-1])
    result: dict = {"n": n}
    for metric, count in zip(correct, totals):
        result[metric] = count / n
        result[f"{metric}_stderr"] = scoring.stderr_of_mean(count / n, n)
    return result


class MultipleChoiceTask(EvalTask):
    """An eval task of multiple-choice questions: a subclass names itself, its data file and `load`
    (the parser, returning objects with context, choices and label); scoring and rows are shared."""

    unit = batch_unit = "questions"
    default_batch_size = 8
    training_metrics = ("acc", "acc_norm")
    delimiter: ClassVar[str] = " "
    """What goes between the context and each choice (lm-eval's target_delimiter)."""
    shared_file: ClassVar[str | None] = None
    """The data file's path in the shared data folder, used when --data is not given."""
    remote: ClassVar[RemoteFile | None] = None
    """The public file downloaded (and cached) when the shared folder has none."""

    def has_default_data(self) -> bool:
        return self.shared_file is not None or self.remote is not None

    def find_data(self, download: bool = True) -> Path | None:
        return find_data_file(self.shared_file, self.remote, download, self.validate_download)

    def validate_download(self, path: Path) -> None:
        """Raise UserError if a freshly downloaded data file is not what it should be (default: accept)."""

    def run(self, model: Any, tokenizer: Any, examples: Sequence, options: argparse.Namespace, env: Any = None,
            batch_size: int | None = None, show_progress: bool = False) -> dict:
        return evaluate(model, tokenizer, list(examples), batch_size=batch_size or self.default_batch_size, env=env,
                        show_progress=show_progress, delimiter=self.delimiter, description=self.name)

    def rows(self, result: dict) -> list[MetricRow]:
        rows = [MetricRow(metric, f"{result[metric]:.4f} ± {result[metric + '_stderr']:.4f}", meaning)
                for metric, meaning in METRICS.items()]
        return [*rows, MetricRow("n", str(result["n"]), self.unit or "questions")]
