"""A loaded gpt2lab model as an lm-evaluation-harness `LM`: every lm-eval task scored on gpt2lab's own
model and KV cache (imports torch and lm_eval; `gpt2lab.lm_eval` registers the `--model gpt2lab` that
loads an `--init` into it).

    lm = HarnessLM(model, tokenizer, batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

The three request types, as lm-eval's `hf` backend computes them (the same numbers within float
rounding, tested against it):

    loglikelihood          (context, continuation) -> (sum log p(continuation | context), greedy?)
                           tokenized as `scoring.encode_pair` (lm-eval's `_encode_pair`), an empty
                           context replaced by the end-of-text token; scored by
                           `scoring.score_continuations`: sorted by length, batched, each distinct
                           context computed once in the KV cache and shared by its continuations
                           (a multiple-choice question's choices), the LM head run on continuation
                           positions only
    loglikelihood_rolling  a whole text, end-of-text token first, cut into the disjoint windows of
                           max_length tokens that `gpt2lab eval wikitext` scores (`wikitext.window_rows`),
                           windows of equal length batched, each token's NLL taken where the window
                           predicts it (`scoring.target_nll_per_row`), summed per text
    generate_until         `sampling.generate` (KV cache, left-padded batches of equal settings),
                           greedy unless do_sample, cut at the first `until` string
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM

from gpt2lab.errors import UserError
from gpt2lab.evaluate.scoring import encode_pair, score_continuations, target_nll_per_row
from gpt2lab.evaluate.wikitext import window_rows
from gpt2lab.parallel import unwrap

ROLLING_TOKENS_PER_ROW = 256
"""Rolling windows are long (block_size tokens, logits over the vocabulary at each): a batch of them
takes batch_size * ROLLING_TOKENS_PER_ROW tokens, at least one window."""
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


class HarnessLM(LM):
    """lm-eval's model interface over a gpt2lab model and tokenizer (anything with encode/decode/eot_id).

    batch_size: (context, continuation) pairs per forward pass. max_length: the longest sequence
    the model reads (default: block_size), as lm-eval's `max_length`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 32,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.model = unwrap(model).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        block_size = self.model.config.block_size
        self.max_length = int(max_length or block_size)
        if self.max_length > block_size and self.model.config.pos_emb == "learned":
            raise UserError(f"max_length={self.max_length} exceeds the model's block_size={block_size}")

    # ---------------------------------------------------------------------------------------------
    # lm-eval's interface

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_request(*req.args) for req in requests]
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size)
        out = [(s.logprob, s.greedy) for s in scores]
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for i, req in enumerate(requests):
            for row in window_rows([self.prefix_id(), *self.tokenizer.encode(req.args[0])], self.max_length):
                rows.append(row)
                owner.append(i)
        per_batch = max(1, self.batch_size * ROLLING_TOKENS_PER_ROW // self.max_length)
        totals = [0.0] * len(requests)
        for i, nll in zip(owner, target_nll_per_row(self.model, rows, per_batch)):
            totals[i] -= nll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from gpt2lab.sampling import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            settings = self._generation_settings(requests[indices[0]].args[1])
            max_new = settings.pop("max_new_tokens")
            until = settings.pop("until")
            prompts = {i: self._prompt(requests[i].args[0], max_new) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))  # similar lengths share a batch
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                new = generate(self.model, [prompts[i] for i in batch], max_new_tokens=max_new,
                               stop_strings=until, tokenizer=self.tokenizer, **settings)
                for i, ids in zip(batch, new):
                    out[i] = _cut(self.tokenizer.decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------
    # Tokens

    def prefix_id(self) -> int:
        """The token that stands before a text with no context (lm-eval's prefix_token_id)."""
        if self.tokenizer.eot_id is None:
            raise UserError(f"the tokenizer ({self.tokenizer.name}) has no end-of-text token, which lm-eval "
                            "puts before a text scored without context; use a task that gives a context")
        return self.tokenizer.eot_id

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a loglikelihood request, as lm-eval's hf backend makes them."""
        if context == "":
            return [self.prefix_id()], self.tokenizer.encode(continuation)
        return encode_pair(self.tokenizer, context, continuation)

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The prompt ids: the context's last max_length - max_new tokens (lm-eval's hf backend)."""
        ids = self.tokenizer.encode(context) if context else [self.prefix_id()]
        return ids[-max(self.max_length - max_new, 1):]

    def _generation_settings(self, kwargs: dict) -> dict:
        """`sampling.generate` keywords from lm-eval's gen_kwargs (until, max_gen_toks, do_sample, ...)."""
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None)
        if until is None:
            until = [self.tokenizer.decode([self.tokenizer.eot_id])] if self.tokenizer.eot_id is not None else []
        elif isinstance(until, str):
            until = [until]
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", False):
            temperature = 0.0
        return {"max_new_tokens": max_new, "until": list(until), "temperature": temperature,
                "top_k": kwargs.pop("top_k", None), "top_p": kwargs.pop("top_p", None), "seed": kwargs.pop("seed", None)}


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `until` (lm-eval's stop-string rule)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
