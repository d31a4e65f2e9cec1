"""optim.name=muon: torch.optim.Muon for the hidden matrices, AdamW for the rest, with its own lr under
the same schedule; it trains, resumes exactly, and is refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.config import load_config
from gpt2lab.errors import UserError
from gpt2lab.metrics import read_metrics
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import Muon, MuonWithAdamW, OptimConfig, build_optimizer, muon_split, orthogonalise, set_lr
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


def _muon_pair(ns_dtype, **kwargs):
    """Two copies of the same two matrices (one tall, one wide) with the same gradients, and a Muon
    over each: torch.optim.Muon's own and gpt2lab's with `ns_dtype`."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, 16, generator=generator), torch.randn(16, 40, generator=generator)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    return (ours, Muon(ours, ns_dtype=ns_dtype, lr=0.02, weight_decay=0.1, **kwargs)), \
        (theirs, torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, **kwargs))


def _step_both(pair, steps=3):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for (params, opt) in pair:
            generator_state = generator.get_state()
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
            generator.set_state(generator_state)
        for p in pair[0][0]:
            torch.randn(p.shape, generator=generator)


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False}, {"adjust_lr_fn": "match_rms_adamw"}])
def test_muons_own_step_is_torchs_step_when_it_orthogonalises_in_bf16(kwargs):
    """gpt2lab's Muon step (the one it runs in fp32) replicates torch.optim.Muon's step exactly:
    given bf16 it gives torch's parameters bitwise, for tall and wide matrices, with and without
    Nesterov, under each lr adjustment; so the fp32 step differs from torch's in the dtype alone."""
    (ours, opt), (theirs, ref) = _muon_pair(torch.bfloat16, **kwargs)
    opt.step = lambda closure=None: opt._step_in(torch.bfloat16, closure)  # not super().step(): ours
    _step_both(((ours, opt), (theirs, ref)))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_orthogonalises_in_fp32_when_asked(monkeypatch, nesterov):
    """On a CPU without bf16 units torch.optim.Muon's bf16 Newton-Schulz made a tiny model's step
    9x slower: with ns_dtype fp32 every matmul of the step runs in fp32, the step lands within
    bf16's rounding of torch's, the momentum (which does not depend on the dtype) stays torch's
    bitwise, also without Nesterov, where the update is the buffer itself; its state loads into
    torch's Muon and back."""
    (ours, opt), (theirs, ref) = _muon_pair(torch.float32, nesterov=nesterov)
    seen = []
    addmm, matmul = torch.addmm, torch.Tensor.__matmul__

    def spy_addmm(a, b, c, **kw):
        seen.append(b.dtype)
        return addmm(a, b, c, **kw)

    def spy_matmul(a, b):
        seen.append(a.dtype)
        return matmul(a, b)

    monkeypatch.setattr(torch, "addmm", spy_addmm)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy_matmul)
    _step_both(((ours, opt),), steps=1)
    assert seen and set(seen) == {torch.float32}
    monkeypatch.undo()
    (ours, opt), (theirs, ref) = _muon_pair(torch.float32, nesterov=nesterov)
    _step_both(((ours, opt), (theirs, ref)))
    for a, b in zip(ours, theirs):
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=0.02 * 3 * 2**-7, rtol=0)  # 3 steps of lr 0.02, bf16's 2^-8 twice
    ref.load_state_dict(opt.state_dict())
    opt.load_state_dict(ref.state_dict())
    assert opt.ns_dtype == torch.float32


def test_orthogonalise_pushes_singular_values_near_one():
    """A tall matrix whose singular values span 300x comes out with all of them in (0.5, 1.3): Muon's
    quintic iteration gives U S' V^T with S' near 1, not exactly 1."""
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-1.5, 1, 24))
    s = torch.linalg.svdvals(g)
    assert s.max() / s.min() > 300
    out = orthogonalise(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    assert out.shape == g.shape and out.dtype == torch.float32
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3


def _fake_muon_probe(monkeypatch, bf16_rate, cache):
    """The Muon probe measures (fp32 100 GFLOP/s, bf16 `bf16_rate`) and caches it in the folder `cache`."""
    from gpt2lab import precision

    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache))
    monkeypatch.setattr(precision, "_compare_newton_schulz", lambda width, low, **kw: (1e11, bf16_rate))


def test_muon_dtype_auto_measures_the_cpu(default_data, tmp_path, monkeypatch, capsys):
    """optim.muon_dtype auto on a CPU times the orthogonalisation: where bf16 is slower (faked) the run
    says it chose fp32 and why, and steps in fp32; an explicit bf16 there warns; GPT2LAB_CPU_DTYPE
    decides without a word."""
    from gpt2lab import optim

    made = []
    monkeypatch.setattr(optim, "Muon", lambda *a, **k: made.append(k["ns_dtype"]) or Muon(*a, **k))
    _fake_muon_probe(monkeypatch, 2e9, tmp_path / "slow_cache")
    train(load_config("quickstart", tiny(default_data, tmp_path / "slow", **{"train.max_steps": 2})))
    err = capsys.readouterr().err
    assert "optim.muon_dtype auto -> fp32 (bf16 Newton-Schulz matmuls 0.02x fp32 at 32x128: 2 vs 100 GFLOP/s" in err
    train(load_config("quickstart", tiny(default_data, tmp_path / "bf16", **{"train.max_steps": 2,
                                                                           "optim.muon_dtype": "bf16"})))
    assert "warning: optim.muon_dtype=bf16 on this CPU is slower than fp32" in capsys.readouterr().err
    assert made == [torch.float32, torch.bfloat16]

    _fake_muon_probe(monkeypatch, 3e11, tmp_path / "fast_cache")
    train(load_config("quickstart", tiny(default_data, tmp_path / "fast", **{"train.max_steps": 2})))
    assert "optim.muon_dtype auto -> bf16" in capsys.readouterr().err
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "fp32")
    train(load_config("quickstart", tiny(default_data, tmp_path / "forced", **{"train.max_steps": 2})))
    assert "optim.muon_dtype" not in capsys.readouterr().err
    assert made == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    with pytest.raises(UserError, match=r"optim.muon_dtype='fp16' is not one of 'auto', 'bf16', 'fp32'"):
        load_config("quickstart", {"optim.muon_dtype": "fp16"})
