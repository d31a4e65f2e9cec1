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

import math
from pathlib import Path

import torch

from gpt2lab.errors import UserError
from gpt2lab.evaluate import (
    all_reduce_sum,
    dummy_forward_calls,
    most_forward_calls,
    progress_bar,
    rank_and_world,
    read_utf8,
    shard,
)
from gpt2lab.parallel import unwrap


def read_text(path: str | Path, hf_rows: bool = False) -> str:
    """The text of `path` (UTF-8, CRLF -> LF); with `hf_rows`, non-empty lines joined as HF dataset rows."""
    text = read_utf8(Path(path)).replace("\r\n", "\n")
    if hf_rows:
        text = "\n\n".join(line + "\n" for line in text.split("\n") if line)
    return text


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window: input tokens [begin, end), targets [first_target, end)."""
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


@torch.no_grad()
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
    model = unwrap(model)
    if max_length > model.config.block_size:
        raise UserError(f"--max-length {max_length} exceeds the model's block_size={model.config.block_size}")
    if len(ids) < 2:
        raise UserError("the text is shorter than 2 tokens: nothing to score")
    device = next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long)
    all_windows = windows(len(ids), max_length, stride)
    rank, _ = rank_and_world(env)
    batches = _batches(shard(all_windows, env), batch_size)
    most = most_forward_calls(len(batches), env)
    nll, count = 0.0, 0
    with progress_bar(len(batches), "perplexity", enabled=show_progress and rank == 0) as advance:
        for batch in batches:
            idx = torch.stack([data[b:e] for b, e, _ in batch])  # (B, T)
            targets = torch.full_like(idx, -100)
            for row, (b, e, first) in enumerate(batch):
                # Position t predicts token b + t + 1; score targets first .. e - 1.
                targets[row, first - b - 1 : e - b - 1] = data[first:e]
            _, loss = model(idx.to(device), targets.to(device), loss_reduction="sum")
            nll += loss.item()
            count += int((targets != -100).sum())
            advance(1)
    dummy_forward_calls(model, most - len(batches))
    nll, count = all_reduce_sum([nll, count], env)
    return nll, int(count)


def _batches(wins: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows in groups of `batch_size`, split so that each batch has one window length."""
    out = []
    for i in range(0, len(wins), batch_size):
        group = wins[i : i + batch_size]
        for length in sorted({e - b for b, e, _ in group}, reverse=True):
            out.append([w for w in group if w[1] - w[0] == length])
    return out


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
