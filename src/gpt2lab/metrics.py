"""Where a run's metrics go: the console, metrics.jsonl, TensorBoard, W&B, and the loss plot.

    logger = RunLogger(run_dir, cfg.log, total_steps=5000, enabled=env.is_main)
    logger.log("train", step, {"loss": 2.31, "lr": 1e-3, ...})
    logger.log("eval", step, {"val_loss": 2.05})
    logger.print("a sample ...")
    logger.close()

Every event is one JSON object per line of `<run_dir>/metrics.jsonl`: {"event", "step", "time", ...}.
The console (stdout) shows plain lines, or on a terminal the live display of `gpt2lab.console` with
the lines above it. Only rank 0 logs (`enabled=False` elsewhere). TensorBoard, W&B and matplotlib
are imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2lab.config import LogConfig
from gpt2lab.console import ProgressDisplay, say
from gpt2lab.errors import UserError
from gpt2lab.fileio import atomic_file, iter_jsonl, write_atomic, write_error

METRICS_FILE = "metrics.jsonl"
EVENT_SHAPE = {"event": str, "step": int, "loss?": float, "val_loss?": float, "lr?": float, "tokens?": int}
"""What each line of metrics.jsonl holds (see `fileio.shape_problem`): the fields the plot and resume read."""
PLOT_FILE = "loss.png"


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 9.5 -> '9.5s'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_train_line(step: int, total: int, m: dict[str, Any]) -> str:
    """One console line of train metrics."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"grad norm {m['grad_norm']:.3f}",
             f"{m['tokens_per_s']:,.0f} tok/s"]
    per_device = m.get("tokens_per_s_per_device")
    if per_device is not None and per_device != m["tokens_per_s"]:  # several ranks
        parts[-1] += f" ({per_device:,.0f}/device)"
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"ETA {format_duration(m.get('eta_s', float('nan')))}")
    return " | ".join(parts)


def format_progress_info(m: dict[str, Any]) -> str:
    """The compact metrics shown next to the live progress bar."""
    parts = [f"loss {m['loss']:.4f}", f"lr {m['lr']:.1e}", f"grad norm {m['grad_norm']:.2f}",
             f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.0f}%")
    parts.append(f"ETA {format_duration(m.get('eta_s', float('nan')))}")
    return "  ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The events of a run's metrics.jsonl. A last line cut short by a crash mid-write (no newline after
    it) is skipped; any other line that is not an event (EVENT_SHAPE) is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: is it a gpt2lab run directory?")
    events, damaged = [], []

    def invalid(error: UserError) -> None:
        if damaged:  # a damaged line with more after it was not cut short by a crash
            raise damaged[0]
        damaged.append(error)

    for _, event in iter_jsonl(path, invalid, shape=EVENT_SHAPE, fix="remove the line or move the file away"):
        if damaged:
            raise damaged[0]
        events.append(event)
    if damaged and _ends_with_newline(path):
        raise damaged[0]
    return events


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop events after `step` (used when resuming from the checkpoint of `step`, so the log tells the
    history the resumed run actually has)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [json.dumps(e) for e in read_metrics(run_dir) if e.get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept))


class RunLogger:
    """Fans events out to the console, metrics.jsonl, TensorBoard and W&B. A no-op when not `enabled`."""

    def __init__(self, run_dir: str | Path, cfg: LogConfig, *, total_steps: int, enabled: bool = True,
                 config: dict | None = None, start_step: int = 0, console: Any = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._tb = self._wandb = None
        self._bar = ProgressDisplay("steps", enabled=False)
        self._info = ""
        self.live = False
        """True when a live progress bar is shown (a terminal): the trainer then updates it every step."""
        if not enabled:
            return
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._jsonl_error: UserError | None = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard is on but tensorboard is not installed: "
                                "pip install tensorboard (or set --log.tensorboard false)") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("log.wandb is on but wandb is not installed: pip install wandb "
                                "(or set --log.wandb false)") from None
            self._wandb = wandb.init(project=cfg.wandb_project, name=self.run_dir.name, config=config,
                                     dir=str(self.run_dir), resume="allow")
        self._bar = ProgressDisplay("steps", total=total_steps, completed=start_step, enabled=cfg.progress,
                                    console=console)
        self.live = self._bar.shown

    def print(self, message: str) -> None:
        """A line for the person watching (above the progress bar when there is one)."""
        if self.enabled:
            say(message, stdout=True)  # on a terminal, the live display shows it above the bar

    def set_total_steps(self, total_steps: int) -> None:
        """The run's step count changed (train.max_time fixed it): the bar and the log lines follow."""
        self.total_steps = total_steps
        self._bar.update(total=total_steps)

    def log(self, event: str, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        """Record one event ("train", "eval", "hellaswag", ...) of optimizer step `step` in every sink
        (`show` False: not on the console, which the caller informs in its own words)."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **metrics}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as e:  # a full disk: one line, and close() does not fail again on the unwritten rest
            self._jsonl_error = write_error(self.run_dir / METRICS_FILE, e)
            raise self._jsonl_error from None
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(f"{event}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{event}/{k}": v for k, v in numbers.items()}, step=step)
        if not show:
            return
        if event == "train":
            if self.live:
                self.update(step, metrics)
            else:
                self.print(format_train_line(step, self.total_steps, metrics))
        else:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            self.print(f"step {step}/{self.total_steps} | {event}: {shown}")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Move the live bar to `step` with these train metrics (nothing is written anywhere else)."""
        if self.live:
            self._info = format_progress_info(metrics)
            self._bar.update(completed=step, info=self._info)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Show "<name>..." on the live bar while the body runs (validation, a hook, a checkpoint)."""
        if not self.live:
            yield
            return
        self._bar.update(info=f"{name}...  (last: {self._info})" if self._info else f"{name}...")
        self._bar.refresh()
        try:
            yield
        finally:
            self._bar.update(info=self._info)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self.live = False
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self.enabled = False
        try:
            self._jsonl.close()
        except OSError as e:
            if self._jsonl_error is None:
                raise write_error(self.run_dir / METRICS_FILE, e) from None


PLOT_X = ("step", "tokens")


def _run_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """step -> value of a run's train loss, val loss, learning rate and tokens seen; a later event of
    the same step (after a resume) replaces an earlier one."""
    series: dict[str, dict[int, float]] = {"train": {}, "val": {}, "lr": {}, "tokens": {}}
    for e in read_metrics(run_dir):
        if e.get("event") == "train" and "loss" in e:
            series["train"][e["step"]] = e["loss"]
            if "lr" in e:
                series["lr"][e["step"]] = e["lr"]
            if "tokens" in e:
                series["tokens"][e["step"]] = e["tokens"]
        elif e.get("event") == "eval" and "val_loss" in e:
            series["val"][e["step"]] = e["val_loss"]
    if not series["train"] and not series["val"]:
        raise UserError(f"{run_dir}/{METRICS_FILE} has no train or eval losses to plot yet")
    return series


def _tokens_at(series: dict[str, dict[int, float]], steps: list[int]) -> list[float]:
    """Tokens seen after each step: logged with train events; val steps use the run's tokens per step."""
    known = series["tokens"]
    per_step = next((known[s] / s for s in sorted(known) if s > 0), None)
    if per_step is None:
        raise UserError("the run logged no token counts; plot it with --x step")
    return [known.get(s, s * per_step) for s in steps]


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "step", log_scale: bool | None = None) -> Path:
    """Loss curves of one or more runs on one figure (train lines, val markers, one colour per run)
    above a learning-rate panel; returns the PNG path.

    x: "step" or "tokens" (tokens seen, comparable across batch sizes). log_scale: a log loss axis;
    None = log when the losses span more than 3x (the first steps' ~ln(vocab) would otherwise flatten
    the interesting range)."""
    from gpt2lab.fileio import check_output_file

    if x not in PLOT_X:
        raise UserError(f"--x {x!r} is not one of {', '.join(PLOT_X)}")
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), _run_series(Path(d))) for d in run_dirs]
    check_output_file(out, "-o")
    names = [d.resolve().name for d, _ in runs]
    if len(set(names)) < len(names):  # same folder names: tell them apart by the full path
        names = [str(d) for d, _ in runs]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    losses: list[float] = []
    for (_, series), name, color in zip(runs, names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        label = "" if len(runs) == 1 else f"{name}: "
        for kind, style in (("train", "-"), ("val", "o--")):
            steps = sorted(series[kind])
            if not steps:
                continue
            xs = _tokens_at(series, steps) if x == "tokens" else steps
            values = [series[kind][s] for s in steps]
            losses += values
            ax.plot(xs, values, style, color=color, markersize=3.5, linewidth=1.2 if kind == "train" else 1.0,
                    alpha=0.85 if kind == "train" else 1.0, label=f"{label}{kind} loss")
        if series["lr"]:
            steps = sorted(series["lr"])
            xs = _tokens_at(series, steps) if x == "tokens" else steps
            ax_lr.plot(xs, [series["lr"][s] for s in steps], color=color, linewidth=1.2)
    finite = [v for v in losses if math.isfinite(v) and v > 0]
    if log_scale is None:
        log_scale = bool(finite) and max(finite) / min(finite) > 3
    if log_scale:
        from matplotlib import ticker

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # 2.5, not 2.5 x 10^0
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("loss (nats/token)" + (", log scale" if log_scale else ""))
    ax.set_title(names[0] if len(runs) == 1 else f"{len(runs)} runs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen" if x == "tokens" else "step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    out = Path(out)
    try:
        with atomic_file(out, "wb") as f:  # a full disk is one line, and never leaves half a picture
            fig.savefig(f, format=out.suffix[1:].lower() or None, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's loss and learning rate against the step to <run_dir>/loss.png (or `out`)."""
    return plot_runs([run_dir], Path(out) if out is not None else Path(run_dir) / PLOT_FILE)
