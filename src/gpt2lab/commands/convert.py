"""`gpt2lab convert`: export a model to a directory Hugging Face loads unchanged.

    gpt2lab convert --init runs/shakespeare --out hf_shakespeare
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf_shakespeare')"
    gpt2lab convert --init runs/ft/adapter --out ft_peft --format peft    # a LoRA adapter for peft

`--out` must be new, empty or an earlier export of the same format (replaced only with --force):
a file, a run directory, a checkpoint or any other directory is refused before any work.
"""

from __future__ import annotations

import argparse

from gpt2lab.commands.common import HelpFormatter, add_model_arguments

FORMATS = {
    "hf": "config.json + model.safetensors + tokenizer files for GPT2LMHeadModel / AutoTokenizer",
    "peft": "a LoRA adapter (--init ADAPTER_DIR) as adapter_config.json + adapter_model.safetensors for "
            "peft.PeftModel.from_pretrained(base, dir); export the base with --format hf",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    add_model_arguments(parser, init_required=True, device_default="cpu", dtype_default="fp32",
                        dtype_help="dtype of the written weights (auto = as stored)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: new, empty, or an earlier export of this format (with --force)")
    parser.add_argument("--format", default="hf", choices=list(FORMATS),
                        help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    parser.add_argument("--force", action="store_true", help="replace an earlier export of the same format in --out")


def run(args: argparse.Namespace) -> int:
    from gpt2lab import hf, lora
    from gpt2lab.errors import UserError
    from gpt2lab.fileio import check_output_dir
    from gpt2lab.loading import chat_template_of, load_config, load_model

    if args.format == "peft":
        if not lora.is_adapter(args.init):
            raise UserError(f"--format peft exports a LoRA adapter: --init {args.init} is not an adapter directory "
                            "(adapter_config.json)")
        check_output_dir(args.out, kind="PEFT adapter", is_same_kind=lora.is_peft_export, force=args.force)
        hf.check_hf_compatible(load_config(args.init))
        model, _ = load_model(args.init, device=args.device, dtype=args.dtype, merge_adapter=False)
        base = lora.read_adapter_config(args.init)["base"]["init"]
        out = lora.save_peft_adapter(args.out, model, base)
        print(f"wrote {out} (adapter_config.json, {lora.PEFT_WEIGHTS})")
        print(f"load it with: peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE_HF_DIR), "
              f"{str(out)!r}), BASE_HF_DIR = `gpt2lab convert --init {base} --out DIR`")
        return 0
    check_output_dir(args.out, kind="HF export", is_same_kind=hf.is_hf_export, force=args.force)
    hf.check_hf_compatible(load_config(args.init))  # refuse before reading any weights
    model, tokenizer = load_model(args.init, device=args.device, dtype=args.dtype)
    out = hf.save_hf_model(model, args.out, tokenizer, chat_template=chat_template_of(args.init))
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"wrote {out} ({files})")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}) and "
          f"transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0
