"""The HTTP side of `gpt2lab serve`: OpenAI's routes over the continuous-batching engine.

    POST /v1/completions        text or token-id prompts; n, stop, seed, logprobs + echo, streaming (SSE)
    POST /v1/chat/completions   system/user/assistant messages rendered with the model's chat template
    GET  /v1/models             the one model served
    GET  /health                200 {"status": "ok"}
    GET  /metrics               Prometheus text: requests, rows in use, queue, tokens, TTFT, inter-token
    GET  /                      the chat page (static/chat.html, package data): the only file served

`Gate` (an ASGI middleware in front of every route) refuses a /v1 request without the API key (401)
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

from gpt2lab.data.sft import CHAT_TURN_END, TURN_STARTS, encode_segments, render_prompt, render_segments
from gpt2lab.generate import _first_stop, _held_back
from gpt2lab.serve.protocol import APIError, bad, read_chat, read_completion
from gpt2lab.serve.scheduler import Engine, Finished, PromptLogprobs, QueueFull, Seq, Token
from gpt2lab.tokenizer import StreamDecoder, Tokenizer

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass
class Settings:
    model_name: str
    max_len: int  # tokens of context a request may use (the KV pool's row length)
    learned: bool  # learned positions: a long prompt keeps its end and the context slides
    template: str = "alpaca"  # the chat template (gpt2lab.data.sft)
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    requests: dict[tuple[str, int], int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Chat messages -> prompt ids


def chat_prompt_ids(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, template: str,
                    max_tokens: int) -> list[int]:
    """The prompt ids of a conversation (an optional system message, then user/assistant turns ending
    with a user message), rendered as `gpt2lab chat` renders it: with the template the model was
    finetuned on, each past turn as a training example (its answer followed by <|endoftext|>), then
    the new message's prompt. The system message is the chat template's "### System:" turn, and with
    alpaca or a custom template its text followed by a blank line before everything. The oldest turns
    are dropped until the prompt fits in `max_tokens`; a single message is cut from the left."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = list(messages[1:] if system is not None else messages)
    turns = [(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2)]
    message = rest[-1]["content"]
    while True:
        if template == "chat":
            history = [{"role": "system", "content": system}] if system is not None else []
            history += [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
            segments = render_segments({"messages": history}, "chat") + [(render_prompt(message, None, "chat"), False)]
        else:
            segments = [(system + CHAT_TURN_END, False)] if system is not None else []
            segments += [seg for u, a in turns for seg in ((render_prompt(u, None, template), False), (a, True))]
            segments.append((render_prompt(message, None, template), False))
        ids, _ = encode_segments(segments, tokenizer)
        if len(ids) <= max_tokens:
            return ids
        if not turns:
            return ids[-max_tokens:]
        turns.pop(0)


# --------------------------------------------------------------------------------------------------
# One choice: its sequence, its text (stop strings cut it) and its log-probabilities


class Choice:
    def __init__(self, index: int, seq: Seq, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.index, self.seq, self.tokenizer, self.stops = index, seq, tokenizer, stops
        self.decoder = StreamDecoder(tokenizer)
        self.text, self.emitted = "", 0
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
                self.text += self.decoder.flush()
                cut = _first_stop(self.text, self.stops)
                end = len(self.text) if cut is None else cut
                piece, self.emitted = self.text[self.emitted:end], max(end, self.emitted)
                return piece
            return ""
        if self.finish is not None:  # tokens after a stop string, before the engine saw the cancel
            return ""
        self.tokens.append(event.id)
        self.logprobs.append(event.logprob)
        self.tops.append(event.top)
        self.text += self.decoder.feed(event.id)
        cut = _first_stop(self.text, self.stops)
        if cut is not None:
            self.finish = "stop"
            piece, self.emitted = self.text[self.emitted:cut], max(cut, self.emitted)
            return piece
        safe = len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(safe, self.emitted)
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
        if (not settings.learned or scoring) and len(ids) + max_tokens > settings.max_len:
            raise bad("max_tokens" if max_tokens else "prompt",
                      f"this model's context is {settings.max_len} tokens, but the prompt has {len(ids)} and "
                      f"max_tokens asks for {max_tokens}; shorten the prompt or lower max_tokens",
                      "context_length_exceeded")
        return ids[-settings.max_len:]  # a learned-position model keeps the end, as `sample` does

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
        prompts = [fit(encode(p), s.max_tokens, scoring) for p in req.prompts]
        choices = []
        for i, ids in enumerate(prompts):
            for j in range(s.n):
                seq = Seq(prompt=ids, max_new_tokens=s.max_tokens, on_event=print, temperature=s.temperature,
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
            return tokenizer.decode(c.seq.prompt) if req.echo else ""

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
                    "choices": [{"index": c.index, "text": echo_text(c) + c.text[:c.emitted],
                                 "logprobs": all_logprobs(c), "finish_reason": c.finish_reason}
                                for c in choices],
                    "usage": usage()}

        def chunk(c: Choice, text: str, logprobs: dict | None, finish: str | None) -> str:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                        "choices": [{"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        async def body_stream() -> AsyncIterator[str]:
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
        stops = TURN_STARTS.get(settings.template, []) + s.stop
        choices = [Choice(j, Seq(prompt=ids, max_new_tokens=max_tokens, on_event=print, temperature=s.temperature,
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
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text[:c.emitted]},
                                 "logprobs": logprobs_of(c), "finish_reason": c.finish_reason} for c in choices],
                    "usage": usage()}

        def chunk(c: Choice, delta: dict, finish: str | None, logprobs: dict | None = None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                        "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        async def body_stream() -> AsyncIterator[str]:
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
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
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
        status = [0]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
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
        finally:
            key = (route, status[0])
            self.settings.requests[key] = self.settings.requests.get(key, 0) + 1

    def _refuse(self, scope: dict) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is not None and scope["path"].startswith("/v1"):
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
