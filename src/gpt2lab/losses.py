"""Fused LM-head + cross-entropy loss that never holds the whole (N, V) logits matrix.

    loss = linear_cross_entropy(hidden, model.lm_head.weight, targets, vocab_size=50257)
    loss.backward()

The standard path, `F.cross_entropy(lm_head(x).float(), y)`, keeps the logits of every token
alive for backward: at 16k tokens and a 50,304-row head that is 1.6 GB in bf16 plus 3.3 GB for the
fp32 copy and 3.3 GB for the saved log-softmax, more than the whole rest of GPT-2 124M's step.
Here the forward walks over `chunk_size` rows at a time: logits of the chunk (compute dtype),
their logsumexp in fp32, the loss, and right away the gradient wrt the logits (softmax - onehot),
which is multiplied into grad_hidden (N, C) and grad_weight (V, C), accumulated in fp32. Backward
only scales those two by the incoming gradient. Peak extra memory: a few chunk x V buffers.

Conventions (the same as `F.cross_entropy(..., ignore_index=-100)` unless noted):
- targets == -100 are ignored: no loss, no gradient.
- columns >= vocab_size of a padded head (e.g. 50304 rows for 50257 ids) are computed, since an
  aligned matmul is the point of padding, but excluded from the softmax: never counted or
  predicted, and their weight rows get zero gradient.
- reduction "mean" divides by the number of counted tokens; "sum" returns the sum. Unlike
  `F.cross_entropy`, whose mean over zero counted tokens is NaN, a mean with no counted token is 0
  (the trainer's convention: such a batch contributes nothing).
- under autocast the matmuls run in the autocast dtype (bf16/fp16) and everything else in fp32;
  the returned gradients have the dtypes of `hidden` and `weight`.
- the gradient is computed in the forward, so a forward whose inputs need no gradient (eval, or
  `torch.no_grad()`) skips that work.

torch.compile traces the autograd.Function whole (forward and the scaling backward, no graph
break); its chunk loop is unrolled, which is why the number of chunks is kept small.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 4096
"""Rows per chunk: 4096 x 50304 fp32 logits are 0.8 GB, and a 4096-row matmul still fills a GPU."""


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for `device_type`, else `dtype`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`; see `linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                reduction: str, chunk_size: int, compute_dtype: torch.dtype, need_grad: bool) -> torch.Tensor:
        N = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)  # (Vp, C), cast once for all chunks
            valid = targets != IGNORE_INDEX  # (N,)
            count = valid.sum()
            # Per-row factor of the loss and its gradient: 0 for ignored rows, 1/count for a mean.
            scale = valid.float()
            if reduction == "mean":
                scale = scale / count.clamp(min=1).float()
            safe_targets = targets.masked_fill(~valid, 0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                h = hidden[start:end].to(compute_dtype)  # (n, C)
                logits = (h @ w.t()).float()  # (n, Vp) fp32
                if logits.shape[1] > vocab_size:
                    logits[:, vocab_size:] = float("-inf")  # padding ids: outside the softmax
                lse = torch.logsumexp(logits, dim=1)  # (n,)
                t = safe_targets[start:end, None]  # (n, 1)
                target_logit = logits.gather(1, t).squeeze(1)
                s = scale[start:end]
                loss = loss + ((lse - target_logit) * s).sum()
                if not need_grad:
                    continue
                # d loss / d logits = (softmax - onehot(target)) * row scale, in place over the fp32 logits.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, t, torch.full_like(target_logit, -1.0)[:, None])
                grad = grad.mul_(s[:, None]).to(compute_dtype)  # (n, Vp)
                grad_hidden[start:end] = grad @ w  # (n, C)
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)  # (Vp, C)
                else:  # bf16/fp16 product of this chunk, summed over chunks in fp32
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy was called without gradients needed; cannot backward")
        hidden_dtype, weight_dtype = ctx.input_dtypes
        g = grad_output.float()
        return (
            (grad_hidden * g).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
            (grad_weight * g).to(weight_dtype) if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,
        )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                         reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` (restricted to the first `vocab_size` columns)
    against `targets`, without materialising the (N, V) logits.

    hidden (N, C); weight (V_padded, C) with V_padded >= vocab_size (the LM head, e.g. GPT-2's tied
    embedding); targets (N,) ids in [0, vocab_size) or -100 (ignored). reduction "mean" (over
    counted tokens; 0 when none is counted) or "sum". Returns an fp32 scalar. Matches
    `F.cross_entropy((hidden @ weight.T)[:, :vocab_size].float(), targets, ignore_index=-100)`
    in value and gradients (wrt hidden and weight) up to float rounding.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {weight.shape[0]}] (the rows of weight)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compute_dtype = _compute_dtype(hidden.device.type, weight.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, reduction, chunk_size, compute_dtype,
                                    need_grad)
