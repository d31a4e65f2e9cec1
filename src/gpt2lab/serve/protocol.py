"""The OpenAI request bodies, validated field by field, and OpenAI's error object.

Every problem is an `APIError`: an HTTP status and {"error": {"message", "type", "param", "code"}},
`param` naming the field. Fields OpenAI defines that this server does not implement are refused when
set to anything but their neutral value; a field OpenAI does not define is refused by name.
Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpt2lab.chat_template import ROLES

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error answered as OpenAI does: `status` and the error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"'{param}': {message}", param, code)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Field readers


def get_int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {json_type(value)}")
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo} and {hi}, got {value}")
    return value


def get_number(body: dict, name: str, default: float, lo: float, hi: float, *, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {json_type(value)}")
    if not ((lo < value) if low_open else (lo <= value)) or value > hi:
        interval = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
        raise bad(name, f"must be in {interval}, got {value}")
    return float(value)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {json_type(value)}")
    return value


def get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop", f"must be a string or an array of strings, got {json_type(value)}")
    if len(value) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences, got {len(value)}")
    return [s for s in value if s]


def refuse_unknown(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name)


def refuse_unsupported(body: dict, neutral: dict[str, Any]) -> None:
    """Fields OpenAI has but this server does not implement: only their neutral value is accepted."""
    for name, ok in neutral.items():
        if name in body and body[name] is not None and body[name] != ok:
            raise bad(name, f"is not supported by this server (only {ok!r} or unset)")


# --------------------------------------------------------------------------------------------------
# Sampling settings shared by both endpoints


@dataclass
class Sampling:
    max_tokens: int | None  # None: what the context leaves (chat only)
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: list[str]
    n: int
    seed: int | None
    stream: bool
    include_usage: bool


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "stream",
                   "stream_options", "user", "presence_penalty", "frequency_penalty", "logit_bias"}
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


def read_sampling(body: dict, max_tokens_default: int | None, max_tokens_name: str = "max_tokens") -> Sampling:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {json_type(model)}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"must be a string, got {json_type(user)}")
    refuse_unsupported(body, NEUTRAL)
    stream = get_bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"must be an object, got {json_type(options)}")
        if not stream:
            raise bad("stream_options", "is only allowed with 'stream': true")
        refuse_unknown(options, {"include_usage"})
        include_usage = get_bool(options, "include_usage", False)
    top_k = get_int(body, "top_k", None, -1, 2**31 - 1)
    top_p = get_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    n = get_int(body, "n", 1, 1, MAX_N)
    seed = get_int(body, "seed", None, 0, MAX_SEED - (n - 1))  # choice j draws with seed + j
    return Sampling(
        max_tokens=get_int(body, max_tokens_name, max_tokens_default, 0, 2**31 - 1),
        temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=None if top_p == 1.0 else top_p,
        top_k=None if top_k in (None, -1, 0) else top_k,
        stop=get_stop(body),
        n=n,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


# --------------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text or token ids, one per prompt
    sampling: Sampling
    logprobs: int | None
    echo: bool


COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}


def read_completion(body: Any, vocab_size: int) -> CompletionRequest:
    body = _object(body)
    refuse_unknown(body, COMPLETION_FIELDS)
    refuse_unsupported(body, {"suffix": "", "best_of": 1})
    if "prompt" not in body:
        raise bad("prompt", "is required", "missing_required_parameter")
    sampling = read_sampling(body, 16)
    return CompletionRequest(prompts=_prompts(body["prompt"], vocab_size), sampling=sampling,
                             logprobs=get_int(body, "logprobs", None, 0, MAX_LOGPROBS),
                             echo=get_bool(body, "echo", False))


def _prompts(value: Any, vocab_size: int) -> list[str | list[int]]:
    """A text, a list of texts, a list of token ids, or a list of lists of token ids."""
    def ids(items: list, where: str) -> list[int]:
        if not items:
            raise bad("prompt", f"{where} is an empty list of token ids")
        for i, t in enumerate(items):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise bad("prompt", f"{where}[{i}] must be a token id from 0 to {vocab_size - 1}, got {t!r}")
        return items

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
            return [ids(value, "prompt")]
        if all(isinstance(p, list) for p in value):
            return [ids(p, f"prompt[{i}]") for i, p in enumerate(value)]
    raise bad("prompt", "must be a string, an array of strings, an array of token ids or an array of arrays "
              f"of token ids, got {'an empty array' if value == [] else json_type(value)}")


# --------------------------------------------------------------------------------------------------
# /v1/chat/completions


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # {"role", "content"}; an optional system message, then user/assistant turns ending with user
    sampling: Sampling
    logprobs: int | None  # None: none; k: the chosen token's and the k most likely


CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


def read_chat(body: Any) -> ChatRequest:
    body = _object(body)
    refuse_unknown(body, CHAT_FIELDS)
    if "messages" not in body:
        raise bad("messages", "is required", "missing_required_parameter")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = read_sampling(body, None, name)
    logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "needs 'logprobs': true")
    return ChatRequest(messages=_messages(body["messages"]), sampling=sampling,
                       logprobs=(top or 0) if logprobs else None)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", f"must be a non-empty array of messages, got {json_type(value) if value != [] else 'an empty array'}")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object with 'role' and 'content', got {json_type(m)}")
        refuse_unknown(m, {"role", "content", "name"})
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + len(out) - len(turns)
            where = "a system message may only come first" if m["role"] == "system" else \
                f"expected a '{expected}' message (turns alternate user, assistant, ..., user)"
            raise bad(f"messages[{index}].role", where)
    if not turns or turns[-1]["role"] != "user":
        raise bad("messages", "the last message must be a 'user' message")
    return out


def _content(value: Any, where: str) -> str:
    """A string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"must be a string or an array of text parts, got {json_type(value)}")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}")
    return body
