"""Continuous batching: one thread owns the model and decodes every running request together.

    engine = Engine(model, max_batch=16, max_len=1024)
    engine.submit([Seq(prompt=ids, max_new_tokens=64, on_event=deliver)])   # events: Token, PromptLogprobs, Finished
    engine.cancel(seq)                                                      # the row is freed at the next token

The KV cache is one pool of `max_batch` rows (`KVCache`), allocated once. The rows in use come first:

    rows [0, n)    decoding: each step feeds every one of them one token (a ragged step: the rows have
                   different lengths, each token is stored at its own row's position)
    row n          at most one prompt being prefilled, `prefill_chunk` tokens per step, so the rows
                   already streaming keep streaming while a long prompt comes in
    rows (n, max)  free

A new request waits in a bounded queue (`QueueFull` beyond `max_queue`) until a row is free, and joins
the decoding rows at a token boundary once its prompt (all but its last token) is in the cache; its
last prompt token is fed by the next step, which gives its first new token. A finished, stopped or
cancelled row is freed at once: the last decoding row (and the prefilling one) move down into the hole.

Every row computes what it would compute alone (its own positions from 0, masked from the other
rows), so a greedy request returns `gpt2lab.sampling.generate`'s ids whatever else runs (up to float
rounding between batch shapes), and a sampled one draws from its own seeded generator. A
learned-position model slides a full row's context as `sampling.stream` does: the row is refilled from
the last `slide_keep` tokens of its text.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpt2lab.console import say
from gpt2lab.sampling import check_sampling, sample_next, slide_keep

# --------------------------------------------------------------------------------------------------
# Events a request receives (from the engine thread, through its `on_event`)


@dataclass
class Token:
    """One new token; `logprob` and `top` ((id, logprob) pairs, most likely first) when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    """The log-probability of each prompt token after the ones before it (None for the first), with
    the `top` alternatives at each position (None for the first)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Finished:
    """The request is over: "stop" (a stop id), "length" (max_new_tokens), "cancelled" or "error"."""

    reason: str
    message: str = ""


class QueueFull(Exception):
    """The queue of waiting requests is full; try again later."""


@dataclass(eq=False)
class Seq:
    """One sequence to generate. `prompt` is what the model sees (already cut to the context)."""

    prompt: list[int]
    max_new_tokens: int
    on_event: Callable[[Token | PromptLogprobs | Finished], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    echo_logprobs: bool = False  # also the prompt's log-probabilities (computed while prefilling)
    # Engine state
    cancelled: bool = False
    text: list[int] = field(default_factory=list)  # the row's context: what the cache holds, then `pending`
    filled: int = 0  # cache columns in use
    pending: int | None = None  # the token the next step feeds
    generated: int = 0
    generator: torch.Generator | None = None
    submitted: float = 0.0
    last_token: float | None = None
    prompt_logprobs: list = field(default_factory=list)
    prompt_top: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Metrics


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count), thread-safe enough for one writer."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip([*self.buckets, float("inf")], self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """The scheduler thread, the KV pool and the queue (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int, max_len: int, max_queue: int = 256,
                 prefill_chunk: int = 128) -> None:
        self.model = model
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_chunk = prefill_chunk
        self.device = model.transformer.wte.weight.device
        self.learned = model.config.pos_emb == "learned"
        self.keep = min(slide_keep(model), max(1, max_len // 2))  # tokens kept when a full row slides
        self.cache = model.new_cache(max_batch, max_len)
        self.rows: list[Seq] = []  # pool order: decoding rows, then at most one prefilling row
        self.n_decoding = 0
        self.queue: collections.deque[Seq] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.tokens_generated = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.inter_token = Histogram(LATENCY_BUCKETS)
        self.thread = threading.Thread(target=self._loop, name="gpt2lab-serve-engine", daemon=True)

    # Called from other threads

    def start(self) -> Engine:
        self.thread.start()
        return self

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue the sequences (all or none): QueueFull when the queue has no room for them."""
        for seq in seqs:
            check_sampling(max(seq.max_new_tokens, 1), seq.temperature, seq.top_k, seq.top_p, seq.seed)
            if not seq.prompt or len(seq.prompt) > self.max_len:
                raise ValueError(f"a prompt must have 1 to {self.max_len} tokens, got {len(seq.prompt)}")
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.queue) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting already")
            now = time.monotonic()
            for seq in seqs:
                seq.submitted = now
                self.queue.append(seq)
            self.cond.notify()

    def cancel(self, seq: Seq) -> None:
        """Stop generating `seq`; its row is freed at the next token boundary."""
        with self.cond:
            seq.cancelled = True
            self.cond.notify()

    def stop(self) -> None:
        """Cancel everything and end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    def stats(self) -> dict:
        return {"rows_in_use": len(self.rows), "rows_decoding": self.n_decoding, "queue_depth": len(self.queue),
                "max_batch": self.max_batch, "tokens_generated": self.tokens_generated}

    # The engine thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.queue or self.rows or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                self._step()
            except Exception as e:  # a bug or an allocation failure ends the running requests, not the server
                say(f"gpt2lab serve: error while decoding: {type(e).__name__}: {e}")
                for seq in [*self.rows, *self._take_queue()]:
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
                self.rows, self.n_decoding = [], 0
        for seq in [*self.rows, *self._take_queue()]:
            self._finish(seq, "cancelled")
        self.rows, self.n_decoding = [], 0

    def _take_queue(self) -> list[Seq]:
        with self.cond:
            seqs = list(self.queue)
            self.queue.clear()
        return seqs

    @torch.inference_mode()
    def _step(self) -> None:
        """One scheduling round: drop cancelled rows, admit queued requests, prefill one chunk, decode one token."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self._free(i, "cancelled")
        self._admit()
        if len(self.rows) > self.n_decoding:
            self._prefill_chunk()
        if self.n_decoding:
            self._decode()

    def _admit(self) -> None:
        while len(self.rows) == self.n_decoding and len(self.rows) < self.max_batch:
            with self.cond:
                if not self.queue:
                    return
                seq = self.queue.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            if seq.temperature > 0:
                seq.generator = torch.Generator(device=self.device)
                if seq.seed is None:
                    seq.generator.seed()
                else:
                    seq.generator.manual_seed(seq.seed)
            seq.text = list(seq.prompt)
            seq.filled = 0
            self.cache.clear_row(len(self.rows))
            self.rows.append(seq)
            if len(seq.prompt) == 1:
                self._prompt_done(seq)

    def _prefill_chunk(self) -> None:
        """Feed the prefilling row up to `prefill_chunk` more tokens of its prompt (all but the last)."""
        row = self.n_decoding
        seq = self.rows[row]
        chunk = seq.prompt[seq.filled: min(seq.filled + self.prefill_chunk, len(seq.prompt) - 1)]
        view = self.cache.rows(row, row + 1, seq.filled)
        idx = torch.tensor([chunk], device=self.device)
        logits, _ = self.model(idx, cache=view, last_only=not seq.echo_logprobs)
        if seq.echo_logprobs:  # the log-probability of each next prompt token
            targets = seq.prompt[seq.filled + 1: seq.filled + 1 + len(chunk)]
            lps, tops = _logprobs(logits[0], targets, seq.logprobs or 0)
            seq.prompt_logprobs += lps
            seq.prompt_top += tops
        seq.filled += len(chunk)
        if seq.filled == len(seq.prompt) - 1:
            self._prompt_done(seq)

    def _prompt_done(self, seq: Seq) -> None:
        """The prompt is in the cache but for its last token: the row joins the decoding rows."""
        seq.pending = seq.prompt[-1]
        if seq.echo_logprobs:
            seq.on_event(PromptLogprobs([None, *seq.prompt_logprobs], [None, *seq.prompt_top]))
        if seq.max_new_tokens == 0:
            self._free(self.n_decoding, "length")
            return
        self.n_decoding += 1

    def _slide(self, row: int, seq: Seq) -> None:
        """A full row of a learned-position model: refill it from the last `keep` tokens of its text."""
        self.cache.clear_row(row)
        keep = seq.text[-self.keep:]
        seq.filled = 0
        if len(keep) > 1:
            self.model(torch.tensor([keep[:-1]], device=self.device), cache=self.cache.rows(row, row + 1, 0),
                       last_only=True)
            seq.filled = len(keep) - 1

    def _decode(self) -> None:
        """One ragged step: every decoding row is fed its pending token and samples its next one."""
        n = self.n_decoding
        seqs = self.rows[:n]
        for row, seq in enumerate(seqs):
            if seq.filled == self.max_len:
                self._slide(row, seq)
        idx = torch.tensor([[s.pending] for s in seqs], device=self.device)
        pos = torch.tensor([[s.filled] for s in seqs], device=self.device)
        view = self.cache.rows(0, n, max(s.filled for s in seqs) + 1, ragged=True)
        logits, _ = self.model(idx, pos=pos, cache=view)
        logits = logits[:, -1]  # (n, V)
        greedy = logits.argmax(dim=-1).tolist()
        now = time.monotonic()
        done: list[tuple[int, str]] = []
        for row, seq in enumerate(seqs):
            seq.filled += 1
            if seq.temperature == 0:
                token = greedy[row]
            else:
                token = int(sample_next(logits[row: row + 1], seq.temperature, seq.top_k, seq.top_p, seq.generator))
            if token in seq.stop_ids:
                done.append((row, "stop"))
                continue
            event = Token(token)
            if seq.logprobs is not None:
                (event.logprob,), (event.top,) = _logprobs(logits[row: row + 1], [token], seq.logprobs)
            seq.generated += 1
            self.tokens_generated += 1
            if seq.last_token is None:
                self.ttft.observe(now - seq.submitted)
            else:
                self.inter_token.observe(now - seq.last_token)
            seq.last_token = now
            seq.on_event(event)
            seq.text.append(token)
            seq.pending = token
            if seq.generated == seq.max_new_tokens:
                done.append((row, "length"))
        for row, reason in reversed(done):
            self._free(row, reason)

    def _free(self, row: int, reason: str) -> None:
        """End the request in `row` and close the hole: the last decoding row and the prefilling one move down."""
        seq = self.rows.pop(row)
        self._finish(seq, reason)
        if row < self.n_decoding:
            self.n_decoding -= 1
            last = self.n_decoding  # the last decoding row's old index, now past the end of the decoding rows
            if row < last:
                self.rows.insert(row, self.rows.pop(last - 1))
                self.cache.move_row(last, row, self.rows[row].filled)
            if len(self.rows) > self.n_decoding:  # the prefilling row, one place down
                self.cache.move_row(last + 1, last, self.rows[last].filled)

    def _finish(self, seq: Seq, reason: str, message: str = "") -> None:
        seq.on_event(Finished(reason, message))


def _logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of `targets` (one per row of logits (T, V)) and the k most likely ids of each row."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp[torch.arange(len(targets)), torch.tensor(targets, device=lp.device)].tolist()
    if k == 0:
        return chosen, [[] for _ in targets]
    values, ids = lp.topk(k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
