"""The Python front door: load any model the CLI can name, generate, stream, score; train from Python.

    import gpt2lab
    lm = gpt2lab.load("out/quickstart")                   # any --init: preset/hub id, HF dir, run, checkpoint, adapter
    lm.generate("The ", max_new_tokens=50, seed=0)        # -> str (a list of prompts -> a list of str)
    for piece in lm.stream("The "): print(piece, end="")
    lm.score("some text")                                 # Score(loglikelihood=..., tokens=..., perplexity=...)
    lm.chat([{"role": "user", "content": "Hi"}])          # a finetuned model's answer, in its chat template
    result = gpt2lab.train("quickstart", **{"train.max_steps": 100, "checkpoint.out_dir": "out/qs"})

Everything here goes through the same code as the commands: `gpt2lab.loading.load_model` (what
`--init` means), `gpt2lab.generate` (what `gpt2lab sample` runs), the sliding-window scorer of
`gpt2lab eval perplexity`, and `gpt2lab.run.train` (what `gpt2lab train` runs).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpt2lab.errors import ArgumentError
from gpt2lab.fileio import surrogate_problem


@dataclass(frozen=True)
class Score:
    """How well a model predicts one text (as `gpt2lab eval perplexity` computes it)."""

    loglikelihood: float
    """Sum of log p(token | context) over the scored tokens, in nats."""
    tokens: int
    """Tokens scored (every token but the first, which has no context)."""
    perplexity: float
    """exp(-loglikelihood / tokens)."""


class LoadedModel:
    """A model and its tokenizer, with text in and text out. `.model` is the plain `gpt2lab.GPT`.

    A text or token id it cannot use (not a str, a lone surrogate, an id outside the vocabulary) raises
    `gpt2lab.errors.ArgumentError`, a `UserError` with a one-line message."""

    def __init__(self, model: Any, tokenizer: Any, chat_template: Any = "alpaca") -> None:
        from gpt2lab.chat_template import get_chat_template

        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = get_chat_template(chat_template)
        """The `gpt2lab.chat_template.ChatTemplate` of `chat`: the one the model was finetuned with, else alpaca."""

    def __repr__(self) -> str:
        c = self.model.config
        return (f"LoadedModel({self.model.num_params():,} params, {c.n_layer} layers x {c.n_embd}, "
                f"tokenizer {self.tokenizer.name}, {self.model.transformer.wte.weight.device})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self.tokenizer.encode(_text(text, "text"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(self._ids(ids))

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 100, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] = ()) -> str | list[str]:
        """The text generated after `prompt` (a list of prompts -> a list of texts, one batch).
        temperature 0 = greedy; `seed` makes sampling reproducible; generation ends at the
        tokenizer's end-of-text or at a `stop` string (not included)."""
        from gpt2lab.generate import stream_text

        prompts, stop = _texts(prompt, "prompt"), _texts(stop, "stop")
        texts = []
        for p in prompts:  # one prompt at a time: the same text `gpt2lab sample` gives for it
            pieces = stream_text(self.model, self.tokenizer, self._prompt_ids(p), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_strings=stop)
            texts.append("".join(pieces))
        return texts[0] if isinstance(prompt, str) else texts

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of OpenAI-style messages [{"role": "system"|"user"|"assistant", "content": str}, ...]
        in the model's chat template (what `apply_chat_template` of its export gives)."""
        return self.chat_template.encode(messages, self.tokenizer, add_generation_prompt=add_generation_prompt)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, *, temperature: float = 0.7,
             top_k: int | None = 50, top_p: float | None = None, seed: int | None = None) -> str:
        """The assistant's answer to `messages` (see `encode_chat`), until <|endoftext|> or the start of
        a new turn, with the oldest exchanges dropped when the conversation outgrows half the context."""
        from gpt2lab.generate import stream_text

        room = min(max_new_tokens, self.model.config.block_size // 2)
        ids = self.chat_template.encode(messages, self.tokenizer, max_tokens=self.model.config.block_size - room + 1)
        return "".join(stream_text(self.model, self.tokenizer, ids, max_new_tokens=room, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, stop_strings=self.chat_template.stop)).strip()

    def stream(self, prompt: str, max_new_tokens: int = 100, **kwargs: Any) -> Iterator[str]:
        """The text generated after `prompt`, piece by piece as it is decoded (arguments of `generate`)."""
        from gpt2lab.generate import stream_text

        stop = _texts(kwargs.pop("stop", ()), "stop")
        yield from stream_text(self.model, self.tokenizer, self._prompt_ids(_text(prompt, "prompt")),
                               max_new_tokens=max_new_tokens,
                               stop_strings=stop, **kwargs)

    def score(self, text: str | Sequence[str], *, max_length: int | None = None,
              stride: int | None = None) -> Score | list[Score]:
        """Log-likelihood, token count and perplexity of `text` (a list -> a list), with the
        sliding windows of `gpt2lab eval perplexity` (defaults: block_size, stride half of it)."""
        from gpt2lab.evaluate.perplexity import sliding_window_nll

        texts = _texts(text, "text")
        max_length = _count(max_length, "max_length") or self.model.config.block_size
        stride = _count(stride, "stride") or max(max_length // 2, 1)
        scores = []
        for t in texts:
            nll, count = sliding_window_nll(self.model, self.tokenizer.encode(t), max_length, stride)
            scores.append(Score(loglikelihood=-nll, tokens=count, perplexity=math.exp(nll / count)))
        return scores[0] if isinstance(text, str) else scores

    def _ids(self, ids: Any) -> list[int]:
        """`ids` as a list of ints of the tokenizer's vocabulary (ArgumentError otherwise)."""
        n, name = self.tokenizer.vocab_size, self.tokenizer.name
        try:
            out = [operator.index(i) for i in ids]
        except TypeError:
            raise ArgumentError(f"token ids must be a sequence of integers, got {_kind(ids)}") from None
        bad = next((i for i in out if not 0 <= i < n), None)
        if bad is not None:
            raise ArgumentError(f"token id {bad} is outside the {name} tokenizer's vocabulary (0 to {n - 1})")
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        eot = self.tokenizer.eot_id
        return ids if ids else ([eot] if eot is not None else [0])  # an empty prompt starts a document


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = next((v for v in value if not isinstance(v, int)), None)
        return f"a {type(value).__name__} holding {type(inner).__name__}" if inner is not None else type(value).__name__
    return type(value).__name__


def _text(value: Any, what: str) -> str:
    """`value` if it is a str of whole characters; ArgumentError otherwise."""
    if not isinstance(value, str):
        raise ArgumentError(f"{what} must be a str, got {_kind(value)}")
    problem = surrogate_problem(value)
    if problem is not None:
        raise ArgumentError(f"{what}: {problem}")
    return value


def _texts(value: Any, what: str) -> list[str]:
    """A str or a sequence of str, as a list of checked texts."""
    if isinstance(value, str):
        return [_text(value, what)]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ArgumentError(f"{what} must be a str or a list of str, got {_kind(value)}")
    return [_text(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _count(value: Any, what: str) -> int | None:
    """None, or `value` as a positive int."""
    if value is None:
        return None
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{what} must be a positive integer or None, got {_kind(value)}") from None
    if value < 1:
        raise ArgumentError(f"{what} must be a positive integer or None, got {value}")
    return value


def load(init: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model `init` names, as `--init` does on the command line: a preset or hub id (`gpt2`,
    `distilgpt2`, `random:gpt2-tiny`), a Hugging Face directory, a gpt2lab run or checkpoint directory,
    or a LoRA adapter directory (merged into its base). device: auto|cpu|cuda|cuda:N|mps.
    dtype: auto (as stored; `gpt2lab sample --dtype auto` measures instead) or fp32|bf16|fp16, or int8
    (CPU only: int8 linear layers for decoding, see `gpt2lab.int8`)."""
    from gpt2lab.devices import canonical_dtype, check_device_name, resolve_device
    from gpt2lab.loading import chat_template_of, load_model

    init = os.fspath(init) if isinstance(init, os.PathLike) else init
    if not isinstance(init, str):
        raise ArgumentError(f"init must be a model name or a path (str or os.PathLike), got {_kind(init)}")
    check_device_name(device)
    dtype = dtype if dtype == "int8" else canonical_dtype(dtype)
    model, tokenizer = load_model(init, device=resolve_device(device), dtype=None if dtype == "auto" else dtype)
    return LoadedModel(model, tokenizer, chat_template_of(init) or "alpaca")


def train(config: str | None = "quickstart", **overrides: Any) -> Any:
    """Run `gpt2lab train`'s trainer from Python and return its `TrainResult` (step, losses, checkpoint).

    config: a preset name or YAML path (None = the dataclass defaults). overrides: dotted keys, as on
    the command line (`**{"train.max_steps": 100}`), or whole sections (`optim={"lr": 1e-3}`).
    """
    from gpt2lab.config import load_config
    from gpt2lab.run import train as run_training

    return run_training(load_config(config, overrides))
