"""The scoring machinery eval tasks share (imports torch: task modules import it inside `run`).

    encode_pair          context/continuation tokenization of lm-evaluation-harness
    score_continuations  sum log-likelihood and greedy match of continuation tokens, batched
    shard, all_reduce_sum  split work over torchrun ranks and add up the counts
    stderr_of_mean       the standard error of an accuracy
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt2lab.console import ProgressDisplay
from gpt2lab.errors import UserError
from gpt2lab.parallel import all_reduce, unwrap

# --------------------------------------------------------------------------------------------------
# Ranks: each takes a strided share of the items and the counts are summed


def rank_and_world(env=None) -> tuple[int, int]:
    """(rank, world_size) from a DistEnv, else from an initialized process group, else (0, 1)."""
    if env is not None:
        return env.rank, env.world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence, env=None) -> list:
    """This rank's items: those at positions i with i % world_size == rank."""
    rank, world = rank_and_world(env)
    return list(items[rank::world])


def all_reduce_sum(values: Sequence[float], env=None) -> list[float]:
    """Element-wise sum of `values` over all ranks (unchanged in a single process)."""
    return _all_reduce(values, "sum", env)


def _all_reduce(values: Sequence[float], op: str, env=None) -> list[float]:
    _, world = rank_and_world(env)
    if world == 1:
        return [float(v) for v in values]
    return all_reduce(torch.tensor([float(v) for v in values], dtype=torch.float64), op).tolist()


def most_forward_calls(calls: int, env=None) -> int:
    """The largest of every rank's planned number of forward calls (a collective; `calls` in one process).

    A sharded (FSDP) model gathers its weights in every forward call, so every rank must make the same
    number of calls: ranks agree on it before the first call and the ones with less work make dummy
    calls (`dummy_forward_calls`) after theirs. Agreeing first matters: a rank that reached this
    all-reduce while another is still inside a forward's all-gather would deadlock.
    """
    _, world = rank_and_world(env)
    return calls if world == 1 else int(_all_reduce([calls], "max", env)[0])


def dummy_forward_calls(model: torch.nn.Module, count: int) -> None:
    """`count` forward calls on one token, whose output is thrown away."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(count):
            model(torch.zeros((1, 1), dtype=torch.long, device=device))


# --------------------------------------------------------------------------------------------------
# Scoring continuations


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the way lm-evaluation-harness makes them.

    Trailing whitespace of the context moves to the continuation; `context + continuation` is
    encoded as one string and split after as many tokens as the context alone encodes to, so the
    continuation's first token is the one the model really sees there (e.g. " word", not "word").
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class ContinuationScore:
    """How well a model predicts a continuation given its context."""

    logprob: float
    """Sum of log p(token | everything before it) over the continuation tokens (natural log)."""
    n_tokens: int
    greedy: bool
    """Every continuation token is the model's most likely next token."""


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    env=None,
    on_batch: Callable[[int], None] | None = None,
    use_kv_cache: bool | None = None,
) -> list[ContinuationScore]:
    """Score each (context ids, continuation ids) pair: log p(continuation | context), token by token.

    A row longer than block_size + 1 tokens loses tokens from the left of its context, as in
    lm-evaluation-harness. Pairs are sorted by length, pairs of one context next to each other (less
    padding; scores come back in input order), and up to `batch_size` of them share a batch, run
    through the model's KV cache: one call for the batch's distinct contexts, each once, left-padded
    so that they all end in the same column, with logits for that last column only (it predicts each
    continuation's first token); then, in chunks of similar length, the cache rows of their contexts
    forked for the continuations (a multiple-choice question's endings share its context), the
    continuations but their last tokens, right-padded, whose logits predict the rest. So the LM head,
    the largest matmul of a small model, runs on continuation positions only, little of it on
    padding, and padding is never attended (padding columns have position -1). Every rank must call this; `on_batch(k)` follows each batch of k pairs.

    `use_kv_cache=False` runs one plain forward over context + continuation instead (same numbers,
    logits at every position). That is the default for FSDP-sharded models, whose mixed-precision
    compute dtype a cache allocated outside the forward could not match.
    """
    model = unwrap(model)
    if use_kv_cache is None:
        use_kv_cache = not _is_fsdp(model)
    block_size = model.config.block_size
    device = next(model.parameters()).device
    rows = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("score_continuations needs a non-empty context and continuation")
        if len(continuation) > block_size:
            raise UserError(
                f"a continuation of {len(continuation)} tokens does not fit the model's block_size={block_size}"
            )
        rows.append((list(context)[-(block_size + 1 - len(continuation)):], list(continuation)))
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), rows[i][0], len(rows[i][1])))
    batches = _pack([rows[i] for i in order], batch_size, block_size)
    # The cache path makes one call for the contexts and one per chunk of continuations longer than a token.
    calls = sum(1 + (len(_chunks(b)) if use_kv_cache else 0) for b in batches)
    most = most_forward_calls(calls, env)
    scores: list[ContinuationScore] = []
    for batch in batches:
        logprob, hits = [0.0] * len(batch), [0] * len(batch)
        parts = _continuation_parts(model, batch, device) if use_kv_cache else _continuation_parts_full(model, batch, device)
        for rows_of_part, logits, targets in parts:
            for i, lp, h in zip(rows_of_part, *_token_scores(logits, targets)):
                logprob[i] += lp
                hits[i] += h
        for (_, c), lp, h in zip(batch, logprob, hits):
            scores.append(ContinuationScore(logprob=lp, n_tokens=len(c), greedy=h == len(c)))
        if on_batch is not None:
            on_batch(len(batch))
    dummy_forward_calls(model, most - calls)
    in_order: list[ContinuationScore] = [None] * len(rows)  # type: ignore[list-item]
    for i, score in zip(order, scores):
        in_order[i] = score
    return in_order


def _pack(rows: list[tuple[list[int], list[int]]], batch_size: int, block_size: int) -> list[list]:
    """Consecutive rows in batches of at most `batch_size`, each fitting one KV cache of block_size columns
    (longest context + longest continuation - 1: contexts are left-padded, continuations right-padded)."""
    batches, current, longest_context, longest_continuation = [], [], 0, 0
    for context, continuation in rows:
        lc, ln = max(longest_context, len(context)), max(longest_continuation, len(continuation))
        if current and (len(current) == batch_size or lc + ln - 1 > block_size):
            batches.append(current)
            current, lc, ln = [], len(context), len(continuation)
        current.append((context, continuation))
        longest_context, longest_continuation = lc, ln
    if current:
        batches.append(current)
    return batches


CHUNK_SLACK = 1.15
"""Continuations of a batch run in chunks of similar lengths: a chunk takes the next-longest row while
its rows x longest length stays within CHUNK_SLACK x their tokens (padding costs what tokens cost)."""


def _chunks(batch: list) -> list[list[int]]:
    """The rows of `batch` whose continuations have more than one token, longest first, in chunks of
    similar length (see CHUNK_SLACK); one forward call each."""
    rows = sorted((i for i, (_, n) in enumerate(batch) if len(n) > 1), key=lambda i: -len(batch[i][1]))
    chunks: list[list[int]] = []
    for i in rows:
        chunk = chunks[-1] if chunks else None
        if chunk and (len(chunk) + 1) * len(batch[chunk[0]][1]) <= CHUNK_SLACK * (
                sum(len(batch[j][1]) for j in chunk) + len(batch[i][1])):
            chunk.append(i)
        else:
            chunks.append([i])
    return chunks


def _token_scores(logits: torch.Tensor, targets: list[list[int]]) -> tuple[list[float], list[int]]:
    """(summed log-probability, greedy hits) of each row's targets: logits (R, L, V), column j of row r
    predicting targets[r][j] (rows shorter than L are padding after their targets)."""
    device = logits.device
    lengths = torch.tensor([len(t) for t in targets])
    valid = torch.arange(logits.shape[1])[None, :] < lengths[:, None]  # (R, L)
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=device)
    picked = logits[valid.to(device)].float()  # (N, V), row-major: row r's tokens in order
    token_logprob = F.log_softmax(picked, dim=-1).gather(1, flat[:, None]).squeeze(1)
    token_greedy = (picked.argmax(dim=-1) == flat).float()
    row_of = torch.arange(len(targets))[:, None].expand_as(valid)[valid].to(device)
    sums = torch.zeros(len(targets), device=device, dtype=torch.float64).index_add_(0, row_of, token_logprob.double())
    hits = torch.zeros(len(targets), device=device).index_add_(0, row_of, token_greedy)
    return sums.tolist(), [round(h) for h in hits.tolist()]


def _continuation_parts(model: torch.nn.Module, batch: list, device: torch.device):
    """(rows, logits (R, L, V), targets) parts of a packed batch's scores, through the KV cache: first the
    batch's distinct contexts, each computed once, left-padded to end in one column, whose last logits
    predict every row's first continuation token; then, per chunk of rows (`_chunks`), a fork of the
    cache rows of their contexts and the continuations but their last tokens, right-padded."""
    distinct: dict[tuple[int, ...], int] = {}
    row_context = [distinct.setdefault(tuple(context), len(distinct)) for context, _ in batch]
    Lc = max(len(c) for c in distinct)
    idx = torch.zeros((len(distinct), Lc), dtype=torch.long)
    pos = torch.full((len(distinct), Lc), -1, dtype=torch.long)
    for i, context in enumerate(distinct):
        idx[i, Lc - len(context):] = torch.tensor(context)
        pos[i, Lc - len(context):] = torch.arange(len(context))
    chunks = _chunks(batch)
    Ln = max((len(batch[chunk[0]][1]) for chunk in chunks), default=1)
    cache = model.new_cache(len(distinct), Lc + Ln - 1)
    first, _ = model(idx.to(device), pos=pos.to(device), cache=cache, last_only=True)  # (U, 1, V)
    first = first.index_select(0, torch.tensor(row_context, device=device))  # (B, 1, V)
    yield range(len(batch)), first, [[n[0]] for _, n in batch]
    for chunk in chunks:
        L = len(batch[chunk[0]][1]) - 1
        idx = torch.zeros((len(chunk), L), dtype=torch.long)
        pos = torch.full((len(chunk), L), -1, dtype=torch.long)
        for r, i in enumerate(chunk):
            context, continuation = batch[i]
            idx[r, : len(continuation) - 1] = torch.tensor(continuation[:-1])
            pos[r, : len(continuation) - 1] = torch.arange(len(context), len(context) + len(continuation) - 1)
        rows_cache = cache.fork(torch.tensor([row_context[i] for i in chunk], device=device))
        logits, _ = model(idx.to(device), pos=pos.to(device), cache=rows_cache)  # (R, L, V)
        yield chunk, logits, [batch[i][1][1:] for i in chunk]


def _continuation_parts_full(model: torch.nn.Module, batch: list, device: torch.device):
    """Like `_continuation_parts`, in one part, from one forward over right-padded context + continuation[:-1]."""
    B = len(batch)
    T = max(len(c) + len(n) - 1 for c, n in batch)
    Ln = max(len(n) for _, n in batch)
    idx = torch.zeros((B, T), dtype=torch.long)
    where = torch.zeros((B, Ln), dtype=torch.long)  # the position whose logits predict continuation[j]
    for i, (context, continuation) in enumerate(batch):
        row = context + continuation[:-1]
        idx[i, : len(row)] = torch.tensor(row)
        where[i] = (len(context) - 1 + torch.arange(Ln)).clamp(max=T - 1)
    logits, _ = model(idx.to(device))  # (B, T, V)
    yield range(B), logits[torch.arange(B, device=device)[:, None], where.to(device)], [n for _, n in batch]


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


# --------------------------------------------------------------------------------------------------
# Scoring token rows (perplexity, wikitext)


@torch.no_grad()
def sum_target_nll(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 1,
    env=None,
    show_progress: bool = False,
    description: str = "perplexity",
) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of `rows` over all ranks.

    Each row is (input ids, target ids) of one length T <= block_size: position t of the input predicts
    target t, and a target of -100 is not scored. Consecutive rows of equal length are batched
    `batch_size` at a time; under torchrun each rank takes the rows k with k % world_size == rank
    (every rank must call this).
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    batches = _same_length_batches(shard(rows, env), batch_size)
    most = most_forward_calls(len(batches), env)
    nll, count = 0.0, 0
    with ProgressDisplay("items", total=len(batches), description=description, enabled=show_progress) as bar:
        for batch in batches:
            idx = torch.tensor([list(ids) for ids, _ in batch], dtype=torch.long)  # (B, T)
            targets = torch.tensor([list(t) for _, t in batch], dtype=torch.long)  # (B, T)
            _, loss = model(idx.to(device), targets.to(device), loss_reduction="sum")
            nll += loss.item()
            count += int((targets != -100).sum())
            bar.advance(1)
    dummy_forward_calls(model, most - len(batches))
    nll, count = all_reduce_sum([nll, count], env)
    return nll, int(count)


@torch.no_grad()
def target_nll_per_row(model: torch.nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                       batch_size: int = 1) -> list[float]:
    """The summed NLL (nats) of each row (input ids, target ids, -100 = not scored), as `sum_target_nll`
    scores them but row by row, in one process. Rows are sorted by length and batched `batch_size` at
    a time, one length per batch; the NLLs come back in input order."""
    model = unwrap(model)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = [0.0] * len(rows)
    for batch in _same_length_batches(order, batch_size, key=lambda i: len(rows[i][0])):
        idx = torch.tensor([list(rows[i][0]) for i in batch], dtype=torch.long)  # (B, T)
        targets = torch.tensor([list(rows[i][1]) for i in batch], dtype=torch.long)  # (B, T)
        _, loss = model(idx.to(device), targets.to(device), loss_reduction="none")  # (B * T,)
        for i, nll in zip(batch, loss.view(len(batch), -1).double().sum(dim=1).tolist()):
            out[i] = nll
    return out


def _same_length_batches(rows: list, batch_size: int, key: Callable[[Any], int] = lambda row: len(row[0])) -> list[list]:
    """Consecutive rows in groups of `batch_size`, each group split so that a batch has one row length
    (`key(row)`, default: the length of its input ids)."""
    out = []
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        for length in sorted({key(row) for row in group}, reverse=True):
            out.append([row for row in group if key(row) == length])
    return out


def stderr_of_mean(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n items (sample std / sqrt(n), as lm-evaluation-harness)."""
    return (p * (1 - p) / (n - 1)) ** 0.5 if n > 1 else 0.0
