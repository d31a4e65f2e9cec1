"""Misuse and faults across every command: each case must end with exit code 2 and one line on
stderr (no traceback), before any work, and leave every file that existed before it byte-identical
(and create nothing). The cases run in-process through `gpt2lab.cli.main` in one sandbox holding a
real run, a checkpoint, a LoRA adapter, a prepared dataset and some files of the user's own."""

from __future__ import annotations

import json

import pytest
from misuse import TRAIN, snapshot

from gpt2lab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, argv): every case must fail with exit 2, one line, nothing changed.
CASES = [
    # train: config values, devices, data, outputs, resume
    ("train-betas", [*TRAIN, "--optim.betas", "0.9,1.5"]),
    ("train-eps", [*TRAIN, "--optim.eps", "-1"]),
    ("train-lr", [*TRAIN, "--optim.lr", "-0.1"]),
    ("train-weight-decay", [*TRAIN, "--optim.weight_decay", "-1"]),
    ("train-cuda", [*TRAIN, "--train.device", "cuda"]),
    ("train-mps", [*TRAIN, "--train.device", "mps"]),
    ("train-device-typo", [*TRAIN, "--train.device", "gpu"]),
    ("train-sample-temperature", [*TRAIN, "--train.sample_temperature", "-1"]),
    ("train-sample-top-k", [*TRAIN, "--train.sample_top_k", "0"]),
    ("train-max-steps", [*TRAIN, "--train.max_steps", "0"]),
    ("train-heads", [*TRAIN, "--model.n_head", "3"]),
    ("train-geometry", [*TRAIN, "--train.tokens_per_step", "100"]),
    ("train-unknown-key", [*TRAIN, "--train.lr", "3e-4"]),
    ("train-not-a-number", [*TRAIN, "--optim.lr", "fast"]),
    ("train-missing-config", [*TRAIN, "--config", "missing.yaml"]),
    ("train-bad-yaml", [*TRAIN, "--config", "bad.yaml"]),
    ("train-out-under-file", [*TRAIN, "--out", "notes.txt/run"]),
    ("train-existing-run", [*TRAIN, "--out", "run"]),
    ("train-resume-nothing", [*TRAIN, "--out", "mydir", "--resume"]),
    ("train-resume-missing", [*TRAIN, "--checkpoint.resume", "nowhere/ckpt"]),
    ("train-missing-data", [*TRAIN, "--data.dir", "nodata"]),
    ("train-init-missing", [*TRAIN, "--model.init", "runs/missing"]),
    ("train-vocab", [*TRAIN, "--model.vocab_size", "3"]),
    ("train-dtype", [*TRAIN, "--train.dtype", "fp8"]),
    ("train-schedule", [*TRAIN, "--optim.schedule", "linear"]),
    ("train-eval-task", [*TRAIN, "--eval.tasks", "[mmlu]", "--eval.every", "1"]),
    # finetune
    ("finetune-missing-data", ["finetune", "--data", "missing.jsonl", "--init", "base", "--out", "ft"]),
    ("finetune-bad-record", ["finetune", "--data", "bad.jsonl", "--init", "base", "--out", "ft"]),
    ("finetune-lora-r", ["finetune", "--data", "bad.jsonl", "--init", "base", "--out", "ft", "--lora.r", "-1"]),
    ("finetune-template", ["finetune", "--data", "bad.jsonl", "--init", "base", "--out", "ft",
                           "--data.sft.template", "Q: {nope}"]),
    ("finetune-init-missing", ["finetune", "--data", "bad.jsonl", "--init", "nowhere/model", "--out", "ft"]),
    # prepare
    ("prepare-unknown-source", ["prepare", "wikipedia-xl", "--out", "d2"]),
    ("prepare-missing-input", ["prepare", "shakespeare", "--input", "missing.txt", "--out", "d2"]),
    ("prepare-out-is-file", ["prepare", "default", "--out", "notes.txt"]),
    ("prepare-latin1", ["prepare", "latin1.txt", "--out", "d2"]),
    ("prepare-val-fraction", ["prepare", "default", "--out", "d2", "--val-fraction", "2"]),
    ("prepare-into-run", ["prepare", "default", "--out", "run"]),
    ("prepare-into-foreign", ["prepare", "default", "--out", "mydir"]),
    ("prepare-broken-jsonl", ["prepare", "broken.jsonl", "--out", "d2"]),
    ("prepare-tokenizer-dir", ["prepare", "default", "--out", "d2", "--tokenizer", "mydir"]),
    # tokenizer
    ("tokenizer-vocab-small", ["tokenizer", "train", "notes.txt", "--vocab-size", "10", "--out", "tok"]),
    ("tokenizer-out-foreign", ["tokenizer", "train", "notes.txt", "--vocab-size", "300", "--out", "mydir"]),
    ("tokenizer-out-run", ["tokenizer", "train", "notes.txt", "--vocab-size", "300", "--out", "run"]),
    ("tokenizer-unknown-corpus", ["tokenizer", "train", "wikipedia-xl", "--vocab-size", "300", "--out", "tok"]),
    ("tokenizer-latin1", ["tokenizer", "train", "latin1.txt", "--vocab-size", "300", "--out", "tok"]),
    ("tokenizer-encode-no-dir", ["tokenizer", "encode", "--tokenizer", "mydir", "hello"]),
    ("tokenizer-decode-bad-id", ["tokenizer", "decode", "99999999"]),
    # sample
    ("sample-system-without-chat", ["sample", "--init", "run", "--prompt", "x", "--system", "Be brief."]),
    ("sample-chat-and-prompt", ["sample", "--init", "run", "--chat", "hi", "--prompt", "x"]),
    ("sample-special-template-gpt2", ["sample", "--init", "run", "--chat", "hi", "--template", "special"]),
    ("sample-missing", ["sample", "--init", "runs/missing"]),
    ("sample-random-weights", ["sample", "--init", "junk_ckpt"]),
    ("sample-truncated-config", ["sample", "--init", "trunc_cfg"]),
    ("sample-latin1-prompt", ["sample", "--init", "run", "--prompt-file", "latin1.txt"]),
    ("sample-missing-prompt", ["sample", "--init", "run", "--prompt-file", "missing.txt"]),
    ("sample-temperature", ["sample", "--init", "run", "--temperature", "-1"]),
    ("sample-top-p", ["sample", "--init", "run", "--top-p", "2"]),
    ("sample-max-new", ["sample", "--init", "run", "--max-new-tokens", "0"]),
    ("sample-cuda", ["sample", "--init", "run", "--device", "cuda"]),
    ("sample-dtype", ["sample", "--init", "run", "--dtype", "fp8"]),
    # chat
    ("chat-missing", ["chat", "--init", "runs/missing"]),
    ("chat-cuda", ["chat", "--init", "run", "--device", "cuda"]),
    ("chat-temperature", ["chat", "--init", "run", "--temperature", "-2"]),
    # serve
    ("serve-missing", ["serve", "--init", "runs/missing", "--port", "0"]),
    ("serve-port", ["serve", "--init", "base", "--port", "70000"]),
    ("serve-max-batch", ["serve", "--init", "base", "--port", "0", "--max-batch", "0"]),
    ("serve-max-len", ["serve", "--init", "base", "--port", "0", "--max-len", "100000"]),
    ("serve-template", ["serve", "--init", "base", "--port", "0", "--template", "Q: {nope}"]),
    ("serve-api-key", ["serve", "--init", "base", "--port", "0", "--api-key", " "]),
    ("serve-cuda", ["serve", "--init", "base", "--port", "0", "--device", "cuda"]),
    # eval
    ("eval-unknown-task", ["eval", "mmlu", "--init", "run"]),
    ("eval-perplexity-no-data", ["eval", "perplexity", "--init", "run"]),
    ("eval-missing-data", ["eval", "hellaswag", "--init", "run", "--data", "missing.jsonl"]),
    ("eval-json-is-dir", ["eval", "lambada", "--init", "run", "--data", "broken.jsonl", "--json", "mydir"]),
    ("eval-json-into-dir", ["eval", "lambada", "--init", "run", "--data", "lambada.jsonl", "--json", "mydir"]),
    ("eval-json-under-file", ["eval", "lambada", "--init", "run", "--data", "lambada.jsonl", "--json", "notes.txt/x"]),
    ("eval-broken-lambada", ["eval", "lambada", "--init", "run", "--data", "broken.jsonl"]),
    ("eval-limit", ["eval", "hellaswag", "--init", "run", "--limit", "0"]),
    ("eval-latin1", ["eval", "perplexity", "--init", "run", "--data", "latin1.txt"]),
    ("eval-cuda", ["eval", "wikitext", "--init", "run", "--device", "cuda"]),
    # bench
    ("bench-missing", ["bench", "--init", "runs/missing"]),
    ("bench-cuda", ["bench", "--init", "run", "--device", "cuda"]),
    ("bench-dtype", ["bench", "--init", "run", "--dtype", "fp8"]),
    # convert
    ("convert-out-file", ["convert", "--init", "run", "--out", "notes.txt"]),
    ("convert-out-run", ["convert", "--init", "base", "--out", "run"]),
    ("convert-out-checkpoint", ["convert", "--init", "base", "--out", "run/checkpoints/step_000002"]),
    ("convert-out-foreign", ["convert", "--init", "base", "--out", "mydir"]),
    ("convert-rope", ["convert", "--init", "rope", "--out", "hf_rope"]),
    ("convert-missing", ["convert", "--init", "runs/missing", "--out", "hf"]),
    ("convert-peft-not-adapter", ["convert", "--init", "base", "--out", "peft", "--format", "peft"]),
    # merge-lora
    ("merge-into-run", ["merge-lora", "--adapter", "adapter", "--out", "run"]),
    ("merge-into-file", ["merge-lora", "--adapter", "adapter", "--out", "notes.txt"]),
    ("merge-into-foreign", ["merge-lora", "--adapter", "adapter", "--out", "mydir"]),
    ("merge-missing-adapter", ["merge-lora", "--adapter", "noadapter", "--out", "merged"]),
    ("merge-not-adapter", ["merge-lora", "--adapter", "base", "--out", "merged"]),
    # model-info
    ("model-info-missing", ["model-info", "--init", "runs/missing"]),
    ("model-info-preset", ["model-info", "gpt3"]),
    ("model-info-bad-field", ["model-info", "gpt2", "--model.n_head", "7"]),
    # plot
    ("plot-no-metrics", ["plot", "mydir"]),
    ("plot-missing", ["plot", "nowhere"]),
    ("plot-out-is-dir", ["plot", "run", "-o", "mydir"]),
    ("plot-x", ["plot", "run", "--x", "time"]),
    # the command itself
    ("unknown-command", ["trian"]),
]


@pytest.mark.parametrize("name, argv", CASES, ids=[c[0] for c in CASES])
def test_misuse_is_one_line_and_touches_nothing(name, argv, sandbox, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    before = snapshot(sandbox)
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{name}: expected one line, got:\n{err}"
    assert "error" in lines[0]
    assert "{'" not in lines[0] and "weights_only=False" not in lines[0], lines[0]  # no Python reprs
    assert snapshot(sandbox) == before, f"{name} changed or created files"


def test_there_are_sixty_cases_across_all_commands():
    from gpt2lab.cli import COMMANDS

    assert len(CASES) >= 60
    assert {argv[0] for _, argv in CASES} >= set(COMMANDS)
    assert json.dumps(CASES)  # plain data
