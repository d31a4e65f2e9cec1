"""The `gpt2lab` command line: one parser, subcommands imported only when they run.

Each subcommand lives in its own module, which defines

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None

so `gpt2lab --help` stays instant and `gpt2lab sample` never imports the trainer. Building any
command's parser imports no torch (the `train` options come from the torch-free config classes of
gpt2lab.config), so every `gpt2lab COMMAND --help` is instant too.
Errors meant for users are raised as `gpt2lab.errors.UserError` and printed as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import types
from collections.abc import Iterator
from typing import NoReturn

from gpt2lab.console import say

# name -> (module, one-line help). Order is the order shown by `gpt2lab --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gpt2lab.commands.train", "pretrain (or continue training) a model from a YAML config"),
    "finetune": ("gpt2lab.commands.finetune", "instruction-finetune a model on Alpaca/chat records (full or LoRA)"),
    "prepare": ("gpt2lab.commands.prepare", "tokenize a corpus into token shards for training"),
    "sample": ("gpt2lab.commands.sample", "generate text from a checkpoint, HF directory or OpenAI preset"),
    "chat": ("gpt2lab.commands.chat", "talk to an instruction-finetuned model"),
    "serve": ("gpt2lab.commands.serve", "serve a model over an OpenAI-compatible HTTP API (continuous batching)"),
    "eval": ("gpt2lab.commands.eval", "evaluate: hellaswag, lambada, wikitext, perplexity"),
    "bench": ("gpt2lab.commands.bench", "measure training/decoding speed, MFU and memory"),
    "convert": ("gpt2lab.commands.convert", "export a checkpoint to a Hugging Face GPT-2 directory"),
    "merge-lora": ("gpt2lab.commands.merge_lora", "merge a LoRA adapter into its base and save a plain checkpoint"),
    "model-info": ("gpt2lab.commands.model_info", "parameter count, FLOPs/token and KV-cache bytes/token of a config"),
    "plot": ("gpt2lab.commands.plot", "draw train/val loss curves of a run directory to PNG"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="gpt2lab",
        description="GPT-2 language models: pretrain, finetune, evaluate and sample.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `gpt2lab COMMAND --help` for a command's options; `gpt2lab --version` prints the version.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(name: str) -> tuple[types.ModuleType, argparse.ArgumentParser]:
    """The module of command `name` and its parser (with "(default: X)" in every option's help); no torch."""
    from gpt2lab.commands.common import HelpFormatter

    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"gpt2lab {name}", description=help_, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    """Run `gpt2lab ARGV...`; returns the exit code (2 for usage and user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"gpt2lab {version('gpt2lab')}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            # `gpt2lab` alone runs the quickstart: train the default config.
            argv = ["train"]
        else:
            _top_parser().print_help()
            return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        say(f"gpt2lab: error: unknown command '{name}'{hint}; see `gpt2lab --help`")
        return 2
    module, parser = build_parser(name)
    args = parser.parse_args(rest)

    from gpt2lab.errors import UserError

    try:
        with _sigterm_raises():
            code = module.run(args)
    except UserError as e:
        say(f"gpt2lab {name}: error: {e}")  # rank 0's: under torchrun every rank fails alike
        return 2
    except KeyboardInterrupt:
        say(f"gpt2lab {name}: interrupted", all_ranks=True)
        return 130
    except Terminated:
        say(f"gpt2lab {name}: stopped by SIGTERM", all_ranks=True)
        return 128 + signal.SIGTERM
    return int(code or 0)


class Terminated(BaseException):
    """SIGTERM arrived. Raised where the command is, like KeyboardInterrupt for Ctrl-C, so what it
    holds is cleaned up on the way out (temporary folders removed, worker pools stopped) instead of
    the process vanishing mid-write; a BaseException, so no `except Exception` swallows it."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated for the block (the trainer sets its own handler while it trains: a
    SIGTERM there finishes the step and saves); outside the main thread signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: types.FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
