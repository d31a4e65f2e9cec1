"""The architecture of a GPT: `GPTConfig` and the named presets, with no torch.

    GPTConfig.from_preset("gpt2-tiny", pos_emb="rope")   -> a validated architecture
    PRESETS["gpt2-medium"]                               -> {"n_layer": 24, "n_head": 16, "n_embd": 1024}

`gpt2lab.model` builds the network from it; the run config (`gpt2lab.config`) and `gpt2lab model-info`
read its fields and their docstrings for `--help` without importing torch.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, fields
from typing import Literal

from gpt2lab.errors import UserError

PosEmb = Literal["learned", "rope"]
"""Position encodings: GPT-2's learned absolute table, or rotary embeddings."""


MAX_SIZE = 2**31 - 1
"""The largest value of an architecture size (layers, heads, widths, vocabulary, context)."""


@dataclass
class GPTConfig:
    """Architecture of a GPT model. Defaults are GPT-2 124M (`gpt2`)."""

    block_size: int = 1024
    """Maximum context length in tokens (the size of the learned position table)."""
    vocab_size: int = 50257
    """Number of token ids the tokenizer produces (50257 for GPT-2 BPE)."""
    padded_vocab_size: int | None = None
    """Rows of the embedding/LM head; >= vocab_size (e.g. 50304, a multiple of 64, for faster matmuls).
    Padding ids are never produced: logits are returned for the first `vocab_size` ids only."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads: None or n_head = MHA, 1 = MQA, a divisor of n_head = GQA."""
    n_embd: int = 768
    """Model width C; must be a multiple of n_head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2 has them)."""
    pos_emb: PosEmb = "learned"
    """Position encoding: "learned" (GPT-2's absolute table) or "rope" (rotary)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (only with pos_emb="rope")."""
    sliding_window: int | list[int | None] | None = None
    """Attention window in tokens: None = full causal attention; an int applies to every layer;
    a list gives one entry per layer (None or 0 = full attention for that layer)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2 uses 1e-5)."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        self.validate()

    def validate(self) -> None:
        """Raise UserError with a one-line message if the fields do not describe a valid model."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
            if value > MAX_SIZE:  # tensor shapes and per-layer tables are indexed by machine integers
                raise UserError(f"model.{name}={value:,} is larger than any model can be (at most {MAX_SIZE:,})")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                f"(use 1 for multi-query, {self.n_head} for multi-head attention)"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"model.padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}"
            )
        if self.pos_emb not in typing.get_args(PosEmb):  # from_dict does not coerce
            raise UserError(f"model.pos_emb must be one of {', '.join(map(repr, typing.get_args(PosEmb)))}, "
                            f"got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise UserError(f"rotary embeddings need an even head size, got {self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.sliding_window, list) and len(self.sliding_window) != self.n_layer:
            raise UserError(
                f"model.sliding_window has {len(self.sliding_window)} entries but the model has "
                f"n_layer={self.n_layer} layers; give one entry per layer or a single int"
            )
        sw = self.sliding_window  # not layer_windows(): a list of n_layer entries, however absurd n_layer is
        for w in sw if isinstance(sw, list) else [sw]:
            if w is not None and w < 0:
                raise UserError(f"model.sliding_window entries must be positive (or null), got {w}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (None = full causal attention)."""
        sw = self.sliding_window
        if isinstance(sw, list):
            return [w if w else None for w in sw]
        return [sw if sw else None] * self.n_layer

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named architecture (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)}){hint}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict (e.g. a checkpoint's config.json); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # OpenAI's GPT-2 family (parameter counts with the tied embedding counted once).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
    # Small models for CPU runs and tests.
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
}


def gpt2_problems(config: GPTConfig, target: str) -> list[str]:
    """What OpenAI's GPT-2 architecture (`target`: "HF GPT-2", "llama.cpp's gpt2") cannot express of
    `config`: rotary positions, grouped-query attention, sliding windows. [] for a GPT-2-shaped model
    (a bias-free one included: it is exported with zero biases, which compute the same logits)."""
    problems = []
    if config.pos_emb != "learned":
        problems.append(f"pos_emb={config.pos_emb!r} ({target} has learned positions only)")
    if config.n_kv_head != config.n_head:
        problems.append(f"n_kv_head={config.n_kv_head} ({target} has multi-head attention only)")
    if any(w is not None for w in config.layer_windows()):
        problems.append(f"sliding_window={config.sliding_window} ({target} has full attention only)")
    return problems
