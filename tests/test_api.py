"""The Python API: `gpt2lab.load` for every --init form, its generate/stream/score equal to what the
CLI computes, `gpt2lab.train` running the CLI's trainer, and the examples/ scripts running as shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.cli import main
from gpt2lab.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from gpt2lab.sampling import generate

REPO = Path(__file__).resolve().parents[1]
TINY = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "train.tokens_per_step": 256, "train.micro_batch_size": 8, "train.max_steps": 30, "train.eval_every": 0,
        "train.eval_batches": 2, "train.sample_tokens": 0, "checkpoint.every": 30, "log.progress": False,
        "optim.warmup_steps": 5}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(default_data) -> Path:
    return default_data


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny quickstart run trained through gpt2lab.train (the Python entry point)."""
    out = tmp_path_factory.mktemp("api") / "run"
    result = gpt2lab.train("quickstart", **{**TINY, "data.dir": str(data_dir), "data.prepare": None,
                                            "checkpoint.out_dir": str(out)}, optim={"lr": 3e-3})
    assert result.step == 30 and result.checkpoint.name == "step_000030"
    assert result.train_loss < 3.5  # 103 characters: a uniform guess is ln(103) = 4.63
    assert (out / "resolved_config.yaml").read_text().count("lr: 0.003") == 1
    return out


def test_load_generates_what_the_generator_does(run_dir):
    lm = gpt2lab.load(str(run_dir), device="cpu")
    assert lm.tokenizer.name == "char" and "LoadedModel(" in repr(lm)
    prompt = "The "
    text = lm.generate(prompt, max_new_tokens=20, temperature=0)
    ids = generate(lm.model, [lm.encode(prompt)], max_new_tokens=20, temperature=0, tokenizer=lm.tokenizer)[0]
    assert text == lm.decode(ids) and len(text) == 20
    assert lm.generate([prompt, "def "], max_new_tokens=5, temperature=0) == [text[:5], lm.generate("def ", 5, temperature=0)]
    assert "".join(lm.stream(prompt, max_new_tokens=20, temperature=0)) == text
    a = lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)
    assert a == lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)


def test_score_equals_eval_perplexity(run_dir, tmp_path, capsys):
    lm = gpt2lab.load(str(run_dir))
    text = "The quick brown fox jumps over the lazy dog. " * 6  # longer than a block: several windows
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", "perplexity", "--init", str(run_dir), "--data", str(tmp_path / "t.txt"),
                 "--json", str(tmp_path / "ppl.json")]) == 0
    reference = json.loads((tmp_path / "ppl.json").read_text())
    reference = reference.get("results", reference)
    reference = reference.get("perplexity", reference)
    score = lm.score(text)
    assert score.tokens == reference["tokens_scored"]
    assert abs(score.perplexity - reference["ppl"]) <= 1e-5 * reference["ppl"]
    assert abs(-score.loglikelihood / score.tokens - reference["nll"]) <= 1e-5
    assert [s.tokens for s in lm.score([text, text[:50]])] == [score.tokens, 49]


def test_load_takes_every_init_form(run_dir, tmp_path):
    from gpt2lab.checkpoint import list_checkpoints
    from gpt2lab.hf import save_hf_model

    ckpt = list_checkpoints(run_dir)[-1]
    base = gpt2lab.load(str(run_dir))
    idx = torch.tensor([base.encode("The cat")])
    expected = base.model(idx)[0]
    assert torch.equal(gpt2lab.load(str(ckpt)).model(idx)[0], expected)
    save_hf_model(base.model, tmp_path / "hf", base.tokenizer)
    hf_lm = gpt2lab.load(str(tmp_path / "hf"))  # an HF directory (GPT-2 tokenizer assumed)
    torch.testing.assert_close(hf_lm.model(idx)[0], expected, atol=1e-5, rtol=0)
    assert gpt2lab.load("random:gpt2-tiny").model.config.n_layer == 2
    adapted = apply_lora(gpt2lab.load(str(run_dir)).model, LoraConfig(r=2))
    for m in lora_modules(adapted).values():
        m.lora_B.data.normal_(0, 0.05)
    save_adapter(tmp_path / "adapter", adapted, LoraConfig(r=2), base_init=str(run_dir),
                 tokenizer=base.tokenizer.to_dict())
    merged = gpt2lab.load(str(tmp_path / "adapter"))
    torch.testing.assert_close(merged.model(idx)[0], adapted.eval()(idx)[0], atol=1e-5, rtol=0)
    with pytest.raises(gpt2lab.errors.UserError, match="unknown device"):
        gpt2lab.load(str(run_dir), device="gpu")


def run_example(name: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_examples_run(run_dir, data_dir, tmp_path):
    out = run_example("generate.py", "--init", str(run_dir), "--prompt", "The ", cwd=tmp_path)
    assert out.startswith("LoadedModel(") and out.count("\n") >= 5
    out = run_example("score.py", "--init", str(run_dir), cwd=tmp_path)
    assert len(out.splitlines()) == 3 and all(" ppl " in line for line in out.splitlines())
    out = run_example("train_and_sample.py", "--out", str(tmp_path / "example"), "--steps", "40",
                      "--data", str(data_dir), cwd=tmp_path)
    assert "\ntrained 40 steps: val loss " in out and (tmp_path / "example" / "loss.png").is_file()
