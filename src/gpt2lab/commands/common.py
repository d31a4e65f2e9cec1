"""Argument sets shared by several commands: model-loading flags, run-config options, the help formatter.

Nothing here imports torch: parsers are built from it for `--help`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from gpt2lab.devices import DEVICE_CHOICES, DTYPE_CHOICES, canonical_dtype, check_device_name
from gpt2lab.errors import UserError

INIT_HELP = ("model: gpt2|gpt2-medium|gpt2-large|gpt2-xl (OpenAI's weights), random:<preset>, a Hugging Face "
             "GPT-2 directory, or a gpt2lab checkpoint / run directory (its newest checkpoint)")
DEVICE_HELP = "where the model runs: auto = the CUDA GPU if torch sees one, else cpu (mps only when asked)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" to options whose help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        # None, False (store_true) and [] (append) mean "off"; saying so adds nothing.
        if ("default" in help_ or not action.option_strings or default is None or default is False
                or default == [] or default is argparse.SUPPRESS):
            return help_
        return help_ + " (default: %(default)s)"


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse `type` that reports a UserError from `check` as argparse's one-line usage error."""
    def convert(text: str) -> str:
        try:
            return check(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _coerced(tp: type) -> Callable[[str], object]:
    """An argparse `type` that converts like a config field of type `tp` (a float must be finite)."""
    def convert(text: str) -> object:
        from gpt2lab.configparse import CoerceError, coerce

        try:
            return coerce(text, tp)
        except CoerceError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    return convert


def add_model_arguments(parser: argparse.ArgumentParser, *, init_default: str | None = None,
                        init_required: bool = False, init_help: str = INIT_HELP, device_default: str = "auto",
                        dtype_default: str = "auto", dtype_help: str = "weight dtype", int8: bool = False) -> None:
    """--init, --device and --dtype: how every model-loading command names its model and where it runs.

    --dtype takes auto|fp32|bf16|fp16 (float32|bfloat16|float16 as aliases) and stores the short name;
    what "auto" means is the command's, stated in `dtype_help`. `int8`: also int8 (weight-only int8
    decoding on a CPU, for the commands that decode).
    """
    parser.add_argument("--init", default=init_default, required=init_required, metavar="MODEL",
                        help=init_help + ("" if init_default is None else " (default: %(default)s)"))
    parser.add_argument("--device", default=device_default, type=_checked(check_device_name),
                        metavar=DEVICE_CHOICES, help=DEVICE_HELP + " (default: %(default)s)")
    choices = (*DTYPE_CHOICES, "int8") if int8 else DTYPE_CHOICES
    parser.add_argument("--dtype", default=dtype_default,
                        type=_checked(lambda t: t if int8 and t == "int8" else canonical_dtype(t)),
                        metavar="|".join(choices), help=dtype_help + " (default: %(default)s)")


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """--config, --out, --resume, and one --section.field option per RunConfig field (with its docstring).

    The options come from the torch-free config classes themselves; the values stay text until
    `gpt2lab.config.config_from_args` coerces them.
    """
    from gpt2lab.config import RunConfig, all_keys, preset_names
    from gpt2lab.configparse import add_config_options, suggest

    parser.usage = f"{parser.prog} [--config NAME|PATH] [--out DIR] [--resume [CKPT]] [--section.field VALUE ...]"
    parser.allow_abbrev = False  # "--optim.l" must not silently mean --optim.lr
    parser.add_argument("--config", default=default_config, metavar="NAME|PATH",
                        help=f"preset name ({', '.join(preset_names())}) or a YAML file (default: {default_config})")
    parser.add_argument("--out", metavar="DIR", help="run directory (same as --checkpoint.out_dir)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from the newest checkpoint of the run directory (or from CKPT)")
    add_config_options(parser, RunConfig, "run")
    keys = all_keys()

    def error(message: str) -> NoReturn:
        unknown = message.split("unrecognized arguments:")[-1].split() if "unrecognized" in message else []
        flags = [u for u in unknown if u.startswith("--")]
        if flags:
            key = flags[0][2:].split("=", 1)[0]
            message = f"unknown config key '{key}'{suggest(key, keys)}"
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error  # one line with a suggestion instead of argparse's usage dump


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float,
                           top_k: int | None) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, with each command's defaults."""
    parser.add_argument("--max-new-tokens", type=_coerced(int), default=max_new_tokens,
                        help="tokens to generate per answer")
    parser.add_argument("--temperature", type=_coerced(float), default=temperature,
                        help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=_coerced(int), default=top_k, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=_coerced(float), default=None,
                        help="nucleus sampling: the smallest set of tokens with probability >= p (default: off)")
    parser.add_argument("--seed", type=_coerced(int), default=None,
                        help="random seed (0 to 2**63-1): the same seed gives the same text")


TEMPLATE_HELP = ("chat template: alpaca, chat, special (a trained tokenizer's chat tokens) or a custom "
                 "'...{instruction}...{output}' string (default: the one the model was finetuned with, else alpaca)")


def add_template_arguments(parser: argparse.ArgumentParser) -> None:
    """--template and --system: how a message becomes a prompt (gpt2lab.chat_template)."""
    parser.add_argument("--template", default=None, help=TEMPLATE_HELP)
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="system prompt placed before the conversation (alpaca: replaces its preamble)")


def resolve_template(args: argparse.Namespace, init: str):
    """The ChatTemplate of --template, else the one `init` records, else alpaca."""
    from gpt2lab.chat_template import get_chat_template

    if args.template is not None:
        return get_chat_template(args.template)
    from gpt2lab.loading import chat_template_of

    return get_chat_template(chat_template_of(init) or "alpaca")
