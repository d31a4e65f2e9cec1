"""`gpt2lab eval TASK`: zero-shot scores of a model on one of the registered eval tasks.

    gpt2lab eval hellaswag --init gpt2 [--data PATH] [--limit N] [--json OUT]
    gpt2lab eval wikitext --init gpt2                                        # word/byte perplexity
    gpt2lab eval perplexity --init gpt2-large --data wiki.test.raw --hf-rows --stride 512
    gpt2lab eval lambada --init gpt2
    gpt2lab eval lm-eval --init out/run --tasks arc_easy,piqa --limit 100      # any lm-evaluation-harness task
    torchrun --nproc_per_node=8 -m gpt2lab eval hellaswag --init gpt2-xl     # items split over ranks

The tasks, their options and their table rows come from gpt2lab.evaluate.registry; this module has
no per-task code. See docs/evaluation.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gpt2lab.commands.common import add_model_arguments
from gpt2lab.console import say
from gpt2lab.evaluate.registry import all_tasks, get_task
from gpt2lab.evaluate.task import MetricRow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subcommand per registered task, each with the common options and the task's own."""
    common = argparse.ArgumentParser(add_help=False)
    add_model_arguments(common, init_default="gpt2", dtype_default="fp32",
                        dtype_help="weight dtype for evaluation (fp32 as published numbers are); auto = on CPU, "
                                   "bf16 where forward passes of the model with bf16 weights are >= 1.3x faster than "
                                   "fp32 (timed once, then cached; GPT2LAB_CPU_DTYPE=fp32|bf16 decides instead), else "
                                   "fp32; on a GPU as stored; int8 = int8 linear layers (CPU), to measure their cost",
                        int8=True)
    common.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT ('-' = stdout)")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in all_tasks():
        task.add_arguments(sub.add_parser(task.name, parents=[common], help=task.description,
                                          description=task.description[:1].upper() + task.description[1:] + "."))


def run(args: argparse.Namespace) -> int:
    """Load the model, score it on the task and print the table (and the JSON with --json)."""
    from gpt2lab import parallel
    from gpt2lab.devices import dtype_name
    from gpt2lab.dtype_choice import ForwardPasses, load_dtype, resolve
    from gpt2lab.fileio import check_output_file
    from gpt2lab.generate import optimize_for_decoding
    from gpt2lab.loading import load_model

    task = get_task(args.task)
    if args.json and args.json != "-":
        check_output_file(args.json, "--json")  # before the evaluation, not after it
    env = parallel.init_distributed(args.device)
    try:
        data = task.resolve_data(args.data)
        examples = task.load(data, args)
        if task.unit is not None:
            examples = examples[: args.limit]
        batch_size = args.batch_size or task.default_batch_size  # None: --batch-size auto
        if args.dtype == "int8":  # what int8 decoding costs in quality (gpt2lab.int8)
            model, tokenizer = load_model(args.init, device=env.device, dtype="int8")
            dtype = "int8"
        else:
            model, tokenizer = load_model(args.init, device=env.device, dtype=load_dtype(args.dtype, env.device))
            model.eval()
            # scoring is batched forward passes: on a CPU auto times them (rank 0's choice for all ranks)
            resolved = resolve(args.dtype, env.device, ForwardPasses(model, batch_size, model.config.block_size))
            if resolved.dtype is not None:
                model.to(resolved.dtype)
            dtype = args.dtype if resolved.dtype is None else dtype_name(resolved.dtype)
            if resolved.line:
                say(f"note: {resolved.line}")
            optimize_for_decoding(model)  # inference only: on a CPU, oneDNN-packed linear layers
        start = time.perf_counter()
        metrics = task.run(model, tokenizer, examples, args, env=env, batch_size=batch_size,
                           show_progress=True)
        result = {
            "task": task.name, **metrics, "model": args.init, "data": str(data),
            "seconds": round(time.perf_counter() - start, 3), "device": str(env.device), "dtype": dtype,
            "world_size": env.world_size,
        }
        if env.is_main:
            _report(task.rows(result), result, to_stderr=args.json == "-")  # keep stdout pure JSON
            if args.json:
                text = json.dumps(result, indent=2)
                if args.json == "-":
                    print(text)
                else:
                    Path(args.json).write_text(text + "\n", encoding="utf-8")
    finally:
        parallel.destroy()
    return 0


def _report(rows: list[MetricRow], result: dict, to_stderr: bool = False) -> None:
    """A table of the task's rows on stdout, or stderr (the JSON has every figure)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['task']}: {result['model']} on {Path(result['data']).name}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    for row in rows:
        table.add_row(row.metric, row.value, row.label)
    table.caption = f"{result['seconds']:.1f} s on {result['device']} ({result['dtype']}, {result['world_size']} rank(s))"
    Console(stderr=to_stderr).print(table)
