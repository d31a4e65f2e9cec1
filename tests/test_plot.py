"""`gpt2lab plot`: loss and learning rate of one run or several overlaid, log loss axis by default
when the losses span more than 3x, x axis in steps or tokens."""

from __future__ import annotations

import json
import math

import pytest

matplotlib = pytest.importorskip("matplotlib")

from gpt2lab.errors import UserError  # noqa: E402
from gpt2lab.metrics import plot_runs  # noqa: E402


def fake_run(path, tokens_per_step: int, start_loss: float = 4.0, end_loss: float = 1.2) -> None:
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(10, 501, 10):
            loss = end_loss + (start_loss - end_loss) * math.exp(-step / 80)
            f.write(json.dumps({"event": "train", "step": step, "loss": loss, "lr": 1e-3 * min(1, step / 50),
                                "tokens": step * tokens_per_step}) + "\n")
            if step % 100 == 0:
                f.write(json.dumps({"event": "eval", "step": step, "val_loss": loss + 0.1}) + "\n")


def axes_of(monkeypatch):
    """Capture the figure plot_runs draws (its axes) instead of reading pixels back."""
    import matplotlib.figure

    seen = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        seen["axes"] = fig.axes
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return seen


def test_single_run_has_log_loss_and_an_lr_panel(tmp_path, monkeypatch):
    fake_run(tmp_path / "a", 768)
    seen = axes_of(monkeypatch)
    out = plot_runs([tmp_path / "a"], tmp_path / "a.png")
    assert out.stat().st_size > 10_000
    loss_ax, lr_ax = seen["axes"]
    assert loss_ax.get_yscale() == "log"  # 4.0 -> 1.2 spans more than 3x
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "val loss"]
    assert lr_ax.get_ylabel() == "learning rate" and max(lr_ax.get_lines()[0].get_ydata()) == pytest.approx(1e-3)


def test_overlay_in_tokens_lines_up_runs_of_different_batch_sizes(tmp_path, monkeypatch):
    fake_run(tmp_path / "a", 768)
    fake_run(tmp_path / "b", 1536, start_loss=2.0, end_loss=1.5)
    seen = axes_of(monkeypatch)
    plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "ab.png", x="tokens")
    loss_ax, lr_ax = seen["axes"]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["a: train loss", "a: val loss", "b: train loss", "b: val loss"]
    train_b = loss_ax.get_lines()[2]
    assert train_b.get_xdata()[-1] == 500 * 1536  # tokens seen, not steps
    val_a = loss_ax.get_lines()[1]
    assert list(val_a.get_xdata()) == [s * 768 for s in (100, 200, 300, 400, 500)]
    assert lr_ax.get_xlabel() == "tokens seen"


def test_narrow_range_stays_linear_and_bad_x_is_one_line(tmp_path, monkeypatch):
    fake_run(tmp_path / "a", 768, start_loss=1.6, end_loss=1.2)
    seen = axes_of(monkeypatch)
    plot_runs([tmp_path / "a"], tmp_path / "a.png")
    assert seen["axes"][0].get_yscale() == "linear"
    with pytest.raises(UserError, match="--x 'time' is not one of step, tokens"):
        plot_runs([tmp_path / "a"], tmp_path / "a.png", x="time")


def test_plot_command_overlays_runs(tmp_path, monkeypatch, capsys):
    from gpt2lab.cli import main

    fake_run(tmp_path / "a", 768)
    fake_run(tmp_path / "b", 1536)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "a", "b", "--x", "tokens", "--linear"]) == 0
    assert (tmp_path / "loss_comparison.png").stat().st_size > 10_000
    assert main(["plot", "a"]) == 0 and (tmp_path / "a" / "loss.png").is_file()
    assert capsys.readouterr().out.split() == ["loss_comparison.png", "a/loss.png"]
