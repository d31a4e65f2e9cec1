"""`gpt2lab convert`: export a model to a directory Hugging Face `transformers` loads unchanged.

    gpt2lab convert --init runs/shakespeare --out hf_shakespeare
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf_shakespeare')"
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True,
                        help="a checkpoint directory, a run directory (latest checkpoint), an HF directory, "
                             "gpt2|gpt2-medium|... or random:<preset>")
    parser.add_argument("--out", required=True, help="output directory (created; files in it are overwritten)")
    parser.add_argument("--format", default="hf", choices=["hf"],
                        help="hf: config.json + model.safetensors (+ GPT-2 tokenizer files) for GPT2LMHeadModel")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")


def run(args: argparse.Namespace) -> int:
    from gpt2lab.hf import check_hf_compatible, save_hf_model
    from gpt2lab.loading import load_config, load_model

    check_hf_compatible(load_config(args.init))  # refuse before reading any weights
    model, tokenizer = load_model(args.init, device="cpu", dtype=args.dtype)
    out = save_hf_model(model, args.out, tokenizer)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"wrote {out} ({files})")
    if tokenizer.to_dict() != {"kind": "gpt2"}:
        print(f"note: no tokenizer files written: HF has no equivalent of the {tokenizer.name} tokenizer")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0
