"""`gpt2lab sample`: stream text from a checkpoint, a run, an HF directory or OpenAI's GPT-2.

    gpt2lab sample --init gpt2 --prompt "Hello, I'm a language model," --num-samples 3 --seed 0
    gpt2lab sample --init runs/shakespeare_char --max-new-tokens 500 --temperature 0.8
    gpt2lab sample --init random:gpt2-tiny --prompt-file prompt.txt
    gpt2lab sample --init out/finetune_chat --chat "Name three colors." --system "Answer in one line."
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2lab.commands.common import (
    add_model_arguments,
    add_sampling_arguments,
    add_template_arguments,
    resolve_template,
)
from gpt2lab.console import say
from gpt2lab.errors import UserError

DTYPE_HELP = ("weight dtype for decoding: auto = on CPU, fp32 or bf16, whichever decodes this model faster "
              "here, or int8 where it decodes 1.3x faster than both (timed once, then cached; "
              "GPT2LAB_CPU_DTYPE=fp32|bf16 decides instead), elsewhere as stored; "
              "int8 = int8 weights with one scale per output channel (CPU only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, init_required=True, dtype_help=DTYPE_HELP, int8=True)
    parser.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    parser.add_argument("--prompt-file", help="read the prompt from this file instead of --prompt")
    parser.add_argument("--chat", metavar="MESSAGE",
                        help="one user message for a finetuned model: rendered with its chat template (and "
                             "--system) and answered until <|endoftext|> (`gpt2lab chat` holds a conversation)")
    parser.add_argument("--instruct", metavar="INSTRUCTION",
                        help="one-shot instruction for a finetuned model: rendered with --template and "
                             "answered until <|endoftext|> (use `gpt2lab chat` for a conversation)")
    parser.add_argument("--input", dest="instruct_input", default=None,
                        help="optional input/context for --instruct (Alpaca's \"### Input:\" block)")
    add_template_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=200, temperature=0.8, top_k=200)
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples to draw, one after another")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a sample when this text appears (repeatable); the text is not printed")
    parser.add_argument("--ignore-eot", action="store_true",
                        help="keep generating past <|endoftext|> instead of ending the sample there")


def _read_prompt(args: argparse.Namespace) -> str | list[dict]:
    """The prompt text, or the messages of --chat."""
    if args.chat is not None or args.instruct is not None:
        flag = "--chat" if args.chat is not None else "--instruct"
        if args.prompt or args.prompt_file or (args.chat is not None and args.instruct is not None):
            raise UserError(f"{flag} cannot be combined with --prompt, --prompt-file or --instruct; use one of them")
        template = resolve_template(args, args.init)
        if args.chat is not None or args.system is not None:
            from gpt2lab.chat_template import conversation

            message = args.chat if args.chat is not None else args.instruct
            if args.instruct_input:
                message = f"{message}\n\n{args.instruct_input}"
            return conversation([], message, args.system)
        from gpt2lab.data.sft import render_prompt

        return render_prompt(args.instruct, args.instruct_input, template=args.template or template.name)
    if args.system is not None or args.template is not None:
        raise UserError("--system and --template apply to --chat and --instruct; add one of them or drop the option")
    if args.prompt_file is None:
        return args.prompt
    from gpt2lab.fileio import read_text

    path = Path(args.prompt_file)
    if not path.is_file():
        raise UserError(f"--prompt-file {path} does not exist")
    return read_text(path)


def load_for_decoding(args: argparse.Namespace, load: Callable[[Any, str], tuple[Any, Any]], *,
                      batched: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from `load(device, dtype)` for --device and --dtype, in eval mode and laid
    out for decoding one sequence at a time (`generate.optimize_for_one_row`; also used by
    `gpt2lab chat`), or batches of them (`batched`: `gpt2lab serve`).

    --dtype auto on CPU loads fp32 weights, times decoding them against bf16, then against int8
    linear layers (gpt2lab.dtype_choice: once per machine and model, then cached) and keeps the
    fastest (int8 only when 1.3x faster than the other two), saying which on stderr; elsewhere auto
    keeps the dtype the weights are stored in. --dtype int8 quantizes the linear layers to int8
    (gpt2lab.int8; a LoRA adapter is merged first)."""
    from gpt2lab.devices import resolve_device
    from gpt2lab.dtype_choice import Decoding, decoding_int8, load_dtype, resolve
    from gpt2lab.generate import optimize_for_decoding, optimize_for_one_row
    from gpt2lab.int8 import quantize_int8
    from gpt2lab.native_decode import missing_build_note

    layout = optimize_for_decoding if batched else optimize_for_one_row

    def ready(model: Any, tokenizer: Any) -> tuple[Any, Any]:  # before the layout, which packs for torch
        if not batched and (note := missing_build_note(model)):
            say(f"note: {note}")
        return model, tokenizer

    device = resolve_device(args.device)
    if args.dtype == "int8":
        from gpt2lab.int8 import check_int8
        from gpt2lab.lora import merge_lora

        check_int8(device)  # before loading
        model, tokenizer = load(device, "fp32")
        return ready(quantize_int8(merge_lora(model)), tokenizer)
    model, tokenizer = load(device, load_dtype(args.dtype, device))
    model.eval()
    work = Decoding(model, layout=layout)
    resolved = resolve(args.dtype, device, work)
    if args.dtype == "auto" and device.type == "cpu" and (int8 := decoding_int8(work, resolved)) is not None:
        say(f"note: {int8.note('--dtype', 'auto')}")
        return ready(quantize_int8(model), tokenizer)
    if resolved.dtype is not None:
        model.to(resolved.dtype)
    if resolved.line:
        say(f"note: {resolved.line}")
    ready(model, tokenizer)
    return layout(model), tokenizer


def run(args: argparse.Namespace) -> int:
    from gpt2lab.generate import stream_text
    from gpt2lab.loading import load_model
    from gpt2lab.sampling import check_sampling

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading the model
    prompt = _read_prompt(args)
    model, tokenizer = load_for_decoding(args, lambda device, dtype: load_model(args.init, device=device, dtype=dtype))
    stop = list(args.stop)
    if isinstance(prompt, list):  # --chat: ids from the chat template
        template = resolve_template(args, args.init)
        ids = template.encode(prompt, tokenizer)
        stop += template.stop
    else:
        ids = tokenizer.encode(prompt, allow_special=True)
    if not ids:
        # An empty prompt starts a new document, as in pretraining.
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    if model.config.pos_emb == "learned" and len(ids) + args.max_new_tokens - 1 > model.config.block_size:
        say(f"note: the text will outgrow block_size={model.config.block_size}; the model then sees only "
            "the latest tokens (the context slides)")
    max_new = args.max_new_tokens

    import torch

    # One generator for all samples: a seed fixes the whole sequence of samples.
    generator = torch.Generator(device=model.transformer.wte.weight.device)
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        if args.instruct is None and args.chat is None:  # a rendered template is not worth echoing
            sys.stdout.write(prompt)
        for piece in stream_text(model, tokenizer, ids, max_new_tokens=max_new, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, generator=generator,
                                 stop_ids=() if args.ignore_eot else None, stop_strings=stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0
