"""`lm_eval --model gpt2lab`: any model gpt2lab loads, evaluated by lm-evaluation-harness without export.

    lm_eval --model gpt2lab --model_args init=out/run,dtype=auto --tasks hellaswag,arc_easy

model_args: init (any `--init`: a run, checkpoint, LoRA adapter (kept unmerged), HF directory, hub id
or random:<preset>; default gpt2), dtype (fp32, bf16, fp16 or auto, as `gpt2lab eval --dtype`;
default fp32), max_length (default: block_size); lm-eval's --batch_size (a number or auto) and
--device are honoured. The scoring is `gpt2lab.evaluate.harness.HarnessLM`.

lm-eval finds the backend through the entry point `gpt2lab = "gpt2lab.lm_eval:GPT2LabLM"` of the
group "lm_eval.models" (pyproject.toml). lm-eval releases that do not read that group yet get it
from `gpt2lab_lm_eval.pth`, installed with gpt2lab, which runs `gpt2lab.lm_eval_plugin` at Python
start-up: a hook that adds the entry points when lm-eval's model registry is first imported.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model

from gpt2lab.evaluate.harness import HarnessLM

NAME = "gpt2lab"
DEFAULT_BATCH_SIZE = 32
"""Pairs per forward pass for --batch_size auto or none (CPU-sized: scoring rows are short)."""


@register_model(NAME)
class GPT2LabLM(HarnessLM):
    """lm-eval's `--model gpt2lab`: loads `init` (gpt2lab.loading.load_model) and scores it with HarnessLM."""

    def __init__(self, init: str = "gpt2", dtype: str = "fp32", device: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_length: int | None = None, **unused: Any) -> None:
        from gpt2lab.console import say
        from gpt2lab.devices import resolve_device
        from gpt2lab.dtype_choice import ForwardPasses, load_dtype, resolve
        from gpt2lab.errors import UserError
        from gpt2lab.generate import optimize_for_decoding
        from gpt2lab.loading import load_model

        if unused:
            raise UserError(f"--model_args {', '.join(unused)}: unknown to --model gpt2lab; it takes init, "
                            "dtype and max_length")
        import torch

        rows = _batch_size(batch_size, max_batch_size)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            say(f"note: --device {device} (lm-eval's default) but torch sees no CUDA GPU: running on the CPU")
            device = "cpu"
        device = resolve_device(str(device) if device else "auto")
        model, tokenizer = load_model(str(init), device=device, dtype=load_dtype(str(dtype), device),
                                      merge_adapter=False)
        resolved = resolve(str(dtype), device, ForwardPasses(model, rows, model.config.block_size))
        if resolved.dtype is not None:
            model.to(resolved.dtype)
        if resolved.line:
            say(f"note: {resolved.line}")
        optimize_for_decoding(model.eval())  # inference only: on a CPU, oneDNN-packed linear layers
        super().__init__(model, tokenizer, batch_size=rows, max_length=max_length)
        self.init = str(init)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def get_model_info(self) -> dict:
        return {"model_init": self.init, "model_block_size": self.model.config.block_size}


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's --batch_size (N, "auto" or "auto:K") as pairs per forward pass."""
    from gpt2lab.errors import UserError

    text = str(batch_size) if batch_size is not None else "auto"
    if text.startswith("auto"):
        return min(DEFAULT_BATCH_SIZE, max_batch_size or DEFAULT_BATCH_SIZE)
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch_size {text}: expected a positive number or auto")
    return int(text)
