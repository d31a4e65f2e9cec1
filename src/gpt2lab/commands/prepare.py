"""`gpt2lab prepare SOURCE --out DIR`: tokenize a corpus into token shards + meta.json."""

from __future__ import annotations

import argparse

from gpt2lab.data.prepare import DEFAULT_SHARD_TOKENS, SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help=f"one of {', '.join(SOURCES)}; hf:NAME for another Hugging Face dataset; "
        "or a local .txt file, folder of .txt files, .jsonl or .parquet",
    )
    parser.add_argument("--out", required=True, help="dataset folder to write (train_*.bin, val_*.bin, meta.json)")
    parser.add_argument("--tokenizer", choices=["gpt2", "char"],
                        help="default: char for default and shakespeare_char, gpt2 otherwise")
    parser.add_argument("--val-fraction", type=float,
                        help="share held out for validation (default 0.1; openwebtext 0.0005; fineweb-edu: first shard)")
    parser.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--workers", type=int, help="tokenizer processes for streamed corpora (default: half the CPUs)")
    parser.add_argument("--input", help="shakespeare/shakespeare_char: read this input.txt instead of downloading")
    parser.add_argument("--subset", help="dataset config, e.g. sample-10BT or sample-100BT for fineweb-edu")
    parser.add_argument("--text-field", default="text", help="record field holding the text (jsonl/parquet/hf)")
    parser.add_argument("--block-size", type=int,
                        help="refuse a corpus whose train or val split cannot fill one block of this size")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.data.prepare import prepare

    meta = prepare(
        args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens, workers=args.workers, input_path=args.input, subset=args.subset,
        text_field=args.text_field, overwrite=args.overwrite, block_size=args.block_size,
        progress=not args.no_progress,
    )
    splits = ", ".join(f"{name} {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
                       for name, s in meta["splits"].items())
    tokenizer = meta["tokenizer"]["kind"]
    print(f"{meta['dir']}: {splits}; tokenizer {tokenizer}, vocab_size {meta['vocab_size']:,}")
    return 0
