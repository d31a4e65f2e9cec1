"""What gpt2lab promises about files: atomic directories whose modes follow the umask, one-line
errors for a full disk or a refused write, one writer per run directory, export targets that never
replace what gpt2lab did not write, and damaged checkpoints named instead of loaded."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.checkpoint import (
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_problem,
    intact_checkpoints,
    load_train_state,
    load_weights,
    save_checkpoint,
    step_dir,
)
from gpt2lab.errors import UserError
from gpt2lab.fileio import RunLock, atomic_dir, check_output_dir, check_output_file
from gpt2lab.model import GPT, GPTConfig


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=64))


def save(run, step: int) -> None:
    model = tiny()
    save_checkpoint(step_dir(run, step), model, model.config, {"kind": "gpt2"}, step=step,
                    train_state={"step": step, "rng": torch.zeros(3)})


def test_atomic_dir_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "f.txt").stat().st_mode & 0o777 == 0o644


def test_weights_files_follow_the_umask_too(tmp_path):
    """safetensors writes its files owner-only; a checkpoint, an HF export and an adapter follow the umask
    like every other file gpt2lab writes."""
    from gpt2lab.hf import save_hf_model
    from gpt2lab.lora import LoraConfig, apply_lora, save_adapter

    old = os.umask(0o022)
    try:
        model = tiny()
        save_checkpoint(tmp_path / "ckpt", model, model.config, {"kind": "gpt2"}, step=1)
        save_hf_model(model, tmp_path / "hf")
        apply_lora(model, LoraConfig(r=2))
        save_adapter(tmp_path / "adapter", model, LoraConfig(r=2), base_init="gpt2", tokenizer={"kind": "gpt2"})
    finally:
        os.umask(old)
    weights = list(tmp_path.rglob("*.safetensors"))
    assert len(weights) == 3
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in weights), {str(p): oct(p.stat().st_mode) for p in weights}


def test_disk_full_mid_write_is_one_line_and_keeps_the_previous_version(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("first")
    with pytest.raises(UserError) as e, atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(e.value)
    assert message.startswith(f"no space left on device writing {tmp_path / 'out'}") and "free" in message
    assert "\n" not in message
    assert (tmp_path / "out" / "f.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory left behind
    # torch.save reports the same fault in its own words
    with pytest.raises(UserError, match="no space left on device"), atomic_dir(tmp_path / "out"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/bin/mount"), reason="needs root for a tmpfs")
def test_a_checkpoint_that_does_not_fit_on_a_small_tmpfs(tmp_path):
    """A real full disk: a 1 MB tmpfs holds one tiny checkpoint but not a second, larger one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
        save_checkpoint(mnt / "step_000001", model, model.config, {"kind": "gpt2"}, step=1)
        before = (mnt / "step_000001" / WEIGHTS_FILE).read_bytes()
        big = GPT(GPTConfig(block_size=16, vocab_size=4096, n_layer=2, n_head=2, n_embd=64))
        with pytest.raises(UserError, match="no space left on device writing .*step_000002"):
            save_checkpoint(mnt / "step_000002", big, big.config, {"kind": "gpt2"}, step=2)
        assert (mnt / "step_000001" / WEIGHTS_FILE).read_bytes() == before
        assert sorted(p.name for p in mnt.iterdir()) == ["step_000001"]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_run_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    with RunLock(tmp_path):
        other = subprocess.run(
            [sys.executable, "-c", f"from gpt2lab.fileio import RunLock\nwith RunLock({str(tmp_path)!r}): pass"],
            capture_output=True, text=True)
        assert other.returncode != 0
        last = other.stderr.strip().splitlines()[-1]
        assert "is in use by another gpt2lab run (pid" in last and f"{os.getpid()}" in last
    # a holder killed with SIGKILL leaves the file but not the lock
    holder = subprocess.Popen([sys.executable, "-c", f"from gpt2lab.fileio import RunLock\nimport time\n"
                               f"with RunLock({str(tmp_path)!r}): time.sleep(60)"])
    for _ in range(100):
        if (tmp_path / ".gpt2lab.lock").read_text().startswith(f"pid {holder.pid}"):
            break
        subprocess.run(["sleep", "0.1"])
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        pass


@pytest.mark.parametrize("setup, match", [
    (lambda p: p.write_text("mine"), "is a file"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "not empty and is not an earlier"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("{}")), "run directory"),
])
def test_export_targets_refused(tmp_path, setup, match):
    target = tmp_path / "t"
    setup(target)
    with pytest.raises(UserError, match=match):
        check_output_dir(target, kind="HF export", is_same_kind=lambda p: (p / "config.json").is_file(), force=True)


def test_an_earlier_export_needs_force(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(UserError, match="add --force"):
        check_output_dir(target, kind="HF export", is_same_kind=lambda p: True, force=False)
    assert check_output_dir(target, kind="HF export", is_same_kind=lambda p: True, force=True) == target
    checkpoint_dir = tmp_path / "run" / "checkpoints" / "step_000001"
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / "config.json").write_text("{}")
    with pytest.raises(UserError, match="run directory or checkpoint"):
        check_output_dir(checkpoint_dir, kind="HF export", is_same_kind=lambda p: True, force=True)


def test_output_file_checks(tmp_path):
    assert check_output_file(tmp_path / "new" / "dir" / "x.json", "--json").parent.is_dir()
    with pytest.raises(UserError, match="--json .* is a directory"):
        check_output_file(tmp_path, "--json")


def test_damaged_checkpoints_are_named_and_skipped(tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    save(run, 2)
    save(run, 3)
    newest = step_dir(run, 3)
    weights = newest / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(UserError, match=r"model.safetensors: truncated \("):
        load_weights(newest)
    (step_dir(run, 2) / TRAIN_STATE_FILE).write_bytes(b"PK\x03\x04 not a zip")
    ckpts, skipped = intact_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_000001"]
    assert skipped[0].startswith("skipped step_000003: ") and "truncated" in skipped[0]
    assert skipped[1].startswith("skipped step_000002: ") and "damaged or truncated" in skipped[1]
    (newest / "config.json").write_text('{"format": "gpt2lab-checkpoint", ')
    assert "config.json:1: invalid JSON at column 34" in checkpoint_problem(newest)
    (step_dir(run, 1) / WEIGHTS_FILE).write_bytes(b"\xff" * 4096)  # random bytes, not safetensors
    assert "model.safetensors: not a safetensors file" in checkpoint_problem(step_dir(run, 1))


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_payload_is_refused_without_advice_to_disable_the_check(tmp_path):
    save(tmp_path / "run", 1)
    ckpt = step_dir(tmp_path / "run", 1)
    torch.save({"step": 1, "evil": Payload()}, ckpt / TRAIN_STATE_FILE)
    with pytest.raises(UserError) as e:
        load_train_state(ckpt)
    message = str(e.value)
    assert "would run code" in message and "weights_only" not in message and "\n" not in message
    config = json.loads((ckpt / "config.json").read_text())
    assert config["step"] == 1
