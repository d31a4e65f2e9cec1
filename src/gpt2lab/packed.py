"""Linear layers with their weights pre-packed for oneDNN: the fastest CPU kernels for inference.

    pack_linears(model)        # in place, for inference: what `optimize_for_decoding` does on a CPU

`F.linear` on a CPU multiplies through MKL (float32) or re-lays out the weight for oneDNN on every
call (bfloat16). oneDNN's own packed ("blocked") weight layout, made once here with
`torch.ops.mkldnn._reorder_linear_weight` and multiplied with `torch.ops.mkldnn._linear_pointwise`
(the pair torch.compile's CPU backend uses when it freezes a model), streams the weight at close to
memory bandwidth: a gpt2 (124M) float32 decode step's matrices ran 1.4x faster than the best
`F.linear` layout, 16 rows at once (a served batch) 3x, long scoring batches 1.5x, bfloat16 1.5-1.8x
(benchmarks/bench_decode.py, docs/benchmarks.md). Each output row is also computed the same way
whatever the number of rows, so a request's logits do not depend on what shares its batch.

Only the weights are packed (float32 or bfloat16, a CPU with oneDNN); the tied LM head gets its own
packed copy (the token embedding still reads its rows). A packed layer can be moved to another
dtype (it repacks) but cannot be trained or saved: `pack_linears` is for inference only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.errors import UserError

_AVAILABLE: dict[torch.dtype, bool] = {}


def packable(dtype: torch.dtype) -> bool:
    """True when a CPU weight of `dtype` can be packed here: torch has oneDNN and its linear ops,
    oneDNN runs `dtype` on this CPU (bfloat16 needs AVX-512 at least), and a packed product equals
    `F.linear` on a small check (measured once per dtype)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype not in _AVAILABLE:
        _AVAILABLE[dtype] = _check(dtype)
    return _AVAILABLE[dtype]


def _check(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(24, 40, generator=g).to(dtype), torch.randn(3, 40, generator=g).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError):  # a torch without these ops or kernels (built without oneDNN)
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight (out, in) and bias (out,) are copied: the packed weight, and a clone of the bias."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.weight_packed = _pack(weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype (the weight's)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight (out, in) as an ordinary tensor (a copy)."""
        return self.weight_packed.to_dense()

    def _apply(self, fn, recurse=True):  # model.to(dtype) etc.: convert the weight, then pack it again
        super()._apply(fn, recurse)
        self.weight_packed = _pack(fn(self.dense_weight()))
        return self

    def __deepcopy__(self, memo):  # an opaque oneDNN tensor has no storage to copy: pack a copy afresh
        twin = memo[id(self)] = PackedLinear(self.dense_weight(), self.bias)
        return twin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight_packed.dtype}")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    if weight.device.type != "cpu" or not packable(weight.dtype):
        raise UserError(f"packed linear layers run on a CPU in float32 or bfloat16, not {weight.dtype} on "
                        f"{weight.device}; load the model again instead of moving a model laid out for CPU decoding")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` (CPU, float32 or bfloat16, inference) by a
    `PackedLinear`, in place; the number replaced. LoRA layers (not plain Linears) are left as they
    are, and so is every layer when this CPU or torch cannot pack the weights' dtype."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and packable(child.weight.dtype):
                setattr(module, name, PackedLinear(child.weight, child.bias))
                replaced += 1
    return replaced


def is_packed(model: nn.Module) -> bool:
    """True when some linear layer of `model` was packed by `pack_linears`."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
