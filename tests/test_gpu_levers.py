"""The GPU speed levers, proven on the CPU: train.fused_loss and train.sdpa_backend in the trainer, no
host-device sync inside a training step, the static-shape decode step that torch.compile can capture
with CUDA graphs, and a dry run of benchmarks/gpu_speed.py. Tiny models, fp32 (float64 for decoding)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import parallel
from gpt2lab.config import OptimConfig, TrainConfig, load_config
from gpt2lab.errors import UserError
from gpt2lab.logging import RunLogger
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.trainer import Trainer, TrainerParts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra OpenMP threads only spin on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# Training-step switches


class StepData:
    """get_batch(step): a batch that depends on the step, with some targets ignored (-100)."""

    def __init__(self, rows: int, T: int, V: int) -> None:
        self.rows, self.T, self.V = rows, T, V

    def get_batch(self, step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.V, (self.rows, self.T), generator=g)
        y = torch.randint(0, self.V, (self.rows, self.T), generator=g)
        y[0, :3] = -100
        return x, y

    def state_dict(self) -> dict:
        return {}


def make_trainer(max_steps: int = 3, log_every: int = 1, **train) -> tuple[Trainer, GPT]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, padded_vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    cfg = TrainConfig(max_steps=max_steps, tokens_per_step=4 * 16, micro_batch_size=2, log_every=log_every,
                      eval_every=0, **train)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    parts = TrainerParts(train=cfg, optim=optim, env=parallel.DistEnv(),
                         logger=RunLogger(".", None, total_steps=max_steps, enabled=False), run_dir=Path("."),
                         block_size=16, dtype=torch.float32, scaler=torch.amp.GradScaler("cpu", enabled=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, foreach=True)
    return Trainer(model, optimizer, StepData(4, 16, 50), parts), model


def run_steps(**train) -> tuple[list[float], GPT]:
    trainer, model = make_trainer(**train)
    losses = [trainer.train_step(step)[0].item() for step in range(3)]
    return losses, model


@pytest.mark.parametrize("switch", [dict(fused_loss=True), dict(sdpa_backend="math"), dict(sdpa_backend="flash")])
def test_switch_gives_the_same_training(switch):
    """3 AdamW steps (2 micro-batches each) with the lever on: same losses and weights as with it off."""
    want_losses, want = run_steps()
    losses, model = run_steps(**switch)
    assert losses == pytest.approx(want_losses, abs=1e-5)
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert (p - q).abs().max().item() < 1e-5, name


def test_sdpa_backend_errors():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        make_trainer(sdpa_backend="cudnn")
    with pytest.raises(UserError, match="train.sdpa_backend='fast' is not one of"):
        load_config(None, {"train.sdpa_backend": "fast"})
    assert load_config(None, {"train.fused_loss": "true"}).train.fused_loss is True


SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def test_no_host_sync_in_training_steps(monkeypatch):
    """Tensor reads that make the host wait for the device (.item(), float(t), bool(t), ...) issued by
    gpt2lab code during fit(): as many for 8 steps as for 2, i.e. only at log time (the last step)."""
    package = str(Path(parallel.__file__).parent)
    calls: list[str] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                calls.append(f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    counts = {}
    for steps in (2, 8):
        calls.clear()
        trainer, _ = make_trainer(max_steps=steps, log_every=1000, fused_loss=True, sdpa_backend="math")
        trainer.fit()
        counts[steps] = list(calls)
    assert counts[2] == counts[8], counts
    assert 0 < len(counts[8]) <= 4, counts[8]  # the finite check, loss and grad norm of the one log line


# --------------------------------------------------------------------------------------------------
# benchmarks/gpu_speed.py


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
