"""`gpt2lab serve`: an OpenAI-compatible server for a model, with continuous batching.

    gpt2lab serve --init gpt2                                  # http://127.0.0.1:8000/v1
    gpt2lab serve --init out/finetune_alpaca --api-key secret          # its recorded chat template
    gpt2lab serve --init random:gpt2-tiny --port 0             # any free port (printed)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health, /metrics, and the
chat page at /. Ctrl-C or SIGTERM stops taking requests, lets the running ones finish for --grace
seconds (then cancels them) and exits 0. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os

from gpt2lab.commands.common import INIT_HELP, TEMPLATE_HELP, _coerced, add_model_arguments, resolve_template
from gpt2lab.commands.sample import DTYPE_HELP
from gpt2lab.console import say
from gpt2lab.errors import UserError

API_KEY_ENV = "GPT2LAB_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, init_required=True, init_help=INIT_HELP + ", or a LoRA adapter directory",
                        dtype_help=DTYPE_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the server to the network")
    parser.add_argument("--port", type=_coerced(int), default=8000, help="TCP port (0 = any free port, printed)")
    parser.add_argument("--max-batch", type=_coerced(int), default=16,
                        help="KV-cache rows: requests decoded together (more wait in the queue)")
    parser.add_argument("--max-len", type=_coerced(int), default=None,
                        help="tokens of context per request, prompt and completion (default: the model's block_size)")
    parser.add_argument("--max-queue", type=_coerced(int), default=256,
                        help="requests that may wait for a row; beyond that the server answers 429")
    parser.add_argument("--template", default=None,
                        help="for /v1/chat/completions, the " + TEMPLATE_HELP)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, "
                             "else no key)")
    parser.add_argument("--model-name", default=None, help="the model's id in the API (default: the --init text)")
    parser.add_argument("--max-body", type=_coerced(int), default=1 << 20, help="largest request body in bytes (413 beyond)")
    parser.add_argument("--grace", type=_coerced(float), default=10.0,
                        help="seconds a stop (Ctrl-C, SIGTERM) waits for running requests before cancelling them")


def check_args(args: argparse.Namespace) -> None:
    """UserError for flags out of range, before anything loads."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-body", args.max_body, 1024)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len must be at least 2, got {args.max_len}")
    if not args.grace >= 0:
        raise UserError(f"--grace must be a number of seconds >= 0, got {args.grace}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave the flag out to serve without one")


def run(args: argparse.Namespace) -> int:
    import socket

    check_args(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'") from None
    from gpt2lab.commands.sample import load_for_decoding
    from gpt2lab.loading import load_model

    template = resolve_template(args, args.init)  # a bad --template or a damaged record: said before loading
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    try:  # bind first: a port in use is said before the model loads
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        why = (e.strerror or str(e)).split(" (while attempting")[0]  # create_server appends the address
        raise UserError(f"cannot listen on {args.host}:{args.port}: {why}; choose another --port or --host") from None
    with sock:
        model, tokenizer = load_for_decoding(args, lambda device, dtype: load_model(args.init, device=device, dtype=dtype),
                                             batched=True)
        return serve(model, tokenizer, sock, args, api_key, template)


def serve(model, tokenizer, sock, args: argparse.Namespace, api_key: str | None, template) -> int:
    from gpt2lab.devices import dtype_name
    from gpt2lab.serve.app import Settings, create_app, run_server
    from gpt2lab.serve.scheduler import Engine

    config = model.config
    learned = config.pos_emb == "learned"
    max_len = args.max_len or config.block_size
    if learned and max_len > config.block_size:
        raise UserError(f"--max-len {max_len} is more than the model's block_size {config.block_size}, the most "
                        "positions a learned-position model has")
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, max_queue=args.max_queue)
    settings = Settings(model_name=args.model_name or args.init, max_len=max_len, learned=learned,
                        template=template, api_key=api_key, max_body=args.max_body)
    app = create_app(engine, tokenizer, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    weight = model.transformer.wte.weight
    say(f"gpt2lab serve: {settings.model_name} ({dtype_name(weight.dtype)} on {weight.device}, {args.max_batch} rows "
        f"of {max_len} tokens) at http://{shown}:{port}/v1" + (" (API key required)" if api_key else ""))
    engine.start()
    try:
        run_server(app, sock, args.grace)
    finally:
        engine.stop()
    say("gpt2lab serve: stopped")
    return 0
