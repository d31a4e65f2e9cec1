"""`gpt2lab merge-lora`: fold a LoRA adapter into its base and save a plain checkpoint.

    gpt2lab merge-lora --adapter out/finetune_alpaca/adapter --out out/alpaca_merged
    gpt2lab sample --init out/alpaca_merged ...

The base is the one the adapter records (its `--init` at finetuning time) unless `--init` names
another with the same architecture. The result loads anywhere a checkpoint does, with no LoRA code.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory (adapter_config.json)")
    parser.add_argument("--init", metavar="BASE", help="base model (default: the base recorded in the adapter)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory of the merged checkpoint")
    parser.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.lora import load_adapted_model, merge_lora

    model, tokenizer, adapter = load_adapted_model(args.adapter, args.init, device=args.device, dtype="fp32")
    merge_lora(model)
    extra = {"lora_merged": {"adapter": str(Path(args.adapter).resolve()), "base": args.init or adapter["base"]["init"],
                             "r": adapter["r"], "alpha": adapter["alpha"]}}
    save_checkpoint(args.out, model, model.config, tokenizer.to_dict(), extra=extra)
    print(f"merged {args.adapter} into {extra['lora_merged']['base']} -> {args.out}")
    return 0
