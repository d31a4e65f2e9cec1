"""Hostile and careless input, by family: files whose JSON/YAML parses but has the wrong shape,
damaged or hostile weight files, sizes that cannot fit, numbers that are not numbers, text that is
not clean UTF-8, races, the user's own files, interactive and environment edges, the Python API and
a real full disk. Every case ends in one line (exit 2 on the command line, a `gpt2lab.errors.UserError`
subclass in Python) before any work, with no traceback, and leaves every file that existed before it
byte-identical. The command-line cases run in-process in the shared `sandbox`; the ones that could
exhaust memory or hang run in a subprocess under an address-space and a time limit.

Each family has its own table (name, how the files are made, argv) and its own tests; the last test
counts them all.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


# ==================================================================================================
# Families 1, 2, 5, 9: files of the wrong shape, damaged or hostile weight files, text that is not
# clean UTF-8, the Python API's exceptions

SHAPE_CASES: list = []


# ==================================================================================================
# Families 3, 4, 8: sizes that cannot fit, numbers that are not numbers, interactive and
# environment edges

SIZE_CASES: list = []


# ==================================================================================================
# Families 6, 7, 10: races, the user's own files, a real full disk

RACE_CASES: list = []


# ==================================================================================================


def test_there_are_sixty_cases_across_the_ten_families():
    assert len(SHAPE_CASES) + len(SIZE_CASES) + len(RACE_CASES) >= 60
