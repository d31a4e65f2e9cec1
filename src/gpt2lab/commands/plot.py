"""`gpt2lab plot RUN_DIR`: draw a run's train and val loss (from metrics.jsonl) to loss.png."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl (e.g. out/quickstart)")
    parser.add_argument("-o", "--out", help="PNG path (default: RUN_DIR/loss.png)")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.logging import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
