"""`gpt2lab convert`: export a model to a directory Hugging Face loads unchanged.

    gpt2lab convert --init runs/shakespeare --out hf_shakespeare
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf_shakespeare')"
    gpt2lab convert --init runs/ft/adapter --out ft_peft --format peft    # a LoRA adapter for peft
    gpt2lab convert --init runs/gpt2 --out model.gguf --format gguf --outtype q8_0   # llama.cpp, Ollama

`--out` must be new, empty or an earlier export of the same format (replaced only with --force):
a file, a run directory, a checkpoint or any other directory is refused before any work. For gguf,
`--out` is a file: new, or a GGUF file gpt2lab wrote (replaced only with --force).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.commands.common import HelpFormatter, add_model_arguments

FORMATS = {
    "hf": "config.json + model.safetensors + tokenizer files for GPT2LMHeadModel / AutoTokenizer",
    "peft": "a LoRA adapter (--init ADAPTER_DIR) as adapter_config.json + adapter_model.safetensors for "
            "peft.PeftModel.from_pretrained(base, dir); export the base with --format hf",
    "gguf": "one .gguf file (weights + tokenizer) for llama.cpp, Ollama and LM Studio; --out is a file",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    add_model_arguments(parser, init_required=True, device_default="cpu", dtype_default="fp32",
                        dtype_help="dtype of the written weights (auto = as stored)")
    parser.add_argument("--out", required=True, metavar="DIR|FILE",
                        help="output directory (for gguf: file): new, empty, or an earlier export of this format "
                             "(with --force)")
    parser.add_argument("--format", default="hf", choices=list(FORMATS),
                        help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"],
                        help="GGUF weight type (--format gguf only): f32 exact, f16 half the size, q8_0 8-bit "
                             "blocks (a quarter of f32)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export of the same format in --out")


def run(args: argparse.Namespace) -> int:
    from gpt2lab import hf, lora
    from gpt2lab.errors import UserError
    from gpt2lab.fileio import check_output_dir
    from gpt2lab.loading import chat_template_of, load_config, load_model

    if args.outtype != "f32" and args.format != "gguf":
        raise UserError(f"--outtype applies to --format gguf only; drop it for --format {args.format}")
    if args.format == "gguf":
        return _export_gguf(args)
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


def _export_gguf(args: argparse.Namespace) -> int:
    from gpt2lab import gguf_export
    from gpt2lab.errors import UserError
    from gpt2lab.fileio import check_export_file
    from gpt2lab.loading import load_config, load_model, load_tokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'gpt2lab[gguf]'") from None
    if args.dtype not in ("fp32", "auto"):
        raise UserError(f"--dtype {args.dtype} does not apply to --format gguf; choose the weight type with --outtype")
    out = check_export_file(args.out, kind="GGUF file", is_same_kind=gguf_export.is_gguf_export, force=args.force)
    # refuse before reading any weights
    gguf_export.check_gguf_compatible(load_config(args.init), load_tokenizer(args.init))
    model, tokenizer = load_model(args.init, device=args.device, dtype="fp32")
    gguf_export.save_gguf(model, tokenizer, out, outtype=args.outtype, name=Path(args.init).name or args.init)
    size = out.stat().st_size
    print(f"wrote {out} ({args.outtype}, {size / 2**20:,.1f} MiB)")
    print(f"run it with: llama_cpp.Llama({str(out)!r}), or `ollama create NAME -f Modelfile` with a Modelfile "
          f"that says FROM {out}")
    return 0
