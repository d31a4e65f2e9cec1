"""Where a run's metrics go: the console, metrics.jsonl, TensorBoard, W&B, and the loss plot.

    logger = RunLogger(run_dir, cfg.log, total_steps=5000, enabled=env.is_main)
    logger.log("train", step, {"loss": 2.31, "lr": 1e-3, ...})
    logger.log("eval", step, {"val_loss": 2.05})
    logger.print("a sample ...")
    logger.close()

Every event is one JSON object per line of `<run_dir>/metrics.jsonl`: {"event", "step", "time", ...}.
The console shows a live progress line (rich) when it is a terminal, plain lines otherwise. Only
rank 0 logs (`enabled=False` elsewhere). TensorBoard, W&B and matplotlib are imported lazily.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from gpt2lab.config import LogConfig
from gpt2lab.errors import UserError

METRICS_FILE = "metrics.jsonl"
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
    parts = [f"loss {m['loss']:.4f}", f"lr {m['lr']:.1e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.0f}%")
    parts.append(f"ETA {format_duration(m.get('eta_s', float('nan')))}")
    return "  ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The events of a run's metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: is it a gpt2lab run directory?")
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop events after `step` (used when resuming from the checkpoint of `step`, so the log tells the
    history the resumed run actually has)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [json.dumps(e) for e in read_metrics(run_dir) if e.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


class RunLogger:
    """Fans events out to the console, metrics.jsonl, TensorBoard and W&B. A no-op when not `enabled`."""

    def __init__(self, run_dir: str | Path, cfg: LogConfig, *, total_steps: int, enabled: bool = True,
                 config: dict | None = None, start_step: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._tb = self._wandb = self._progress = self._task = None
        if not enabled:
            return
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
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
        if cfg.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=12),
                                      TextColumn("{task.fields[info]}"), refresh_per_second=4)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def print(self, message: str) -> None:
        """A line for the person watching (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def log(self, event: str, step: int, metrics: dict[str, Any]) -> None:
        """Record one event ("train", "eval", "hellaswag", ...) of optimizer step `step` in every sink."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(f"{event}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{event}/{k}": v for k, v in numbers.items()}, step=step)
        if event == "train":
            line = format_train_line(step, self.total_steps, metrics)
            if self._progress is not None:
                self._progress.update(self._task, completed=step, info=format_progress_info(metrics))
            else:
                self.print(line)
        else:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            self.print(f"step {step}/{self.total_steps} | {event}: {shown}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
        self.enabled = False


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the train and val loss of a run (from metrics.jsonl) against the step; returns the PNG path."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(run_dir)
    series: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for e in events:  # a later event of the same step (after a resume) replaces an earlier one
        if e.get("event") == "train" and "loss" in e:
            series["train"][e["step"]] = e["loss"]
        elif e.get("event") == "eval" and "val_loss" in e:
            series["val"][e["step"]] = e["val_loss"]
    if not series["train"] and not series["val"]:
        raise UserError(f"{run_dir}/{METRICS_FILE} has no train or eval losses to plot yet")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, style in (("train", "-"), ("val", "o-")):
        if series[name]:
            steps = sorted(series[name])
            ax.plot(steps, [series[name][s] for s in steps], style, label=f"{name} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
