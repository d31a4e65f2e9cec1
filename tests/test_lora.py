"""LoRA: exact identity at init, merge equivalence, frozen base, small adapters that reload exactly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from gpt2lab.checkpoint import load_checkpoint, save_checkpoint
from gpt2lab.errors import UserError
from gpt2lab.loading import load_model
from gpt2lab.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from gpt2lab.model import GPT, GPTConfig

LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=512, **overrides)).eval()


def trained_adapter(model: GPT) -> GPT:
    """Give B nonzero values, as training would."""
    gen = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=gen) * 0.05
    return model


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_zero_b_gives_the_base_logits_exactly(idx):
    model = tiny()
    base = model(idx)[0]
    apply_lora(model, LORA)
    assert len(lora_modules(model)) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
    assert torch.equal(model(idx)[0], base)


def test_targets_select_layers_by_name_or_suffix():
    model = apply_lora(tiny(), replace(LORA, targets=["attn.c_proj"]))
    assert sorted(lora_modules(model)) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(UserError, match=r"match no nn.Linear layer; layer names are \['c_attn', 'c_fc'"):
        apply_lora(tiny(), replace(LORA, targets=["q_proj"]))
    with pytest.raises(UserError, match="lora.r must be a positive integer"):
        apply_lora(tiny(), replace(LORA, r=0))
    with pytest.raises(UserError, match="already has LoRA layers"):
        apply_lora(model, LORA)


def test_only_lora_parameters_get_gradients(idx):
    model = apply_lora(tiny(), LORA)
    model.train()
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
    # B starts at zero, so A's first gradient is zero; B's is not
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_base_parameter_names_are_unchanged():
    model = tiny()
    keys = set(model.state_dict())
    apply_lora(model, LORA)
    assert {k for k in model.state_dict() if "lora_" not in k} == keys


def test_merged_weights_give_the_adapter_logits(idx, tmp_path):
    model = trained_adapter(apply_lora(tiny(), LORA))
    adapted = model(idx)[0]
    assert (adapted - tiny()(idx)[0]).abs().max() > 1e-3  # the adapter changes something
    merge_lora(model)
    assert not lora_modules(model) and type(model.transformer.h[0].attn.c_attn) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    merged = model(idx)[0]
    assert (merged - adapted).abs().max() <= 1e-5
    # the merged model is a plain GPT: it saves and loads as an ordinary checkpoint
    save_checkpoint(tmp_path / "merged", model, model.config, {"kind": "gpt2"})
    loaded, _ = load_checkpoint(tmp_path / "merged")
    assert torch.equal(loaded.eval()(idx)[0], merged)


def test_saved_adapter_is_small_and_reloads_exactly(idx, tmp_path):
    model = trained_adapter(apply_lora(tiny(), LORA))
    adapted = model(idx)[0]
    save_adapter(tmp_path / "adapter", model, LORA, base_init="tiny-base", tokenizer={"kind": "gpt2"})
    save_checkpoint(tmp_path / "base", tiny(), tiny().config, {"kind": "gpt2"})
    adapter_bytes = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    base_bytes = (tmp_path / "base" / "model.safetensors").stat().st_size
    # 8,192 LoRA parameters vs 136,960 in the base (6%); the file ratio adds only the headers
    assert adapter_bytes < base_bytes / 10
    assert set(lora_state_dict(model)) == {f"{n}.{ab}" for n in lora_modules(model) for ab in ("lora_A", "lora_B")}
    config = read_adapter_config(tmp_path / "adapter")
    assert (config["r"], config["alpha"], config["base"]["init"]) == (4, 8.0, "tiny-base")
    fresh = tiny()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(idx)[0], adapted)


def test_adapter_refuses_another_architecture_and_warns_on_other_weights(tmp_path):
    model = trained_adapter(apply_lora(tiny(), LORA))
    save_adapter(tmp_path / "adapter", model, LORA, base_init="tiny-base")
    with pytest.raises(UserError, match="adapter was trained on base 'tiny-base' whose model config differs"):
        load_adapter(tiny(n_layer=3), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="weights differ"):
        load_adapter(tiny(seed=5), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="is not a gpt2lab LoRA adapter config"):
        load_adapter(tiny(), tmp_path / "adapter")


def test_lora_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2.0, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))


def test_a_saved_lora_entry_without_alpha_gets_loraconfigs_default(tmp_path, idx):
    """One default per field: a LoRA run checkpoint whose config records only r loads with
    LoraConfig's alpha (16), as training used it; the loader once fell back to alpha = r."""
    torch.manual_seed(0)
    model = trained_adapter(apply_lora(GPT(GPTConfig.from_preset("gpt2-tiny")), LoraConfig(r=4))).eval()
    expected = model(idx)[0]
    save_checkpoint(tmp_path / "ckpt", model, model.config, {"kind": "gpt2"}, extra={"lora": {"r": 4}})
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    assert not lora_modules(loaded)  # merged on load
    assert (loaded(idx)[0] - expected).abs().max() <= 1e-5
