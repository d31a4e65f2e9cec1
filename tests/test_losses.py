"""The fused LM-head + cross-entropy loss (`gpt2lab.losses.linear_cross_entropy`): equal to the standard
logits + F.cross_entropy path in value and gradients (alone and through GPT's tied embedding), never
holding an (N, V) tensor, and traced by torch.compile without graph breaks. CPU, tiny sizes."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2lab import model as model_module
from gpt2lab.losses import linear_cross_entropy
from gpt2lab.model import GPT, GPTConfig

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(hidden, weight, targets, vocab_size, reduction):
    logits = (hidden @ weight.t())[:, :vocab_size]
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction=reduction)


def inputs(N=37, C=16, V=67, Vp=72, ignored_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(Vp, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored_every:
        targets[::ignored_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 10, 37, 4096])  # 10 does not divide N=37
@pytest.mark.parametrize("padded", [False, True])
def test_matches_standard_path(reduction, chunk_size, padded):
    hidden, weight, targets = inputs(Vp=72 if padded else 67)
    expected = reference(hidden, weight, targets, 67, reduction)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, vocab_size=67, reduction=reduction, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL
    if padded:  # padding ids are never predicted, so their weight rows get no gradient
        assert grads[1][67:].abs().max().item() == 0.0


def test_grad_output_is_applied():
    hidden, weight, targets = inputs()
    (3.5 * reference(hidden, weight, targets, 67, "mean")).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.5 * linear_cross_entropy(hidden, weight, targets, vocab_size=67, chunk_size=8)).backward()
    assert (hidden.grad - want[0]).abs().max().item() <= TOL
    assert (weight.grad - want[1]).abs().max().item() <= TOL


def test_all_ignored_mean_is_zero():
    hidden, weight, targets = inputs()
    targets[:] = -100
    loss = linear_cross_entropy(hidden, weight, targets, vocab_size=67)
    loss.backward()
    assert loss.item() == 0.0  # F.cross_entropy would give NaN here
    assert hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


def test_no_grad_gives_the_same_value():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, vocab_size=67, chunk_size=8)
    assert abs(loss.item() - reference(hidden, weight, targets, 67, "mean").item()) <= TOL


def test_autocast_bf16_close_to_standard_path():
    """Under autocast both paths run the matmuls in bf16; the fused one sums grad_weight over chunks in fp32."""
    hidden, weight, targets = inputs(N=64, C=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(hidden, weight, targets, 67, "mean")
        loss = linear_cross_entropy(hidden, weight, targets, vocab_size=67, chunk_size=16)
    want = torch.autograd.grad(expected, (hidden, weight))
    got = torch.autograd.grad(loss, (hidden, weight))
    assert abs(loss.item() - expected.item()) < 1e-3 * abs(expected.item())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32  # the dtypes of the inputs, not the autocast dtype
        assert (g - w).abs().max().item() < 2e-2 * w.abs().max().item()


def test_bad_arguments():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, vocab_size=67, reduction="none")
    with pytest.raises(ValueError, match="vocab_size"):
        linear_cross_entropy(hidden, weight, targets, vocab_size=100)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1], vocab_size=67)


# --------------------------------------------------------------------------------------------------
# Inside GPT


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides}))


def batch(B=3, T=13, V=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = -100
    targets[2, -3:] = -100
    return idx, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padded_vocab_size", [None, 128])
def test_gpt_fused_loss_matches_standard_backward(monkeypatch, reduction, padded_vocab_size):
    """Loss and every parameter's gradient (the tied wte/lm_head included) equal the standard path's."""
    model = tiny_gpt(padded_vocab_size=padded_vocab_size)
    idx, targets = batch()
    logits, loss = model(idx, targets, loss_reduction=reduction)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # 39 rows in chunks of 8: the last chunk is partial.
    monkeypatch.setattr(model_module, "linear_cross_entropy", functools.partial(linear_cross_entropy, chunk_size=8))
    no_logits, fused = model(idx, targets, loss_reduction=reduction, fused_loss=True)
    fused.backward()
    assert no_logits is None
    assert abs(fused.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
    for name, p in model.named_parameters():
        assert (p.grad - want[name]).abs().max().item() <= TOL, name


def test_gpt_fused_loss_without_targets_returns_logits():
    model = tiny_gpt()
    idx, _ = batch()
    logits, loss = model(idx, fused_loss=True)
    assert loss is None and logits.shape == (3, 13, 100)


class MaxTensorSize(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_does_not_scale_with_tokens_times_vocab(monkeypatch):
    """No tensor of N*V elements exists, neither saved for backward nor transient, with the fused loss;
    the standard path has both (so the check can fail)."""
    model = tiny_gpt(vocab_size=1000, padded_vocab_size=1024, n_embd=16, n_head=2, n_layer=1)
    idx, targets = batch(B=4, T=32, V=1000)
    N, Vp = idx.numel(), 1024
    monkeypatch.setattr(model_module, "linear_cross_entropy", functools.partial(linear_cross_entropy, chunk_size=32))

    def run(fused: bool) -> tuple[int, int]:
        saved: list[int] = []

        def pack(t):
            saved.append(t.numel())
            return t

        tracker = MaxTensorSize()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
            _, loss = model(idx, targets, fused_loss=fused)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return max(saved), tracker.largest

    saved, largest = run(fused=True)
    assert saved < N * 1000 / 4 and largest <= 32 * Vp  # 32 * Vp: one chunk, a quarter of N * V
    saved, largest = run(fused=False)
    assert saved >= N * 1000 and largest >= N * 1000


def test_gpt_fused_loss_has_no_graph_breaks():
    """torch.compile traces the autograd.Function whole: one graph, forward and loss."""
    model = tiny_gpt(padded_vocab_size=128)
    idx, targets = batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda i, t: model(i, t, fused_loss=True))(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
