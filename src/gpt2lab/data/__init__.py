"""Data: corpora (`sources`), corpora -> shards + meta.json (`prepare`), token shards (`shards`), the
step-indexed loader (`loader`) and instruction records (`sft`).

Submodules are imported on first use, so `gpt2lab prepare --help` (which reads `sources`) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "TokenLoader": "loader",
    "dataset_fingerprint": "loader",
    "iter_eval_batches": "loader",
    "check_min_tokens": "prepare",
    "load_meta": "prepare",
    "open_shard": "shards",
    "write_shard": "shards",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """The names above, imported from their submodule on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"gpt2lab.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'gpt2lab.data' has no attribute {name!r}")
