"""The HTTP side of `gpt2lab serve`: OpenAI's routes over the continuous-batching engine.

    POST /v1/completions        text or token-id prompts; n, stop, seed, logprobs + echo, streaming (SSE)
    POST /v1/chat/completions   system/user/assistant messages rendered with the model's chat template
    GET  /v1/models             the one model served
    GET  /health                200 {"status": "ok"}
    GET  /metrics               Prometheus text: requests, rows in use, queue, tokens, TTFT, inter-token
    GET  /                      the chat page (static/chat.html, package data): the only file served

    GET /tokenizer_info, POST /tokenize, /detokenize   vLLM's tokenizer routes (lm-eval's remote tokenizer)

`Gate` (an ASGI middleware in front of every route) refuses a /v1 or tokenizer request without the API key (401)
and a body over the size cap (413), and counts the answers. Everything else is checked field by field
in `gpt2lab.serve.protocol` (400 naming the field); a full queue is 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2lab.chat_template import ChatTemplate, get_chat_template
from gpt2lab.errors import UserError
from gpt2lab.fileio import parse_json
from gpt2lab.generate import StopText
from gpt2lab.serve.protocol import APIError, bad, get_bool, read_chat, read_completion, refuse_unknown
from gpt2lab.serve.scheduler import Engine, Finished, PromptLogprobs, QueueFull, Seq, Token
from gpt2lab.tokenizer import Tokenizer

TOKENIZER_ROUTES = ("/tokenizer_info", "/tokenize", "/detokenize")  # vLLM's, for lm-eval's remote tokenizer
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/", *TOKENIZER_ROUTES)


@dataclass
class Settings:
    model_name: str
    max_len: int  # tokens of context a request may use (the KV pool's row length)
    learned: bool  # learned positions: a long prompt keeps its end and the context slides
    template: ChatTemplate = field(default_factory=lambda: get_chat_template("alpaca"))  # the model's chat template
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    requests: dict[tuple[str, int], int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Chat messages -> prompt ids


def chat_prompt_ids(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, template: ChatTemplate,
                    max_tokens: int) -> list[int]:
    """The prompt ids of a conversation (an optional system message, then user/assistant turns ending
    with a user message), rendered by the model's chat template exactly as `gpt2lab chat` renders it;
    the oldest exchanges are dropped until it fits in `max_tokens`. A conversation the template
    cannot render is a 400 naming `messages`."""
    try:
        return template.encode(messages, tokenizer, max_tokens=max_tokens)
    except UserError as e:
        raise APIError(400, str(e), "messages") from None


# --------------------------------------------------------------------------------------------------
# One choice: its sequence, its text (stop strings cut it) and its log-probabilities


class Choice:
    def __init__(self, index: int, seq: Seq, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.index, self.seq = index, seq
        self.out = StopText(tokenizer, stops)  # the text, stop strings cut
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []
        self.tops: list[list[tuple[int, float]] | None] = []
        self.prompt: PromptLogprobs | None = None
        self.finish: str | None = None  # set once: stop, length, cancelled, error
        self.error = ""

    def feed(self, event: Token | PromptLogprobs | Finished) -> str:
        """Take one event; return the text it makes safe to send (a stop string is never sent)."""
        if isinstance(event, PromptLogprobs):
            self.prompt = event
            return ""
        if isinstance(event, Finished):
            if self.finish is None:
                self.finish, self.error = event.reason, event.message
                if event.token is not None:  # the stop id: in the log-probabilities, not in the text
                    self.tokens.append(event.token.id)
                    self.logprobs.append(event.token.logprob)
                    self.tops.append(event.token.top)
                return self.out.flush()
            return ""
        if self.finish is not None:  # tokens after a stop string, before the engine saw the cancel
            return ""
        self.tokens.append(event.id)
        self.logprobs.append(event.logprob)
        self.tops.append(event.top)
        piece = self.out.feed(event.id)
        if self.out.stopped:
            self.finish = "stop"
        return piece

    @property
    def finish_reason(self) -> str:
        return "length" if self.finish == "length" else "stop"

    @property
    def done(self) -> bool:
        return self.finish is not None


# --------------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, tokenizer: Tokenizer, settings: Settings) -> Gate:
    """The ASGI app (FastAPI behind `Gate`)."""
    app = FastAPI(title="gpt2lab", docs_url=None, redoc_url=None, openapi_url=None)
    eot = getattr(tokenizer, "eot_id", None)
    stop_ids = () if eot is None else (eot,)
    vocab = engine.model.config.vocab_size

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "gpt2lab", "max_model_len": settings.max_len}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_text(engine, settings), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        page = resources.files("gpt2lab.serve").joinpath("static/chat.html")
        if not page.is_file():
            raise APIError(404, "the chat page is not installed with this copy of gpt2lab", code="not_found")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        special = tokenizer.decode([eot]) if eot is not None else None
        return {"eos_token": special, "bos_token": special, "pad_token": None, "tokenizer_name": tokenizer.name,
                "vocab_size": tokenizer.vocab_size, "max_model_len": settings.max_len}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_json(request, settings.max_body)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        refuse_unknown(body, {"prompt", "add_special_tokens", "model"})
        get_bool(body, "add_special_tokens", False)  # GPT-2 adds none either way
        if not isinstance(body.get("prompt"), str):
            raise bad("prompt", "must be a string")
        ids = tokenizer.encode(body["prompt"], allow_special=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": settings.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_json(request, settings.max_body)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        refuse_unknown(body, {"tokens", "model"})
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise bad("tokens", f"must be an array of token ids from 0 to {vocab - 1}")
        return {"prompt": tokenizer.decode(tokens)}

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_name}'",
                           "model", "model_not_found")

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        ids = tokenizer.encode(prompt, allow_special=True)
        return ids or [eot if eot is not None else 0]  # an empty prompt starts a new document, as in `sample`

    def fit(ids: list[int], max_tokens: int, scoring: bool) -> list[int]:
        """The prompt as the model sees it, or 400 when prompt and completion cannot fit the context."""
        if max_tokens > settings.max_len:
            raise bad("max_tokens", f"may be at most {settings.max_len} (the context), got {max_tokens}",
                      "context_length_exceeded")
        if scoring and len(ids) > settings.max_len:  # every prompt token is scored: none may be dropped
            raise bad("prompt", f"this model's context is {settings.max_len} tokens, but the prompt to score has "
                      f"{len(ids)}; shorten it", "context_length_exceeded")
        if not settings.learned and len(ids) + max_tokens > settings.max_len:
            raise bad("max_tokens" if max_tokens else "prompt",
                      f"this model's context is {settings.max_len} tokens, but the prompt has {len(ids)} and "
                      f"max_tokens asks for {max_tokens}; shorten the prompt or lower max_tokens",
                      "context_length_exceeded")
        return ids[-settings.max_len:]  # a learned-position model keeps the end and slides, as `sample` does

    async def run(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Any, str]]:
        """Submit the choices' sequences (429 when the queue is full) and return their stream of
        (choice, event, text the event makes safe to send)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(choice: Choice):
            def on_event(event) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (choice, event))
                except RuntimeError:  # the event loop has closed (the server is gone)
                    pass
            return on_event

        for c in choices:
            c.seq.on_event = deliver(c)
            c.seq.stop_ids = stop_ids
        try:
            engine.submit([c.seq for c in choices])
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry after a second", code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except (UserError, ValueError) as e:  # what the checks above let through, said as a 400 (not a 500)
            raise APIError(400, str(e)) from None

        async def events() -> AsyncIterator[tuple[Choice, Any, str]]:
            live = len(choices)
            try:
                while live:
                    choice, event = await queue.get()
                    was_done = choice.done
                    piece = choice.feed(event)
                    if choice.done and not was_done and not isinstance(event, Finished):
                        engine.cancel(choice.seq)  # a stop string: free the row now
                    if isinstance(event, Finished):
                        live -= 1
                    yield choice, event, piece
            finally:
                for c in choices:
                    engine.cancel(c.seq)  # a client gone or a stream closed: free the rows (no-op when finished)

        return events()

    async def collect(request: Request, choices: list[Choice], stream: AsyncIterator) -> None:
        """Run a non-streamed request to its end; a client that disconnects meanwhile cancels it."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for c in choices:
                engine.cancel(c.seq)

        watcher = asyncio.create_task(watch())
        try:
            async for _ in stream:
                pass
        finally:
            watcher.cancel()

    def check_errors(choices: list[Choice]) -> None:
        for c in choices:
            if c.finish == "error":
                raise APIError(500, f"generation failed: {c.error}", type="server_error")

    # ---- /v1/completions

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request, settings.max_body)
        req = read_completion(body, vocab)
        check_model(body.get("model"))
        s = req.sampling
        scoring = req.echo and req.logprobs is not None
        given = [encode(p) for p in req.prompts]
        if len(given) * s.n > engine.max_queue:
            raise bad("prompt", f"{len(given)} prompts x n={s.n} is more than the {engine.max_queue} sequences "
                      "this server queues (--max-queue); send fewer at once")
        prompts = [fit(ids, s.max_tokens, scoring) for ids in given]
        choices = []
        for i, ids in enumerate(prompts):
            for j in range(s.n):
                seq = Seq(prompt=ids, max_new_tokens=s.max_tokens, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, seed=None if s.seed is None else s.seed + j,
                          logprobs=req.logprobs, echo_logprobs=scoring)
                choices.append(Choice(i * s.n + j, seq, tokenizer, s.stop))
        usage_prompt = sum(len(p) for p in prompts)
        if s.max_tokens == 0 and not scoring:  # nothing to compute
            for c in choices:
                c.feed(Finished("length"))
        stream = None if all(c.done for c in choices) else await run(choices)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def echo_text(c: Choice) -> str:
            return tokenizer.decode(given[c.index // s.n]) if req.echo else ""  # the whole prompt, as sent

        def logprobs_of(ids: list[int], lps: list, tops: list) -> dict:
            words = [tokenizer.decode([t]) for t in ids]
            offsets, at = [], 0
            for w in words:
                offsets.append(at)
                at += len(w)
            return {"tokens": words, "token_logprobs": lps, "text_offset": offsets,
                    "top_logprobs": [None if top is None else {tokenizer.decode([t]): lp for t, lp in top}
                                     for top in tops]}

        def prompt_logprobs(c: Choice) -> dict:
            return logprobs_of(c.seq.prompt, c.prompt.logprobs, c.prompt.top)

        def new_logprobs(c: Choice, start: int = 0) -> dict | None:
            if req.logprobs is None:
                return None
            return logprobs_of(c.tokens[start:], c.logprobs[start:], c.tops[start:])

        def all_logprobs(c: Choice) -> dict | None:
            if req.logprobs is None or not (scoring and c.prompt is not None):
                return new_logprobs(c)
            both = prompt_logprobs(c)
            new = new_logprobs(c)
            shift = sum(len(w) for w in both["tokens"])
            return {"tokens": both["tokens"] + new["tokens"], "token_logprobs": both["token_logprobs"] + new["token_logprobs"],
                    "text_offset": both["text_offset"] + [o + shift for o in new["text_offset"]],
                    "top_logprobs": both["top_logprobs"] + new["top_logprobs"]}

        def usage() -> dict:
            done = sum(len(c.tokens) for c in choices)
            return {"prompt_tokens": usage_prompt, "completion_tokens": done, "total_tokens": usage_prompt + done}

        if not s.stream:
            if stream is not None:
                await collect(request, choices, stream)
            check_errors(choices)
            return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                    "choices": [{"index": c.index, "text": echo_text(c) + c.out.shown,
                                 "logprobs": all_logprobs(c), "finish_reason": c.finish_reason}
                                for c in choices],
                    "usage": usage()}

        def chunk(c: Choice, text: str, logprobs: dict | None, finish: str | None) -> str:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                        "choices": [{"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        async def body_stream() -> AsyncIterator[str]:
            try:
                async for text in sse_events():
                    yield text
            finally:  # the client went away mid-stream: free the rows now, not when the generator is collected
                for c in choices:
                    engine.cancel(c.seq)

        async def sse_events() -> AsyncIterator[str]:
            if stream is None:
                for c in choices:
                    if req.echo:
                        yield chunk(c, echo_text(c), None, None)
                    yield chunk(c, "", None, c.finish_reason)
            else:
                if req.echo and not scoring:
                    for c in choices:
                        yield chunk(c, echo_text(c), None, None)
                sent = {c.index: 0 for c in choices}  # tokens whose log-probabilities were sent
                async for c, event, piece in stream:
                    if isinstance(event, PromptLogprobs):
                        yield chunk(c, echo_text(c), prompt_logprobs(c), None)
                        continue
                    lp = None
                    if req.logprobs is not None and len(c.tokens) > sent[c.index]:
                        lp, sent[c.index] = new_logprobs(c, sent[c.index]), len(c.tokens)
                    if piece or lp:
                        yield chunk(c, piece, lp, None)
                    if isinstance(event, Finished):
                        if c.finish == "error":
                            yield sse(APIError(500, f"generation failed: {c.error}", type="server_error").body())
                        yield chunk(c, "", None, c.finish_reason)
            if s.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                           "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_stream(), media_type="text/event-stream")

    # ---- /v1/chat/completions

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await read_json(request, settings.max_body)
        req = read_chat(body)
        check_model(body.get("model"))
        if eot is None:
            raise APIError(400, "this model's tokenizer has no <|endoftext|>, which chat needs; use /v1/completions",
                           "messages")
        s = req.sampling
        if s.max_tokens is not None and s.max_tokens >= settings.max_len:
            raise bad("max_tokens", f"must be below {settings.max_len} (the context), got {s.max_tokens}",
                      "context_length_exceeded")
        room = s.max_tokens if s.max_tokens is not None else settings.max_len // 2
        ids = chat_prompt_ids(req.messages, tokenizer, settings.template, settings.max_len - room)
        max_tokens = s.max_tokens if s.max_tokens is not None else settings.max_len - len(ids)
        stops = list(settings.template.stop) + s.stop
        choices = [Choice(j, Seq(prompt=ids, max_new_tokens=max_tokens, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, seed=None if s.seed is None else s.seed + j,
                                 logprobs=req.logprobs), tokenizer, stops)
                   for j in range(s.n)]
        if max_tokens == 0:
            for c in choices:
                c.feed(Finished("length"))
        stream = None if max_tokens == 0 else await run(choices)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs_of(c: Choice, start: int = 0) -> dict | None:
            if req.logprobs is None:
                return None

            def entry(t: int, lp: float) -> dict:
                word = tokenizer.decode([t])
                return {"token": word, "logprob": lp, "bytes": list(tokenizer.decode_bytes([t]))}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top or []]}
                                for t, lp, top in zip(c.tokens[start:], c.logprobs[start:], c.tops[start:])]}

        def usage() -> dict:
            done = sum(len(c.tokens) for c in choices)
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        if not s.stream:
            if stream is not None:
                await collect(request, choices, stream)
            check_errors(choices)
            return {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.out.shown},
                                 "logprobs": logprobs_of(c), "finish_reason": c.finish_reason} for c in choices],
                    "usage": usage()}

        def chunk(c: Choice, delta: dict, finish: str | None, logprobs: dict | None = None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                        "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        async def body_stream() -> AsyncIterator[str]:
            try:
                async for text in sse_events():
                    yield text
            finally:  # the client went away mid-stream: free the rows now
                for c in choices:
                    engine.cancel(c.seq)

        async def sse_events() -> AsyncIterator[str]:
            for c in choices:
                yield chunk(c, {"role": "assistant", "content": ""}, None)
            if stream is None:
                for c in choices:
                    yield chunk(c, {}, c.finish_reason)
            else:
                sent = {c.index: 0 for c in choices}
                async for c, event, piece in stream:
                    lp = None
                    if req.logprobs is not None and len(c.tokens) > sent[c.index]:
                        lp, sent[c.index] = logprobs_of(c, sent[c.index]), len(c.tokens)
                    if piece or lp:
                        yield chunk(c, {"content": piece}, None, lp)
                    if isinstance(event, Finished):
                        if c.finish == "error":
                            yield sse(APIError(500, f"generation failed: {c.error}", type="server_error").body())
                        yield chunk(c, {}, c.finish_reason)
            if s.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": settings.model_name, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_stream(), media_type="text/event-stream")

    return Gate(app, settings)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class BodyTooLarge(Exception):
    pass


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 413 over `limit` bytes, 400 when it is not JSON."""
    try:
        raw = await request.body()
    except BodyTooLarge:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large") from None
    try:
        return parse_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


# --------------------------------------------------------------------------------------------------
# The gate: API key, body size, request counts


class Gate:
    """ASGI middleware in front of the app: 401 for a /v1 request without `Authorization: Bearer KEY`
    (when a key is set), 413 for a body over `max_body` bytes (by Content-Length, or counted as it
    arrives), and a count of the answers by route and status for /metrics."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status, ended = [0], [False]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended[0] = True
            await send(message)

        try:
            error = self._refuse(scope)
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, counted_send)
                return
            limit, seen = self.settings.max_body, [0]

            async def limited_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise BodyTooLarge
                return message

            await self.app(scope, limited_receive, counted_send)
        except asyncio.CancelledError:  # uvicorn cancels what still runs when a stop's grace period is over:
            if status[0] and not ended[0]:  # end the cut stream properly (its rows were freed on the way out)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            key = (route, status[0])
            self.settings.requests[key] = self.settings.requests.get(key, 0) + 1

    def _refuse(self, scope: dict) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is not None and (scope["path"].startswith("/v1") or scope["path"] in TOKENIZER_ROUTES):
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                what = "no API key was given" if not given else "the API key is wrong"
                return APIError(401, f"Incorrect API key: {what}; send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", type="authentication_error",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body):
            return APIError(413, f"the request body is larger than {self.settings.max_body} bytes",
                            code="request_too_large")
        return None


# --------------------------------------------------------------------------------------------------
# Metrics


def metrics_text(engine: Engine, settings: Settings) -> str:
    """Prometheus text format (version 0.0.4)."""
    stats = engine.stats()
    lines = ["# HELP gpt2lab_requests_total HTTP requests answered, by route and status.",
             "# TYPE gpt2lab_requests_total counter"]
    for (route, status), count in sorted(settings.requests.items()):
        lines.append(f'gpt2lab_requests_total{{route="{route}",status="{status}"}} {count}')
    for name, value, help_ in (
        ("rows_in_use", stats["rows_in_use"], "KV-cache rows holding a request (decoding or prefilling)."),
        ("rows_decoding", stats["rows_decoding"], "Rows in the running decode batch."),
        ("rows_max", stats["max_batch"], "KV-cache rows (--max-batch)."),
        ("queue_depth", stats["queue_depth"], "Requests waiting for a row."),
    ):
        lines += [f"# HELP gpt2lab_{name} {help_}", f"# TYPE gpt2lab_{name} gauge", f"gpt2lab_{name} {value}"]
    lines += ["# HELP gpt2lab_tokens_generated_total Tokens generated.", "# TYPE gpt2lab_tokens_generated_total counter",
              f"gpt2lab_tokens_generated_total {stats['tokens_generated']}"]
    for name, hist, help_ in (("time_to_first_token_seconds", engine.ttft, "From a request's arrival to its first token."),
                              ("inter_token_seconds", engine.inter_token, "Between consecutive tokens of a request.")):
        lines += [f"# HELP gpt2lab_{name} {help_}", f"# TYPE gpt2lab_{name} histogram", *hist.lines(f"gpt2lab_{name}")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Running it


def make_server(app: Gate, grace: float) -> Any:
    """A uvicorn server for `app` whose Ctrl-C / SIGTERM is a clean stop: it stops accepting, waits up to
    `grace` seconds for the requests in flight (then cancels them) and returns, without re-raising the
    signal as uvicorn otherwise does (the command then exits 0)."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace, lifespan="off",
                            access_log=False, ws="none")
    return Server(config)


def run_server(app: Gate, sock: Any, grace: float) -> None:
    """Serve on the bound socket `sock` until a stop (see `make_server`)."""
    make_server(app, grace).run(sockets=[sock])
