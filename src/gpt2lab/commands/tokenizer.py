"""`gpt2lab tokenizer`: train a byte-level BPE on a corpus, and look at what a tokenizer does.

    gpt2lab tokenizer train shakespeare --vocab-size 2048 --out tok/shakespeare
    gpt2lab tokenizer encode --tokenizer tok/shakespeare "To be, or not to be"
    gpt2lab tokenizer decode --tokenizer tok/shakespeare 83 1047 9
    gpt2lab tokenizer info --tokenizer tok/shakespeare

`train` reads CORPUS as `gpt2lab prepare` reads SOURCE (a registered source, a .txt/.jsonl/.parquet
file, a folder of .txt files, hf:NAME), holds out the last 5% of each document (up to 10 MB), learns
the merges on the rest with the Hugging Face `tokenizers` library (GPT-2's pre-tokenization,
<|endoftext|> and the chat tokens <|system|> <|user|> <|assistant|> <|end|> reserved as ids 0-4),
writes DIR/tokenizer.json, and prints bytes per token on the held-out text against GPT-2's tokenizer.
The same corpus and settings give the same tokenizer. Use it with `gpt2lab prepare SOURCE --tokenizer DIR`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from gpt2lab.errors import UserError

HELD_OUT_FRACTION = 0.05
HELD_OUT_MAX_BYTES = 10_000_000
CHUNK_CHARS = 1_000_000  # long documents reach the trainer in pieces cut at newlines, so progress moves
OUTPUT_FILES = frozenset({"tokenizer.json"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="learn a byte-level BPE from a corpus and write DIR/tokenizer.json",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("corpus", nargs="+", metavar="CORPUS",
                       help="what `gpt2lab prepare` takes as SOURCE: a source name, a file, a folder, hf:NAME")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="number of ids, special tokens and the 256 bytes included (e.g. 8192)")
    train.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json")
    train.add_argument("--max-mb", type=float, default=1000.0, metavar="MB",
                       help="read at most this many megabytes of text (a streamed corpus is cut there)")
    train.add_argument("--input", help="a local copy of a downloaded source's file (as for `gpt2lab prepare`)")
    train.add_argument("--subset", help="dataset config of a Hugging Face corpus")
    train.add_argument("--text-field", help="record field holding the text (.jsonl, .parquet, hf:NAME)")
    train.add_argument("--force", action="store_true", help="replace a tokenizer written earlier in --out")
    for name, help_ in (("encode", "print the ids of TEXT (or standard input)"),
                        ("decode", "print the text of IDS (or whitespace-separated ids on standard input)"),
                        ("info", "vocabulary size, special tokens and bytes per token of a tokenizer")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--tokenizer", default="gpt2", metavar="TOK",
                       help="gpt2, or a directory made by `gpt2lab tokenizer train` (default: gpt2)")
        if name == "encode":
            p.add_argument("text", nargs="?", help="text to encode (default: standard input)")
            p.add_argument("--allow-special", action="store_true",
                           help="special token text (<|endoftext|>, <|user|>, ...) becomes its id")
        elif name == "decode":
            p.add_argument("ids", nargs="*", type=int, metavar="ID", help="ids to decode (default: standard input)")
        else:
            p.add_argument("--text-file", help="report bytes per token of this text file too")


def _is_tokenizer_dir(path: Path) -> bool:
    return {p.name for p in path.iterdir()} <= OUTPUT_FILES


def _training_texts(documents: Iterator[str], max_bytes: int, held: list[str], advance) -> Iterator[str]:
    """The training share of each document, in pieces, until `max_bytes` are read; the held-out tail
    of each goes to `held`; `advance(n)` is told the bytes of each document read."""
    read = held_bytes = 0
    for doc in documents:
        size = len(doc.encode("utf-8"))
        if read + size > max_bytes:
            return
        read += size
        if held_bytes < HELD_OUT_MAX_BYTES:
            cut = len(doc) - int(len(doc) * HELD_OUT_FRACTION)
            held.append(doc[cut:])
            held_bytes += size - len(doc[:cut].encode("utf-8"))
            doc = doc[:cut]
        while doc:
            cut = doc.rfind("\n", 0, CHUNK_CHARS) + 1 if len(doc) > CHUNK_CHARS else len(doc)
            cut = cut or CHUNK_CHARS
            yield doc[:cut]
            doc = doc[cut:]
        advance(size)


def train(args: argparse.Namespace) -> int:
    from gpt2lab.console import ProgressDisplay, format_bytes, say
    from gpt2lab.data.sources import find_source, source_args
    from gpt2lab.fileio import atomic_dir, check_output_dir
    from gpt2lab.tokenizer import MIN_BPE_VOCAB, TOKENIZER_FILE, GPT2Tokenizer, train_bpe

    if args.vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_BPE_VOCAB} ids (5 special tokens + 256 bytes)")
    if not args.max_mb > 0:
        raise UserError(f"--max-mb {args.max_mb} must be a positive number of megabytes")
    out = check_output_dir(args.out, kind="tokenizer", is_same_kind=_is_tokenizer_dir, force=args.force)
    corpora = []
    for spec in args.corpus:  # every CORPUS is opened (and checked) before any training
        entry = find_source(spec)
        corpora.append(entry.open(spec, source_args(entry, input=args.input, subset=args.subset,
                                                    text_field=args.text_field)))
    max_bytes = int(args.max_mb * 1e6)
    held: list[str] = []

    read = [0]
    display = [ProgressDisplay("items", total=max_bytes if any(c.count is None for c in corpora) else None,
                               description="reading the corpus (bytes)")]

    def advance(n: int) -> None:
        read[0] += n
        display[0].advance(n)

    def texts() -> Iterator[str]:
        documents = (doc for corpus in corpora for doc in corpus.documents())
        yield from _training_texts(documents, max_bytes, held, advance)
        display[0].close()
        say(f"read {format_bytes(read[0])} of text; learning {args.vocab_size:,} ids")
        display[0] = ProgressDisplay("status", description=f"learning the merges of {args.vocab_size:,} ids")

    try:
        bpe = train_bpe(texts(), args.vocab_size)
    finally:
        display[0].close()
    if read[0] == 0:
        raise UserError(f"{' '.join(args.corpus)}: no text read (empty, or its first document is over --max-mb)")
    with atomic_dir(out) as tmp:
        (tmp / TOKENIZER_FILE).write_text(bpe.json, encoding="utf-8")
    print(f"wrote {out / TOKENIZER_FILE} ({bpe.vocab_size:,} ids)")
    text = "".join(held)
    if text:
        size = len(text.encode("utf-8"))
        ours, gpt2 = size / max(1, len(bpe.encode(text))), size / max(1, len(GPT2Tokenizer().encode(text)))
        print(f"held-out text ({format_bytes(size)}): {ours:.3f} bytes/token with this tokenizer, "
              f"{gpt2:.3f} with GPT-2's ({ours / gpt2:.2f}x)")
    print(f"use it with: gpt2lab prepare SOURCE --tokenizer {out} --out DATA_DIR")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return train(args)
    from gpt2lab.tokenizer import get_tokenizer

    if args.tokenizer == "char":
        raise UserError("the char tokenizer lives in a prepared dataset; use --tokenizer gpt2 or a trained BPE DIR")
    tok = get_tokenizer(args.tokenizer)
    if args.action == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        print(" ".join(map(str, tok.encode(text, allow_special=args.allow_special))))
    elif args.action == "decode":
        ids = args.ids
        if not ids:
            words = sys.stdin.read().split()
            if not all(w.lstrip("-").isdigit() for w in words):
                raise UserError("standard input must hold whitespace-separated token ids")
            ids = [int(w) for w in words]
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the {tok.name} tokenizer's vocabulary (0 to {tok.vocab_size - 1})")
        sys.stdout.write(tok.decode(ids))
        sys.stdout.write("\n")
    else:
        print(f"tokenizer: {tok!r}")
        print(f"vocab_size: {tok.vocab_size:,}")
        print(f"<|endoftext|>: {tok.eot_id}")
        if tok.name == "bpe":
            from gpt2lab.tokenizer import CHAT_SPECIAL_TOKENS

            print("chat tokens: " + ", ".join(f"{t}={tok.encode(t, allow_special=True)[0]}" for t in CHAT_SPECIAL_TOKENS))
        if args.text_file:
            from gpt2lab.fileio import read_text

            text = read_text(args.text_file)
            print(f"{args.text_file}: {len(text.encode('utf-8')) / max(1, len(tok.encode(text))):.3f} bytes/token")
    return 0
