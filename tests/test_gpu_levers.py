"""The GPU speed levers, proven on the CPU: train.fused_loss and train.sdpa_backend in the trainer, no
host-device sync inside a training step, the static-shape decode step that torch.compile can capture
with CUDA graphs, and a dry run of benchmarks/gpu_speed.py. Tiny models, fp32 (float64 for decoding)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import parallel
from gpt2lab.config import load_config
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import OptimConfig
from gpt2lab.trainer import TrainConfig, Trainer, batch_geometry

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, foreach=True)
    geometry = batch_geometry(cfg.tokens_per_step, cfg.micro_batch_size, 16, 1)
    return Trainer(model, optimizer, StepData(4, 16, 50), geometry, train=cfg, optim=optim,
                   env=parallel.DistEnv()), model


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
# Static-shape decoding (torch.compile + CUDA graphs)

V = 64
DECODE_VARIANTS = {
    f"{pos}-{attn}-{'win' if window else 'full'}": dict(pos_emb=pos, n_kv_head=kv, sliding_window=window)
    for pos, (attn, kv), window in itertools.product(["learned", "rope"], [("mha", 4), ("gqa", 2)], [None, 4])
}


def decode_model(**overrides) -> GPT:
    """float64 weights large enough that greedy argmaxes are far from ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=4, n_embd=32, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.double().eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(DECODE_VARIANTS))
def test_static_decode_equals_dynamic_cache(name):
    """Greedy tokens of fixed-shape steps equal the ordinary cached path's, for left-padded batches too
    (the window of 4 is shorter than the prompts, so the ring wraps during the prefill and the decode)."""
    from gpt2lab.sampling import generate

    model = decode_model(**DECODE_VARIANTS[name])
    prompts = prompts_of([5, 9, 1])
    want = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=())
    got = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=(), static_cache=True)
    assert got == want


def prefilled(model: GPT, B: int = 2, T: int = 5, new: int = 8):
    """A cache in static mode after a prefill of T tokens, the next token and its positions (B, 1);
    all inference tensors, as in `generate` (a normal tensor among them would be a guard change)."""
    with torch.inference_mode():
        cache = model.new_cache(B, T + new)
        model(torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2)), cache=cache)
        cache.start_static_decoding()
        return cache, torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), T)


@pytest.mark.parametrize("name", ["rope-gqa-win", "learned-mha-full"])
def test_static_decode_step_is_one_graph_that_never_recompiles(name):
    from gpt2lab.sampling import decode_one_token

    model = decode_model(**DECODE_VARIANTS[name])
    cache, token, pos = prefilled(model)
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(decode_one_token)(model, cache, token, pos)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    cache, token, pos = prefilled(model)
    torch._dynamo.reset()
    compiled = torch.compile(decode_one_token, backend="eager", fullgraph=True)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):  # a recompile (a new column, position or token) would raise
            token = compiled(model, cache, token, pos).argmax(-1, keepdim=True)
            pos += 1
    assert (cache.layers[0].col == 5 + 4).all()


def test_static_step_rejects_several_tokens():
    model = decode_model()
    cache, _, _ = prefilled(model)
    with pytest.raises(ValueError, match="one token"), torch.inference_mode():
        model(torch.zeros(2, 2, dtype=torch.long), pos=torch.full((2, 2), 5), cache=cache)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_decode_on_cuda_matches_eager():
    from gpt2lab.sampling import generate

    model = decode_model(pos_emb="rope", n_kv_head=2).float().cuda()
    prompts = prompts_of([5, 9])
    want = generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=())
    assert generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=(), compile=True) == want


# --------------------------------------------------------------------------------------------------
# benchmarks/gpu_speed.py


def load_script(name: str):
    """Import benchmarks/<name>.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_speed_dry_run_levers(tmp_path):
    """The first part alone (quick): with no time budget every measurement is recorded as skipped; a
    second run with --merge then gives the straightforward path and each cheap lever a number."""
    gpu_speed = load_script("gpu_speed")
    out = tmp_path / "levers.json"
    doc = gpu_speed.main(["--dry-run", "--only", "levers", "--budget-s", "0", "--out", str(out)])
    assert len(doc["results"]) == 8 and all("skipped" in r for r in doc["results"].values())
    doc = gpu_speed.main(["--dry-run", "--only", "levers", "--budget-s", "600", "--out", str(out), "--merge"])
    timed = {k: r for k, r in doc["results"].items() if "tokens_per_s" in r}
    assert set(timed) == {"train/baseline", "train/padded", "train/fused_loss", "train/fused_adamw",
                          "train/sdpa_flash", "train/sdpa_math"}
    assert all(r["mfu"] > 0 and r["last_loss"] > 0 for r in timed.values())


@pytest.mark.slow
def test_gpu_speed_dry_run(tmp_path):
    """The GPU sweep runs every part on a tiny CPU model: each measurement gives a number, except the
    CUDA-only attention backends, which are recorded as clear errors; JSON and markdown are written."""
    gpu_speed = load_script("gpu_speed")
    out = tmp_path / "gpu_speed.json"
    doc = gpu_speed.main(["--dry-run", "--out", str(out), "--budget-s", "600"])
    results = doc["results"]
    cuda_only = {"train/sdpa_cudnn", "train/sdpa_efficient"}
    for key, r in results.items():
        if key in cuda_only:
            assert "needs a CUDA GPU" in r["error"]
        elif key == "curve":
            assert r["max_abs_delta_loss"] < 1e-2 and len(r["abs_delta_loss"]) == 8
        else:
            assert r["tokens_per_s"] > 0, (key, r)
    expected = {"train/baseline", "train/cum4_compile", "train/cum5_fused_loss", "train/compiled_optimizer",
                "train/micro_batch_8", "medium/eager_levers", "decode/gpt2lab compiled static cache/b4",
                "decode/transformers/b1", "train/compile_alone", "curve"}
    assert expected <= set(results)
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == results.keys()
    assert "| train/baseline |" in saved["markdown"]


def test_gpu_speed_never_replaces_a_file_it_did_not_write_nor_an_earlier_sweep(tmp_path, capsys):
    """--out was rewritten whatever it held: a mistyped path lost that file, and a rerun without
    --merge lost a finished sweep's GPU numbers. Both are refused in one line before any work."""
    gpu_speed = load_script("gpu_speed")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    for argv in (["--dry-run", "--out", str(notes)], ["--dry-run", "--out", str(notes), "--merge"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_speed.main(argv)
        assert exit_info.value.code == 2
        assert "exists and is not a result file of this script" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": 1}\n'
    earlier = tmp_path / "gpu_speed.json"
    earlier.write_text(json.dumps({"results": {"train/baseline": {"tokens_per_s": 5e5}}, "markdown": ""}))
    before = earlier.read_text()
    with pytest.raises(SystemExit):
        gpu_speed.main(["--dry-run", "--out", str(earlier)])
    assert "pass --merge to keep them" in capsys.readouterr().err and earlier.read_text() == before
    with pytest.raises(SystemExit):
        gpu_speed.main(["--dry-run", "--out", str(tmp_path)])
    assert "is not a file" in capsys.readouterr().err
