"""gpt2lab: GPT-2 language models in plain PyTorch.

    from gpt2lab import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2lab.model import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The model classes, imported on first use so `import gpt2lab.cli` (and `--help`) needs no torch."""
    if name in __all__:
        return getattr(importlib.import_module("gpt2lab.model"), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
