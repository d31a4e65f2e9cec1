"""End to end: `gpt2lab finetune` (full and LoRA) through the one trainer, merge-lora, and chat.

A tiny GPT (2 layers, n_embd 32, GPT-2 BPE, block_size 96) is first trained for 30 steps on 600
Alpaca records with nothing masked (its "pretraining"), then instruction-finetuned on 320 other
records (32 held out), with the prompt masked. Validation losses are measured on the held-out
records, response tokens only. Everything runs on CPU in one process except the chat subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint import load_checkpoint, save_checkpoint
from gpt2lab.config import load_config
from gpt2lab.data.sft import SFTConfig, build_sft_data
from gpt2lab.loading import load_model
from gpt2lab.lora import load_adapter, read_adapter_config
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.run import train
from gpt2lab.tokenizer import get_tokenizer

BLOCK = 96
VAL_FRACTION = 0.1
SEED = 1337
# 4 rows of up to 96 tokens per step; no in-run evaluation, samples or intermediate checkpoints.
QUICK = ["--train.tokens_per_step", str(4 * BLOCK), "--train.micro_batch_size", "4", "--train.eval_every", "0",
         "--train.eval_batches", "0", "--train.sample_tokens", "0", "--checkpoint.every", "0",
         "--train.log_every", "10", "--log.progress", "false", "--train.device", "cpu", "--optim.weight_decay", "0",
         "--optim.warmup_steps", "5", "--train.seed", str(SEED)]
BAD_LINES = ['{"instruction": "no output here"}', "{not json", '{"instruction": "x", "output": 7}']


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data) -> Path:
    """Data files, and a base model briefly pretrained (unmasked) on other Alpaca records."""
    work = tmp_path_factory.mktemp("finetune")
    records = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text())
    (work / "pretrain.json").write_text(json.dumps(records[1000:1600]))
    lines = [json.dumps(r) for r in records[:320]]
    for i, bad in zip((5, 50, 200), BAD_LINES):
        lines.insert(i, bad)
    (work / "sft.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK)
    save_checkpoint(work / "init", GPT(config), config, {"kind": "gpt2"})
    cfg = load_config("finetune_alpaca", _overrides(QUICK + [
        "--model.init", str(work / "init"), "--data.sft.path", str(work / "pretrain.json"),
        "--data.sft.mask_prompt", "false", "--data.sft.val_fraction", "0", "--train.max_steps", "30",
        "--optim.lr", "1e-2", "--optim.min_lr", "1e-3", "--checkpoint.out_dir", str(work / "base")]))
    train(cfg)
    return work


def _overrides(argv: list[str]) -> dict[str, str]:
    return {k[2:]: v for k, v in zip(argv[::2], argv[1::2])}


def val_loss(model: torch.nn.Module, data_file: Path) -> float:
    """Mean loss per response token over the held-out records (the split finetune uses)."""
    _, val = build_sft_data(SFTConfig(path=str(data_file), val_fraction=VAL_FRACTION, skip_invalid=True),
                            get_tokenizer("gpt2"), BLOCK, 4, 0, 1, SEED, log=lambda m: None)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for x, y in val.iter_eval_batches(16):
            total += float(model(x, y, loss_reduction="sum")[1])
            count += int((y != -100).sum())
    return total / count


def finetune(work: Path, out: str, *extra: str) -> Path:
    """`gpt2lab finetune` on sft.jsonl (3 invalid lines skipped) from the base, 20 steps; its stderr
    is written to <out>.log."""
    argv = ["finetune", "--data", str(work / "sft.jsonl"), "--init", str(work / "base"), "--out", str(work / out),
            "--data.sft.skip_invalid", "true", "--data.sft.val_fraction", str(VAL_FRACTION), "--train.max_steps",
            "20", *QUICK, *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    (work / f"{out}.log").write_text(err.getvalue())
    assert code == 0, err.getvalue()
    return work / out


@pytest.fixture(scope="module")
def base_loss(work) -> float:
    return val_loss(load_checkpoint(work / "base")[0], work / "sft.jsonl")


@pytest.fixture(scope="module")
def full_run(work) -> Path:
    return finetune(work, "full", "--optim.lr", "3e-3", "--optim.min_lr", "3e-4")


@pytest.fixture(scope="module")
def lora_run(work) -> Path:
    return finetune(work, "lora", "--optim.lr", "1e-2", "--optim.min_lr", "1e-3", "--lora.r", "8", "--lora.alpha",
                    "16", "--lora.dropout", "0", "--lora.targets", "c_attn,c_proj,c_fc", "--lora.merge", "true")


def test_full_finetune_lowers_held_out_loss(work, base_loss, full_run):
    tuned, config = load_checkpoint(full_run)
    before, after = base_loss, val_loss(tuned, work / "sft.jsonl")
    print(f"full finetune: held-out loss {before:.3f} -> {after:.3f}")
    # measured on 2 CPU threads: 8.293 -> 8.003 (margin 0.29)
    assert after < before - 0.15
    assert config["step"] == 20


def test_lora_finetune_lowers_held_out_loss(work, base_loss, lora_run):
    merged, _ = load_checkpoint(lora_run / "merged")
    before, after = base_loss, val_loss(merged, work / "sft.jsonl")
    print(f"LoRA finetune: held-out loss {before:.3f} -> {after:.3f}")
    # measured: 8.293 -> 8.224 (margin 0.069) with 8,192 trained parameters (0.5% of the model)
    assert after < before - 0.03


def test_lora_run_outputs_agree(work, lora_run):
    """The adapter on its base, the merged checkpoint, merge-lora's output and the run's own last
    checkpoint (which holds A and B next to the frozen base) all compute the same logits."""
    idx = torch.randint(0, 50257, (2, BLOCK), generator=torch.Generator().manual_seed(0))
    adapter = lora_run / "adapter"
    config = read_adapter_config(adapter)
    assert config["base"]["init"] == str((work / "base").resolve()) and config["r"] == 8
    base_bytes = sum(f.stat().st_size for f in (work / "base" / "checkpoints").rglob("model.safetensors"))
    assert (adapter / "adapter.safetensors").stat().st_size < base_bytes / 50  # 5,376 of 1.6M parameters
    with_adapter, _ = load_checkpoint(work / "base")
    load_adapter(with_adapter, adapter)
    reference = with_adapter.eval()(idx)[0]
    assert cli.main(["merge-lora", "--adapter", str(adapter), "--out", str(work / "merged_cli")]) == 0
    for path in (lora_run / "merged", work / "merged_cli", lora_run):
        model, _ = load_model(str(path))
        assert (model.eval()(idx)[0] - reference).abs().max() <= 1e-5, path


def test_finetune_reports_skipped_records_and_lengths(work, full_run):
    log = (work / "full.log").read_text()
    data = work / "sft.jsonl"
    assert (f"{data}: skipped 3 invalid records (line 6: missing 'output'; line 51: invalid JSON at column 2: "
            "Expecting property name enclosed in double quotes; line 201: field 'output' must be a string, got "
            "number)") in log
    assert f"{data} train: 288 records, kept " in log and f"{data} val: 32 records, kept " in log
    assert "format: sft" in (full_run / "resolved_config.yaml").read_text()


def test_chat_through_a_pipe(full_run):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "chat", "--init", str(full_run), "--max-new-tokens", "12", "--seed", "0",
         "--device", "cpu"],
        input="Name a primary color.\n/reset\n\nGive me a word.\n", capture_output=True, text=True, timeout=300,
        env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and proc.stderr == ""
    assert proc.stdout.count("\n") >= 2  # one answer (plus its newline) per message


def test_chat_loads_an_adapter_and_stops_on_exit(work, lora_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi.\n/exit\nnever answered\n"))
    assert cli.main(["chat", "--init", str(lora_run / "adapter"), "--max-new-tokens", "5", "--seed", "0",
                     "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") <= 6


def test_malformed_data_fails_before_training(work, capsys):
    (work / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": 3, '
                                    '"output": "b"}\n')
    code = cli.main(["finetune", "--data", str(work / "bad.jsonl"), "--init", str(work / "base"), "--out",
                     str(work / "bad_run"), *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.endswith(f"{work / 'bad.jsonl'}:2: field 'input' must be a string, got number; pass "
                        "--data.sft.skip_invalid true to skip invalid records")
    assert not (work / "bad_run" / "checkpoints").exists()


def test_finetune_without_data_explains_where_to_get_alpaca(capsys):
    assert cli.main(["finetune"]) == 2
    err = capsys.readouterr().err
    assert "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json" in err
    assert "--data alpaca" in err


def test_finetune_data_alpaca_offline_is_one_line(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2LAB_ALPACA_URL", "http://127.0.0.1:9/alpaca_data.json")
    code = cli.main(["finetune", "--data", "alpaca", "--init", str(work / "base"), "--out", str(tmp_path / "run"),
                     *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "could not download Alpaca data from http://127.0.0.1:9/alpaca_data.json" in err


def test_sample_instruct_answers_with_the_template(full_run, capsys):
    from gpt2lab.data.sft import render_prompt
    from gpt2lab.loading import load_model
    from gpt2lab.sampling import generate

    args = ["sample", "--init", str(full_run), "--instruct", "Name a primary color.", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "### Instruction:" not in printed  # the rendered template is not echoed, only the answer
    model, tok = load_model(str(full_run))
    prompt = tok.encode(render_prompt("Name a primary color."))
    expected = tok.decode(generate(model, [prompt], max_new_tokens=8, temperature=0)[0])
    assert printed.strip() == expected.strip()
    assert cli.main(args + ["--prompt", "x"]) == 2


def test_finetune_records_its_chat_template(work, full_run, lora_run):
    """Checkpoints, adapters and merged models say which chat template they were finetuned with;
    `chat`/`sample --chat` default to it."""
    from gpt2lab.loading import chat_template_of

    assert chat_template_of(str(full_run)) == "alpaca"
    assert chat_template_of(str(lora_run / "adapter")) == "alpaca"
    assert chat_template_of(str(lora_run / "merged")) == "alpaca"
    assert cli.main(["merge-lora", "--adapter", str(lora_run / "adapter"), "--out", str(work / "merged_template")]) == 0
    assert chat_template_of(str(work / "merged_template")) == "alpaca"
    assert chat_template_of("random:gpt2-tiny") is None  # no finetuning: no template


def test_sample_chat_with_a_system_prompt_uses_the_recorded_template(full_run, capsys):
    from gpt2lab.chat_template import get_chat_template
    from gpt2lab.loading import load_model
    from gpt2lab.sampling import generate

    args = ["sample", "--init", str(full_run), "--chat", "Name a primary color.", "--system", "Answer briefly.",
            "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    model, tok = load_model(str(full_run))
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a primary color."}]
    prompt = get_chat_template("alpaca").encode(messages, tok)
    assert tok.decode(prompt).startswith("Answer briefly.\n\n### Instruction:\nName a primary color.")
    new = generate(model, [prompt], max_new_tokens=8, temperature=0)[0]
    expected = tok.decode(new[:new.index(tok.eot_id)] if tok.eot_id in new else new)
    assert printed.strip() == expected.split("### Instruction:")[0].strip()
