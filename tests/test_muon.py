"""optim.name=muon: torch.optim.Muon for the hidden matrices, AdamW for the rest, with its own lr under
the same schedule; it trains, resumes exactly, and is refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.config import load_config
from gpt2lab.errors import UserError
from gpt2lab.logging import read_metrics
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import MuonWithAdamW, OptimConfig, build_optimizer, muon_split, set_lr
from gpt2lab.run import train

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")]


def test_muon_takes_the_hidden_matrices_only():
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    muon, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted({names[id(p)].split(".", 3)[-1] for p in muon}) == [
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert len(muon) == 4 * 2 and all(p.dim() == 2 for p in muon)
    rest_names = {n for n, _ in rest}
    assert "transformer.wte.weight" in rest_names and "transformer.wpe.weight" in rest_names
    assert all(".h." not in f".{n}" or p.dim() == 1 for n, p in rest)  # biases and gains of the blocks
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, MuonWithAdamW) and [type(o).__name__ for o in opt] == ["Muon", "AdamW"]
    set_lr(opt, 5e-4)  # half the peak: Muon's lr follows the same schedule
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(g["lr"] == 5e-4 for g in opt.adamw.param_groups)


def tiny(data_dir, out, **overrides) -> dict:
    return {"data.dir": str(data_dir), "data.prepare": None, "checkpoint.out_dir": str(out),
            "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "model.dropout": 0.1,
            "train.tokens_per_step": 256, "train.micro_batch_size": 4, "train.max_steps": 40,
            "train.eval_every": 0, "train.eval_tokens": 256, "train.sample_tokens": 0, "train.log_every": 1,
            "checkpoint.every": 20, "checkpoint.keep_last": 0, "optim.warmup_steps": 5, "optim.name": "muon",
            "optim.lr": 3e-3, "optim.schedule": "constant", "log.progress": False, **overrides}


def test_muon_trains_and_resumes_exactly(default_data, tmp_path):
    full = train(load_config("quickstart", tiny(default_data, tmp_path / "full")))
    losses = {e["step"]: e["loss"] for e in read_metrics(tmp_path / "full") if e["event"] == "train"}
    assert losses[40] < losses[1] - 1.0  # ln(103) = 4.6 at the start
    train(load_config("quickstart", tiny(default_data, tmp_path / "half", **{"train.max_steps": 20})))
    train(load_config("quickstart", tiny(default_data, tmp_path / "half", **{"checkpoint.resume": True,
                                                                           "checkpoint.allow_changes": True})))
    resumed = {e["step"]: e["loss"] for e in read_metrics(tmp_path / "half") if e["event"] == "train"}
    assert [resumed[s] for s in range(21, 41)] == [losses[s] for s in range(21, 41)]  # bitwise
    assert full.step == 40


def test_muon_is_refused_under_fsdp_and_on_an_old_torch(monkeypatch):
    with pytest.raises(UserError, match="cannot run under parallel.strategy=fsdp"):
        load_config("quickstart", {"optim.name": "muon", "parallel.strategy": "fsdp"})
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"needs torch.optim.Muon \(torch >= 2.9\)"):
        build_optimizer(GPT(GPTConfig.from_preset("gpt2-tiny")), OptimConfig(name="muon"), "cpu")


def test_muon_on_a_cpu_with_slow_bf16_says_so(default_data, tmp_path, monkeypatch, capsys):
    """torch.optim.Muon orthogonalises in bf16: where bf16 matmuls measure slower than fp32 (faked
    here), the run warns once at start; where GPT2LAB_CPU_DTYPE decided (no measurement), it says nothing."""
    import torch

    from gpt2lab import precision, run

    slow = precision.Choice(torch.float32, {"fp32": 1e11, "bf16": 2e9}, 0.02, kind="train", detail="faked")
    monkeypatch.setattr(run, "train_precision", lambda n_embd, rows: slow)
    monkeypatch.setattr(run, "compute_dtype", lambda *a, **k: (torch.float32, None))
    train(load_config("quickstart", tiny(default_data, tmp_path / "slow", **{"train.max_steps": 2})))
    err = capsys.readouterr().err
    assert "warning: optim.name=muon: torch.optim.Muon orthogonalises each update in bf16" in err
    assert "0.02x fp32 on this CPU" in err

    monkeypatch.setattr(run, "train_precision", lambda n_embd, rows: precision.Choice(
        torch.float32, source=precision.OVERRIDE_ENV))
    train(load_config("quickstart", tiny(default_data, tmp_path / "forced", **{"train.max_steps": 2})))
    assert "optim.name=muon" not in capsys.readouterr().err
