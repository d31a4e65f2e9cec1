"""Tokenizer speed: training a byte-level BPE, and `gpt2lab prepare` with it against GPT-2's tiktoken.

    python benchmarks/bench_tokenizer.py                      # 64 MB corpus, 32,768-id BPE trained on 16 MB
    python benchmarks/bench_tokenizer.py --mb 2 --train-mb 1 --vocab-size 1000    # a quick smoke run

The corpus is the texts of the shared data folder ($GPT2LAB_SHARED_DATA, default ../shared/data:
WikiText-2, Tiny Shakespeare), cut into paragraphs and repeated until it holds --mb megabytes,
written as one JSON line per document. Training: `gpt2lab.tokenizer.train_bpe` on the first
--train-mb megabytes (MB/s of text learnt from). Encoding: the same `gpt2lab prepare CORPUS.jsonl
--tokenizer T` command, run in a fresh process for each tokenizer (GPT-2 = tiktoken, then the trained
BPE, also encoded by tiktoken: see gpt2lab.tokenizer.BPETokenizer), every core used as prepare uses them, alternating order over --repeats
runs; MB/s = corpus bytes / wall time of the command (median). The ratio trained BPE / tiktoken is
printed last (the goal is >= 0.8), with bytes per token of each on the corpus.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("wikitext-2/test.txt", "wikitext-2/valid.txt", "tinyshakespeare/input.txt")


def shared_data() -> Path:
    path = Path(os.environ.get("GPT2LAB_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        sys.exit(f"shared data folder {path} not found (set GPT2LAB_SHARED_DATA)")
    return path


def documents(data: Path) -> list[str]:
    """The paragraphs of the shared texts."""
    docs = []
    for name in SOURCES:
        text = (data / name).read_text(encoding="utf-8", errors="replace")
        docs += [p.strip("\n") for p in text.replace("\n \n", "\n\n").split("\n\n") if p.strip()]
    return docs


def write_corpus(docs: list[str], mb: float, path: Path) -> int:
    """JSONL of `docs` repeated to at least `mb` megabytes; returns the bytes of text written."""
    size, target = 0, int(mb * 1e6)
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
                size += len(d.encode("utf-8"))
                if size >= target:
                    break
    return size


def prepare_seconds(corpus: Path, tokenizer: str, out: Path, workers: int | None) -> float:
    cmd = [sys.executable, "-m", "gpt2lab", "prepare", str(corpus), "--tokenizer", tokenizer, "--out", str(out),
           "--overwrite", "--no-progress"] + (["--workers", str(workers)] if workers else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=64.0, help="corpus size in megabytes (>= 50 for the record)")
    parser.add_argument("--train-mb", type=float, default=16.0, help="megabytes the BPE is trained on")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="prepare runs per tokenizer (median)")
    parser.add_argument("--workers", type=int, default=None, help="prepare --workers (default: prepare's)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()

    from gpt2lab.data.prepare import load_meta
    from gpt2lab.tokenizer import TOKENIZER_FILE, train_bpe

    docs = documents(shared_data())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        size = write_corpus(docs, args.mb, corpus)
        train_docs, train_bytes = [], 0
        while train_bytes < args.train_mb * 1e6:
            for d in docs:
                train_docs.append(d)
                train_bytes += len(d.encode("utf-8"))
                if train_bytes >= args.train_mb * 1e6:
                    break
        # training runs in a child process: `tokenizers` turns its threads off in processes forked
        # from one that used them, and prepare forks its workers
        script = ("import sys, json, time; from gpt2lab.tokenizer import train_bpe; docs = json.load(open(sys.argv[1]));"
                  " t = time.perf_counter(); tok = train_bpe(docs, int(sys.argv[2]));"
                  " print(time.perf_counter() - t); open(sys.argv[3], 'w').write(tok.json)")
        (tmp / "train.json").write_text(json.dumps(train_docs))
        (tmp / "tok").mkdir()
        proc = subprocess.run([sys.executable, "-c", script, str(tmp / "train.json"), str(args.vocab_size),
                               str(tmp / "tok" / TOKENIZER_FILE)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        train_s = float(proc.stdout.split()[-1])
        assert train_bpe  # imported above so a broken install fails before the corpus is written

        times: dict[str, list[float]] = {"gpt2 (tiktoken)": [], "trained BPE": []}
        tokens = {}
        names = {"gpt2 (tiktoken)": "gpt2", "trained BPE": str(tmp / "tok")}
        for r in range(args.repeats):
            order = list(names) if r % 2 == 0 else list(reversed(names))
            for label in order:
                out = tmp / f"data_{names[label].replace('/', '_')}"
                times[label].append(prepare_seconds(corpus, names[label], out, args.workers))
                meta = load_meta(out)
                tokens[label] = sum(s["tokens"] for s in meta["splits"].values())

    rates = {k: size / 1e6 / statistics.median(v) for k, v in times.items()}
    ratio = rates["trained BPE"] / rates["gpt2 (tiktoken)"]
    print(f"{datetime.date.today()}  cpus {os.cpu_count()}  corpus {size / 1e6:.1f} MB  "
          f"BPE {args.vocab_size:,} ids trained on {train_bytes / 1e6:.1f} MB")
    print(f"training: {train_s:.1f} s ({train_bytes / 1e6 / train_s:.2f} MB/s)")
    for label, rate in rates.items():
        print(f"prepare {label:<26} {rate:8.2f} MB/s  (median of {len(times[label])}, "
              f"{size / tokens[label]:.2f} bytes/token)")
    print(f"ratio trained BPE / tiktoken: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"corpus_mb": size / 1e6, "train_mb": train_bytes / 1e6, "vocab_size": args.vocab_size,
                          "train_s": train_s, "prepare_mb_s": rates, "ratio": ratio,
                          "bytes_per_token": {k: size / v for k, v in tokens.items()}, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
