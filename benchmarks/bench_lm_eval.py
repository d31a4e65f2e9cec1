"""lm-evaluation-harness on HellaSwag: `--model gpt2lab` against `--model hf` on the exported model, same run.

    python benchmarks/bench_lm_eval.py                     # gpt2 (124M), 500 HellaSwag examples, batch 32
    python benchmarks/bench_lm_eval.py --limit 20 --preset gpt2-tiny    # a smoke test

Both backends score the same random GPT-2-shaped weights: gpt2lab's `GPT2LabLM` (what `lm_eval --model
gpt2lab` runs) on the checkpoint, lm-eval's `HFLM` (what `lm_eval --model hf` runs) on its `gpt2lab convert`
export, fp32, on the CPU, with the same --batch-size. The task is `hellaswag_local`, lm-eval's
multiple-choice HellaSwag over the shared data folder's HellaSwag file (a local task YAML written by
`gpt2lab.evaluate.lm_eval_task.write_local_tasks`, so it runs offline); its dataset is loaded once
before timing. Each backend's wall time is one `lm_eval.simple_evaluate` call (building the task's
requests, then scoring them); --reps N repeats both, alternating which goes first, and reports medians.
Printed: both wall times, the ratio, whether the metrics (acc, acc_norm) are equal, and the largest
per-request log-likelihood difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="HellaSwag examples (default: 500)")
    parser.add_argument("--preset", default="gpt2", help="model preset, random weights (default: gpt2, 124M)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both backends (default: 32)")
    parser.add_argument("--reps", type=int, default=1, help="timed runs of each backend (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from gpt2lab.bench import cpu_description
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.cli import main as gpt2lab_main
    from gpt2lab.evaluate.lm_eval_task import task_manager, write_local_tasks
    from gpt2lab.lm_eval import GPT2LabLM
    from gpt2lab.model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lm_eval_"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "datasets"))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset))
    save_checkpoint(tmp / "ckpt", model, model.config, {"kind": "gpt2"}, step=1)
    assert gpt2lab_main(["convert", "--init", str(tmp / "ckpt"), "--out", str(tmp / "hf")]) == 0
    write_local_tasks(tmp / "tasks", limit=args.limit)
    manager = task_manager([str(tmp / "tasks")])
    manager.load(["hellaswag_local"])  # the dataset is converted and cached here, outside the timing

    backends = {  # GPT2LabLM: what `lm_eval --model gpt2lab` builds (load_model, the CPU layout, HarnessLM)
        "gpt2lab": GPT2LabLM(init=str(tmp / "ckpt"), dtype="fp32", device="cpu", batch_size=args.batch_size),
        "hf": HFLM(pretrained=str(tmp / "hf"), batch_size=args.batch_size, device="cpu", dtype="float32"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    outputs: dict[str, dict] = {}
    for rep in range(args.reps):
        for name in (list(backends) if rep % 2 == 0 else list(reversed(backends))):
            start = time.perf_counter()
            outputs[name] = lm_eval.simple_evaluate(model=backends[name], tasks=["hellaswag_local"], limit=args.limit,
                                                    task_manager=manager, bootstrap_iters=0, log_samples=True)
            seconds[name].append(time.perf_counter() - start)

    def metrics(out: dict) -> dict[str, float]:
        return {k.split(",")[0]: v for k, v in out["results"]["hellaswag_local"].items()
                if k in ("acc,none", "acc_norm,none")}

    def loglikelihoods(out: dict) -> list[float]:
        samples = sorted(out["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
        return [resp[0][0] for s in samples for resp in s["resps"]]

    ours, theirs = metrics(outputs["gpt2lab"]), metrics(outputs["hf"])
    diff = max(abs(a - b) for a, b in zip(loglikelihoods(outputs["gpt2lab"]), loglikelihoods(outputs["hf"])))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    ratio = median["hf"] / median["gpt2lab"]
    print(f"HellaSwag ({args.limit} examples, {4 * args.limit} requests), {args.preset} random weights, fp32, "
          f"batch {args.batch_size}, median of {args.reps}")
    print(f"  lm_eval --model gpt2lab  {median['gpt2lab']:8.2f} s   acc {ours['acc']:.4f}  acc_norm {ours['acc_norm']:.4f}")
    print(f"  lm_eval --model hf       {median['hf']:8.2f} s   acc {theirs['acc']:.4f}  acc_norm {theirs['acc_norm']:.4f}")
    print(f"  gpt2lab is {ratio:.2f}x faster; metrics {'equal' if ours == theirs else 'DIFFERENT'}; "
          f"largest per-request log-likelihood difference {diff:.2e}")
    print(f"{cpu_description()}, torch {torch.__version__} ({torch.get_num_threads()} threads), lm_eval "
          f"{lm_eval.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        print(json.dumps({"seconds": median, "ratio": ratio, "metrics": {"gpt2lab": ours, "hf": theirs},
                          "metrics_equal": ours == theirs, "max_loglikelihood_diff": diff, "limit": args.limit,
                          "preset": args.preset, "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
