"""WikiText-2, as lm-evaluation-harness's `wikitext` task scores it: per-word and per-byte perplexity
of whole Wikipedia articles.

Data: the raw test split (`wiki.test.raw` of wikitext-2-raw-v1), split into one page per article at
its top-level headings (` = Title = `; `= = Section = =` lines stay inside the page). Each page is
detokenized (`detokenize`, the harness's `wikitext_detokenizer`), encoded, prefixed with the
end-of-text token and cut into disjoint rolling windows of max_length tokens (`rolling_windows`):
every token is scored exactly once, the first window's from the prefix on, each later full window
with the previous window's last token as its only context, and the last, shorter window with the
max_length tokens before its end as context. Summed over all pages,

    word_perplexity  exp(-sum ll / sum words)     words = len(re.split(r"\\s+", page))
    byte_perplexity  exp(-sum ll / sum bytes)     bytes = len(page.encode("utf-8"))
    bits_per_byte    -sum ll / sum bytes / ln 2

where ll is a page's log-likelihood (natural log) and the words and bytes are counted on the page
before detokenization, as the harness counts them. How the pages are rebuilt from a file of
non-empty lines, and how that differs from the harness's `wikitext_document_level` pages, is in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2lab.errors import UserError
from gpt2lab.evaluate import find_data_file
from gpt2lab.evaluate.task import EvalTask, MetricRow, positive_int
from gpt2lab.fileio import read_text

if TYPE_CHECKING:
    import torch

SHARED_FILE = "wikitext-2/raw/wiki.test.raw"

# The detokenizer's rules, in the order applied: plain replacements, then regular expressions.
_CONTRACTION = [("s '", "s'")]
_NUMBER_SEPARATORS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_PUNCTUATION = [(f" {p} ", f"{p} ") for p in ":;.!?,"]
_BRACKETS = [
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
]
_MISC = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
         (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def detokenize(page: str) -> str:
    """lm-evaluation-harness's `wikitext_detokenizer`: WikiText's spaced-out punctuation, number
    separators (` @-@ `), brackets, quotes and headings put back the way running text writes them."""
    for old, new in _CONTRACTION:
        page = page.replace(old, new)
    page = re.sub(r"/' [0-9]/", r"/'[0-9]/", page)  # matches only a literal "/' 5/"; kept to equal the harness
    for old, new in _NUMBER_SEPARATORS + _PUNCTUATION:
        page = page.replace(old, new)
    for pattern, new in _BRACKETS:
        page = pattern.sub(new, page)
    for old, new in _MISC:
        page = page.replace(old, new)
    return page


def is_article_heading(line: str) -> bool:
    """A top-level heading ` = Title = ` (the harness's test: section headings `= = x = =` are not)."""
    squeezed = line.replace("= = =", "===").replace("= =", "==").strip()
    return squeezed.startswith("= ") and squeezed.endswith(" =")


def read_pages(path: str | Path) -> list[str]:
    """The articles of a WikiText raw file (CRLF or LF), one page each, built as the harness's
    `wikitext_document_level` builds them: the file's lines from one top-level heading to the next,
    joined with "\\n" (text before the first heading is a page of its own; blank pages are dropped)."""
    groups: list[list[str]] = [[]]
    for line in read_text(path).replace("\r\n", "\n").split("\n"):
        if is_article_heading(line) and groups[-1]:
            groups.append([])
        groups[-1].append(line)
    pages = ["\n".join(group) for group in groups if "".join(group).strip()]
    if not pages:
        raise UserError(f"{path} holds no text; pass a WikiText raw file such as wiki.test.raw")
    return pages


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """(start, length, scored) of each window over [prefix] + tokens (n_tokens + 1 ids): the model reads
    ids[start : start + length] and the last `scored` of the `length` predictions count.

    Together the windows score every token once: tokens [0, L), [L, 2L), ... (L = max_length).
    """
    out = []
    for first in range(0, n_tokens, max_length):
        end = min(first + max_length, n_tokens)  # this window scores tokens [first, end)
        start = max(end - max_length, 0)  # read the max_length ids before token `end`, prefix included
        out.append((start, end - start, end - first))
    return out


def window_rows(ids: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) of each rolling window over `ids` ([prefix] + a text's tokens): targets
    already scored by an earlier window are -100 (not scored), for `scoring.sum_target_nll`."""
    rows = []
    for start, length, scored in rolling_windows(len(ids) - 1, max_length):
        targets = ids[start + 1 : start + length + 1]
        rows.append((ids[start : start + length], [-100] * (length - scored) + targets[length - scored :]))
    return rows


def evaluate(model: torch.nn.Module, tokenizer, pages: list[str], max_length: int | None = None,
             batch_size: int = 4, env=None, show_progress: bool = False) -> dict:
    """word_perplexity, byte_perplexity and bits_per_byte of `model` on `pages` (same dict on every rank)."""
    from gpt2lab.evaluate.scoring import sum_target_nll
    from gpt2lab.parallel import unwrap

    block_size = unwrap(model).config.block_size
    max_length = max_length or block_size
    if max_length > block_size:
        raise UserError(f"--max-length {max_length} exceeds the model's block_size={block_size}")
    if tokenizer.eot_id is None:
        raise UserError("wikitext needs a tokenizer with an end-of-text token to start each page with")
    rows = []
    for page in pages:
        rows += window_rows([tokenizer.eot_id, *tokenizer.encode(detokenize(page))], max_length)
    nll, tokens = sum_target_nll(model, rows, batch_size, env, show_progress, "wikitext")
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    return {
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "pages": len(pages),
        "tokens": tokens,
        "words": words,
        "bytes": n_bytes,
        "max_length": max_length,
    }


class WikiText(EvalTask):
    name = "wikitext"
    description = "WikiText-2 word/byte perplexity and bits per byte, as lm-evaluation-harness's wikitext"
    data_help = (f"a WikiText raw file such as wiki.test.raw (default: $GPT2LAB_SHARED_DATA/{SHARED_FILE}, "
                 "the wikitext-2-raw-v1 test split)")
    unit = "pages"
    batch_unit = "windows"
    default_batch_size = 4
    training_metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-length", type=positive_int,
                            help="rolling window length in tokens (default: the model's block_size)")

    def find_data(self, download: bool = True) -> Path | None:
        return find_data_file(SHARED_FILE)

    def load(self, path: Path, options: argparse.Namespace) -> list[str]:
        return read_pages(path)

    def run(self, model: torch.nn.Module, tokenizer: Any, examples: Sequence, options: argparse.Namespace,
            env: Any = None, batch_size: int | None = None, show_progress: bool = False) -> dict:
        return evaluate(model, tokenizer, list(examples), max_length=options.max_length,
                        batch_size=batch_size or self.default_batch_size, env=env, show_progress=show_progress)

    def rows(self, result: dict) -> list[MetricRow]:
        return [
            MetricRow("word_perplexity", f"{result['word_perplexity']:.4f}",
                      f"exp(NLL / words), {result['words']:,} whitespace-split words"),
            MetricRow("byte_perplexity", f"{result['byte_perplexity']:.4f}",
                      f"exp(NLL / bytes), {result['bytes']:,} UTF-8 bytes"),
            MetricRow("bits_per_byte", f"{result['bits_per_byte']:.4f}", "NLL / bytes / ln 2"),
            MetricRow("pages", str(result["pages"]),
                      f"articles; {result['tokens']:,} tokens in windows of {result['max_length']}"),
        ]


TASK = WikiText()
