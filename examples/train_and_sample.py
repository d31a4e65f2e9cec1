"""Train a small model from Python with the same trainer as `gpt2lab train`, then sample from it.

    python examples/train_and_sample.py --out out/example --steps 300
"""

import argparse

import gpt2lab

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="out/example", help="run directory (must not hold a run yet)")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--data", default="data/default", help="prepared data (made on first use from Python's docs)")
args = parser.parse_args()

# The quickstart preset with a few fields changed: dotted keys as on the command line, or whole sections.
result = gpt2lab.train(
    "quickstart",
    **{"train.max_steps": args.steps, "checkpoint.out_dir": args.out, "data.dir": args.data},
    optim={"warmup_steps": 20},
)
print(f"trained {result.step} steps: val loss {result.val_loss:.3f}, checkpoint {result.checkpoint}")

lm = gpt2lab.load(args.out)
print(lm.generate("The ", max_new_tokens=200, temperature=0.8, seed=0))
