"""`gpt2lab merge-lora`: fold a LoRA adapter into its base and save a plain checkpoint.

    gpt2lab merge-lora --adapter out/finetune_alpaca/adapter --out out/alpaca_merged
    gpt2lab sample --init out/alpaca_merged ...

The base is the one the adapter records (its `--init` at finetuning time) unless `--init` names
another with the same architecture. The result loads anywhere a checkpoint does, with no LoRA code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.commands.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory (adapter_config.json)")
    add_model_arguments(parser, init_help="base model (default: the base recorded in the adapter)",
                        device_default="cpu", dtype_default="fp32", dtype_help="dtype of the merged weights")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory of the merged checkpoint: new, empty, or an earlier merge-lora output "
                             "(with --force); never a run directory")
    parser.add_argument("--force", action="store_true", help="replace an earlier merge-lora output in --out")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.checkpoint import is_merged_checkpoint, save_checkpoint
    from gpt2lab.fileio import check_output_dir
    from gpt2lab.loading import chat_template_of, load_adapted_model
    from gpt2lab.lora import merge_lora

    check_output_dir(args.out, kind="merge-lora output", is_same_kind=is_merged_checkpoint, force=args.force)
    model, tokenizer, adapter = load_adapted_model(args.adapter, args.init, device=args.device, dtype=args.dtype)
    merge_lora(model)
    extra = {"lora_merged": {"adapter": str(Path(args.adapter).resolve()), "base": args.init or adapter["base"]["init"],
                             "r": adapter["r"], "alpha": adapter["alpha"]}}
    template = chat_template_of(args.adapter)  # the merged model keeps the chat template it was finetuned with
    if template is not None:
        extra["chat_template"] = template
    save_checkpoint(args.out, model, model.config, tokenizer.to_dict(), extra=extra)
    print(f"merged {args.adapter} into {extra['lora_merged']['base']} -> {args.out}")
    return 0
