"""`gpt2lab train`: pretrain or continue training a model from a YAML config.

    gpt2lab train                                   # the quickstart: prepare, train ~3 min on CPU, sample
    gpt2lab train --config shakespeare_char --train.max_steps 2000 --optim.lr=3e-4
    gpt2lab train --config my.yaml --out out/exp1 --resume
    torchrun --nproc_per_node 8 -m gpt2lab train --config gpt2_124m_fineweb
"""

from __future__ import annotations

import argparse

from gpt2lab.commands.common import add_config_arguments

DEFAULT_CONFIG = "quickstart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a GPT from a config: defaults < --config preset/YAML < --section.field overrides. "
        "Every field is listed below with its meaning and default."
    )
    parser.epilog = __doc__.split("\n\n", 1)[1]
    add_config_arguments(parser, DEFAULT_CONFIG)


def run(args: argparse.Namespace) -> int:
    from gpt2lab.config import config_from_args
    from gpt2lab.run import process_started_at, train

    result = train(config_from_args(args), started_at=process_started_at())
    return 0 if result is not None else 1
