"""Distributed training proven equal to one process, end to end through `gpt2lab train` under torchrun
(CPU, Gloo, 2 ranks, a tiny model), plus in-process checks of gpt2lab.parallel.

Every run trains the same 6 steps from the same seed and global batch (128 tokens = 8 rows of 16):
one process accumulates 4 micro-batches, two ranks accumulate 2 each. Per-step losses and final
weights must agree within 1e-5 (only the summation order of gradients differs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import checkpoint, parallel
from gpt2lab.errors import UserError
from gpt2lab.fileio import clean_state_dict
from gpt2lab.model import GPT, GPTConfig

TOL = 1e-5
STEPS = 6
CONFIG = """\
name: tiny
model: {{init: scratch, n_layer: 2, n_head: 2, n_embd: 32, block_size: 16}}
data: {{dir: {data}, prepare: null}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{max_steps: {steps}, tokens_per_step: 128, micro_batch_size: 2, device: cpu, eval_every: 0,
         eval_batches: 2, sample_tokens: 0, log_every: 1}}
checkpoint: {{every: 3, keep_last: 0}}
log: {{progress: false}}
"""


def _env() -> dict:
    # Small collective timeout: a test that goes wrong fails in seconds instead of hanging.
    return {**os.environ, "GPT2LAB_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch]


def _train_args(ws: Path, out: Path, *overrides: str) -> list[str]:
    return ["-m", "gpt2lab", "train", "--config", str(ws / "tiny.yaml"), "--out", str(out), *overrides]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _train_events(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in events if e["event"] == "train"]


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _train_events(run)}


def _final_val_loss(run: Path) -> float:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e["val_loss"] for e in events if e["event"] == "eval" and e["step"] == STEPS][-1]


def _weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _assert_same_run(run: Path, ref: Path, steps: range = range(1, STEPS + 1), weight_tol: float = TOL) -> None:
    losses, ref_losses = _losses(run), _losses(ref)
    assert sorted(losses) == list(steps)
    for s in steps:
        assert abs(losses[s] - ref_losses[s]) <= TOL, (s, losses[s], ref_losses[s])
    w, ref_w = _weights(run), _weights(ref)
    assert w.keys() == ref_w.keys()
    diff = max((w[k] - ref_w[k]).abs().max().item() for k in w)
    assert diff <= weight_tol, f"final weights differ by {diff}"
    # The validation set is the same whatever the world size (regression: it grew with the ranks).
    assert abs(_final_val_loss(run) - _final_val_loss(ref)) <= TOL


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with a tiny character dataset, the config, and the one-process reference run `ref`."""
    from gpt2lab.data.prepare import prepare_text

    ws = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    prepare_text(" ".join(rng.choice(words) for _ in range(3000)), ws / "data", "char", source={"name": "test"})
    (ws / "tiny.yaml").write_text(CONFIG.format(data=ws / "data", steps=STEPS))
    _run([sys.executable, *_train_args(ws, ws / "ref")])
    return ws


# --------------------------------------------------------------------------------------------------
# Equal to one process


def test_ddp_two_ranks_equals_one_process(ws):
    out = ws / "ddp"
    proc = _run(_torchrun("--standalone", "--nproc_per_node=2", *_train_args(ws, out, "--parallel.strategy", "ddp")))
    assert (proc.stdout + proc.stderr).count("x 2 ranks") == 1  # rank 0 logs, once for the whole job
    _assert_same_run(out, ws / "ref")
    for e in _train_events(out):
        assert e["tokens_per_s_per_device"] == pytest.approx(e["tokens_per_s"] / 2)


def test_fsdp_two_ranks_equals_one_process_and_resumes_on_one(ws):
    out = ws / "fsdp"
    _run(_torchrun("--standalone", "--nproc_per_node=2", *_train_args(ws, out, "--parallel.strategy", "fsdp")))
    _assert_same_run(out, ws / "ref")
    ckpt = out / "checkpoints" / "step_000003"
    assert (ckpt / checkpoint.DCP_DIR / ".metadata").is_file()  # sharded model + optimizer
    assert (ckpt / "model.safetensors").is_file()  # consolidated, for sample / eval / convert
    # Saved by 2 ranks, resumed by one plain process (no process group): DCP reshards on load.
    resumed = ws / "fsdp_to_1"
    _run([sys.executable, *_train_args(ws, resumed, "--resume", str(ckpt))])
    _assert_same_run(resumed, ws / "ref", range(4, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(ws):
    resumed = ws / "1_to_fsdp"
    ckpt = ws / "ref" / "checkpoints" / "step_000003"
    _run(_torchrun("--standalone", "--nproc_per_node=2",
                   *_train_args(ws, resumed, "--parallel.strategy", "fsdp", "--resume", str(ckpt))))
    _assert_same_run(resumed, ws / "ref", range(4, STEPS + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process(ws):
    """Two torchrun agents, one process each, meeting at 127.0.0.1 as node 0 and node 1 would."""
    out, port = ws / "two_nodes", _free_port()
    procs = [
        subprocess.Popen(
            _torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                      f"--master_port={port}", *_train_args(ws, out)),
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-5000:]
    _assert_same_run(out, ws / "ref")


# --------------------------------------------------------------------------------------------------
# Failure


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (torchrun's workers), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_a_worker_when(agent: subprocess.Popen, ready: Path, deadline: float = 240) -> None:
    end = time.monotonic() + deadline
    while not ready.exists():
        assert agent.poll() is None, "the job ended before a worker could be killed"
        assert time.monotonic() < end, f"{ready} never appeared"
        time.sleep(0.05)
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_rank_ends_the_job(ws):
    """SIGKILL of one worker mid-training: torchrun stops the other and exits non-zero, with no hang."""
    out = ws / "killed"
    agent = subprocess.Popen(
        _torchrun("--standalone", "--nproc_per_node=2", *_train_args(ws, out, "--train.max_steps", "100000",
                                                                       "--checkpoint.every", "0")),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    _kill_a_worker_when(agent, out / "metrics.jsonl")
    killed_at = time.monotonic()
    try:
        _, err = agent.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        agent.kill()
        pytest.fail("the job hung after a worker was killed")
    assert agent.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "SIGKILL" in err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_rank_restarts_and_resumes(ws):
    """With --max-restarts=1 the job restarts after a worker dies and resumes from the newest checkpoint."""
    out, steps = ws / "restarted", 40
    agent = subprocess.Popen(
        _torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1",
                  *_train_args(ws, out, "--train.max_steps", str(steps), "--checkpoint.every", "5")),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _kill_a_worker_when(agent, out / "checkpoints" / "step_000005")
    try:
        _, err = agent.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        agent.kill()
        pytest.fail("the restarted job did not finish")
    assert agent.returncode == 0, err[-5000:]
    assert "resuming from" in err and "step_0000" in err.split("resuming from", 1)[1].splitlines()[0]
    assert (out / "checkpoints" / f"step_{steps:06d}").is_dir()
    assert sorted(_losses(out)) == list(range(1, steps + 1))  # every step logged once, none lost


# --------------------------------------------------------------------------------------------------
# In process


def _tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))


def _cfg(**kw) -> SimpleNamespace:
    fields = dict(strategy="auto", activation_checkpointing="none", compile_blocks=False,
                  fsdp=SimpleNamespace(reshard_after_forward=True, mixed_precision=True))
    return SimpleNamespace(**{**fields, **kw})


def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = parallel.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.backend, env.distributed) == (0, 1, True, None, False)
    model = _tiny()
    assert parallel.parallelize(model, _cfg(strategy="fsdp"), env) is model  # no process group: plain
    assert parallel.unwrap(model) is model
    t = torch.tensor([3.0])
    assert parallel.all_reduce(t, "mean") is t and t.item() == 3.0
    state = checkpoint.model_state_for_save(model)
    assert "lm_head.weight" not in state and state.keys() == clean_state_dict(model.state_dict()).keys()


def test_bad_settings_are_user_errors(monkeypatch):
    env = parallel.DistEnv()
    with pytest.raises(UserError, match="parallel.strategy"):
        parallel.parallelize(_tiny(), _cfg(strategy="zero3"), env)
    with pytest.raises(UserError, match="activation_checkpointing"):
        parallel.parallelize(_tiny(), _cfg(activation_checkpointing="all"), env)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="torchrun"):
        parallel.init_distributed("cpu")


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    x = torch.randint(0, 64, (2, 16))
    grads = []
    for ac in ("none", mode):
        model = parallel.parallelize(_tiny(), _cfg(activation_checkpointing=ac), parallel.DistEnv())
        _, loss = model(x, x)
        loss.backward()
        grads.append({k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in model.named_parameters()})
        wrapped = [type(b).__name__ for b in model.transformer.h]
    assert grads[0].keys() == grads[1].keys()  # checkpoint keys stay clean
    assert wrapped == (["CheckpointWrapper"] * 2 if mode == "block" else ["CheckpointWrapper", "Block"])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real (Gloo, world size 1) process group inside the test process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield parallel.DistEnv(backend="gloo")
    dist.destroy_process_group()


def test_no_sync_reaches_ddp_through_torch_compile(one_rank_group):
    """Regression: the trainer passes torch.compile(DDP(model)); no_sync must still pause DDP's sync
    (with summed gradients a sync per micro-batch counts earlier micro-batches once per rank)."""
    ddp = parallel.parallelize(_tiny(), _cfg(strategy="ddp"), one_rank_group)
    for module in (ddp, torch.compile(ddp)):
        with parallel.no_sync(module, enabled=True):
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync
        with parallel.no_sync(module, enabled=False):
            assert ddp.require_backward_grad_sync


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_under_ddp_equals_one_process(ws):
    """optim.name=muon: each DDP rank steps a whole Muon over the summed gradients, as one process does."""
    muon = ("--optim.name", "muon", "--optim.muon_lr", "0.01")
    _run([sys.executable, *_train_args(ws, ws / "muon_ref", *muon)])
    out = ws / "muon_ddp"
    _run(_torchrun("--standalone", "--nproc_per_node=2", *_train_args(ws, out, "--parallel.strategy", "ddp", *muon)))
    # Muon orthogonalises its update in bf16: gradients summed in another order (ranks vs micro-batches)
    # round differently there, by up to an ulp of bf16 times muon_lr: 1e-2 * 2**-8 = 4e-5 a step.
    _assert_same_run(out, ws / "muon_ref", weight_tol=6 * 4e-5)
    assert _losses(ws / "muon_ref") != _losses(ws / "ref")  # Muon really ran
