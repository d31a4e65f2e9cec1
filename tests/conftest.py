"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data files of /work/shared/data ($GPT2LAB_SHARED_DATA, default <repo>/../shared/data); skip if absent."""
    path = Path(os.environ.get("GPT2LAB_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set GPT2LAB_SHARED_DATA)")
    return path
