"""`gpt2lab plot RUN_DIR [RUN_DIR ...]`: loss curves and learning rate of one run, or several overlaid.

    gpt2lab plot out/quickstart                          # out/quickstart/loss.png
    gpt2lab plot out/a out/b --x tokens -o compare.png   # two runs on one figure, against tokens seen
"""

from __future__ import annotations

import argparse

from gpt2lab.commands.common import HelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory holding metrics.jsonl (e.g. out/quickstart); several are overlaid")
    parser.add_argument("-o", "--out", help="PNG path (default: RUN_DIR/loss.png for one run, "
                        "loss_comparison.png in the current directory for several)")
    parser.add_argument("--x", default="step", choices=["step", "tokens"],
                        help="x axis: optimizer steps, or tokens seen (compares runs of different batch sizes)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--log", dest="log_scale", action="store_const", const=True, default=None,
                       help="log loss axis (default: log when the losses span more than 3x, else linear)")
    scale.add_argument("--linear", dest="log_scale", action="store_const", const=False, help="linear loss axis")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpt2lab.metrics import PLOT_FILE, plot_runs

    default = Path(args.run_dirs[0]) / PLOT_FILE if len(args.run_dirs) == 1 else Path("loss_comparison.png")
    print(plot_runs(args.run_dirs, args.out or default, x=args.x, log_scale=args.log_scale))
    return 0
