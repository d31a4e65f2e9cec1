"""Score texts with a model: log-likelihood, token count and perplexity, as `gpt2lab eval perplexity`.

    python examples/score.py --init gpt2
"""

import argparse

import gpt2lab

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--init", default="gpt2")
args = parser.parse_args()

lm = gpt2lab.load(args.init)
texts = [
    "The cat sat on the mat.",
    "The mat sat on the cat.",
    "Colorless green ideas sleep furiously.",
]
for text, s in zip(texts, lm.score(texts)):
    print(f"{s.perplexity:10.2f} ppl  {s.loglikelihood:9.2f} nats over {s.tokens:3d} tokens  {text}")
