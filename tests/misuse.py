"""What the misuse tests share (tests/test_misuse.py, tests/test_hostile.py): the tiny run settings,
a snapshot of every file under a folder, and the checks every misuse case makes (an exit code or a
gpt2lab exception, one line, no traceback, nothing that existed before changed).

    code, err = run_cli(["sample", "--init", "run"], cwd=sandbox)        in-process, through cli.main
    proc = run_limited(["sample", ...], cwd=sandbox, memory=2 << 30)      a subprocess under an
                                                                          address-space and time limit
    assert_one_line("name", code, err)                                    exit 2, one line, no traceback
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import subprocess
import sys
from pathlib import Path

TINY = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
        "train.tokens_per_step": 64, "train.micro_batch_size": 4, "train.max_steps": 2, "train.eval_every": 0,
        "train.eval_batches": 1, "train.sample_tokens": 0, "checkpoint.every": 2, "log.progress": False}
TRAIN = ["train", "--data.dir", "data", "--data.prepare", "null", "--out", "fresh",
         *[a for k, v in TINY.items() if k != "log.progress" for a in (f"--{k}", str(v))]]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file and a marker for every directory under `root` (links are not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_cli(argv: list[str], cwd: Path, stdin: str | None = None) -> tuple[int, str]:
    """`gpt2lab ARGV` run in-process in `cwd`: (exit code, stderr). An exception that escapes
    `cli.main` is a traceback the user would see: it is re-raised, failing the test."""
    from gpt2lab.cli import main

    err = io.StringIO()
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    try:
        os.chdir(cwd)
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse's own usage errors
                code = e.code
    finally:
        os.chdir(old_cwd)
        sys.stdin = old_stdin
    return int(code or 0), err.getvalue()


def run_limited(argv: list[str], cwd: Path, *, memory: int = 4 << 30, timeout: float = 120,
                stdin: bytes | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`gpt2lab ARGV` in a subprocess whose address space is capped at `memory` bytes and whose
    wall time at `timeout` seconds (subprocess.TimeoutExpired fails the test: a hang)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "gpt2lab", *argv], cwd=cwd, capture_output=True,
                          input=stdin, timeout=timeout, preexec_fn=limit,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line(name: str, code: int, err: str, expected: int = 2) -> str:
    """The case ended with exit `expected` and one line on stderr that is gpt2lab's, not Python's."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{name}: traceback\n{err}"
    assert len(lines) == 1, f"{name}: expected one line, got:\n{err}"
    assert "error" in lines[0], f"{name}: {lines[0]}"
    assert "{'" not in lines[0] and "weights_only=False" not in lines[0], lines[0]  # no Python reprs
    return lines[0]
