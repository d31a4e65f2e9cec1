"""int8 weight-only decoding on a CPU: each Linear's weight stored as int8, one scale per output row.

    quantize_int8(model)       # in place, for inference: what `sample --dtype int8` and load(dtype="int8") do

A decode step reads every weight once per token, so its speed is the bytes it reads: int8 weights
are a quarter of fp32's. Weights are quantized symmetrically per output channel (row r of W is
round(W[r] / s_r) with s_r = max |W[r]| / 127) and multiplied by torch's int8 weight-pack kernel
(`torch._weight_int8pack_mm`), which takes bfloat16 activations (its float32 path is several times
slower), so inputs are cast to bfloat16 and outputs back. Embeddings, LayerNorms and the KV cache
stay in the model's dtype; the LM head, tied to the token embedding, gets its own int8 copy (the
embedding reads one row per token and stays as it is).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2lab.errors import UserError
from gpt2lab.model import GPT
from gpt2lab.packed import PackedLinear


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows times float scales (weight-only quantization)."""

    def __init__(self, linear: nn.Linear | PackedLinear) -> None:
        super().__init__()
        w = (linear.dense_weight() if isinstance(linear, PackedLinear) else linear.weight.detach()).float()
        # the scale the kernel multiplies by is bfloat16 (its activations' dtype): round with that one
        scale = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127).to(torch.bfloat16)  # (out,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale.float()[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())  # (out, in)
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight_int8,
                                      self.scale)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_int8(device: torch.device | str) -> None:
    """UserError unless int8 decoding can run on `device` (a CPU, with torch's int8 weight-pack kernel)."""
    if torch.device(device).type != "cpu":
        raise UserError(f"int8 decoding runs on the CPU only, not {device}; use --device cpu, or bf16 on a GPU")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise UserError(f"int8 decoding needs torch's int8 weight-pack kernel, which torch {torch.__version__} "
                        "lacks; upgrade torch or use --dtype fp32|bf16")


@torch.no_grad()
def quantize_int8(model: GPT) -> GPT:
    """Replace every nn.Linear of `model` (CPU, inference only; packed ones too) by an `Int8Linear`, in place.

    The model can no longer be trained or saved as a checkpoint; its logits are within int8
    rounding of the original's (per row, |error| <= max |W[r]| / 254 per weight)."""
    check_int8(model.transformer.wte.weight.device)
    model.eval()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, PackedLinear)):
                setattr(module, child_name, Int8Linear(child))
    return model


def is_int8(model: nn.Module) -> bool:
    """True when `model`'s linear layers were quantized by `quantize_int8`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
