"""Perplexity of a text file with the sliding-window method of the transformers perplexity guide.

The whole file is tokenized as one sequence of N tokens. Windows of `max_length` tokens start every
`stride` tokens; each window scores only the tokens that the previous window did not, so with
stride < max_length every token but the first is scored exactly once, with at least
`max_length - stride` tokens of context. stride == max_length gives disjoint windows (fast, less
context), and then the first token of each window, which nothing in its window predicts, is not
scored, exactly as in the guide (whose 19.44 for gpt2-large at stride 1024 is computed that way).

    window k:  [begin_k, end_k) with begin_k = k * stride, end_k = min(begin_k + max_length, N)
    scored:    targets j with max(end_{k-1}, begin_k + 1) <= j < end_k

Reported: tokens scored, mean NLL per token (nats), token perplexity, and for comparison across
tokenizers the perplexity per word (whitespace-separated) and per UTF-8 byte plus bits per byte,
all from the same summed NLL. The first token is never scored (nothing predicts it), so the per-word
and per-byte figures divide a sum over the scored tokens by the words/bytes of the whole text.

Reading the file: bytes decoded as UTF-8 and CRLF turned into LF. With `hf_rows`, every non-empty
line becomes one dataset row ending in "\\n" and the rows are joined with "\\n\\n", which is what the
guide does with `"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])`.
That dataset also has 1,467 empty rows (4,358 in all) that a file of non-empty lines, such as
shared/data/wikitext-2/raw/wiki.test.raw, cannot record; each would add one more "\\n\\n", so our
text is slightly shorter than the guide's and the perplexities are close but not identical.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2lab.errors import UserError
from gpt2lab.evaluate.task import EvalTask, MetricRow, positive_int
from gpt2lab.fileio import read_text as read_utf8_file

if TYPE_CHECKING:
    import torch


def read_text(path: str | Path, hf_rows: bool = False) -> str:
    """The text of `path` (UTF-8, CRLF -> LF); with `hf_rows`, non-empty lines joined as HF dataset rows."""
    text = read_utf8_file(path).replace("\r\n", "\n")
    if hf_rows:
        text = "\n\n".join(line + "\n" for line in text.split("\n") if line)
    return text


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: input tokens [begin, end), targets [first_target, end)."""
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2 (a window of one token predicts nothing), got {max_length}")
    if not 0 < stride <= max_length:
        raise UserError(f"--stride must be between 1 and --max-length={max_length}, got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def sliding_window_nll(
    model: torch.nn.Module,
    ids: list[int],
    max_length: int,
    stride: int,
    batch_size: int = 1,
    env=None,
    show_progress: bool = False,
) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of the token sequence `ids`, over all ranks.

    Windows of equal length are batched `batch_size` at a time; under torchrun each rank takes the
    windows k with k % world_size == rank (every rank must call this).
    """
    from gpt2lab.evaluate.scoring import sum_target_nll
    from gpt2lab.parallel import unwrap

    block_size = unwrap(model).config.block_size
    if max_length > block_size:
        raise UserError(f"--max-length {max_length} exceeds the model's block_size={block_size}")
    if max_length < 2:  # a window of one token has no context to score a token with
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    if len(ids) < 2:
        raise UserError("the text is shorter than 2 tokens: nothing to score")
    rows = []
    for b, e, first in windows(len(ids), max_length, stride):
        # Position t predicts token b + t + 1; score targets first .. e - 1.
        targets = [-100] * (first - b - 1) + ids[first:e] + [-100]
        rows.append((ids[b:e], targets))
    return sum_target_nll(model, rows, batch_size, env, show_progress, "perplexity")


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    env=None,
    show_progress: bool = False,
) -> dict:
    """Perplexity figures of `text` (defaults: max_length = block_size, stride = max_length // 2)."""
    from gpt2lab.parallel import unwrap

    max_length = max_length or unwrap(model).config.block_size
    stride = stride or max(max_length // 2, 1)
    ids = tokenizer.encode(text)
    nll, count = sliding_window_nll(model, ids, max_length, stride, batch_size, env, show_progress)
    n_words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    return {
        "tokens": len(ids),
        "tokens_scored": count,
        "max_length": max_length,
        "stride": stride,
        "nll": nll / count,
        "ppl": math.exp(nll / count),
        "words": n_words,
        "word_ppl": math.exp(nll / n_words),
        "bytes": n_bytes,
        "byte_ppl": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
    }


def window_length(text: str) -> int:
    """An argparse `type` for --max-length: a window of at least 2 tokens (one predicts the next)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a window needs at least 2 tokens (one to predict the other), got {text!r}")
    return value


class Perplexity(EvalTask):
    name = "perplexity"
    description = "sliding-window token perplexity (and per word / per byte) of a UTF-8 text file"
    data_help = "the text file to score"
    unit = None
    batch_unit = "windows"
    default_batch_size = 1
    training_metrics = ("ppl",)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-length", type=window_length,
                            help="window length in tokens (default: the model's block_size)")
        parser.add_argument("--stride", type=positive_int, help="tokens between window starts (default: max-length / 2)")
        parser.add_argument("--hf-rows", action="store_true",
                            help="join non-empty lines as HF dataset rows with '\\n\\n' (the transformers guide's "
                                 "WikiText text); default: score the file as it is")

    def load(self, path, options: argparse.Namespace) -> list[str]:
        text = read_text(path, hf_rows=options.hf_rows)
        if not text.split():  # perplexity per word would divide by zero words
            raise UserError(f"{path} holds no words (only whitespace, or nothing): nothing to score")
        return [text]

    def run(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence, options: argparse.Namespace,
            env: Any = None, batch_size: int | None = None, show_progress: bool = False) -> dict:
        (text,) = examples
        result = evaluate(model, tokenizer, text, max_length=options.max_length, stride=options.stride,
                          batch_size=batch_size or self.default_batch_size, env=env, show_progress=show_progress)
        return {**result, "hf_rows": options.hf_rows}

    def rows(self, result: dict) -> list[MetricRow]:
        return [
            MetricRow("tokens_scored", f"{result['tokens_scored']:,}",
                      f"of {result['tokens']:,}; windows of {result['max_length']}, stride {result['stride']}"),
            MetricRow("nll", f"{result['nll']:.4f}", "mean negative log-likelihood per token (nats)"),
            MetricRow("ppl", f"{result['ppl']:.3f}", "token perplexity"),
            MetricRow("word_ppl", f"{result['word_ppl']:.3f}", f"per whitespace word ({result['words']:,} words)"),
            MetricRow("byte_ppl", f"{result['byte_ppl']:.4f}", f"per UTF-8 byte ({result['bytes']:,} bytes)"),
            MetricRow("bits_per_byte", f"{result['bits_per_byte']:.4f}", "NLL in bits per byte"),
        ]


TASK = Perplexity()
