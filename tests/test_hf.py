"""Hugging Face interop and model loading: tiny random `transformers` GPT-2 models saved to disk load
with the same logits and greedy continuation, export back unchanged, and every bad input is a one-line
UserError. Also `gpt2lab sample` / `convert` through the CLI. CPU, no network."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt2lab.checkpoint import save_checkpoint  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.errors import UserError  # noqa: E402
from gpt2lab.hf import load_hf_model, save_hf_model  # noqa: E402
from gpt2lab.loading import load_config, load_model  # noqa: E402
from gpt2lab.model import GPT, GPTConfig  # noqa: E402
from gpt2lab.sampling import generate  # noqa: E402
from gpt2lab.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(vocab_size: int = 300, n_embd: int = 32, seed: int = 0):
    """A tiny random GPT2LMHeadModel; weights scaled up so greedy choices are far from ties."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=n_embd, n_positions=64, vocab_size=vocab_size,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The same tiny HF model saved as safetensors and as pytorch_model.bin."""
    model = hf_model()
    st = tmp_path_factory.mktemp("hf_safetensors")
    model.save_pretrained(st)
    pt = tmp_path_factory.mktemp("hf_bin")
    # transformers 5 only writes safetensors: write the legacy file the way older versions did.
    model.config.save_pretrained(pt)
    torch.save(model.state_dict(), pt / "pytorch_model.bin")
    return model, st, pt


class Payload:
    """Stands for arbitrary pickled code: torch.load(weights_only=True) must refuse to build it."""


def tokens(n: int = 24, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("which", ["safetensors", "bin"])
def test_loads_with_equal_logits(hf_dirs, which):
    hf, st, pt = hf_dirs
    model = load_hf_model(st if which == "safetensors" else pt)
    assert model.config.n_embd == 32 and model.config.vocab_size == 300 and model.config.block_size == 64
    idx = tokens()
    ours, _ = model(idx)
    torch.testing.assert_close(ours, hf(idx).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_loads_the_hub_layout(hf_dirs, tmp_path):
    """OpenAI's files on the hub: keys without `transformer.`, causal-mask buffers saved with the weights."""
    from safetensors.torch import save_file

    hf, st, _ = hf_dirs
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((st / "config.json").read_text())
    idx = tokens()
    torch.testing.assert_close(load_hf_model(tmp_path)(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_continuation_matches_hf_generate(hf_dirs):
    hf, st, _ = hf_dirs
    model = load_hf_model(st)
    prompt = tokens(8)[:1]
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    ours = generate(model, prompt.tolist(), max_new_tokens=20, temperature=0, stop_ids=())
    assert ours[0] == expected[0, 8:].tolist()


@torch.no_grad()
def test_export_round_trip(hf_dirs, tmp_path):
    hf, st, _ = hf_dirs
    save_hf_model(load_hf_model(str(st)), tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens()
    torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_export_trims_padded_vocab_and_writes_a_working_tokenizer(tmp_path):
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2")
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, padded_vocab_size=50304, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    save_hf_model(model, tmp_path, tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens(10, vocab=50257)
    torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Hello, I'm a language model,", "naïve café 日本語 🤖\n\n  spaces", "don't<|endoftext|>x"]:
        assert hf_tok.encode(text) == tok.encode(text, allow_special=True)
    assert hf_tok.eos_token_id == 50256


@pytest.mark.parametrize("overrides, match", [
    (dict(pos_emb="rope"), "pos_emb"),
    (dict(n_kv_head=1), "n_kv_head"),
    (dict(sliding_window=4), "sliding_window"),
])
def test_export_refuses_variants_hf_cannot_express(tmp_path, overrides, match):
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, **overrides))
    with pytest.raises(UserError, match=match) as e:
        save_hf_model(model, tmp_path / "out")
    assert "\n" not in str(e.value) and "use the gpt2lab checkpoint itself" in str(e.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line each


def _edit_config(src, dst, **changes):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("changes, match", [
    (dict(n_embd=64), r"has shape \(96,\) but the config needs \(192,\)"),
    (dict(n_layer=3), "weights do not match the model config"),
    (dict(model_type="llama"), "model_type"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(n_inner=100), "n_inner"),
])
def test_bad_config_is_one_line(hf_dirs, tmp_path, changes, match):
    bad = _edit_config(hf_dirs[1], tmp_path / "bad", **changes)
    with pytest.raises(UserError, match=match) as e:
        load_hf_model(bad)
    assert "\n" not in str(e.value)


def test_missing_files_are_one_line(hf_dirs, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_dirs[1] / "config.json").read_text())
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    for path, match in ((no_weights, "no weights"), (no_config, "no config.json"),
                        (tmp_path / "nowhere", "neither a directory nor a hub model")):
        with pytest.raises(UserError, match=match) as e:
            load_hf_model(path)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file or directory") as e:
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="neither a gpt2lab checkpoint"):
        load_model(str(no_config))


def test_pickled_code_is_refused(hf_dirs, tmp_path):
    (tmp_path / "config.json").write_text((hf_dirs[1] / "config.json").read_text())
    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot be loaded safely") as e:
        load_hf_model(tmp_path)
    assert "\n" not in str(e.value)


def test_offline_hub_error_is_one_line(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError) as e:
        load_hf_model("gpt2")
    message = str(e.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download openai-community/gpt2" in message and "--init DIR" in message


# --------------------------------------------------------------------------------------------------
# load_model and the CLI


@pytest.fixture(scope="module")
def bpe_hf_dir(tmp_path_factory):
    """A tiny HF GPT-2 with the real GPT-2 vocabulary size, so the GPT-2 tokenizer applies."""
    path = tmp_path_factory.mktemp("hf_bpe")
    hf_model(vocab_size=50257, n_embd=16).save_pretrained(path)
    return path


def test_load_model_kinds(bpe_hf_dir, tmp_path):
    model, tok = load_model(str(bpe_hf_dir))
    assert tok.name == "gpt2" and not model.training
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step_000001", model, model.config, tok.to_dict(), step=1)
    save_checkpoint(run / "checkpoints" / "step_000002", model, model.config, tok.to_dict(), step=2)
    for init in (run, run / "checkpoints" / "step_000002"):
        again, tok2 = load_model(str(init), dtype="bfloat16")
        assert tok2.name == "gpt2" and again.transformer.wte.weight.dtype == torch.bfloat16
        assert torch.equal(again.transformer.h[0].attn.c_attn.weight.float(),
                           model.transformer.h[0].attn.c_attn.weight.bfloat16().float())
    tiny, tok3 = load_model("random:gpt2-tiny")
    assert tiny.config.n_layer == 2 and tok3.name == "gpt2"
    assert torch.equal(tiny.transformer.wte.weight, load_model("random:gpt2-tiny")[0].transformer.wte.weight)
    assert load_config(str(run)) == model.config
    assert load_config("openai-community/gpt2-medium").n_layer == 24


class _Stdout:
    """Records every write, to see that text arrives piece by piece."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass


def test_cli_sample_streams(bpe_hf_dir, monkeypatch):
    model, tok = load_model(str(bpe_hf_dir))
    prompt = "Hello, I'm a language model,"
    ids = generate(model, [tok.encode(prompt)], max_new_tokens=12, temperature=0, stop_ids=())[0]
    out = _Stdout()
    monkeypatch.setattr("sys.stdout", out)
    code = main(["sample", "--init", str(bpe_hf_dir), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--ignore-eot", "--device", "cpu"])
    assert code == 0
    assert "".join(out.writes) == prompt + tok.decode(ids) + "\n"
    assert len(out.writes) > 3  # the prompt, several streamed pieces, the newline


def test_cli_convert(tmp_path, capsys):
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).eval()
    save_checkpoint(tmp_path / "ckpt", model, config, {"kind": "gpt2"})
    assert main(["convert", "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = tokens(10, vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)

    rope = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, pos_emb="rope")
    save_checkpoint(tmp_path / "rope", GPT(rope), rope, {"kind": "gpt2"})
    capsys.readouterr()  # drop transformers' progress bars
    assert main(["convert", "--init", str(tmp_path / "rope"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos_emb='rope'" in err


def _fake_hub_cache(cache, repo: str, source) -> None:
    """Lay out `source`'s files as huggingface_hub's cache holds a downloaded snapshot of `repo`."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((source / f).read_bytes())


def test_any_gpt2_architecture_hub_id_loads(monkeypatch, tmp_path, bpe_hf_dir):
    """Not only OpenAI's four: a user's repo id loads through the hub client (here from its cache)."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    _fake_hub_cache(tmp_path, "someone/tiny-gpt2", bpe_hf_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, tok = load_model("someone/tiny-gpt2")
    reference, _ = load_model(str(bpe_hf_dir))
    idx = tokens(vocab=50257)
    assert torch.equal(model(idx)[0], reference(idx)[0]) and tok.name == "gpt2"
    assert load_config("someone/tiny-gpt2") == reference.config
    with pytest.raises(UserError) as e:
        load_model("distilgpt2", flag="--model.init")
    message = str(e.value)
    assert "\n" not in message and "hf download distilgpt2 --local-dir DIR" in message
    assert "--model.init DIR" in message
