"""gpt2lab.console: lines reach whatever stderr/stdout is current, as they are, on rank 0 only unless
asked for every rank; a live display is drawn only on a terminal on rank 0."""

from __future__ import annotations

import contextlib
import io
import logging

from rich.console import Console

from gpt2lab.console import LOGGER, ProgressDisplay, say


def test_a_line_is_written_as_is_to_the_current_stream(capsys):
    say("gpt2lab: 100% done, {not a format}")
    say("two\nlines", stdout=True)
    assert capsys.readouterr() == ("two\nlines\n", "gpt2lab: 100% done, {not a format}\n")
    redirected = io.StringIO()
    with contextlib.redirect_stderr(redirected):
        say("into the redirection")
    assert redirected.getvalue() == "into the redirection\n" and capsys.readouterr().err == ""


def test_other_ranks_say_only_what_is_for_every_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    say("rank 0 only")
    say("every rank", all_ranks=True)
    assert capsys.readouterr().err == "every rank\n"
    monkeypatch.setenv("RANK", "0")
    say("rank 0 only")
    assert capsys.readouterr().err == "rank 0 only\n"


def test_the_logger_level_silences_gpt2lab(capsys):
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        say("not shown")
    finally:
        LOGGER.setLevel(level)
    assert capsys.readouterr().err == ""


def test_no_live_display_off_a_terminal_except_the_final_line_of_tokens(capsys):
    for kind in ("steps", "items", "status"):
        with ProgressDisplay(kind, total=3, description=kind) as bar:
            bar.advance(2)
            assert not bar.shown
    assert capsys.readouterr() == ("", "")
    with ProgressDisplay("tokens", total=100, description="data") as bar:
        bar.update(completed=100)
        assert not bar.shown
    out = capsys.readouterr().out
    assert out.startswith("data ") and "100 tokens" in out and out.count("\n") == 1


def test_a_terminal_shows_the_display_on_rank_0_only(monkeypatch):
    def display() -> tuple[bool, str]:
        console = Console(file=io.StringIO(), force_terminal=True, width=100)
        with ProgressDisplay("steps", total=4, console=console) as bar:
            bar.update(completed=2, info="loss 1.5")
            shown = bar.shown
        return shown, console.file.getvalue()

    shown, drawn = display()
    assert shown and "2/4" in drawn and "loss 1.5" in drawn
    monkeypatch.setenv("RANK", "1")
    assert display() == (False, "")
    monkeypatch.setenv("RANK", "0")
    with ProgressDisplay("items", total=1, enabled=False, console=Console(file=io.StringIO(), force_terminal=True)) as bar:
        assert not bar.shown
