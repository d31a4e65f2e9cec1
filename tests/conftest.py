"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def machine_independent_defaults(tmp_path_factory):
    """Environment defaults for the whole session (a value already set is kept; subprocesses inherit them).

    GPT2LAB_CPU_DTYPE=fp32: `dtype: auto` on a CPU is measured (gpt2lab.dtype_choice) and picks bf16 where
    bf16 runs faster, as on CPUs with AMX; tests compare against fp32 references, so auto must mean
    fp32 on every machine. tests/test_precision.py removes it where it tests the measurement itself.
    GPT2LAB_CACHE: a fresh folder, so the suite never writes into (or reads from) the user's ~/.cache/gpt2lab.
    """
    defaults = {"GPT2LAB_CPU_DTYPE": "fp32", "GPT2LAB_CACHE": str(tmp_path_factory.mktemp("gpt2lab_cache"))}
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    yield
    for name in added:
        os.environ.pop(name, None)


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
