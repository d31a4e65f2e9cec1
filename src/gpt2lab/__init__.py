"""gpt2lab: GPT-2 language models in plain PyTorch.

    import gpt2lab
    lm = gpt2lab.load("gpt2")                      # any --init: hub id, HF dir, run, checkpoint, adapter
    lm.generate("Hello, I'm a language model,", max_new_tokens=30)
    gpt2lab.train("quickstart", **{"train.max_steps": 200})
    # a problem with the input (a file, an argument) raises gpt2lab.UserError, with a one-line message

    from gpt2lab import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `gpt2lab_lm_eval.pth` imports this
# package at every interpreter start (gpt2lab.lm_eval_plugin), so it stays cheap to import
if TYPE_CHECKING:
    from typing import Any

    from gpt2lab.api import LoadedModel, Score, load, train
    from gpt2lab.architecture import GPTConfig
    from gpt2lab.errors import UserError
    from gpt2lab.model import GPT, KVCache

# Public name -> the module that defines it (imported on first use).
_EXPORTS = {"GPT": "gpt2lab.model", "GPTConfig": "gpt2lab.architecture", "KVCache": "gpt2lab.model",
            "load": "gpt2lab.api", "train": "gpt2lab.api", "LoadedModel": "gpt2lab.api", "Score": "gpt2lab.api",
            "UserError": "gpt2lab.errors"}
__all__ = ["GPT", "GPTConfig", "KVCache", "LoadedModel", "Score", "UserError", "load", "train"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The public names, imported on first use so `import gpt2lab.cli` (and `--help`) needs no torch."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
