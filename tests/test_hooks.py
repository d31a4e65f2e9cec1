"""Trainer hooks and in-training eval tasks: hooks run on schedule and in order, their time stays out
of tokens/s, at_end hooks run once after the last step; eval tasks are logged as eval/<task>/<metric>
with the numbers `gpt2lab eval` computes; the eval config's old and new keys."""

from __future__ import annotations

import time

import pytest
import torch

from gpt2lab import parallel
from gpt2lab.config import load_config
from gpt2lab.errors import UserError
from gpt2lab.evaluate import wikitext
from gpt2lab.evaluate.training import EvalConfig, TaskEvaluator, task_schedule
from gpt2lab.metrics import LogConfig, RunLogger, read_metrics
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import OptimConfig
from gpt2lab.run import train
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.trainer import Hook, TrainConfig, Trainer, batch_geometry

TOK = get_tokenizer("gpt2")
TOY_WIKI = " = Alpha = \r\n Alpha is a river in the north , near Gamma . \r\n = Beta = \r\n Beta is a letter . \r\n"

pytestmark = pytest.mark.usefixtures("one_thread")


class RandomData:
    """get_batch(step) -> random tokens of a fixed seed per step."""

    def __init__(self, rows: int, T: int, vocab: int) -> None:
        self.rows, self.T, self.vocab = rows, T, vocab

    def get_batch(self, step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (self.rows, self.T), generator=g)
        return x, torch.roll(x, -1, dims=1)

    def state_dict(self) -> dict:
        return {}


def make_trainer(model: GPT, hooks: list[Hook], max_steps: int, logger: RunLogger | None = None) -> Trainer:
    T = model.config.block_size
    cfg = TrainConfig(max_steps=max_steps, tokens_per_step=2 * T, micro_batch_size=2, log_every=1, eval_every=0)
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), RandomData(2, T, model.config.vocab_size),
                   batch_geometry(2 * T, 2, T, 1), train=cfg, optim=OptimConfig(warmup_steps=0),
                   env=parallel.DistEnv(), logger=logger, hooks=hooks)


def test_hooks_run_on_schedule_in_order_and_outside_tokens_per_s():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    calls: list[str] = []

    def slow_sample() -> str:
        calls.append("sample")
        time.sleep(0.3)
        return "some text"

    def metrics() -> dict:
        calls.append("eval")
        return {"toy/x": 1.0}

    hooks = [Hook("sample", 2, slow_sample, at_end=True), Hook("eval", 2, metrics)]
    result = make_trainer(model, hooks, max_steps=4).fit()
    # steps 2 and 4: sample before eval at 2; at the last step the at_end sample runs after the loop
    assert calls == ["sample", "eval", "eval", "sample"]
    assert result.final == {"sample": "some text"}
    assert [(e["event"], e["step"]) for e in result.history if e["event"] == "eval"] == [("eval", 2), ("eval", 4)]
    step_times = {e["step"]: e["step_time_s"] for e in result.history if e["event"] == "train"}
    assert step_times[3] < 0.2  # the 0.3 s sample after step 2 is not in step 3's time


def test_eval_tasks_are_logged_with_the_numbers_of_gpt2lab_eval(tmp_path, monkeypatch, capsys):
    """eval/wikitext/<metric> after the last step equals wikitext.evaluate on the final weights."""
    (tmp_path / "shared" / "wikitext-2" / "raw").mkdir(parents=True)
    (tmp_path / "shared" / wikitext.SHARED_FILE).write_bytes(TOY_WIKI.encode())
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(tmp_path / "shared"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16))
    logger = RunLogger(tmp_path, LogConfig(progress=False), total_steps=2)
    evaluator = TaskEvaluator([wikitext.TASK], None, model, TOK)
    make_trainer(model, [Hook("eval", 2, evaluator)], max_steps=2, logger=logger).fit()
    logger.close()
    assert model.training  # restored after evaluating
    (logged,) = [e for e in read_metrics(tmp_path) if e["event"] == "eval"]
    want = wikitext.evaluate(model.eval(), TOK, wikitext.read_pages(tmp_path / "shared" / wikitext.SHARED_FILE))
    assert logged["step"] == 2
    for metric in wikitext.TASK.training_metrics:
        assert logged[f"wikitext/{metric}"] == want[metric]
    assert "eval: wikitext/word_perplexity" in capsys.readouterr().out


def test_run_builds_the_eval_hook_and_a_task_that_cannot_run_only_warns(tmp_path, monkeypatch, default_data):
    """The quickstart's character model has no end-of-text token: wikitext is skipped with a warning,
    training finishes (and the run wires eval.tasks / eval.every to a hook)."""
    (tmp_path / "shared" / "wikitext-2" / "raw").mkdir(parents=True)
    (tmp_path / "shared" / wikitext.SHARED_FILE).write_bytes(TOY_WIKI.encode())
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(tmp_path / "shared"))
    over = {"data.dir": str(default_data), "data.prepare": None, "checkpoint.out_dir": str(tmp_path / "run"),
            "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
            "train.tokens_per_step": 64, "train.micro_batch_size": 4, "train.max_steps": 2, "train.eval_batches": 1,
            "train.sample_tokens": 0, "log.progress": False, "eval.tasks": "wikitext", "eval.every": 1}
    with pytest.warns(UserWarning, match="wikitext skipped during training: wikitext needs a tokenizer"):
        result = train(load_config("quickstart", over))
    assert result.step == 2


def test_eval_config_old_and_new_keys():
    assert task_schedule(EvalConfig(hellaswag_every=250, hellaswag_limit=100)) == (["hellaswag"], 250, 100)
    cfg = load_config(None, ["--eval.tasks", "hellaswag,wikitext", "--eval.every", "50", "--eval.limit", "10"])
    assert task_schedule(cfg.eval) == (["hellaswag", "wikitext"], 50, 10)
    assert task_schedule(EvalConfig()) == ([], 0, None)
    bad = [
        (dict(hellaswag_every=5, every=5, tasks=["lambada"]), "both set; keep one"),
        (dict(tasks=["wikitext"]), r"eval.every is 0; set --eval.every N"),
        (dict(every=5), "eval.tasks is empty"),
        (dict(tasks=["helaswag"], every=5), "eval.tasks 'helaswag' is not an eval task; did you mean 'hellaswag'"),
        (dict(tasks=["perplexity"], every=5), "'perplexity' needs --data PATH"),
        (dict(tasks=["wikitext"], every=5, limit=0), "eval.limit must be positive"),
    ]
    for fields, message in bad:
        with pytest.raises(UserError, match=message) as info:
            task_schedule(EvalConfig(**fields))
        assert "\n" not in str(info.value)


def test_fineweb_preset_keeps_hellaswag_every_250():
    assert task_schedule(load_config("gpt2_124m_fineweb").eval) == (["hellaswag"], 250, None)


def test_no_hooks_and_no_checkpoints():
    """No hooks, no checkpoints: fit runs max_steps and logs one train event per step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    result = make_trainer(model, [], max_steps=3).fit()
    assert result.step == 3 and result.final == {} and result.checkpoint is None
    assert [e["step"] for e in result.history if e["event"] == "train"] == [1, 2, 3]


def test_live_display_moves_every_step_and_shows_phases(tmp_path, default_data):
    """In a terminal (here rich's recording console) the bar moves every step, with loss and grad norm,
    and names what runs between steps; the log file still gets only the log_every lines."""
    import io

    from rich.console import Console

    from gpt2lab.metrics import LogConfig, RunLogger

    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    updates, phases = [], []
    logger = RunLogger(tmp_path, LogConfig(), total_steps=6, console=console)
    real_update, real_phase = logger.update, logger.phase
    logger.update = lambda step, m: (updates.append((step, m["loss"], m["grad_norm"])), real_update(step, m))
    logger.phase = lambda name: (phases.append(name), real_phase(name))[1]
    over = {"data.dir": str(default_data), "data.prepare": None, "checkpoint.out_dir": str(tmp_path),
            "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
            "train.tokens_per_step": 64, "train.micro_batch_size": 4, "train.max_steps": 6, "train.log_every": 3,
            "train.eval_every": 3, "train.eval_tokens": 64, "train.sample_tokens": 0, "checkpoint.every": 6}
    cfg = load_config("quickstart", over)
    from gpt2lab import run as run_module

    real_logger = run_module.RunLogger
    run_module.RunLogger = lambda *a, **k: logger
    try:
        run_module.train(cfg)
    finally:
        run_module.RunLogger = real_logger
    assert [u[0] for u in updates] == [1, 2, 3, 4, 5, 6] and all(u[1] > 0 and u[2] > 0 for u in updates)
    assert phases == ["validation loss", "validation loss", "checkpoint"]
    shown = console.export_text()
    assert "grad norm" in shown and "step" in shown
