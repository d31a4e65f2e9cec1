"""`gpt2lab prepare SOURCE --out DIR`: tokenize a corpus into token shards + meta.json.

The list of sources in `--help` is generated from `gpt2lab.data.sources.SOURCES`; building this
parser imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse

from gpt2lab.data.sources import DEFAULT_SHARD_TOKENS, DEFAULT_TEXT_FIELD, SOURCES, Source, sources_taking


def _approx(n: int) -> str:
    """A size hint for people: 465000 -> "465k", 9040000000 -> "9B"."""
    for factor, unit in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= factor:
            return f"{n / factor:.3g}{unit}"
    return str(n)


def describe(source: Source) -> str:
    """Two help lines for one entry: its description, then its defaults and size hint."""
    val = "the first shard" if source.val_fraction is None else f"{source.val_fraction:g}"
    defaults = [f"tokenizer {source.tokenizer}", f"val {val}"]
    if source.subset:
        defaults.append(f"subset {source.subset}")
    if source.subset in source.tokens:
        defaults.append(f"~{_approx(source.tokens[source.subset])} tokens")
    return f"  {source.name:<18}{source.description}\n  {'':<18}{', '.join(defaults)}"


def _applies_to(option: str) -> str:
    return f"({', '.join(sources_taking(option))})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "sources (and their defaults):\n" + "\n".join(describe(s) for s in SOURCES.values())
    parser.add_argument("source", help="a source listed below: a name, hf:NAME or a local PATH")
    parser.add_argument("--out", required=True, help="dataset folder to write (train_*.bin, val_*.bin, meta.json)")
    parser.add_argument("--tokenizer", metavar="TOK",
                        help="gpt2, char, or a directory made by `gpt2lab tokenizer train` (default: the source's, "
                             "listed below)")
    parser.add_argument("--val-fraction", type=float,
                        help="share held out for validation (default: the source's, listed below)")
    parser.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--workers", type=int, help="tokenizer processes for streamed corpora (default: half the CPUs)")
    parser.add_argument("--input", help=f"read this file instead of downloading {_applies_to('input')}")
    parser.add_argument("--subset", help=f"dataset config, e.g. sample-100BT {_applies_to('subset')}")
    parser.add_argument("--text-field",
                        help=f"record field holding the text (default {DEFAULT_TEXT_FIELD}) {_applies_to('text_field')}")
    parser.add_argument("--block-size", type=int,
                        help="refuse a corpus whose train or val split cannot fill one block of this size")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.data.prepare import prepare
    from gpt2lab.tokenizer import tokenizer_label

    meta = prepare(
        args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens, workers=args.workers, input_path=args.input, subset=args.subset,
        text_field=args.text_field, overwrite=args.overwrite, block_size=args.block_size,
        progress=not args.no_progress,
    )
    splits = ", ".join(f"{name} {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
                       for name, s in meta["splits"].items())
    tokenizer = tokenizer_label(meta["tokenizer"])
    print(f"{meta['dir']}: {splits}; tokenizer {tokenizer}, vocab_size {meta['vocab_size']:,}")
    return 0
