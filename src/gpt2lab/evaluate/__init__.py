"""Evaluation of language models: eval tasks behind one interface, and the data files they read.

    from gpt2lab.evaluate.registry import get_task
    task = get_task("hellaswag")                       # an EvalTask (task.py)
    options = task.default_options()
    examples = task.load(task.resolve_data(None), options)
    task.run(model, tokenizer, examples, options)      # {"acc": ..., "acc_norm": ..., "n": ...}

    task.py       the EvalTask interface: name, description, CLI options, data, run, table rows
    registry.py   task name -> module; `gpt2lab eval`, --json and in-training eval all go through it
    training.py   EvalConfig (the run config's `eval` section) and the trainer's eval-task hook
    scoring.py    the torch side the tasks share: continuation scoring, rank sharding
    multiple_choice.py   MultipleChoiceTask: a multiple-choice task is a parser on it
    hellaswag.py  lambada.py  perplexity.py  wikitext.py   the tasks
    lm_eval_task.py  harness.py   any lm-evaluation-harness task (`lm-eval`), gpt2lab as lm-eval's backend

Here, without torch (parsers import this package): the shared data folder, the download cache,
`fetch` (a public data file, sha256-checked) and `find_data_file` (shared folder, cache, download).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.download import cache_dir, download, sha256_file
from gpt2lab.errors import UserError

MIRROR_ENV = "GPT2LAB_DATA_MIRROR"
SHARED_DATA_ENV = "GPT2LAB_SHARED_DATA"

# --------------------------------------------------------------------------------------------------
# Data files: the shared folder, the cache, downloads


def shared_data_dir() -> Path | None:
    """The project's shared data folder ($GPT2LAB_SHARED_DATA, default <repo>/../shared/data), if it exists."""
    env = os.environ.get(SHARED_DATA_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return path if path.is_dir() else None


@dataclass(frozen=True)
class RemoteFile:
    """A public data file: where it lives and, when one is published, the sha256 it must have."""

    url: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def resolved_url(self) -> str:
        """The URL to fetch: `$GPT2LAB_DATA_MIRROR/<name>` when a mirror is set, else the canonical URL."""
        mirror = os.environ.get(MIRROR_ENV)
        return f"{mirror.rstrip('/')}/{self.name}" if mirror else self.url


def cached_path(remote: RemoteFile) -> Path | None:
    """The cached copy of `remote`, if one was downloaded before."""
    path = cache_dir() / remote.name
    return path if path.is_file() else None


def find_data_file(shared_name: str | None, remote: RemoteFile | None = None, download: bool = True,
                   validate: Callable[[Path], None] | None = None) -> Path | None:
    """A task's data file when --data is not given: `shared_name` in the shared data folder if present,
    else the cached copy of `remote`, else (when `download`) `remote` fetched now (checked by `validate`);
    None when there is none."""
    shared = shared_data_dir()
    if shared_name is not None and shared is not None and (shared / shared_name).is_file():
        return shared / shared_name
    if remote is None:
        return None
    cached = cached_path(remote)
    if cached is not None or not download:
        return cached
    return fetch(remote, validate=validate)


def fetch(remote: RemoteFile, validate: Callable[[Path], None] | None = None, timeout: float = 60.0) -> Path:
    """The cached copy of `remote`, downloading it first if needed.

    The download goes to a temporary file next to the cache entry and is renamed into place only
    after its sha256 (when known) matches and `validate(path)` (which raises UserError) passes, so a
    failed or partial download never leaves a cache entry behind.
    """
    dest = cache_dir() / remote.name
    if dest.is_file():
        if remote.sha256 and sha256_file(dest) != remote.sha256:
            raise UserError(
                f"cached {dest} does not have sha256 {remote.sha256}; delete it to download it again"
            )
        return dest
    download(remote.resolved_url(), dest, sha256=remote.sha256, validate=validate, timeout=timeout,
             fix=f"connect to the internet, set {MIRROR_ENV} to a mirror, or pass --data PATH to a local copy")
    return dest
