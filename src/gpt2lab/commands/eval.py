"""`gpt2lab eval TASK`: zero-shot HellaSwag, perplexity of a text file, LAMBADA last-word accuracy.

    gpt2lab eval hellaswag --init gpt2 [--data PATH] [--limit N] [--json OUT]
    gpt2lab eval perplexity --init gpt2-large --data wiki.test.raw --hf-rows --stride 512
    gpt2lab eval lambada --init gpt2
    torchrun --nproc_per_node=8 -m gpt2lab eval hellaswag --init gpt2-xl     # items split over ranks

--init takes an OpenAI preset (gpt2, gpt2-medium, ...), a Hugging Face GPT-2 directory, a gpt2lab
checkpoint or run directory, or random:<preset>. See docs/evaluation.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gpt2lab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt2lab.evaluate.hellaswag import CONTEXT_STYLES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--init", default="gpt2",
                        help="model: preset name, HF directory, checkpoint/run directory or random:<preset> "
                             "(default: gpt2)")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    common.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="weight dtype for evaluation (default: fp32, as published numbers are)")
    common.add_argument("--batch-size", type=int, default=None,
                        help="tasks / passages / windows per forward pass (defaults: 8 / 16 / 1)")
    common.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT ('-' = stdout)")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    hs = sub.add_parser("hellaswag", parents=[common], help="zero-shot HellaSwag (acc, acc_norm, acc_token_mean)",
                        description="Zero-shot HellaSwag validation accuracy, scored as lm-evaluation-harness does.")
    hs.add_argument("--data", help="hellaswag_val.jsonl or a llama.cpp-format text file (default: the shared "
                                   "file if present, else the official jsonl, downloaded and cached)")
    hs.add_argument("--limit", type=int, help="only the first N tasks")
    hs.add_argument("--context-style", choices=CONTEXT_STYLES, default="llamacpp",
                    help="llamacpp: the same tasks from either file format (default); harness: "
                         "lm-evaluation-harness's context, official jsonl only")

    ppl = sub.add_parser("perplexity", parents=[common], help="sliding-window perplexity of a text file",
                         description="Token perplexity (and per-word / per-byte) of a UTF-8 text file.")
    ppl.add_argument("--data", required=True, help="the text file to score")
    ppl.add_argument("--max-length", type=int, help="window length in tokens (default: the model's block_size)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: max-length / 2)")
    ppl.add_argument("--hf-rows", action="store_true",
                     help="join non-empty lines as HF dataset rows with '\\n\\n' (the transformers guide's "
                          "WikiText text); default: score the file as it is")

    lam = sub.add_parser("lambada", parents=[common], help="LAMBADA last-word accuracy and perplexity",
                         description="LAMBADA (OpenAI's GPT-2 version) last-word accuracy and perplexity.")
    lam.add_argument("--data", help="lambada_test.jsonl (default: the shared file if present, else OpenAI's, "
                                    "downloaded, sha256-checked and cached)")
    lam.add_argument("--limit", type=int, help="only the first N passages")


def run(args: argparse.Namespace) -> int:
    from gpt2lab import parallel
    from gpt2lab.loading import load_model

    for name in ("batch_size", "limit", "max_length", "stride"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    env = parallel.init_distributed(args.device)
    try:
        data = _resolve_data(args)
        model, tokenizer = load_model(args.init, device=env.device, dtype=DTYPES[args.dtype])
        model.eval()
        start = time.perf_counter()
        metrics = _evaluate(args, model, tokenizer, data, env)
        result = {
            "task": args.task, **metrics, "model": args.init, "data": str(data),
            "seconds": round(time.perf_counter() - start, 3), "device": str(env.device), "dtype": args.dtype,
            "world_size": env.world_size,
        }
        if env.is_main:
            _report(result, to_stderr=args.json == "-")  # keep stdout pure JSON
            if args.json:
                text = json.dumps(result, indent=2)
                if args.json == "-":
                    print(text)
                else:
                    Path(args.json).write_text(text + "\n", encoding="utf-8")
    finally:
        parallel.destroy()
    return 0


def _resolve_data(args: argparse.Namespace) -> Path:
    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise UserError(f"--data {path} does not exist")
        return path
    if args.task == "hellaswag":
        from gpt2lab.evaluate.hellaswag import find_data_file
    else:
        from gpt2lab.evaluate.lambada import find_data_file
    return find_data_file(download=True)


def _evaluate(args: argparse.Namespace, model, tokenizer, data: Path, env) -> dict:
    show = sys.stderr.isatty()
    if args.task == "hellaswag":
        from gpt2lab.evaluate import hellaswag

        tasks = hellaswag.load_tasks(data, args.context_style)[: args.limit]
        metrics = hellaswag.evaluate(model, tokenizer, tasks, batch_size=args.batch_size or 8, env=env,
                                     show_progress=show)
        return {**metrics, "context_style": args.context_style}
    if args.task == "perplexity":
        from gpt2lab.evaluate import perplexity

        text = perplexity.read_text(data, hf_rows=args.hf_rows)
        metrics = perplexity.evaluate(model, tokenizer, text, max_length=args.max_length, stride=args.stride,
                                      batch_size=args.batch_size or 1, env=env, show_progress=show)
        return {**metrics, "hf_rows": args.hf_rows}
    from gpt2lab.evaluate import lambada

    passages = lambada.read_passages(data)[: args.limit]
    return lambada.evaluate(model, tokenizer, passages, batch_size=args.batch_size or 16, env=env,
                            show_progress=show)


def _report(result: dict, to_stderr: bool = False) -> None:
    """A table of the figures on stdout, or stderr (the JSON has them all)."""
    from rich.console import Console
    from rich.table import Table

    from gpt2lab.evaluate.hellaswag import METRICS

    task = result["task"]
    table = Table(title=f"{task}: {result['model']} on {Path(result['data']).name}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    if task == "hellaswag":
        for metric, meaning in METRICS.items():
            table.add_row(metric, f"{result[metric]:.4f} ± {result[metric + '_stderr']:.4f}", meaning)
        table.add_row("n", str(result["n"]), f"tasks (context style {result['context_style']})")
    elif task == "perplexity":
        table.add_row("tokens_scored", f"{result['tokens_scored']:,}",
                      f"of {result['tokens']:,}; windows of {result['max_length']}, stride {result['stride']}")
        table.add_row("nll", f"{result['nll']:.4f}", "mean negative log-likelihood per token (nats)")
        table.add_row("ppl", f"{result['ppl']:.3f}", "token perplexity")
        table.add_row("word_ppl", f"{result['word_ppl']:.3f}", f"per whitespace word ({result['words']:,} words)")
        table.add_row("byte_ppl", f"{result['byte_ppl']:.4f}", f"per UTF-8 byte ({result['bytes']:,} bytes)")
        table.add_row("bits_per_byte", f"{result['bits_per_byte']:.4f}", "NLL in bits per byte")
    else:
        table.add_row("acc", f"{result['acc']:.4f} ± {result['acc_stderr']:.4f}",
                      "last word predicted greedily, every token")
        table.add_row("ppl", f"{result['ppl']:.3f}", "per-word perplexity of the last word (lm-eval's)")
        table.add_row("ppl_token", f"{result['ppl_token']:.3f}",
                      f"per-token perplexity over {result['target_tokens']:,} target tokens")
        table.add_row("n", str(result["n"]), "passages")
    table.caption = f"{result['seconds']:.1f} s on {result['device']} ({result['dtype']}, {result['world_size']} rank(s))"
    Console(stderr=to_stderr).print(table)
