"""Token generation over the preallocated KV cache: sampling, batched prompts, stopping.

    ids = generate(model, [tok.encode("Hello")], max_new_tokens=50, temperature=0.8, top_k=200, tokenizer=tok)
    for step in stream(model, prompts, max_new_tokens=50):   # one list of B ids (None = nothing) per step
        ...

Prompts of different lengths share one batch through LEFT padding: every row ends at the same
column, pad columns get position -1 (never attended) and each row's positions start at 0 at its
first real token, so a batched row computes exactly what it would compute alone. The prompt is
run once (prefill), then one token per step reads the cache. `generate_uncached` is the plain
full-recompute loop, kept as the reference the cached path is tested against. On a GPU,
`generate(..., compile=True)` runs each step (`decode_one_token`, fixed shapes over a static cache)
as one compiled CUDA graph (docs/gpu.md).

This module sits below the model (it only calls the model it is given), so `GPT.generate` is this
loop; text in and out, streaming and stop strings are in `gpt2lab.generate`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gpt2lab.config import check_seed
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import StreamDecoder, Tokenizer

# --------------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k ids and outside the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely ids whose probabilities sum to at least `top_p`
    (always at least the most likely id).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id when the ids before it already reach top_p (so the first id always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax when temperature == 0, else a draw from the
    temperature-scaled distribution restricted by top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit is shifted to 0 and the temperature kept above float32's smallest normal number:
    # a tiny temperature then scales the other logits to -inf (greedy), never to inf or NaN.
    logits = logits.float()
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   seed: int | None = None) -> None:
    """UserError for sampling settings outside their range (callers check before loading a model)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (or unset), got {top_p}")
    check_seed(seed, "seed")


def _make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device):
    if generator is not None:
        return generator
    if seed is None:
        return None  # torch's global RNG
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Stopping


class _Stopper:
    """Tracks which rows have stopped: on a stop id (not emitted) or once their generated text
    contains a stop string (the completing token is emitted)."""

    def __init__(self, batch_size: int, stop_ids: Sequence[int], stop_strings: Sequence[str],
                 tokenizer: Tokenizer | None) -> None:
        if stop_strings and tokenizer is None:
            raise UserError("stop_strings need a tokenizer to decode the generated ids; pass tokenizer=")
        self.stop_ids = set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.done = [False] * batch_size
        if self.stop_strings:
            self.decoders = [StreamDecoder(tokenizer) for _ in range(batch_size)]
            self.tails = [""] * batch_size  # just enough trailing text to see a stop string across tokens
            self.keep = max(len(s) for s in self.stop_strings) - 1

    def update(self, tokens: list[int]) -> list[int | None]:
        """Given one sampled id per row, return what each row emits (None = nothing) and update `done`."""
        out: list[int | None] = []
        for row, t in enumerate(tokens):
            if self.done[row] or t in self.stop_ids:
                self.done[row] = True
                out.append(None)
                continue
            out.append(t)
            if self.stop_strings:
                text = self.tails[row] + self.decoders[row].feed(t)
                if any(s in text for s in self.stop_strings):
                    self.done[row] = True
                self.tails[row] = text[len(text) - self.keep:] if self.keep else ""
        return out


def _default_stop_ids(stop_ids: Sequence[int] | None, tokenizer: Tokenizer | None) -> Sequence[int]:
    if stop_ids is not None:
        return stop_ids
    eot = getattr(tokenizer, "eot_id", None)
    return () if eot is None else (eot,)


# --------------------------------------------------------------------------------------------------
# Generation


# --------------------------------------------------------------------------------------------------
# Generation


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> idx (B, T) and pos (B, T), left padded (pad pos = -1)."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    pos = torch.full((len(prompts), T), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p):
            idx[row, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            pos[row, T - len(p):] = torch.arange(len(p))
    return idx.to(device), pos.to(device)


def _check_prompts(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise UserError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt is empty; start it with at least one token (e.g. the tokenizer's eot_id)")


@torch.inference_mode()
def stream(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Tokenizer | None = None,
    static_cache: bool = False,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Generate from B prompts in one batch, yielding after every step a list of B entries: the new
    id of each row, or None for a row that has stopped.

    prompts: B lists of token ids (lengths may differ). temperature 0 = greedy. seed (or an explicit
    `generator`) makes sampling reproducible. stop_ids (default: the tokenizer's eot_id) end a row
    and are not emitted; a row also ends once its generated text contains one of `stop_strings`
    (the completing id is emitted). Ends when every row has stopped or after max_new_tokens steps.
    The model is put in eval mode while generating (dropout off) and restored afterwards.
    A learned-position model sees at most block_size tokens: longer prompts keep their last
    block_size tokens, and when the context is full it slides: the cache is refilled from the last
    half block of each row's text and decoding goes on (nanoGPT crops its context the same way).
    static_cache: decode with fixed-shape steps (`decode_one_token` over a cache in static mode; same
    tokens). compile: also torch.compile those steps with CUDA graphs (`compiled_decode_one_token`),
    the fast path on a GPU; the first call of a cache size compiles (tens of seconds).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    _check_prompts(model, prompts)
    device = model.transformer.wte.weight.device
    generator = _make_generator(seed, generator, device)
    stopper = _Stopper(len(prompts), _default_stop_ids(stop_ids, tokenizer), stop_strings, tokenizer)
    learned = model.config.pos_emb == "learned"
    block_size = model.config.block_size
    rows = [list(p)[-block_size:] if learned else list(p) for p in prompts]  # each row's text so far
    T = max(len(r) for r in rows)
    # The last sampled id is never fed back, hence the - 1.
    cache_len = T + max_new_tokens - 1
    cache = model.new_cache(len(rows), min(cache_len, block_size) if learned else cache_len)
    decode = compiled_decode_one_token() if compile else decode_one_token
    was_training = model.training
    model.eval()

    def prefill(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        cache.reset()
        idx, pos = _left_pad(contexts, device)
        logits, _ = model(idx, pos=pos, cache=cache, last_only=True)  # (B, 1, V)
        if static_cache or compile:
            cache.start_static_decoding()
        next_pos = torch.tensor([[len(c)] for c in contexts], device=device)  # (B, 1)
        return logits[:, -1], next_pos, idx.shape[1]

    try:
        logits, next_pos, filled = prefill(rows)  # filled: cache columns in use
        if not (static_cache or compile):
            decode = one_token_step(model, cache)
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            new = tokens.tolist()
            yield stopper.update(new)
            if all(stopper.done) or step == max_new_tokens - 1:
                return
            for row, t in zip(rows, new):
                row.append(t)
            if filled == cache.max_len:  # only learned positions get here: slide the context
                logits, next_pos, filled = prefill([r[-slide_keep(model):] for r in rows])
                continue
            logits = decode(model, cache, tokens[:, None], next_pos)  # (B, V)
            next_pos += 1
            filled += 1
    finally:
        model.train(was_training)


def slide_keep(model: torch.nn.Module) -> int:
    """Tokens of context kept when a learned-position model's full context slides (half a block)."""
    return max(1, model.config.block_size // 2)


def decode_one_token(model: torch.nn.Module, cache: Any, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of the token after `token` (B, 1) at positions `pos` (B, 1), appended to `cache`.

    Over a cache in static mode (`KVCache.start_static_decoding`) every call has the same shapes and
    reads nothing back to the host, so torch.compile traces it as one graph that later steps reuse
    without recompiling (see `compiled_decode_one_token`), as gpt-fast does.
    """
    logits, _ = model(token, pos=pos, cache=cache)
    return logits[:, -1]


def one_token_step(model: torch.nn.Module, cache: Any) -> Callable[[torch.nn.Module, Any, torch.Tensor, torch.Tensor],
                                                                    torch.Tensor]:
    """The fastest plain decode step for `model` into `cache`, called as `decode_one_token`: the
    compiled one-row C step (`gpt2lab.native_decode`) where it runs (one row, a CPU model it
    covers), else `decode_one_token` itself. Call it again after replacing the cache."""
    from gpt2lab.native_decode import native_step

    return native_step(model, cache) or decode_one_token


@functools.cache
def compiled_decode_one_token() -> Callable[[torch.nn.Module, Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`decode_one_token` under torch.compile(mode="reduce-overhead", fullgraph=True): on CUDA a step is
    one CUDA-graph replay instead of hundreds of kernel launches. Its output is overwritten by the next
    call, so use (or clone) it before decoding the next token."""
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new ids of each of the B prompts (without the prompt and without a final stop id);
    takes the keyword arguments of `stream`."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens=max_new_tokens, **kwargs):
        for row, t in enumerate(step):
            if t is not None:
                out[row].append(t)
    return out


@torch.inference_mode()
def generate_uncached(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Reference generation: each prompt alone, the whole context recomputed every step, no cache
    (sliding the context of a learned-position model exactly as `stream` does)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    _check_prompts(model, prompts)
    learned = model.config.pos_emb == "learned"
    device = model.transformer.wte.weight.device
    generator = _make_generator(seed, None, device)
    out = []
    for prompt in prompts:
        seq = torch.tensor([list(prompt)[-model.config.block_size:] if learned else list(prompt)],
                           device=device)  # (1, T)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits, _ = model(seq)
            t = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (1,)
            if int(t) in stop_ids:
                break
            new.append(int(t))
            seq = torch.cat((seq, t[:, None]), dim=1)
            if learned and seq.shape[1] > model.config.block_size:
                seq = seq[:, -slide_keep(model):]
        out.append(new)
    return out


