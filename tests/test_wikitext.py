"""The wikitext task: lm-evaluation-harness's windows, detokenizer and metrics, checked against a
direct computation with plain forward passes; pages of the shared file; and the task registry."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.evaluate import wikitext
from gpt2lab.evaluate.registry import TASK_MODULES, all_tasks, get_task
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.tokenizer import get_tokenizer

TOK = get_tokenizer("gpt2")
# Two articles in WikiText's raw layout (CRLF, as the shared file): spaced punctuation, @-@ number
# separators, a section heading, brackets and quotes for the detokenizer.
TOY = (
    " = Alpha Beta = \r\n"
    " Alpha Beta is a 1 @,@ 200 @-@ metre river in the north , near the town of Gamma ( population 3 @.@ 5 million ) . "
    "It flows into the sea . \r\n"
    " = = History = = \r\n"
    " The river 's name was first recorded in 1066 ; local people call it \" the old water \" . \r\n"
    " = Delta = \r\n"
    " Delta is a letter . It is used in mathematics : a change in a quantity . \r\n"
)


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32))
    return model.eval()


def harness_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs of lm-evaluation-harness's rolling windows with a one-token
    context, made disjoint, written from its definition: continuations are consecutive chunks of
    max_len tokens; each context is the max_len + 1 ids before the chunk's end, cut to what precedes it."""
    ids = [prefix, *tokens]
    pairs = []
    for first in range(0, len(tokens), max_len):
        end = min(first + max_len, len(tokens))
        window = ids[max(end - max_len, 0) : end + 1]  # inputs, then the last target
        n = end - first
        pairs.append((window[: len(window) - n], window[len(window) - n :]))
    return pairs


def reference(model: GPT, pages: list[str], max_len: int) -> dict[str, float]:
    """The three metrics from one plain forward pass per window, in float64 sums."""
    total_ll = 0.0
    for page in pages:
        for context, continuation in harness_windows(TOK.encode(wikitext.detokenize(page)), TOK.eot_id, max_len):
            inp = (context + continuation)[-(max_len + 1) :][:-1]
            with torch.no_grad():
                logits, _ = model(torch.tensor([inp]))
            logprobs = F.log_softmax(logits[0, -len(continuation) :].double(), dim=-1)
            total_ll += logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item()
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    return {"word_perplexity": math.exp(-total_ll / words), "byte_perplexity": math.exp(-total_ll / n_bytes),
            "bits_per_byte": -total_ll / n_bytes / math.log(2)}


def test_rolling_windows_are_the_harness_windows():
    """The harness's own example (34 tokens, max length 10): windows [prefix, 0..8], [9..18], [19..28],
    and [23..32] of which only the predictions of 30..33 count."""
    assert wikitext.rolling_windows(34, 10) == [(0, 10, 10), (10, 10, 10), (20, 10, 10), (24, 10, 4)]
    assert wikitext.rolling_windows(5, 10) == [(0, 5, 5)]


def test_detokenize():
    page = (' = A = \n = = B = = \n 1 @,@ 000 @-@ odd , ( x ) [ y ] " q " the river \'s " end " . \n'
            " 5 \N{DEGREE SIGN} C ; N is it ? \n")
    assert wikitext.detokenize(page) == (' = A =\n== B ==\n1,000-odd, (x) [y] "q" the river\'s "end".\n'
                                         "5\N{DEGREE SIGN}C; 1 is it?\n")  # the harness turns " N " into " 1 "


def test_pages_split_at_article_headings(tmp_path):
    f = tmp_path / "toy.raw"
    f.write_bytes(TOY.encode())
    pages = wikitext.read_pages(f)
    assert [p.splitlines()[0] for p in pages] == [" = Alpha Beta = ", " = Delta = "]
    assert pages[0].endswith("the old water \" . ") and pages[1].endswith("quantity . \n")
    assert "\r" not in "".join(pages)


def test_metrics_equal_direct_computation(tiny_model, tmp_path):
    """Pages longer than the 16-token windows (so full, and shorter last, windows both occur), batched
    and not: the three metrics equal the direct computation within 1e-6 (relative)."""
    f = tmp_path / "toy.raw"
    f.write_bytes(TOY.encode())
    pages = wikitext.read_pages(f)
    want = reference(tiny_model, pages, 16)
    for batch_size in (1, 3):
        got = wikitext.evaluate(tiny_model, TOK, pages, batch_size=batch_size)
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value, rel=1e-6), metric
    assert got["pages"] == 2 and got["tokens"] == sum(len(TOK.encode(wikitext.detokenize(p))) for p in pages)
    assert got["words"] == sum(len(re.split(r"\s+", p)) for p in pages)
    with pytest.raises(UserError, match="exceeds the model's block_size=16"):
        wikitext.evaluate(tiny_model, TOK, pages, max_length=32)


def test_shared_file_pages(shared_data):
    """The shared test split: 62 article headings, so 62 pages; whitespace words + 2 per page (the
    harness's re.split counts an empty string at either end) and the bytes of the LF-joined lines."""
    pages = wikitext.read_pages(shared_data / wikitext.SHARED_FILE)
    assert len(pages) == 62
    assert sum(len(re.split(r"\s+", p)) for p in pages) == 241_211 + 2 * 62
    assert sum(len(p.encode("utf-8")) for p in pages) == 1_287_595


def test_cli_on_the_shared_file(shared_data, tmp_path, monkeypatch, capsys):
    """`gpt2lab eval wikitext` finds the shared file by itself; on its first page the JSON equals the
    direct computation."""
    from gpt2lab.checkpoint import save_checkpoint

    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(shared_data))
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=128, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    save_checkpoint(tmp_path / "ckpt", model, model.config, TOK.to_dict())
    assert main(["eval", "wikitext", "--init", str(tmp_path / "ckpt"), "--limit", "1", "--device", "cpu",
                 "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "wikitext" and result["pages"] == 1
    want = reference(model, wikitext.read_pages(shared_data / wikitext.SHARED_FILE)[:1], 128)
    for metric, value in want.items():
        assert result[metric] == pytest.approx(value, rel=1e-6), metric


# --------------------------------------------------------------------------------------------------
# The registry


def test_registry_names_and_help_without_torch():
    """Every task is registered under its own name; `gpt2lab eval --help` lists each with its description
    and building the parser imports no torch."""
    assert [t.name for t in all_tasks()] == list(TASK_MODULES)
    with pytest.raises(UserError, match="'wikitxt' is not an eval task; did you mean 'wikitext'"):
        get_task("wikitxt")
    code = ("import sys, argparse; from gpt2lab.commands import eval as e; p = argparse.ArgumentParser(); "
            "e.add_arguments(p); p.print_help(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.splitlines()[-1] == "False"
    for task in all_tasks():
        assert task.name in out and task.description.split()[0] in out
