"""`gpt2lab finetune`: instruction finetuning (full or LoRA) with the same trainer as `gpt2lab train`.

    gpt2lab finetune --data alpaca --init gpt2                          # download Alpaca 52K, full finetune
    gpt2lab finetune --data my.jsonl --init out/pretrain --lora.r 8 --optim.lr 3e-4
    gpt2lab finetune --data chats.jsonl --init gpt2 --data.sft.template chat --train.max_steps 200

It is `gpt2lab train --config finetune_alpaca --data.format sft --data.sft.path FILE --model.init INIT`:
the preset sets the SFT data options, and any config field can be overridden with --section.field.
"""

from __future__ import annotations

import argparse

from gpt2lab.commands.common import add_config_arguments
from gpt2lab.console import say

NO_DATA_HELP = """gpt2lab finetune: no instruction data given; pass --data FILE.json|FILE.jsonl|alpaca.

Records look like {{"instruction": "...", "input": "... (optional)", "output": "..."}} (Alpaca) or
{{"messages": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}]}} (with
--data.sft.template chat), as a JSON array or one record per line (JSONL).

To use the 52K Stanford Alpaca set:
  gpt2lab finetune --data alpaca --init gpt2        downloads it once into $GPT2LAB_CACHE or ~/.cache/gpt2lab
or fetch it yourself and pass the file:
  curl -LO {url}
  gpt2lab finetune --data alpaca_data.json --init gpt2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    parser.add_argument("--data", metavar="FILE|alpaca",
                        help="instruction records (.json array or .jsonl), or 'alpaca' to download the 52K set "
                             "(same as --data.sft.path)")
    parser.add_argument("--init", metavar="MODEL",
                        help="model to finetune: gpt2 (or another OpenAI preset), a Hugging Face GPT-2 directory, "
                             "or a gpt2lab checkpoint / run directory (same as --model.init; default: gpt2)")
    add_config_arguments(parser, "finetune_alpaca")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.config import config_from_args

    # The shortcuts are the dotted keys config_from_args reads (argparse dests are "data.sft.path", ...).
    if args.data is not None:
        setattr(args, "data.sft.path", args.data)
    if args.init is not None:
        setattr(args, "model.init", args.init)
    setattr(args, "data.format", "sft")
    if not getattr(args, "data.sft.path", None) and not _preset_has_data(args.config):
        from gpt2lab.data.sft import ALPACA_URL

        say(NO_DATA_HELP.format(url=ALPACA_URL))
        return 2
    cfg = config_from_args(args)
    from gpt2lab.run import process_started_at, train

    train(cfg, started_at=process_started_at())
    return 0


def _preset_has_data(config: str | None) -> bool:
    """Whether the --config file itself names the SFT data (then --data is optional)."""
    from gpt2lab.config import load_config
    from gpt2lab.errors import UserError

    if config is None:
        return False
    try:  # format "tokens" only so that validation does not demand the path we are looking for
        return bool(load_config(config, {"data.format": "tokens"}).data.sft.path)
    except UserError:  # the real load reports any problem with the file
        return True
