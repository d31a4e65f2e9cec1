"""gpt2lab: GPT-2 language models in plain PyTorch.

    from gpt2lab import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))
    logits, loss = model(idx, targets)
"""

from gpt2lab.model import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
__version__ = "0.1.0"
