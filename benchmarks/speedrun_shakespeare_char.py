"""Shakespeare-char speedrun on a CPU: the lowest full-val-split loss in a fixed wall-clock budget.

    python benchmarks/speedrun_shakespeare_char.py                        # nanoGPT's CPU recipe vs ours
    python benchmarks/speedrun_shakespeare_char.py --recipes ours --input /path/to/input.txt

Each recipe is a `gpt2lab train` run in its own process, timed from launch to exit (start-up, data
loading, training, in-training evals, checkpoint and plot included). Afterwards its final checkpoint
is scored on the WHOLE validation split (111,540 characters, every full block once), the same way for
every recipe, so the comparison does not depend on each recipe's own eval settings.

Recipes:
- `nanogpt`: nanoGPT's documented CPU run, `python train.py config/train_shakespeare_char.py
  --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
  --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`
  (lr 1e-3 -> 1e-4 cosine, 100 warmup steps, beta2 0.99, no biases), in gpt2lab's trainer.
- `ours`: configs/shakespeare_char_cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_INPUT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

NANOGPT_CPU = {
    "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "model.block_size": 64, "model.dropout": 0.0,
    "model.bias": False, "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 100,
    "optim.betas": "[0.9,0.99]", "optim.weight_decay": 0.1, "optim.schedule": "cosine",
    "train.max_steps": 2000, "train.tokens_per_step": 768, "train.micro_batch_size": 12,
    "train.eval_every": 250, "train.eval_batches": 20, "train.sample_tokens": 0, "train.log_every": 100,
    "checkpoint.every": 0,
}
RECIPES: dict[str, tuple[str, dict]] = {
    "nanogpt": ("shakespeare_char", NANOGPT_CPU),
    "ours": ("shakespeare_char_cpu", {}),
}


def prepare_data(data_dir: Path, input_path: str | None) -> None:
    from gpt2lab.data.prepare import prepare

    if input_path is None and SHARED_INPUT.is_file():
        input_path = str(SHARED_INPUT)
    prepare("shakespeare_char", data_dir, input_path=input_path, progress=False)


@torch.no_grad()
def full_val_loss(run_dir: Path, data_dir: Path) -> float:
    """Mean loss per character over every full block of the val split (batches of 64 blocks)."""
    from gpt2lab.data.loader import iter_eval_batches
    from gpt2lab.loading import load_model

    model, _ = load_model(str(run_dir), device="cpu")
    total, count = 0.0, 0
    for x, y in iter_eval_batches(data_dir, "val", model.config.block_size, 64, None):
        _, loss = model(x, y, loss_reduction="sum")
        total += loss.item()
        count += y.numel()
    return total / count


MARK = ".speedrun_shakespeare_char"
"""The file that marks an --out folder as this script's own: only such a folder's runs are replaced."""


def claim_out(out: Path) -> None:
    """Make `out` this script's folder for new runs: a missing or empty folder is created and marked;
    a marked one loses the recipes' runs of an earlier call (nothing else in it is touched); any
    other folder is refused (SystemExit, one line): it is not this script's to replace."""
    import shutil

    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; name a folder for the runs")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise SystemExit(f"--out {out} holds files this script did not make; name a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).touch()
    for name in RECIPES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def run_recipe(name: str, data_dir: Path, out: Path, threads: int | None, extra: dict | None = None) -> dict:
    config, overrides = RECIPES[name]
    overrides = {**overrides, **(extra or {})}
    run_dir = out / name
    args = [sys.executable, "-m", "gpt2lab", "train", "--config", config, "--out", str(run_dir),
            "--data.dir", str(data_dir), "--data.prepare", "null", "--log.progress", "false"]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    env = {**os.environ}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    steps = max(e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
    return {"recipe": name, "config": config, "overrides": extra or {}, "wall_s": round(wall, 1), "steps": steps,
            "full_val_loss": round(full_val_loss(run_dir, data_dir), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="nanogpt,ours", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--out", default="out/speedrun",
                        help="where the runs go: a new or empty folder, or one an earlier call made (its runs are replaced)")
    parser.add_argument("--data", default="data/shakespeare_char", help="prepared dataset dir (made if missing)")
    parser.add_argument("--input", help="Tiny Shakespeare input.txt (default: shared copy or download)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the `ours` recipe, e.g. --set train.max_time=100s (repeatable)")
    args = parser.parse_args()
    out, data_dir = Path(args.out), Path(args.data)
    claim_out(out)
    prepare_data(data_dir, args.input)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other processes slow the runs down
    extra = dict(item.split("=", 1) for item in args.set)
    results = [run_recipe(name, data_dir, out, args.threads, extra if name == "ours" else None)
               for name in args.recipes.split(",")]
    for r in results:
        print(f"{r['recipe']:<8} {r['config']:<22} full-val loss {r['full_val_loss']:.4f}   wall {r['wall_s']:.1f} s"
              f"   {r['steps']} steps")
    print(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "load_before": load_before,
                      "results": results}))


if __name__ == "__main__":
    main()
