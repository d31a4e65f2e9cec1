"""Checkpoint directories: train state loadable with weights_only, pruning, run-dir checks, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint import (
    check_same_architecture,
    check_writable,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from gpt2lab.config import RunConfig, to_dict
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import build_optimizer
from gpt2lab.trainer import rng_state, set_rng_state

CONFIG = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16)


def test_train_state_round_trips_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    opt = build_optimizer(model, RunConfig().optim, "cpu")
    _, loss = model(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16)))
    loss.backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": rng_state(), "scaler": scaler.state_dict(),
             "data": {"seed": 1, "order": "random", "step": 3, "fingerprint": "abc"}, "config": to_dict(RunConfig())}
    path = save_checkpoint(step_dir(tmp_path, 3), model, CONFIG, {"kind": "char", "chars": "ab"}, step=3,
                           train_state=state)
    loaded = load_train_state(path)  # torch.load(weights_only=True) inside
    assert loaded["step"] == 3 and loaded["config"]["optim"]["betas"] == [0.9, 0.95]
    fresh = build_optimizer(GPT(CONFIG), RunConfig().optim, "cpu")
    fresh.load_state_dict(loaded["optimizer"])
    model2, config = load_checkpoint(tmp_path)
    assert config["step"] == 3 and all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_prune_keeps_newest_and_find_latest_skips_partial(tmp_path):
    model = GPT(CONFIG)
    for step in (10, 20, 30, 40):
        save_checkpoint(step_dir(tmp_path, step), model, CONFIG, {"kind": "gpt2"}, step=step)
    partial = tmp_path / "checkpoints" / ".tmp-step_000050-xyz"
    partial.mkdir()  # what a crash mid-save leaves
    (tmp_path / "checkpoints" / "step_000060").mkdir()  # no config.json: incomplete
    assert find_latest(tmp_path).name == "step_000040"
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert partial in removed and not partial.exists()


def test_check_writable_and_architecture(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        check_writable(tmp_path / "file" / "run")
    assert check_writable(tmp_path / "new" / "run").is_dir()
    saved = CONFIG.to_dict()
    check_same_architecture(saved, GPTConfig(**{**saved, "dropout": 0.3}), "ckpt")  # dropout may change
    with pytest.raises(UserError, match=r"model.n_embd=16 but the config says 32"):
        check_same_architecture(saved, GPTConfig(**{**saved, "n_embd": 32}), "ckpt")
