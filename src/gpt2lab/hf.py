"""Hugging Face GPT-2 <-> gpt2lab: a key map, four transposes and a config check.

    model = load_hf_model("gpt2")                 # OpenAI's weights from the hub (or the local HF cache)
    model = load_hf_model("path/to/hf_dir")       # config.json + model.safetensors (or pytorch_model.bin)
    save_hf_model(model, "out_dir", tokenizer)    # transformers.GPT2LMHeadModel.from_pretrained("out_dir") works

gpt2lab uses HF's parameter names, so a key maps to itself (minus an optional `transformer.` prefix).
HF stores the four projection weights as `Conv1D` (in, out) matrices; ours are `nn.Linear` (out, in),
hence the transposes. `transformers` is never imported here; `huggingface_hub` only to download.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from gpt2lab.architecture import gpt2_problems
from gpt2lab.errors import FileError, UserError
from gpt2lab.fileio import Map, in_file, inside, read_json, read_safetensors, save_safetensors
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.tokenizer import Tokenizer

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
"""OpenAI's GPT-2 checkpoints, published on the hub as `openai-community/<name>`; any other hub id of a
GPT-2-architecture model (`distilgpt2`, `user/my-gpt2`) loads too."""
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers versions saved with the weights; they carry no parameters.
_BUFFER_KEY = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh-approximated GELU, as in our MLP
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name", as the hub allows
_WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
CONFIG_SHAPE = {"model_type": str, "vocab_size?": int, "n_positions?": int, "n_ctx?": int, "n_embd?": int,
                "n_layer?": int, "n_head?": int, "n_inner?": (int, None), "layer_norm_epsilon?": float,
                "activation_function?": str, "scale_attn_by_inverse_layer_idx?": bool,
                "reorder_and_upcast_attn?": bool, "scale_attn_weights?": bool, "add_cross_attention?": bool,
                "tie_word_embeddings?": bool}
"""The entries of an HF GPT-2 config.json that gpt2lab reads (see `fileio.shape_problem`); others are ignored."""
INDEX_SHAPE = {"weight_map": Map(str)}
TOKENIZER_JSON_SHAPE = {"model?": {"type?": str}}
FIX = "download the model again or re-export it"


def is_hub_name(name: str) -> bool:
    """True for what `load_hf_model` may download: a hub id ("gpt2", "distilgpt2", "owner/name")."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".json", ".yaml", ".yml", ".safetensors", ".bin"))


def hub_repo(name: str) -> str:
    """The hub repository of a name: OpenAI's four live under openai-community/."""
    return f"openai-community/{name}" if name in HUB_MODELS else name


def is_hf_dir(path: str | Path) -> bool:
    """True if `path` is a directory whose config.json describes a transformers model (has model_type)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return "model_type" in read_json(p, dict)
    except UserError:
        return False


# --------------------------------------------------------------------------------------------------
# Loading


def load_hf_model(name_or_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  dropout: float = 0.0, flag: str = "--init") -> GPT:
    """A GPT with the weights of an HF GPT-2 (hub id or local directory), in eval mode.

    dtype: the parameter dtype (default float32, whatever the file stores). dropout: the model's
    dropout for later finetuning (HF's GPT-2 configs say 0.1; inference ignores it). flag: the
    option the user gives the model with, named in download errors.
    """
    path = Path(name_or_dir)
    if not path.is_dir():
        if not is_hub_name(str(name_or_dir)):
            raise UserError(f"{name_or_dir} is neither a directory nor a hub model id (e.g. gpt2, owner/name)")
        path = download_hf_model(str(name_or_dir), flag=flag)
    config = config_from_hf(read_hf_config(path), dropout=dropout, source=str(path / "config.json"))
    state = hf_to_gpt2lab_state(read_hf_weights(path), source=str(path))
    model = GPT.empty(config, device)

    from gpt2lab.fileio import load_model_weights

    load_model_weights(model, state, str(path))  # names the first weight config.json does not fit
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def download_hf_model(name: str, config_only: bool = False, flag: str = "--init") -> Path:
    """Download (or find in the local HF cache) config.json + the safetensors weights of a hub model.

    Honours HF_HUB_OFFLINE; any failure becomes a one-line UserError saying how to get the files and
    to pass their directory with `flag`.
    """
    repo = hub_repo(name)
    how = (f"on a machine with network run `hf download {repo} --local-dir DIR` and pass the directory "
           f"with {flag} DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"downloading {repo} needs huggingface_hub (pip install 'gpt2lab[hf]'), or {how}") from None
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when it is imported.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    patterns = ["config.json"] + ([] if config_only else _WEIGHT_FILES)
    try:
        path = snapshot_download(repo, local_files_only=offline, allow_patterns=patterns)
    except Exception as e:  # no network, proxy, auth, disk: the user's fix is the same in every case
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else _hub_failure(e)
        raise UserError(f"{flag} {name}: no such local directory, and could not download {repo} from the "
                        f"Hugging Face hub ({reason}); {how}") from None
    return Path(path)


def _hub_failure(e: Exception) -> str:
    """What went wrong with a hub download, in a few words (the client's own text is a paragraph)."""
    kind, text = type(e).__name__, str(e)
    if any(m in text for m in ("ConnectError", "Name or service not known", "Connection", "Max retries")):
        return "the hub could not be reached"
    if "RepositoryNotFound" in kind or "404" in text:
        return "no such model on the hub"
    if "GatedRepo" in kind or "401" in text or "403" in text:
        return "the model needs a Hugging Face login (hf auth login)"
    return _first_line(e)


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_hf_config(path: str | Path) -> dict:
    """config.json of an HF model directory."""
    f = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise UserError(f"HF model directory {path} does not exist")
    if not f.is_file():
        raise UserError(f"{path} has no config.json; it is not a Hugging Face model directory")
    return read_json(f, CONFIG_SHAPE, fix=FIX)


def config_from_hf(hf: dict, dropout: float = 0.0, source: str = "config.json") -> GPTConfig:
    """GPTConfig of an HF GPT2Config dict; anything gpt2lab would compute differently is an error."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}; only GPT-2 ('gpt2') models can be loaded")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UserError(f"{source}: activation_function {act!r} is not supported (gpt2lab uses 'gelu_new')")
    for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                       ("scale_attn_weights", True), ("add_cross_attention", False)):
        if bool(hf.get(flag, want)) != want:
            raise UserError(f"{source}: {flag}={hf[flag]} is not supported by gpt2lab (needs {want})")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{source}: n_inner={hf['n_inner']} is not supported (gpt2lab's MLP is 4 * n_embd wide)")
    if hf.get("tie_word_embeddings", True) is False:
        raise UserError(f"{source}: tie_word_embeddings=false is not supported (gpt2lab ties wte and lm_head)")
    try:
        return GPTConfig(
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf.get("vocab_size", 50257),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            dropout=dropout,
        )
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw HF state dict of a directory: model.safetensors (possibly sharded) or pytorch_model.bin,
    the latter loaded with torch.load(weights_only=True) so no pickled code ever runs."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return _load_safetensors([path / "model.safetensors"])
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, INDEX_SHAPE, fix=FIX)["weight_map"]
        shards = {name: inside(path, name, index, f"weight_map.{key}", FIX) for key, name in weight_map.items()}
        return _load_safetensors(sorted(set(shards.values())))
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # refused pickle content or a damaged file
            raise UserError(
                f"{path / 'pytorch_model.bin'} cannot be loaded safely ({_first_line(e)}); "
                "convert it to model.safetensors"
            ) from None
    raise UserError(f"{path} has config.json but no weights (model.safetensors or pytorch_model.bin)")


def _load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileError(f, "missing (a weight shard the index lists)", fix=FIX)
        state.update(read_safetensors(f, FIX))
    return state


def hf_to_gpt2lab_state(hf_state: dict[str, torch.Tensor], source: str = "HF weights") -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict -> gpt2lab keys: `transformer.` prefix added where absent, Conv1D weights
    transposed, mask buffers dropped, the tied lm_head dropped (an untied one is an error)."""
    state = {}
    for key, value in hf_state.items():
        if _BUFFER_KEY.search(key):
            continue
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key
        if key.endswith(_TRANSPOSED):
            value = value.t()
        state[key] = value
    lm_head = state.pop("lm_head.weight", None)
    wte = state.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
        raise UserError(f"{source}: lm_head.weight differs from wte.weight; gpt2lab needs tied embeddings")
    return state


# --------------------------------------------------------------------------------------------------
# Saving


def check_hf_compatible(config: GPTConfig) -> None:
    """Raise UserError if HF's GPT-2 cannot express this architecture (a bias-free model can: it is
    exported with zero biases, which compute the same logits)."""
    problems = gpt2_problems(config, "HF GPT-2")
    if problems:
        raise UserError(
            f"cannot export to HF GPT-2: {'; '.join(problems)}; use the gpt2lab checkpoint itself (sample, chat, "
            "eval and bench read it directly), or train with pos_emb=learned, n_kv_head=n_head and no "
            "sliding_window to get an exportable model"
        )


def hf_config(config: GPTConfig, tokenizer: Tokenizer | None = None) -> dict:
    """The config.json of `transformers.GPT2LMHeadModel` for this architecture."""
    check_hf_compatible(config)
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def gpt2lab_to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict of `model`: Conv1D weights transposed, embedding rows trimmed to
    vocab_size, contiguous CPU tensors, the tied lm_head left out (HF re-ties it on load)."""
    check_hf_compatible(model.config)
    V = model.config.vocab_size
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        value = value.detach()
        if key.endswith(_TRANSPOSED):
            value = value.t()
        if key == "transformer.wte.weight":
            value = value[:V]  # padding rows are never produced, HF has no use for them
        state[key] = value.to("cpu").contiguous()
    if not model.config.bias:  # HF GPT-2 always has biases: zeros compute exactly what none do
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                out = module.weight.shape[0]
                state[f"{name}.bias"] = torch.zeros(out, dtype=module.weight.dtype)
    return state


def save_hf_model(model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None,
                  chat_template: str | None = None) -> Path:
    """Write config.json + model.safetensors that `transformers.GPT2LMHeadModel.from_pretrained`
    loads unchanged, plus tokenizer files `AutoTokenizer` loads: GPT-2's vocab.json/merges.txt, a
    trained BPE's tokenizer.json, or a tokenizer.json for a character-level model. `chat_template`
    (a gpt2lab chat template name or string) becomes the Jinja `chat_template` of tokenizer_config.json,
    so `apply_chat_template` renders as gpt2lab does. Variants HF GPT-2 cannot express (RoPE, GQA/MQA,
    sliding windows) raise UserError."""
    from gpt2lab.fileio import atomic_dir

    config = hf_config(model.config, tokenizer)
    state = gpt2lab_to_hf_state(model)
    config["torch_dtype"] = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # an earlier export is replaced whole, or not at all
        save_safetensors(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        kind = tokenizer.to_dict().get("kind") if tokenizer is not None else None
        if kind == "gpt2":
            write_gpt2_tokenizer_files(tmp, model_max_length=model.config.block_size)
        elif kind == "char":
            write_char_tokenizer_files(tmp, tokenizer.chars, model_max_length=model.config.block_size)
        elif kind == "bpe":
            write_bpe_tokenizer_files(tmp, tokenizer, model_max_length=model.config.block_size)
        if chat_template is not None and kind in ("gpt2", "bpe"):
            from gpt2lab.chat_template import get_chat_template

            config_file = tmp / "tokenizer_config.json"
            tokenizer_config = json.loads(config_file.read_text())
            tokenizer_config["chat_template"] = get_chat_template(chat_template).to_jinja()
            config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


EXPORT_FILES = frozenset({"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
                          "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"})


def is_hf_export(path: str | Path) -> bool:
    """True for a directory that holds only what `save_hf_model` writes (an earlier export)."""
    path = Path(path)
    return is_hf_dir(path) and {p.name for p in path.iterdir()} <= EXPORT_FILES


# --------------------------------------------------------------------------------------------------
# GPT-2 tokenizer files (vocab.json, merges.txt), derived offline from the BPE rank table


def write_gpt2_tokenizer_files(out_dir: str | Path, model_max_length: int = 1024) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json of the GPT-2 tokenizer, so
    `transformers.AutoTokenizer.from_pretrained(out_dir)` (and lm-eval-harness) work offline."""
    from gpt2lab.tokenizer import EOT_TEXT, GPT2Tokenizer, byte_level_bpe

    bpe = byte_level_bpe(GPT2Tokenizer())
    out = Path(out_dir)
    vocab = {token: i for i, token in enumerate(bpe.tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in bpe.merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_char_tokenizer_files(out_dir: str | Path, chars: str, model_max_length: int = 1024) -> None:
    """Write tokenizer.json (a `tokenizers` WordLevel model with one token per character, split one
    character at a time and joined back without spaces) and tokenizer_config.json, so
    `transformers.AutoTokenizer.from_pretrained(out_dir)` encodes exactly as gpt2lab's CharTokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_bpe_tokenizer_files(out_dir: str | Path, tokenizer: Tokenizer, model_max_length: int = 1024) -> None:
    """Write a trained BPE's tokenizer.json (as trained) and a tokenizer_config.json naming its
    special tokens, so `transformers.AutoTokenizer.from_pretrained(out_dir)` encodes exactly as gpt2lab."""
    from gpt2lab.tokenizer import CHAT_SPECIAL_TOKENS, EOT_TEXT

    out = Path(out_dir)
    (out / "tokenizer.json").write_text(tokenizer.json, encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
              "additional_special_tokens": list(CHAT_SPECIAL_TOKENS), "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_hf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of an HF directory: a character tokenizer when its tokenizer.json is the
    one-token-per-character WordLevel model `write_char_tokenizer_files` writes, a trained BPE when it
    holds gpt2lab's reserved chat tokens, else GPT-2 BPE."""
    from gpt2lab.tokenizer import BPETokenizer, CharTokenizer, get_tokenizer

    f = Path(path) / "tokenizer.json"
    if f.is_file():
        model = read_json(f, TOKENIZER_JSON_SHAPE, fix=FIX).get("model", {})
        vocab = model.get("vocab") if model.get("type") == "WordLevel" else None
        if isinstance(vocab, dict) and vocab and all(len(k) == 1 and type(i) is int for k, i in vocab.items()):
            with in_file(f, FIX):
                return CharTokenizer("".join(sorted(vocab, key=vocab.get)))
        if model.get("type") == "BPE" and _is_gpt2lab_bpe(f):
            return BPETokenizer.from_file(f)
    return get_tokenizer("gpt2")


def read_chat_template(path: str | Path) -> str | None:
    """The name of the built-in gpt2lab chat template whose Jinja is the `chat_template` of the
    directory's tokenizer_config.json (as `save_hf_model` writes it), else None."""
    from gpt2lab.chat_template import TEMPLATES

    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return None
    jinja = read_json(f, {"chat_template?": object}, fix=FIX).get("chat_template")
    return next((name for name, t in TEMPLATES.items() if t.to_jinja() == jinja), None)


def _is_gpt2lab_bpe(f: Path) -> bool:
    """True for a tokenizer.json `gpt2lab tokenizer train` wrote (its reserved chat tokens are added tokens)."""
    from gpt2lab.tokenizer import CHAT_SPECIAL_TOKENS

    added = read_json(f, TOKENIZER_JSON_SHAPE, fix=FIX).get("added_tokens") or []
    return {t.get("content") for t in added if isinstance(t, dict)} >= set(CHAT_SPECIAL_TOKENS)
