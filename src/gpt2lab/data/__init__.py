"""Data: token shards (`shards`), corpora -> shards + meta.json (`prepare`), the step-indexed loader (`loader`).

`prepare` is a submodule here: call `gpt2lab.data.prepare.prepare(...)`.
"""

from gpt2lab.data.loader import TokenLoader, dataset_fingerprint, iter_eval_batches
from gpt2lab.data.prepare import check_min_tokens, load_meta
from gpt2lab.data.shards import open_shard, write_shard

__all__ = [
    "TokenLoader",
    "check_min_tokens",
    "dataset_fingerprint",
    "iter_eval_batches",
    "load_meta",
    "open_shard",
    "write_shard",
]
