"""Load a model and generate text from Python.

    python examples/generate.py                       # OpenAI's gpt2 (downloaded once)
    python examples/generate.py --init out/quickstart # a run of `gpt2lab train`
"""

import argparse

import torch

import gpt2lab

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--init", default="gpt2", help="any --init gpt2lab takes: hub id, HF dir, run, checkpoint")
parser.add_argument("--prompt", default="The meaning of life is")
args = parser.parse_args()

lm = gpt2lab.load(args.init)
print(lm)

# One prompt in, one text out; temperature 0 is greedy, a seed makes sampling repeatable.
print(lm.generate(args.prompt, max_new_tokens=40, temperature=0.8, top_k=50, seed=0))

# Several prompts at once.
for text in lm.generate([args.prompt, "Once upon a time"], max_new_tokens=20, temperature=0):
    print(repr(text))

# Streaming: pieces arrive as they are decoded.
for piece in lm.stream(args.prompt, max_new_tokens=20, temperature=0):
    print(piece, end="", flush=True)
print()

# The model itself, nanoGPT style: a (batch, time) tensor of ids in, prompt + continuation out.
idx = torch.tensor([lm.encode(args.prompt)])
out = lm.model.generate(idx, max_new_tokens=10, temperature=0)  # (1, time + 10)
print(lm.decode(out[0].tolist()))
