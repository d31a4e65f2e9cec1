"""`gpt2lab serve` against live servers on 127.0.0.1: the official openai client, answers equal to
`sampling.generate` / `gpt2lab sample` whatever else is in the batch, every 4xx path, the API key, the
SIGTERM drain, and a load test with clients that disconnect and malformed requests. Tiny models, CPU."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gpt2lab.chat_template import get_chat_template  # noqa: E402
from gpt2lab.checkpoint import save_checkpoint  # noqa: E402
from gpt2lab.commands.sample import load_for_decoding  # noqa: E402
from gpt2lab.generate import stream_text  # noqa: E402
from gpt2lab.loading import load_model  # noqa: E402
from gpt2lab.model import GPT, GPTConfig  # noqa: E402
from gpt2lab.sampling import generate  # noqa: E402
from gpt2lab.serve.app import Settings, chat_prompt_ids, create_app, make_server  # noqa: E402
from gpt2lab.serve.scheduler import Engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2-vocabulary model with large weights (next-token logits far apart: no argmax near-ties
    that float rounding between batch shapes could flip), saved as a checkpoint."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(path, model, model.config, {"kind": "gpt2"}, step=1)
    return path


def load(path: Path):
    """The model as `gpt2lab sample` loads it (dtype auto = fp32 in the tests, decoding layout)."""
    args = argparse.Namespace(device="cpu", dtype="auto")
    return load_for_decoding(args, lambda device, dtype: load_model(str(path), device=device, dtype=dtype))


class Live:
    """A server in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, model, tokenizer, *, max_batch=8, max_queue=256, api_key=None, max_body=1 << 20,
                 template="alpaca", start=True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=max_batch, max_len=model.config.block_size, max_queue=max_queue,
                             prefill_chunk=16)
        if start:  # not started: nothing leaves the queue
            self.engine.start()
        settings = Settings(model_name=NAME, max_len=model.config.block_size, learned=True,
                            template=get_chat_template(template),
                            api_key=api_key, max_body=max_body)
        self.server = make_server(create_app(self.engine, tokenizer, settings), grace=5)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()
        self.sock.close()

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kwargs)

    def gauges(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(gpt2lab_\w+) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def live(checkpoint):
    model, tokenizer = load(checkpoint)
    server = Live(model, tokenizer)
    yield server
    server.close()


def solo(live: Live, ids: list[int], n: int, **kwargs) -> str:
    """What `sampling.generate` (`gpt2lab sample`'s loop) gives for one prompt alone, as text."""
    out = generate(live.model, [ids], max_new_tokens=n, tokenizer=live.tokenizer, **kwargs)[0]
    return live.tokenizer.decode(out)


def prompt_ids(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (length,), generator=g).tolist()


# --------------------------------------------------------------------------------------------------
# The openai client


def test_openai_client_completions_and_chat(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    ids = live.tokenizer.encode("Once upon a time")
    expected = solo(live, ids, 12, temperature=0)
    out = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="Once upon a time",
                                                                    max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == expected and len(pieces) > 2

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    alpaca = get_chat_template("alpaca")
    chat_ids = chat_prompt_ids(messages, live.tokenizer, alpaca, 64 - 10)
    assert chat_ids == alpaca.encode(messages, live.tokenizer)  # as `gpt2lab chat` renders it
    assert live.tokenizer.decode(chat_ids).startswith("Answer briefly.")  # the system prompt replaces alpaca's preamble
    reference = "".join(stream_text(live.model, live.tokenizer, chat_ids, max_new_tokens=10, temperature=0,
                                    stop_strings=alpaca.stop))
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == reference and reply.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_template_renders_history_and_system(live):
    tok = live.tokenizer
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    text = tok.decode(chat_prompt_ids(messages, tok, get_chat_template("chat"), 1000))
    assert text == "### System:\nS\n\n### User:\nQ1\n\n### Assistant:\nA1<|endoftext|>### User:\nQ2\n\n### Assistant:\n"
    short = tok.decode(chat_prompt_ids(messages, tok, get_chat_template("chat"), 20))  # the oldest turn goes first
    assert "Q1" not in short and short.endswith("### User:\nQ2\n\n### Assistant:\n")


def test_completion_forms_n_stop_and_logprobs(live):
    ids = prompt_ids(1, 5)
    expected = solo(live, ids, 10, temperature=0)
    body = {"model": NAME, "prompt": [ids, prompt_ids(2, 3)], "max_tokens": 10, "temperature": 0, "n": 2, "logprobs": 2}
    out = live.post("/v1/completions", body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"] == expected
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 10 and all(len(t) == 2 for t in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(v == max(t.values()) for v, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
    stop = expected[len(expected) // 2: len(expected) // 2 + 3]
    cut = live.post("/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0, "stop": stop}).json()
    assert cut["choices"][0]["text"] == expected[:expected.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def test_echo_logprobs_score_the_prompt(live):
    """echo + logprobs with max_tokens 0 (and 1, as lm-eval's local-completions asks): each prompt token's
    log-probability after the ones before it, equal to a full forward pass."""
    ids = prompt_ids(3, 40)
    with torch.no_grad():
        logits, _ = live.model(torch.tensor([ids]))
    reference = logits[0].float().log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    for max_tokens in (0, 1):
        out = live.post("/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": max_tokens, "echo": True,
                                            "logprobs": 1, "temperature": 0}).json()
        lp = out["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(reference, abs=1e-4)
        assert out["choices"][0]["text"].startswith(live.tokenizer.decode(ids))


def test_greedy_equals_generate_whatever_the_batch(live):
    """Prompts of different lengths, one long enough to slide the learned-position context, sent at once:
    each answer is `sampling.generate`'s for that prompt alone."""
    cases = [(prompt_ids(10 + i, n), m) for i, (n, m) in enumerate([(3, 20), (17, 12), (55, 30), (1, 25), (40, 8), (9, 16)])]
    expected = [solo(live, ids, m, temperature=0) for ids, m in cases]

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            answers = await asyncio.gather(*[
                client.post("/v1/completions", json={"prompt": ids, "max_tokens": m, "temperature": 0})
                for ids, m in cases])
        return [a.json()["choices"][0]["text"] for a in answers]

    assert asyncio.run(main()) == expected


def test_seeded_sampling_alone_equals_in_a_crowd(live):
    ids = prompt_ids(20, 6)
    body = {"prompt": ids, "max_tokens": 20, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7}
    alone = live.post("/v1/completions", body).json()["choices"][0]["text"]
    assert alone == solo(live, ids, 20, temperature=0.9, top_k=40, top_p=0.95, seed=7)

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            others = [{"prompt": prompt_ids(30 + i, 4 + i), "max_tokens": 15, "temperature": 1.0} for i in range(6)]
            answers = await asyncio.gather(*[client.post("/v1/completions", json=b) for b in [*others[:3], body, *others[3:]]])
        return answers[3].json()["choices"][0]["text"]

    assert asyncio.run(main()) == alone


def test_greedy_equals_the_sample_command(live, checkpoint):
    out = subprocess.run([sys.executable, "-m", "gpt2lab", "sample", "--init", str(checkpoint), "--prompt", "Hello there",
                          "--temperature", "0", "--max-new-tokens", "15", "--device", "cpu"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True)
    served = live.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 15, "temperature": 0}).json()
    assert out.stdout == "Hello there" + served["choices"][0]["text"] + "\n"


# --------------------------------------------------------------------------------------------------
# Refusals


BAD = [  # (body, status, param)
    ("{not json", 400, None),
    ([1, 2], 400, None),
    ({}, 400, "prompt"),
    ({"prompt": 3}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": ["a", [1]]}, 400, "prompt"),
    ({"prompt": [50257]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_k": 1.5}, 400, "top_k"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "n": True}, 400, "n"),
    ({"prompt": "a", "seed": -1}, 400, "seed"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, 400, "seed"),
    ({"prompt": "a", "stop": 3}, 400, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "a", "echo": 1}, 400, "echo"),
    ({"prompt": "a", "suffix": "x"}, 400, "suffix"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of"),
    ({"prompt": "a", "presence_penalty": 1}, 400, "presence_penalty"),
    ({"prompt": "a", "wat": 1}, 400, "wat"),
    ({"prompt": "a", "model": 5}, 400, "model"),
    ({"prompt": "a", "model": "other"}, 404, "model"),
    ({"prompt": [0] * 65, "max_tokens": 0, "echo": True, "logprobs": 0}, 400, "prompt"),
    ("[" * 100_000 + "]" * 100_000, 400, None),
]

BAD_CHAT = [
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 64}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "a", "x": 1}]}, 400, "x"),
]


@pytest.mark.parametrize("path, case", [("/v1/completions", c) for c in BAD] + [("/v1/chat/completions", c) for c in BAD_CHAT])
def test_bad_requests_get_openai_errors(live, path, case):
    body, status, param = case
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_body_not_utf8(live):
    r = httpx.post(live.url + "/v1/completions", content=b'{"prompt": "\xff"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_streamed_n_choices_echo_and_a_stop_string_across_tokens(live):
    ids = prompt_ids(5, 4)
    expected = solo(live, ids, 12, temperature=0)
    stop = expected[4:9]  # likely spans two tokens: held back until it is known not to be a stop
    events = []
    with httpx.stream("POST", live.url + "/v1/completions", timeout=60,
                      json={"prompt": ids, "max_tokens": 12, "temperature": 0, "n": 2, "echo": True, "stop": [stop],
                            "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == live.tokenizer.decode(ids) + expected[:expected.index(stop)]
        assert [c["finish_reason"] for c in mine][-1] == "stop" and all(c["finish_reason"] is None for c in mine[:-1])
    messages = [{"role": "user", "content": "Hi"}]
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 6, "n": 2, "seed": 3, "stream": True, "logprobs": True,
                            "top_logprobs": 1}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[-1]["finish_reason"] in ("stop", "length")
        lps = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert 0 < len(lps) <= 6 and all(len(t["top_logprobs"]) == 1 for t in lps)


def test_routes_body_cap_and_queue(checkpoint):
    model, tokenizer = load(checkpoint)
    server = Live(model, tokenizer, max_queue=4, max_body=2048)
    try:
        for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/etc/passwd", 404), ("GET", "/../pyproject.toml", 404),
                                     ("GET", "/v1/completions", 405),
                                     ("DELETE", "/v1/models", 405)]:
            r = httpx.request(method, server.url + path)
            assert r.status_code == status and "error" in r.json(), (path, r.text)
        big = {"prompt": "x" * 4000}
        assert server.post("/v1/completions", big).status_code == 413  # by Content-Length

        def chunked():
            yield json.dumps(big).encode()
        r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"  # counted as it arrives
        too_many = server.post("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2})  # more than the queue holds
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
        assert server.post("/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        server.close()


def test_a_full_queue_is_429_with_retry_after(checkpoint):
    from gpt2lab.serve.scheduler import Seq

    model, tokenizer = load(checkpoint)
    server = Live(model, tokenizer, max_queue=3, start=False)  # an engine that takes nothing from its queue
    try:
        server.engine.submit([Seq(prompt=[1], max_new_tokens=1), Seq(prompt=[1], max_new_tokens=1)])
        busy = server.post("/v1/completions", {"prompt": "a", "n": 2})  # two more sequences, room for one
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert server.gauges()["gpt2lab_queue_depth"] == 2
    finally:
        server.close()


def test_api_key(checkpoint):
    model, tokenizer = load(checkpoint)
    server = Live(model, tokenizer, api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/other")]:
                r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert httpx.get(server.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret")
        assert client.completions.create(model=NAME, prompt="a", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope").models.list()
    finally:
        server.close()


# --------------------------------------------------------------------------------------------------
# Lifecycle and load


def test_sigterm_drains_in_flight_requests_and_exits_0(checkpoint):
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", "--init", str(checkpoint), "--port", "0",
                             "--device", "cpu", "--grace", "30", "--model-name", NAME],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        seen = []
        for line in proc.stderr:  # the startup line (after anything the interpreter itself may print)
            seen.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if match or line.startswith("gpt2lab serve: error"):
                break
        assert match, "".join(seen)
        url = match[1]
        assert "fp32" in line and NAME in line
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in events)) > 0
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_with_disconnects_and_malformed_requests(live):
    """200 requests from 32 concurrent clients: a quarter hang up mid-stream, some are malformed. The
    server stays up, every completed greedy answer equals its solo one, and afterwards no row is in use
    and the queue is empty."""
    prompts = [prompt_ids(100 + i, 2 + 5 * i) for i in range(8)]
    expected = [solo(live, p, 12, temperature=0) for p in prompts]
    malformed = [{"prompt": "a", "max_tokens": -3}, {"prompt": 7}, {"messages": 1}, {"prompt": "a", "n": 99}]
    results: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        p = i % len(prompts)
        body = {"prompt": prompts[p], "max_tokens": 12, "temperature": 0}
        kind = i % 8
        if kind in (0, 1):  # hang up after the first tokens of a long answer
            async with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 64, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            results.append("gone")
        elif kind == 2:
            r = await client.post("/v1/completions", json=malformed[i % len(malformed)])
            assert r.status_code == 400
            results.append("bad")
        elif kind in (3, 4):
            text = ""
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            assert text == expected[p]
            results.append("ok")
        else:
            r = await client.post("/v1/completions", json=body)
            assert r.json()["choices"][0]["text"] == expected[p]
            results.append("ok")

    async def main() -> None:
        todo = iter(range(200))

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
                for i in todo:
                    await one(client, i)

        await asyncio.gather(*[client_loop() for _ in range(32)])

    before = live.gauges()["gpt2lab_tokens_generated_total"]
    asyncio.run(main())
    assert results.count("ok") == 125 and results.count("gone") == 50 and results.count("bad") == 25
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    for _ in range(200):  # cancelled rows are freed at the next token boundary
        gauges = live.gauges()
        if gauges["gpt2lab_rows_in_use"] == 0 and gauges["gpt2lab_queue_depth"] == 0:
            break
        time.sleep(0.02)
    assert gauges["gpt2lab_rows_in_use"] == 0 and gauges["gpt2lab_queue_depth"] == 0
    # the 50 who hung up did not get their 64 tokens each
    assert gauges["gpt2lab_tokens_generated_total"] - before < 125 * 12 + 50 * 32
    assert live.post("/v1/completions", {"prompt": prompts[1], "max_tokens": 12, "temperature": 0}).json()[
        "choices"][0]["text"] == expected[1]


@pytest.mark.parametrize("variant", [dict(pos_emb="rope"), dict(pos_emb="rope", n_kv_head=2, sliding_window=4),
                                     dict(pos_emb="learned", n_kv_head=1, sliding_window=[4, None])])
def test_engine_rows_equal_generate_for_attention_variants(variant):
    """The engine alone (no HTTP), float64: rows of different lengths joining and leaving the batch at
    different steps (ring-buffer windows, GQA/MQA, RoPE, a learned context that slides) each give
    exactly `generate`'s ids."""
    from gpt2lab.serve.scheduler import Finished, Seq, Token

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, **variant))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model = model.double().eval()
    engine = Engine(model, max_batch=3, max_len=32, prefill_chunk=5).start()
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randint(0, 64, (n,), generator=g).tolist(), m) for n, m in [(7, 20), (1, 9), (13, 19), (4, 30), (20, 12)]]
    if variant["pos_emb"] == "rope":
        cases = [(p, min(m, 33 - len(p))) for p, m in cases]  # no slide: the context holds it all
    out: list[list[int]] = [[] for _ in cases]
    done = threading.Semaphore(0)

    def on_event(i):
        def f(event):
            if isinstance(event, Token):
                out[i].append(event.id)
            elif isinstance(event, Finished):
                done.release()
        return f

    try:
        for i, (p, m) in enumerate(cases):
            engine.submit([Seq(prompt=p, max_new_tokens=m, on_event=on_event(i))])
            time.sleep(0.002 * i)  # stagger the arrivals a little: rows join a running batch
        for _ in cases:
            done.acquire(timeout=60)
    finally:
        engine.stop()
    assert out == [generate(model, [p], max_new_tokens=m, temperature=0)[0] for p, m in cases]
    assert engine.stats()["rows_in_use"] == 0


TASK_YAML = """task: gpt2lab_hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow  # ~50 s on 2 cores, most of it lm-eval itself
def test_lm_eval_local_completions_matches_gpt2lab_eval(shared_data, tmp_path):
    """lm-evaluation-harness's `local-completions` backend against the server (tokenized requests through
    the server's /tokenize, scoring through echo + logprobs) gives `gpt2lab eval hellaswag`'s acc and
    acc_norm on the same model, over 50 HellaSwag tasks."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]: what its API models need
    from lm_eval.tasks import TaskManager

    from gpt2lab.evaluate import hellaswag

    tasks = hellaswag.load_tasks(shared_data / hellaswag.SHARED_FILE)[:50]
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps({"ctx": t.context, "endings": list(t.endings), "label": t.label}) + "\n"
                            for t in tasks))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=4, n_embd=32))
    path = tmp_path / "ckpt"
    save_checkpoint(path, model, model.config, {"kind": "gpt2"}, step=1)
    model, tokenizer = load(path)
    ours = hellaswag.evaluate(model, tokenizer, tasks, batch_size=8)
    server = Live(model, tokenizer)
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["gpt2lab_hellaswag_local"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            model_args=f"model={NAME},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                       "tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=256",
            batch_size=4)
    finally:
        server.close()
    theirs = out["results"]["gpt2lab_hellaswag_local"]
    assert ours["n"] == 50
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_engine_rows_survive_cancellations_while_prompts_prefill():
    """Several prompts prefill at once (a small chunk budget shared in arrival order) while some requests
    are cancelled wherever they are (queue, prefill, decode): every other row still gives `generate`'s ids."""
    from gpt2lab.serve.scheduler import Finished, Seq, Token

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, pos_emb="rope"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model = model.double().eval()
    engine = Engine(model, max_batch=4, max_len=32, prefill_chunk=7).start()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 12, 9, 1, 11, 6, 10, 8)]
    out: list[list[int]] = [[] for _ in prompts]
    reasons: list[str] = [""] * len(prompts)
    done = threading.Semaphore(0)

    def on_event(i):
        def f(event):
            if isinstance(event, Token):
                out[i].append(event.id)
            elif isinstance(event, Finished):
                reasons[i] = event.reason
                done.release()
        return f

    seqs = [Seq(prompt=p, max_new_tokens=12, on_event=on_event(i)) for i, p in enumerate(prompts)]
    try:
        engine.submit(seqs)
        for i in (1, 4, 6):
            time.sleep(0.003)
            engine.cancel(seqs[i])
        for _ in seqs:
            done.acquire(timeout=60)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        expected = generate(model, [p], max_new_tokens=12, temperature=0)[0]
        if i in (1, 4, 6):
            assert reasons[i] in ("cancelled", "length") and out[i] == expected[:len(out[i])]
        else:
            assert reasons[i] == "length" and out[i] == expected
    assert engine.stats()["rows_in_use"] == 0


def test_the_chat_page_is_the_only_file_served(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/chat/completions" in page and "stream: true" in page and 'id="stop"' in page
    assert "http://" not in page and "https://" not in page  # self-contained: no CDN
    for path in ("/chat.html", "/static/chat.html", "/serve/static/chat.html", "/%2e%2e/pyproject.toml"):
        assert httpx.get(live.url + path).status_code == 404
