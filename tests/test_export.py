"""Export to Hugging Face for every model gpt2lab trains in GPT-2's shape: a bias-free,
character-level model (the quickstart's kind) loads in `transformers` with equal logits and its
tokenizer, and `pipeline("text-generation")` runs on it offline."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gpt2lab.hf import save_hf_model  # noqa: E402
from gpt2lab.model import GPT, GPTConfig  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n"


@pytest.fixture(scope="module")
def char_export(tmp_path_factory):
    """A random bias-free char-level GPT (the quickstart's architecture, smaller) and its export."""
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          bias=False)).eval()
    with torch.no_grad():  # larger weights: greedy choices far from ties
        for p in model.parameters():
            p.mul_(4.0)
    out = tmp_path_factory.mktemp("char_export")
    save_hf_model(model, out, tok)
    return model, tok, out


@torch.no_grad()
def test_bias_free_model_exports_with_equal_logits(char_export):
    model, tok, out = char_export
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.tensor([tok.encode(TEXT[:50])])
    torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)
    biases = [v for k, v in hf.state_dict().items() if k.endswith(".bias") and "attn.bias" not in k]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_char_tokenizer_exports_for_autotokenizer(char_export):
    _, tok, out = char_export
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in (TEXT, "  dog\n\nfox ", "!"):
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text)
        assert hf_tok.decode(ids) == text


def test_pipeline_generates_from_the_exported_char_model(char_export):
    model, tok, out = char_export
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = generator("The quick", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("The quick") and len(text) == len("The quick") + 12
    # the same greedy continuation as gpt2lab's own model
    idx = torch.tensor([tok.encode("The quick")])
    for _ in range(12):
        nxt = model(idx)[0][0, -1].argmax()
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    assert text == tok.decode(idx[0].tolist())


@torch.no_grad()
def test_lora_adapter_exports_for_peft(tmp_path):
    """gpt2lab's adapter, exported in PEFT format next to its HF base, gives the same logits under
    `peft.PeftModel` as gpt2lab computes with the adapter applied."""
    peft = pytest.importorskip("peft")
    from gpt2lab.lora import LoraConfig, apply_lora, lora_modules, save_peft_adapter

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    save_hf_model(model, tmp_path / "base")
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    base_logits = model(idx)[0]
    apply_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"]))
    gen = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():  # as training would: B away from zero
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    model.eval()
    save_peft_adapter(tmp_path / "adapter", model, str(tmp_path / "base"))
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours = model(idx)[0]
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the logits
    torch.testing.assert_close(peft_model(idx).logits, ours, atol=1e-5, rtol=0)


@torch.no_grad()
def test_convert_command_exports_a_checkpoint_and_its_adapter(tmp_path, capsys):
    """Through the CLI: a char-level bias-free checkpoint -> HF dir; its LoRA adapter -> PEFT dir;
    both load in transformers/peft with gpt2lab's logits; a second export needs --force."""
    peft = pytest.importorskip("peft")
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.cli import main
    from gpt2lab.loading import load_model
    from gpt2lab.lora import LoraConfig, apply_lora, lora_modules, save_adapter

    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, bias=False))
    save_checkpoint(tmp_path / "base", base, base.config, tok.to_dict(), step=1)
    adapted = apply_lora(base, LoraConfig(r=2, alpha=4.0, dropout=0.0, targets=["c_attn", "c_fc"]))
    for m in lora_modules(adapted).values():
        m.lora_B.normal_(0, 0.1)
    save_adapter(tmp_path / "adapter", adapted, LoraConfig(r=2, alpha=4.0, dropout=0.0),
                 base_init=str(tmp_path / "base"), tokenizer=tok.to_dict())
    assert main(["convert", "--init", str(tmp_path / "base"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--init", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft"),
                 "--format", "peft"]) == 0
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    ours, _ = load_model(str(tmp_path / "adapter"))  # merged on load
    idx = torch.tensor([tok.encode(TEXT[:30])])
    torch.testing.assert_close(peft_model(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT)["input_ids"] == tok.encode(TEXT)
    capsys.readouterr()
    assert main(["convert", "--init", str(tmp_path / "base"), "--out", str(tmp_path / "hf")]) == 2
    assert "holds an earlier HF export; add --force" in capsys.readouterr().err
    assert main(["convert", "--init", str(tmp_path / "base"), "--out", str(tmp_path / "hf"), "--force"]) == 0
