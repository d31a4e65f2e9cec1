"""Every `gpt2lab ...` command shown in README.md and docs/*.md parses: a known subcommand, known
flags, and for train/finetune known config keys with values of the right type. So the docs cannot
drift from the code again (the commands are parsed, not run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gpt2lab.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(where, command line) for each gpt2lab invocation inside a fenced code block of the docs."""
    found = []
    for doc in DOCS:
        in_code, pending, start = False, "", 0
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            if pending:
                pending += " " + line.strip()
            else:
                pending, start = line.strip(), n
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            command = re.sub(r"\s#\s.*$", "", pending).strip()  # a trailing comment
            pending = ""
            match = re.search(r"(?:^|&&\s*|\s-m\s)gpt2lab\s+(.*)$", command)
            printed = re.match(r"gpt2lab( [\w-]+)?: ", command)  # output shown in the docs, not a command
            if match and not printed and "$" not in command and not command.startswith(("pip ", "python -c")):
                found.append((f"{doc.name}:{start}", match.group(1)))
    return found


COMMAND_LINES = shown_commands()


def test_the_docs_show_commands_of_every_kind():
    names = {shlex.split(c)[0] for _, c in COMMAND_LINES if shlex.split(c)}
    assert len(COMMAND_LINES) >= 40 and names >= set(COMMANDS) - {"model-info"} | {"train"}


@pytest.mark.parametrize("where, command", COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_documented_command_parses(where, command, tmp_path, monkeypatch):
    args = shlex.split(command)
    if not args:
        pytest.skip("`gpt2lab` alone is the quickstart")
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "--version"):
        return
    assert name in COMMANDS, f"{where}: unknown command {name!r}"
    _, parser = build_parser(name)
    try:
        parsed = parser.parse_args(rest)
    except SystemExit as e:
        raise AssertionError(f"{where}: `gpt2lab {command}` does not parse") from e
    if name in ("train", "finetune"):
        from gpt2lab.config import config_from_args

        if parsed.config is not None and parsed.config.endswith((".yaml", ".yml")) and not Path(parsed.config).is_file():
            parsed.config = None  # a user's own file, shown as an example
        monkeypatch.chdir(tmp_path)
        config_from_args(parsed)  # known keys, coercible values (UserError otherwise)


def test_every_dotted_key_the_docs_mention_exists():
    """`--optim.lr 3e-4` in prose or tables is a config key too (the README once said `--train.lr`)."""
    from gpt2lab.config import all_keys

    keys = set(all_keys())
    unknown = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for key in re.findall(r"--([a-z_]+\.[a-z_.]+[a-z_])", line):
                if key not in keys:
                    unknown.append(f"{doc.name}:{n}: --{key}")
    assert not unknown, "\n".join(unknown)
