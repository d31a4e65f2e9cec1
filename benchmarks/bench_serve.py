"""Serving throughput and latency: `gpt2lab serve` vs `transformers serve --continuous-batching`, same weights.

    python benchmarks/bench_serve.py                       # gpt2 (124M) random weights, CPU, 1/4/16 clients
    python benchmarks/bench_serve.py --preset gpt2-tiny --clients 1,2 --new-tokens 8 --requests 1   # smoke

One random-weight model (the preset, seeded) is saved as a gpt2lab checkpoint and exported with
`gpt2lab convert` to a Hugging Face directory; `gpt2lab serve` serves the checkpoint and
`transformers serve --continuous-batching` the export, one server at a time, in the same run. For each
number of concurrent clients, every client streams `--requests` greedy completions one after another
(the same fixed prompt of `--prompt-len` tokens, `--new-tokens` new tokens each) from
/v1/completions. Reported per server and client count: aggregate generated tokens/s (all tokens of all
clients / wall time from the first request to the last answer), p50/p95 time to first token and p50/p95
time between streamed chunks, then the ratios the targets are stated in: each server's 16-client rate
over its 1-client rate, and gpt2lab over transformers at each client count.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gpt2lab.bench import cpu_description
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.model import GPT, GPTConfig

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer from {url} after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def client(base: str, body: dict, requests: int, ttft: list, gaps: list) -> int:
    """One client: `requests` streamed completions in a row; returns the chunks with text received."""
    chunks = 0
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        for _ in range(requests):
            start = last = time.perf_counter()
            first = True
            async with http.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if not choices[0].get("text"):
                        continue
                    now = time.perf_counter()
                    (ttft if first else gaps).append(now - (start if first else last))
                    first, last = False, now
                    chunks += 1
    return chunks


def measure(base: str, model: str, prompt: str, args: argparse.Namespace, clients: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True}
    ttft: list[float] = []
    gaps: list[float] = []

    async def main() -> list[int]:
        return await asyncio.gather(*[client(base, body, args.requests, ttft, gaps) for _ in range(clients)])

    start = time.perf_counter()
    chunks = asyncio.run(main())
    wall = time.perf_counter() - start
    tokens = clients * args.requests * args.new_tokens

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]

    return {"clients": clients, "tokens": tokens, "chunks": sum(chunks), "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "gap_p50": pct(gaps, 50), "gap_p95": pct(gaps, 95)}


def run_server(name: str, command: list[str], base: str, model: str, prompt: str, args: argparse.Namespace,
               env: dict) -> list[dict]:
    print(f"starting {name}: {' '.join(command)}", file=sys.stderr)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, base + "/health")
        measure(base, model, prompt, args, 1)  # warm-up: first-call costs out of the numbers
        rows = []
        for c in args.clients:
            row = {"server": name, **measure(base, model, prompt, args, c)}
            print(f"  {name} {c} clients: {row['tok_s']:.1f} tokens/s", file=sys.stderr)
            rows.append(row)
        return rows
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (greedy)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-batch", type=int, default=16, help="gpt2lab serve --max-batch")
    parser.add_argument("--dtype", default="fp32", help="gpt2lab serve --dtype (transformers serves the fp32 export)")
    parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                        help="also run transformers serve --continuous-batching")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset(args.preset))
        save_checkpoint(work / "ckpt", model, model.config, {"kind": "gpt2"}, step=1)
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, "-m", "gpt2lab", "convert", "--init", str(work / "ckpt"), "--out",
                        str(work / "hf")], check=True, env=env, stdout=subprocess.DEVNULL)
        from gpt2lab.tokenizer import get_tokenizer

        tok = get_tokenizer("gpt2")
        ids = torch.randint(0, 50000, (4 * args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        prompt = tok.decode(tok.encode(tok.decode(ids))[: args.prompt_len])  # text of about prompt_len tokens

        rows = []
        port = free_port()
        rows += run_server("gpt2lab serve", [sys.executable, "-m", "gpt2lab", "serve", "--init", str(work / "ckpt"),
                                             "--port", str(port), "--device", "cpu", "--dtype", args.dtype,
                                             "--max-batch", str(args.max_batch), "--model-name", "bench"],
                           f"http://127.0.0.1:{port}", "bench", prompt, args, env)
        if args.transformers:
            port = free_port()
            command = [shutil.which("transformers") or "transformers", "serve", "--continuous-batching",
                       "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
                       str(work / "hf")]
            rows += run_server("transformers serve --continuous-batching", command, f"http://127.0.0.1:{port}",
                               str(work / "hf"), prompt, args, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.preset}, CPU: {cpu_description()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per request (greedy), "
          f"{args.requests} requests per client\n")
    print(f"{'server':<42} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'gap p50':>8} {'p95':>7}")
    for r in rows:
        print(f"{r['server']:<42} {r['clients']:>7} {r['tok_s']:>8.1f} {r['ttft_p50'] * 1e3:>7.0f}ms "
              f"{r['ttft_p95'] * 1e3:>5.0f}ms {r['gap_p50'] * 1e3:>6.1f}ms {r['gap_p95'] * 1e3:>5.1f}ms")
    ratios = {}
    by = {(r["server"], r["clients"]): r["tok_s"] for r in rows}
    lo, hi = min(args.clients), max(args.clients)
    for server in dict.fromkeys(r["server"] for r in rows):
        ratios[f"{server}: {hi} clients / {lo}"] = by[(server, hi)] / by[(server, lo)]
    if args.transformers:
        for c in args.clients:
            ratios[f"gpt2lab / transformers, {c} clients"] = by[("gpt2lab serve", c)] / by[
                ("transformers serve --continuous-batching", c)]
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        print(json.dumps({"preset": args.preset, "rows": rows, "ratios": ratios, "machine": cpu_description(),
                          "torch": torch.__version__, "load_average": load}))


if __name__ == "__main__":
    main()
