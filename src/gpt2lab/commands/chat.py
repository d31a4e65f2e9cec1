"""`gpt2lab chat`: talk to an instruction-finetuned model.

    gpt2lab chat --init out/finetune_alpaca                  # a checkpoint or run directory
    gpt2lab chat --init out/finetune_alpaca/adapter          # a LoRA adapter (its base is loaded too)
    echo "Name three colors." | gpt2lab chat --init ckpt     # one answer per input line

Each message is rendered with the template the model was finetuned on (`--template`), after the
last `--history` exchanges (oldest dropped first so the prompt fits the context); the answer is
streamed until <|endoftext|>. Commands: /reset forgets the history, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from gpt2lab.commands.common import INIT_HELP, add_model_arguments, add_sampling_arguments
from gpt2lab.commands.sample import DTYPE_HELP, load_for_decoding
from gpt2lab.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, init_required=True, init_help=INIT_HELP + ", or a LoRA adapter directory",
                        dtype_help=DTYPE_HELP)
    parser.add_argument("--base", metavar="INIT", help="base model of a LoRA adapter (default: the one it records)")
    parser.add_argument("--template", default="alpaca",
                        help="prompt template the model was finetuned with: alpaca, chat, or a custom "
                             "'...{instruction}...{output}' string (default: alpaca)")
    add_sampling_arguments(parser, max_new_tokens=256, temperature=0.7, top_k=50)
    parser.add_argument("--history", type=int, default=3, metavar="N",
                        help="previous exchanges kept in the prompt (default: 3; 0 = none)")


def _read_lines(interactive: bool):
    """User lines until EOF: input() with a prompt on a terminal, plain reads from a pipe."""
    while True:
        if interactive:
            try:
                yield input("> ")
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2lab.data.sft import TURN_STARTS, check_template, encode_chat_prompt
    from gpt2lab.generate import stream_text
    from gpt2lab.loading import load_adapted_model
    from gpt2lab.lora import is_adapter
    from gpt2lab.sampling import check_sampling

    check_template(args.template)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading the model
    if args.history < 0:
        raise UserError(f"--history must be >= 0, got {args.history}")
    if sys.stdin is None or sys.stdin.closed:  # Python's stdin when file descriptor 0 was closed
        raise UserError("standard input is closed, and chat reads its messages there; run it in a terminal, "
                        "or pipe the messages in (echo 'Hello' | gpt2lab chat ...)")
    if is_adapter(args.init):
        def load(device, dtype):
            return load_adapted_model(args.init, args.base, device=device, dtype=dtype)[:2]
    else:
        from gpt2lab.loading import load_model

        def load(device, dtype):
            return load_model(args.init, device=device, dtype=dtype)
    model, tokenizer = load_for_decoding(args, load)
    if getattr(tokenizer, "eot_id", None) is None:
        raise UserError(f"{args.init} uses a tokenizer without <|endoftext|>; chat needs an instruction-tuned GPT-2")
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    block_size = model.config.block_size
    answer_room = min(args.max_new_tokens, block_size // 2)  # keep at least half the context for the prompt
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.init} ({args.template} template); /reset clears the history, /exit or Ctrl-D quits")
    history: list[tuple[str, str]] = []
    for line in _read_lines(interactive):
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history.clear()
            if interactive:
                print("(history cleared)")
            continue
        turns = history[-args.history:] if args.history else []
        ids = encode_chat_prompt(turns, message, tokenizer, args.template, max_tokens=block_size - answer_room + 1)
        pieces = []
        for piece in stream_text(model, tokenizer, ids, max_new_tokens=answer_room, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, generator=generator, stop_strings=TURN_STARTS.get(args.template, ())):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append((message, "".join(pieces).strip()))
    return 0
