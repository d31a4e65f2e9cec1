"""GGUF export: one file that llama.cpp, Ollama and LM Studio run (llama.cpp's `gpt2` architecture).

    save_gguf(model, tokenizer, "model.gguf", outtype="q8_0")   # what `gpt2lab convert --format gguf` does
    llama_cpp.Llama("model.gguf")                              # or: ollama create NAME -f Modelfile

Written with `gguf`, llama.cpp's own Python writer: GPT-2 hyperparameters, the weights under
llama.cpp's tensor names, and the tokenizer embedded (byte-level BPE vocabulary and merges,
`<|endoftext|>` as bos/eos). gpt2lab's Linear weights are (out, in) like llama.cpp's, so no weight is
transposed; the tied LM head is not written (llama.cpp then reads the token embedding as the output
matrix); a bias-free model gets zero biases, which compute what no biases do. GGUF lists each shape
innermost first: a (out, in) array is ne = [in, out] in the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from gpt2lab.architecture import GPTConfig, gpt2_problems
from gpt2lab.errors import UserError
from gpt2lab.fileio import atomic_path
from gpt2lab.model import GPT
from gpt2lab.tokenizer import ByteLevelBPE, Tokenizer, byte_level_bpe

OUTTYPES = {
    "f32": "every tensor in float32 (exact: the same logits as gpt2lab fp32)",
    "f16": "matrices in float16, norms, biases and positions in float32 (half the size)",
    "q8_0": "matrices in llama.cpp's 8-bit blocks (32 weights share one scale), the rest in float32",
}
EXPORT_KEY = "gpt2lab.export_version"
"""A metadata entry that marks a file gpt2lab wrote (so `--force` may replace it and nothing else)."""
EXPORT_VERSION = 1
_LAYER_NAMES = {  # gpt2lab module in a block -> llama.cpp tensor in blk.N
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_KEEP_F32 = ("position_embd.weight",)  # llama.cpp's converter keeps position tables in float32 too
_QUANT_BLOCK = 32  # q8_0 quantizes rows in blocks of 32: a row of another length is written in f16


def gguf_problems(config: GPTConfig, tokenizer: Tokenizer) -> list[str]:
    """What llama.cpp's `gpt2` architecture cannot express about this model and tokenizer (none: [])."""
    problems = gpt2_problems(config, "llama.cpp's gpt2")
    if byte_level_bpe(tokenizer) is None:
        problems.append(f"the {tokenizer.name} tokenizer (a GGUF gpt2 model embeds a byte-level BPE tokenizer)")
    return problems


def check_gguf_compatible(config: GPTConfig, tokenizer: Tokenizer) -> None:
    """UserError, in one line that says what can be exported instead, when llama.cpp cannot run the model."""
    problems = gguf_problems(config, tokenizer)
    if not problems:
        return
    architecture_ok = all(p.startswith("the ") for p in problems)
    instead = ("export it with --format hf (transformers reads its tokenizer) or use the gpt2lab checkpoint "
               "itself (sample, chat, eval and bench read it)" if architecture_ok else
               "use the gpt2lab checkpoint itself (sample, chat, eval and bench read it), or train with "
               "pos_emb=learned, n_kv_head=n_head, no sliding_window and a BPE tokenizer to get an exportable model")
    raise UserError(f"cannot export to GGUF: {'; '.join(problems)}; {instead}")


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's gpt2 names, float32 on the CPU, (out, in) as stored:
    embedding rows trimmed to vocab_size, the tied LM head left out, zeros for absent biases."""
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["transformer.wte.weight"][: config.vocab_size],
           "position_embd.weight": state["transformer.wpe.weight"]}
    for i in range(config.n_layer):
        for ours, theirs in _LAYER_NAMES.items():
            weight = state[f"transformer.h.{i}.{ours}.weight"]
            bias = state.get(f"transformer.h.{i}.{ours}.bias")
            out[f"blk.{i}.{theirs}.weight"] = weight
            out[f"blk.{i}.{theirs}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    norm_bias = state.get("transformer.ln_f.bias")
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    out["output_norm.bias"] = norm_bias if norm_bias is not None else torch.zeros(config.n_embd)
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_entries(bpe: ByteLevelBPE, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges "a b") of the GGUF tokenizer of `bpe` for a model of `vocab_size`
    ids: ids the model has beyond the tokenizer's become unused placeholder tokens."""
    import gguf

    tokens = list(bpe.tokens)
    types = [int(gguf.TokenType.CONTROL if i in bpe.special_ids else gguf.TokenType.NORMAL)
             for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, types, [f"{a} {b}" for a, b in bpe.merges]


def save_gguf(model: GPT, tokenizer: Tokenizer, path: str | os.PathLike, outtype: str = "f32",
              name: str = "gpt2lab model") -> Path:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp loads (see the module docstring);
    `outtype` is a key of OUTTYPES. The file appears whole or not at all (written beside `path`, then
    renamed). A model llama.cpp's gpt2 cannot express raises UserError before anything is written."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    config = model.config
    check_gguf_compatible(config, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}; "
                        "they do not belong together")
    bpe = byte_level_bpe(tokenizer)
    tokens, types, merges = tokenizer_entries(bpe, config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        try:
            writer.add_name(name)
            writer.add_uint32(EXPORT_KEY, EXPORT_VERSION)
            writer.add_context_length(config.block_size)
            writer.add_embedding_length(config.n_embd)
            writer.add_feed_forward_length(4 * config.n_embd)
            writer.add_block_count(config.n_layer)
            writer.add_head_count(config.n_head)
            writer.add_layer_norm_eps(config.layer_norm_eps)
            writer.add_file_type(file_type)
            if outtype == "q8_0":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(bpe.pre_tokenizer)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            if tokenizer.eot_id is not None:
                writer.add_bos_token_id(tokenizer.eot_id)
                writer.add_eos_token_id(tokenizer.eot_id)
            writer.add_add_bos_token(False)  # GPT-2 prompts start with their own text
            for tensor_name, tensor in gguf_tensors(model).items():
                data, qtype = _encode(tensor_name, tensor, outtype)
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def _encode(name: str, tensor: torch.Tensor, outtype: str):
    """(numpy data, GGML type or None) of one tensor for `outtype`: vectors and position tables stay
    float32, as llama.cpp's own converter keeps them."""
    import gguf

    data = tensor.numpy()
    if tensor.dim() == 1 or name in _KEEP_F32 or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % _QUANT_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype("float16"), None


def is_gguf_export(path: str | os.PathLike) -> bool:
    """True for a GGUF file gpt2lab wrote (EXPORT_KEY among its first metadata entries), False for
    anything else; reads only the file's first entries (a whole GGUF header takes seconds to parse)."""
    try:
        return EXPORT_KEY in _leading_keys(Path(path))
    except (OSError, struct.error, UnicodeDecodeError):  # unreadable or not GGUF: not ours either way
        return False


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _MAX_KEY, _MAX_STRING = 8, 256, 1 << 16


def _leading_keys(path: Path, limit: int = 16) -> set[str]:
    """The keys of a GGUF file's metadata entries before its first array (at most `limit`)."""
    keys: set[str] = set()
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return keys
        _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        for _ in range(min(n_kv, limit)):
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_KEY:
                break
            key = f.read(n).decode("utf-8")
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == _STRING:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > _MAX_STRING:
                    break
            elif vtype in _SCALAR_BYTES:
                size = _SCALAR_BYTES[vtype]
            else:  # an array: gpt2lab's mark comes before the tokenizer's
                break
            f.seek(size, os.SEEK_CUR)
            keys.add(key)
    return keys
