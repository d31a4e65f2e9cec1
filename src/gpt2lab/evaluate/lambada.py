"""LAMBADA, GPT-2 paper style: predict the last word of a passage given everything before it.

Data: OpenAI's detokenized test set `lambada_test.jsonl` (5,153 lines of {"text": ...}), the version
GPT-2 was evaluated on and lm-evaluation-harness's `lambada_openai`; its sha256 is pinned below.

The target is the last whitespace-delimited word. The passage is tokenized once, as a whole, and the
target tokens are the tokens that overlap that word (for " word" after a space that is the usual
token with its leading space; after a newline the newline stays in the context). So

    acc        every target token is the model's greedy (argmax) prediction, given the real tokens before it
    ppl        exp(mean over passages of the target's summed NLL): per-word perplexity, the definition
               lm-evaluation-harness reports for lambada_openai
    ppl_token  exp(summed NLL / target tokens): per-token perplexity over the target tokens

lm-evaluation-harness splits the last word off at the last " " instead of at any whitespace; the two
agree on 5,146 of the 5,153 passages (the other 7 have a newline just before their last word).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2lab.console import ProgressDisplay
from gpt2lab.errors import UserError
from gpt2lab.evaluate import RemoteFile
from gpt2lab.evaluate import find_data_file as find_task_data
from gpt2lab.evaluate.task import EvalTask, MetricRow
from gpt2lab.fileio import LineError, iter_jsonl, str_field

if TYPE_CHECKING:
    import torch

LAMBADA_TEST = RemoteFile(
    "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
)
SHARED_FILE = "lambada/lambada_test.jsonl"
_LAST_WORD = re.compile(r"\S+$")


def read_passages(path: str | Path) -> list[str]:
    """The passages of a {"text": ...} jsonl file (trailing whitespace removed; blank lines skipped)."""
    passages = []
    for line, record in iter_jsonl(path):
        text = str_field(record, "text", path, line, fix='each line is {"text": PASSAGE}').rstrip()
        if len(text.split()) < 2:
            raise LineError(path, line, f"a passage needs a context and a last word, got {text!r}")
        passages.append(text)
    if not passages:
        raise UserError(f"{path} holds no passages")
    return passages


def split_passage(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of a passage: the target ids are the tokens overlapping its last word."""
    ids = tokenizer.encode(text)
    word_bytes = len(_LAST_WORD.search(text).group().encode("utf-8"))
    # Walk back from the end until the tokens cover the word: the last one taken starts at or before it.
    k, covered = len(ids), 0
    while covered < word_bytes:
        k -= 1
        covered += len(tokenizer.decode_bytes([ids[k]]))
    return ids[:k], ids[k:]


def find_data_file(download: bool = True) -> Path | None:
    """The shared lambada_test.jsonl if present, else the cached (or, when `download`, a fresh) OpenAI copy."""
    return find_task_data(SHARED_FILE, LAMBADA_TEST, download)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    passages: list[str],
    batch_size: int = 16,
    env=None,
    show_progress: bool = False,
) -> dict:
    """Last-word accuracy and perplexities of `model` on `passages` (every rank gets the same dict)."""
    from gpt2lab.evaluate import scoring

    # Every rank tokenizes every passage, so a tokenizer error is raised on all ranks alike.
    pairs = scoring.shard([split_passage(tokenizer, text) for text in passages], env)
    with ProgressDisplay("items", total=len(pairs), description="lambada", enabled=show_progress) as bar:
        scores = scoring.score_continuations(
            model, pairs, batch_size=batch_size, env=env,
            on_batch=bar.advance,
        )
    sums = [
        sum(s.greedy for s in scores),
        sum(s.logprob for s in scores),
        sum(s.n_tokens for s in scores),
        len(scores),
    ]
    correct, logprob, n_tokens, n = scoring.all_reduce_sum(sums, env)
    n = int(n)
    return {
        "n": n,
        "acc": correct / n,
        "acc_stderr": scoring.stderr_of_mean(correct / n, n),
        "ppl": math.exp(-logprob / n),
        "ppl_token": math.exp(-logprob / n_tokens),
        "target_tokens": int(n_tokens),
    }


class Lambada(EvalTask):
    name = "lambada"
    description = "LAMBADA (OpenAI's GPT-2 version) last-word accuracy and perplexity"
    data_help = ("lambada_test.jsonl (default: $GPT2LAB_SHARED_DATA/lambada/lambada_test.jsonl "
                 "if present, else OpenAI's, downloaded, sha256-checked and cached)")
    unit = batch_unit = "passages"
    default_batch_size = 16
    training_metrics = ("acc", "ppl")

    def find_data(self, download: bool = True) -> Path | None:
        return find_data_file(download)

    def load(self, path: Path, options: argparse.Namespace) -> list[str]:
        return read_passages(path)

    def run(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence, options: argparse.Namespace,
            env: Any = None, batch_size: int | None = None, show_progress: bool = False) -> dict:
        return evaluate(model, tokenizer, list(examples), batch_size=batch_size or self.default_batch_size, env=env,
                        show_progress=show_progress)

    def rows(self, result: dict) -> list[MetricRow]:
        return [
            MetricRow("acc", f"{result['acc']:.4f} ± {result['acc_stderr']:.4f}",
                      "last word predicted greedily, every token"),
            MetricRow("ppl", f"{result['ppl']:.3f}", "per-word perplexity of the last word (lm-eval's)"),
            MetricRow("ppl_token", f"{result['ppl_token']:.3f}",
                      f"per-token perplexity over {result['target_tokens']:,} target tokens"),
            MetricRow("n", str(result["n"]), "passages"),
        ]


TASK = Lambada()
