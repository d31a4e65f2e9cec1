"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data files of /work/shared/data ($GPT2LAB_SHARED_DATA, default <repo>/../shared/data); skip if absent."""
    path = Path(os.environ.get("GPT2LAB_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set GPT2LAB_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models spend their time in op overhead, which extra OpenMP threads only add to on a shared CPU.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def default_data(tmp_path_factory) -> Path:
    """The quickstart's corpus (Python's language reference, char tokenizer), prepared once per session."""
    from gpt2lab.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "default"
    prepare("default", out, progress=False)
    return out
