"""Hostile and careless input, by family: files whose JSON/YAML parses but has the wrong shape,
damaged or hostile weight files, sizes that cannot fit, numbers that are not numbers, text that is
not clean UTF-8, races, the user's own files, interactive and environment edges, the Python API and
a real full disk. Every case ends in one line (exit 2 on the command line, a `gpt2lab.errors.UserError`
subclass in Python) before any work, with no traceback, and leaves every file that existed before it
byte-identical. The command-line cases run in-process in the shared `sandbox`; the ones that could
exhaust memory or hang run in a subprocess under an address-space and a time limit.

Each family has its own table (name, how the files are made, argv) and its own tests; the last test
counts them all.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from misuse import TINY, TRAIN, assert_one_line, run_cli, run_limited, snapshot

import gpt2lab
from gpt2lab.errors import ArgumentError, FileError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ==================================================================================================
# Families 1, 2, 5, 9: files of the wrong shape, damaged or hostile weight files, text that is not
# clean UTF-8, the Python API's exceptions

class Json:
    """A maker step: the file's JSON, changed by `edit` (a function of the old value returning the new)."""

    def __init__(self, edit):
        self.edit = edit


def tree(template: str | None, files: dict) -> Callable[[Path, Path], None]:
    """A maker: the case folder as a copy of template folder `template` (None: empty), then `files` written
    into it ({relative path: str | bytes | Json(edit) | None to delete})."""

    def make(folder: Path, templates: Path) -> None:
        if template is None:
            folder.mkdir()
        else:
            shutil.copytree(templates / template, folder)
        for rel, content in files.items():
            f = folder / rel
            if content is None:
                f.unlink()
            elif isinstance(content, Json):
                f.write_text(json.dumps(content.edit(json.loads(f.read_text()))))
            else:
                f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))

    return make


def model_field(name: str, value: object) -> Json:
    """A checkpoint config.json step: its model entry's field `name` set to `value`."""
    return Json(lambda c: {**c, "model": {**c["model"], name: value}})


def header_of(edit) -> Callable[[bytes], bytes]:
    """model.safetensors bytes with its JSON header changed by `edit` (header dict -> header dict)."""
    def change(data: bytes) -> bytes:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header + data[8 + n:]
    return change


def tree_bytes(template: str, rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    """A maker: a copy of template folder `template` whose file `rel` has its bytes changed by `change`."""
    def make(folder: Path, templates: Path) -> None:
        tree(template, {})(folder, templates)
        (folder / rel).write_bytes(change((folder / rel).read_bytes()))
    return make


def first_tensor(edit) -> Callable[[dict], dict]:
    """A safetensors header change: the entry of its first tensor changed by `edit`."""
    def change(header: dict) -> dict:
        name = next(k for k in header if k != "__metadata__")
        header[name] = edit(header[name])
        return header
    return change


def shard_tokenizer(text: bytes) -> Callable[[bytes], bytes]:
    """A token shard's bytes with the tokenizer JSON of its header replaced by `text` (no longer than it)."""
    def change(data: bytes) -> bytes:
        magic, version, code, size, length, count = struct.unpack("<8sIIIIQ", data[:32])
        fixed = struct.pack("<8sIIIIQ", magic, version, code, size, len(text), count)
        return fixed + text + b"\0" * (length - len(text)) + data[32 + length:]
    return change


def api(call: Callable[[Path], object]) -> Callable[[Path], object]:
    """A Python API case: `call(case_folder)` must raise a gpt2lab UserError."""
    call.api = True
    return call


SAMPLE = ["sample", "--init", "{}", "--max-new-tokens", "2"]
TRAIN_ON = [a if a != "data" else "{}" for a in TRAIN]  # train on the case folder's dataset
GOOD_EVENT = json.dumps({"event": "train", "step": 1, "loss": 4.0, "lr": 1e-3, "tokens": 64})
JUNK = bytes(range(128, 256)) * 4  # not UTF-8 from the first byte

# (name, maker of the case folder, argv with "{}" for that folder | api(call), the exception an API case raises)
SHAPE_CASES: list = [
    # 1. JSON that parses but has the wrong shape, in every file gpt2lab reads
    ("sample-ckpt-config-list", tree("ckpt", {"config.json": "[1, 2]"}), SAMPLE, None),
    ("sample-ckpt-config-not-json", tree("ckpt", {"config.json": '{"format": "gpt2lab-checkpoint",\n "model": {'}),
     SAMPLE, None),
    ("sample-ckpt-n-embd-string", tree("ckpt", {"config.json": model_field("n_embd", "16")}), SAMPLE, None),
    ("model-info-ckpt-eps-string", tree("ckpt", {"config.json": model_field("layer_norm_eps", "x")}),
     ["model-info", "--init", "{}"], None),
    ("bench-ckpt-model-list", tree("ckpt", {"config.json": Json(lambda c: {**c, "model": [16]})}),
     ["bench", "--init", "{}"], None),
    ("chat-ckpt-tokenizer-chars-number",
     tree("ckpt", {"config.json": Json(lambda c: {**c, "tokenizer": {"kind": "char", "chars": 5}})}),
     ["chat", "--init", "{}"], None),
    ("eval-ckpt-version-string", tree("ckpt", {"config.json": Json(lambda c: {**c, "version": "1"})}),
     ["eval", "perplexity", "--init", "{}", "--data", "text.txt"], None),
    ("convert-ckpt-lora-list", tree("ckpt", {"config.json": Json(lambda c: {**c, "lora": [2]})}),
     ["convert", "--init", "{}", "--out", "exported"], None),
    ("finetune-init-ckpt-dropout-string", tree("ckpt", {"config.json": model_field("dropout", "0.1")}),
     ["finetune", "--data", "sft.jsonl", "--init", "{}", "--out", "ft"], None),
    ("train-init-ckpt-n-head-string", tree("ckpt", {"config.json": model_field("n_head", "2")}),
     [*TRAIN, "--model.init", "{}"], None),
    ("train-resume-ckpt-tokenizer-list",
     tree("run", {"checkpoints/step_000002/config.json": Json(lambda c: {**c, "tokenizer": ["char"]})}),
     [*TRAIN, "--checkpoint.resume", "{}/checkpoints/step_000002"], None),
    ("sample-hf-config-string", tree("hf", {"config.json": '"model_type"'}), SAMPLE, None),
    ("model-info-hf-eps-string", tree("hf", {"config.json": Json(lambda c: {**c, "layer_norm_epsilon": "x"})}),
     ["model-info", "--init", "{}"], None),
    ("sample-hf-tokenizer-json-list", tree("hf", {"tokenizer.json": "[1]"}), SAMPLE, None),
    ("train-meta-list", tree("data", {"meta.json": "[]"}), TRAIN_ON, None),
    ("train-meta-vocab-string", tree("data", {"meta.json": Json(lambda m: {**m, "vocab_size": "103"})}),
     TRAIN_ON, None),
    ("train-shard-header-tokenizer-list", tree_bytes("data", "train_000000.bin", shard_tokenizer(b"[1]")),
     TRAIN_ON, None),
    ("prepare-over-meta-tokenizer-string", tree("data", {"meta.json": Json(lambda m: {**m, "tokenizer": "char"})}),
     ["prepare", "default", "--out", "{}"], None),
    ("sample-adapter-r-string", tree("adapter", {"adapter_config.json": Json(lambda a: {**a, "r": "2"})}),
     SAMPLE, None),
    ("merge-lora-adapter-base-string", tree("adapter", {"adapter_config.json": Json(lambda a: {**a, "base": "x"})}),
     ["merge-lora", "--adapter", "{}", "--out", "merged"], None),
    ("convert-peft-adapter-modules-number",
     tree("adapter", {"adapter_config.json": Json(lambda a: {**a, "modules": 3})}),
     ["convert", "--init", "{}", "--format", "peft", "--out", "peft"], None),
    ("plot-metrics-list-line", tree(None, {"metrics.jsonl": f"[1, 2]\n{GOOD_EVENT}\n"}),
     ["plot", "{}", "-o", "loss.png"], None),
    ("plot-metrics-wrong-types", tree(None, {"metrics.jsonl": '{"event": "train", "step": "2", "loss": "x"}\n'
                                                              f"{GOOD_EVENT}\n"}),
     ["plot", "{}", "-o", "loss.png"], None),
    ("finetune-chat-role-list",
     tree(None, {"chat.jsonl": '{"messages": [{"role": ["user"], "content": "hi"}]}\n'}),
     ["finetune", "--data", "{}/chat.jsonl", "--init", "base", "--out", "ft", "--data.sft.template", "chat"], None),
    # 2. damaged or hostile weight files
    ("sample-hf-truncated", tree_bytes("hf", "model.safetensors", lambda b: b[:len(b) // 2]), SAMPLE, None),
    ("sample-hf-header-length-2-62", tree_bytes("hf", "model.safetensors", lambda b: struct.pack("<Q", 2**62) + b[8:]),
     SAMPLE, None),
    ("sample-hf-header-nested-deep",
     tree_bytes("hf", "model.safetensors", lambda b: struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000),
     SAMPLE, None),
    ("sample-hf-header-entry-wrong-type",
     tree_bytes("hf", "model.safetensors", header_of(first_tensor(lambda t: {**t, "data_offsets": "0-64"}))),
     SAMPLE, None),
    ("bench-hf-header-shape-strings",
     tree_bytes("hf", "model.safetensors", header_of(first_tensor(lambda t: {**t, "shape": ["16"]}))),
     ["bench", "--init", "{}"], None),
    ("sample-hf-index-outside", tree("hf", {"model.safetensors": None, "model.safetensors.index.json": json.dumps(
        {"weight_map": {"transformer.wte.weight": "../../../etc/passwd"}})}), SAMPLE, None),
    ("convert-hf-index-to-a-model-outside", tree("hf", {"model.safetensors": None, "model.safetensors.index.json":
                                                       json.dumps({"weight_map": {"x": "../outside.safetensors"}})}),
     ["convert", "--init", "{}", "--out", "exported"], None),
    ("train-meta-shard-outside", tree("data", {"meta.json": Json(lambda m: {**m, "splits": {
        **m["splits"], "train": {"shards": ["../../notes.txt"], "tokens": 5}}})}), TRAIN_ON, None),
    ("sample-adapter-weights-header-list", tree("adapter", {"adapter.safetensors": b"\x08\0\0\0\0\0\0\0[1, 2]  "}),
     SAMPLE, None),
    # 5. text that is not clean UTF-8
    ("prepare-jsonl-lone-surrogate", tree(None, {"corpus.jsonl": '{"text": "caf\\udce9 au lait"}\n'}),
     ["prepare", "{}/corpus.jsonl", "--out", "prepared"], None),
    ("finetune-array-lone-surrogate",
     tree(None, {"sft.json": '[{"instruction": "say hi", "output": "hi \\ud83d"}]'}),
     ["finetune", "--data", "{}/sft.json", "--init", "base", "--out", "ft"], None),
    ("train-yaml-lone-surrogate", tree(None, {"c.yaml": 'data:\n  dir: "data\\udc80"\n'}),
     [*TRAIN, "--config", "{}/c.yaml"], None),
    ("train-yaml-not-utf8", tree(None, {"c.yaml": b"# caf\xe9\ntrain:\n  max_steps: 2\n"}),
     [*TRAIN, "--config", "{}/c.yaml"], None),
    ("plot-metrics-not-utf8", tree(None, {"metrics.jsonl": GOOD_EVENT.encode() + b"\n\xff\xfe{}\n"}),
     ["plot", "{}", "-o", "loss.png"], None),
    ("sample-junk-folder", tree(None, {"config.json": JUNK, "model.safetensors": JUNK}), SAMPLE, None),
    # 9. the Python API: gpt2lab's exceptions, one line
    ("api-load-junk-folder", tree(None, {"config.json": JUNK, "model.safetensors": JUNK}),
     api(lambda d: gpt2lab.load(d)), FileError),
    ("api-load-ckpt-config-list", tree("ckpt", {"config.json": "[]"}), api(lambda d: gpt2lab.load(d)), FileError),
    ("api-load-none", tree(None, {}), api(lambda d: gpt2lab.load(None)), ArgumentError),
    ("api-train-yaml-not-utf8", tree(None, {"c.yaml": b"# caf\xe9\n"}),
     api(lambda d: gpt2lab.train(str(d / "c.yaml"))), FileError),
    ("api-encode-lone-surrogate", tree(None, {}), api(lambda d: gpt2lab.load("base").encode("caf\udce9")),
     ArgumentError),
    ("api-generate-lone-surrogate", tree(None, {}),
     api(lambda d: gpt2lab.load("base").generate("\ud83d", max_new_tokens=1)), ArgumentError),
    ("api-generate-prompt-none", tree(None, {}), api(lambda d: gpt2lab.load("ckpt").generate(None)), ArgumentError),
    ("api-generate-temperature-nan", tree(None, {}),
     api(lambda d: gpt2lab.load("ckpt").generate("a", max_new_tokens=1, temperature=math.nan)), UserError),
    ("api-decode-out-of-range", tree(None, {}), api(lambda d: gpt2lab.load("ckpt").decode([5000])), ArgumentError),
    ("api-decode-negative", tree(None, {}), api(lambda d: gpt2lab.load("ckpt").decode([-1])), ArgumentError),
    ("api-score-window-of-one", tree(None, {}), api(lambda d: gpt2lab.load("ckpt").score("abcdef", max_length=1)),
     UserError),
    ("api-score-bytes", tree(None, {}), api(lambda d: gpt2lab.load("ckpt").score(b"abc")), ArgumentError),
]


@pytest.fixture(scope="module")
def shape_root(sandbox, tmp_path_factory) -> Path:
    """A folder of its own (the shared sandbox is only read): templates of every kind of file gpt2lab reads
    (a checkpoint, an HF export, a LoRA adapter with its base, a dataset), and one folder per case."""
    from gpt2lab.hf import save_hf_model
    from gpt2lab.loading import load_model

    root = tmp_path_factory.mktemp("shape")
    templates = root / ".templates"
    templates.mkdir()
    ckpt = next((sandbox / "run" / "checkpoints").iterdir())
    shutil.copytree(ckpt, templates / "ckpt", ignore=shutil.ignore_patterns("train_state.pt"))
    shutil.copytree(ckpt, root / "ckpt", ignore=shutil.ignore_patterns("train_state.pt"))
    shutil.copytree(sandbox / "data", templates / "data")
    shutil.copytree(sandbox / "data", root / "data")  # what TRAIN trains on, should a case get that far
    shutil.copytree(sandbox / "base", root / "base")
    shutil.copytree(sandbox / "adapter", templates / "adapter")
    shutil.copytree(sandbox / "run", templates / "run")
    model, tokenizer = load_model(str(templates / "ckpt"))
    save_hf_model(model, templates / "hf", tokenizer)
    shutil.copy(templates / "hf" / "model.safetensors", root / "outside.safetensors")
    (root / "text.txt").write_text("a few words of text to score\n" * 4)
    (root / "sft.jsonl").write_text('{"instruction": "say hi", "output": "hi"}\n')
    for name, make, _, _ in SHAPE_CASES:
        make(root / name, templates)
    return root


@pytest.mark.parametrize("name, make, call, expected", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_a_file_of_the_wrong_shape_is_one_line(name, make, call, expected, shape_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(shape_root)
    folder = shape_root / name
    if getattr(call, "api", False):
        monkeypatch.chdir(shape_root)
        with pytest.raises(expected) as error:
            call(folder)
        message = str(error.value)
        assert "\n" not in message and message, f"{name}: {message!r}"
    else:
        code, err = run_cli([a.replace("{}", name) for a in call], shape_root, stdin="")
        message = assert_one_line(name, code, err)
    assert snapshot(shape_root) == before, f"{name} changed or created files"
    if not getattr(call, "api", False) or expected is FileError:  # the file at fault is named
        assert f"{name}/" in message, message
    if "outside" in name:  # refused by name, never opened
        assert "not a file name inside" in message, message
    if "surrogate" in name:
        assert "surrogate" in message, message
    if "not-json" in name:  # the file and its JSON error, not "neither a checkpoint nor ..."
        assert "config.json:2: invalid JSON at column 12" in message, message


def test_a_tiny_temperature_samples_like_greedy(shape_root, monkeypatch):
    """1e-300 is 0 in float32: logits / temperature were inf or NaN and torch.multinomial raised a
    RuntimeError; now the largest logit is shifted to 0 and a tiny temperature is greedy decoding."""
    monkeypatch.chdir(shape_root)
    lm = gpt2lab.load("ckpt")
    greedy = lm.generate("The ", max_new_tokens=5, temperature=0)
    assert lm.generate("The ", max_new_tokens=5, temperature=1e-300, seed=0) == greedy


def test_metrics_skip_only_a_last_line_cut_short(tmp_path):
    """A crash mid-write leaves a last line without its newline: skipped. The same damage with a newline
    after it, or before another line, is the file's problem and is named."""
    from gpt2lab.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text(f'{GOOD_EVENT}\n{{"event": "tr')
    assert [e["step"] for e in read_metrics(tmp_path)] == [1]
    for text in (f'{GOOD_EVENT}\n{{"event": "tr\n', f'{{"event": "tr\n{GOOD_EVENT}\n'):
        (tmp_path / "metrics.jsonl").write_text(text)
        with pytest.raises(FileError, match=r"metrics.jsonl:\d: invalid JSON"):
            read_metrics(tmp_path)


def test_file_errors_name_the_file_the_field_and_the_fix(shape_root):
    """The one format of every file problem: FILE[:LINE]: FIELD: what is wrong; how to fix."""
    from gpt2lab.checkpoint import read_config

    with pytest.raises(FileError) as error:
        read_config(shape_root / "sample-ckpt-n-embd-string")
    e = error.value
    assert str(e) == (f"{shape_root / 'sample-ckpt-n-embd-string' / 'config.json'}: model.n_embd: expected an "
                      'integer, got string "16"; restore it or use another checkpoint')
    assert (e.field, e.problem, e.line) == ("model.n_embd", 'expected an integer, got string "16"', None)


# ==================================================================================================
# Families 3, 4, 8: sizes that cannot fit, numbers that are not numbers, interactive and
# environment edges

# (name, how it runs, what): "cli" is argv run in-process in the sandbox ("cli<" with "hi" on
# standard input, "cli-closed" with standard input closed); "limited" is argv run in a subprocess under
# LIMIT_MEMORY of address space and LIMIT_SECONDS; "api" is Python run in-process and "api-limited" in
# such a subprocess, each expected to raise a UserError. "{h}" (h) is the folder of `hostile_files`,
# "{o}" (o) a new path outside it for outputs.
# The memory cases ask for what 3 GiB of address space cannot hold: refused before allocating it.
SIZE_CASES: list = [
    # 3: sizes that cannot fit
    ("train-n-embd-1e7", "limited", [*TRAIN, "--model.n_embd", "10000000", "--out", "{o}"]),
    ("train-n-layer-1e5", "limited", [*TRAIN, "--model.n_layer", "100000", "--out", "{o}"]),
    ("sample-rope-max-new-1e12", "limited", ["sample", "--init", "rope", "--max-new-tokens", str(10**12)]),
    ("train-yaml-alias-bomb", "limited", [*TRAIN, "--config", "{h}/bomb.yaml", "--out", "{o}"]),
    ("convert-config-too-big", "limited", ["convert", "--init", "{h}/huge_ckpt", "--out", "{o}"]),
    ("bench-batch-too-big", "limited", ["bench", "--init", "base", "--batch-size", str(10**8), "--dtype", "fp32"]),
    ("api-gpt-too-big", "api-limited",
     "gpt2lab.GPT(gpt2lab.GPTConfig(n_layer=2, n_head=4, n_embd=10**7))"),
    ("api-rope-cache-too-big", "api-limited", "gpt2lab.load('rope').generate('a', max_new_tokens=10**12)"),
    ("train-yaml-nested-deep", "cli", [*TRAIN, "--config", "{h}/deep.yaml", "--out", "{o}"]),
    ("model-info-value-nested-deep", "cli",
     ["model-info", "gpt2", "--model.sliding_window", "[" * 100_000 + "]" * 100_000]),
    ("finetune-json-nested-deep", "cli", ["finetune", "--data", "{h}/deep.json", "--init", "base", "--out", "{o}"]),
    ("eval-jsonl-nested-deep", "cli", ["eval", "lambada", "--init", "run", "--data", "{h}/deep.jsonl"]),
    ("sample-config-json-nested-deep", "cli", ["sample", "--init", "{h}/deep_ckpt"]),
    ("prepare-shard-tokens-1e13", "cli", ["prepare", "default", "--out", "{o}", "--shard-tokens", str(10**13)]),
    # 4: numbers that are not numbers
    ("train-lr-nan", "cli", [*TRAIN, "--optim.lr", "nan", "--out", "{o}"]),
    ("train-yaml-inf", "cli", [*TRAIN, "--config", "{h}/inf.yaml", "--out", "{o}"]),
    ("model-info-rope-theta-nan", "cli", ["model-info", "gpt2", "--model.rope_theta", "nan"]),
    ("model-info-layers-past-any-index", "cli", ["model-info", "gpt2", "--model.n_layer", "1" + "0" * 30]),
    ("sample-temperature-nan", "cli", ["sample", "--init", "run", "--temperature", "nan"]),
    ("chat-temperature-inf", "cli<", ["chat", "--init", "base", "--temperature", "inf"]),
    ("sample-seed-1e23", "cli", ["sample", "--init", "run", "--seed", str(10**23)]),
    ("train-seed-1e23", "cli", [*TRAIN, "--train.seed", str(10**23), "--out", "{o}"]),
    ("eval-perplexity-max-length-1", "cli", ["eval", "perplexity", "--init", "run", "--data", "notes.txt",
                                             "--max-length", "1"]),
    ("eval-perplexity-no-words", "cli", ["eval", "perplexity", "--init", "run", "--data", "{h}/blank.txt"]),
    ("train-shard-id-beyond-vocab", "cli", [*TRAIN, "--data.dir", "{h}/bad_ids", "--out", "{o}"]),
    ("train-meta-vocab-too-small", "cli", [*TRAIN, "--data.dir", "{h}/small_vocab", "--out", "{o}"]),
    ("api-generate-temperature-nan", "api", "gpt2lab.load('run').generate('a', temperature=float('nan'))"),
    ("api-generate-seed-1e23", "api", "gpt2lab.load('run').generate('a', seed=10**23)"),
    ("api-score-max-length-1", "api", "gpt2lab.load('run').score('some text', max_length=1)"),
    ("api-train-lr-nan", "api",
     "gpt2lab.train('quickstart', **{**TINY, 'data.dir': 'data', 'data.prepare': None, "
     "'checkpoint.out_dir': o, 'optim.lr': float('nan')})"),
    # 8: interactive and environment edges
    ("chat-stdin-closed", "cli-closed", ["chat", "--init", "base"]),
    ("train-nul-in-config", "cli", [a for a in TRAIN if a not in ("--out", "fresh")] + ["--config", "{h}/nul.yaml"]),
    ("prepare-dangling-symlink", "cli", ["prepare", "{h}/corpus", "--out", "{o}"]),
    ("sample-adapter-is-own-base", "cli", ["sample", "--init", "{h}/self_adapter"]),
    ("chat-adapter-is-own-base", "cli<", ["chat", "--init", "{h}/self_adapter"]),
    ("merge-lora-adapter-is-own-base", "cli", ["merge-lora", "--adapter", "{h}/self_adapter", "--out", "{o}"]),
    ("api-load-adapter-is-own-base", "api", "gpt2lab.load(h + '/self_adapter')"),
    ("finetune-template-format-spec", "cli", ["finetune", "--data", "{h}/sft.jsonl", "--init", "base", "--out",
                                              "{o}", "--data.sft.template", "Q: {instruction:d}\nA: {output}"]),
    ("sample-template-format-spec", "cli", ["sample", "--init", "base", "--instruct", "hi", "--template",
                                            "Q: {instruction:>9}\nA: {output}"]),
    ("chat-template-format-spec", "cli<", ["chat", "--init", "base", "--template", "Q: {instruction!r}\nA: {output}"]),
]
LIMIT_MEMORY = 3 << 30
LIMIT_SECONDS = 60


@pytest.fixture(scope="module")
def hostile_files(sandbox, tmp_path_factory) -> Path:
    """A folder of hostile files next to the sandbox (which is never changed): a YAML alias bomb, YAML
    and JSON nested 100,000 deep, a checkpoint whose config asks for a model no machine holds, datasets
    whose token ids exceed their vocabulary, a NUL byte in a config value, a corpus folder with a
    dangling link and an adapter whose base is itself."""
    import json
    import shutil

    h = tmp_path_factory.mktemp("hostile")
    laughs = ["a0: &a0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}"]
    for level in range(1, 10):
        laughs.append(f"a{level}: &a{level} {{" + ", ".join(f"k{i}: *a{level - 1}" for i in range(9)) + "}")
    (h / "bomb.yaml").write_text("\n".join(laughs) + "\n")
    (h / "deep.yaml").write_text("train:\n  max_steps: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (h / "deep.json").write_text("[" + "[" * 100_000 + "]" * 100_000 + "]\n")
    (h / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (h / "deep_ckpt").mkdir()
    (h / "deep_ckpt" / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    shutil.copytree(sandbox / "base", h / "huge_ckpt")
    config = json.loads((h / "huge_ckpt" / "config.json").read_text())
    config["model"].update(n_embd=10**7, n_head=4)
    (h / "huge_ckpt" / "config.json").write_text(json.dumps(config))
    (h / "inf.yaml").write_text("optim:\n  weight_decay: .inf\n")
    (h / "nul.yaml").write_text('checkpoint:\n  out_dir: "o\\0ut"\n')
    (h / "blank.txt").write_text(" \n \n\n")
    (h / "sft.jsonl").write_text('{"instruction": "say hi", "output": "hi"}\n' * 8)
    shutil.copytree(sandbox / "data", h / "bad_ids")
    shard = next((h / "bad_ids").glob("train_*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[-2:] = (60_000).to_bytes(2, "little")  # the last token: an id far beyond the char vocabulary
    shard.write_bytes(bytes(raw))
    shutil.copytree(sandbox / "data", h / "small_vocab")
    meta = json.loads((h / "small_vocab" / "meta.json").read_text())
    meta["vocab_size"] = 10
    (h / "small_vocab" / "meta.json").write_text(json.dumps(meta))
    (h / "corpus").mkdir()
    (h / "corpus" / "a.txt").write_text("the first document of the corpus\n" * 50)
    (h / "corpus" / "b.txt").symlink_to(h / "corpus" / "missing.txt")
    shutil.copytree(sandbox / "adapter", h / "self_adapter")
    adapter = json.loads((h / "self_adapter" / "adapter_config.json").read_text())
    adapter["base"]["init"] = str(h / "self_adapter")
    (h / "self_adapter" / "adapter_config.json").write_text(json.dumps(adapter))
    return h


def _run_python_limited(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` (with gpt2lab imported) in a subprocess under LIMIT_MEMORY and LIMIT_SECONDS; a UserError
    it raises is printed as one line and exits 2, anything else is a traceback."""
    program = ("import sys, gpt2lab\nfrom gpt2lab.errors import UserError\ntry:\n    " + code +
               "\nexcept UserError as e:\n    print('error:', e, file=sys.stderr)\n    sys.exit(2)\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_MEMORY, LIMIT_MEMORY))

    return subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True,
                          timeout=LIMIT_SECONDS, preexec_fn=limit, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("name, how, what", SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_sizes_numbers_and_edges_are_one_line(name, how, what, sandbox, hostile_files, monkeypatch, tmp_path):
    import gpt2lab
    from gpt2lab.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    h, o = str(hostile_files), str(tmp_path / "o")
    before = snapshot(sandbox), snapshot(hostile_files)
    if how == "api":
        monkeypatch.chdir(sandbox)
        with pytest.raises(UserError) as raised:
            exec(what, {"gpt2lab": gpt2lab, "h": h, "o": o, "TINY": TINY})
        assert "\n" not in str(raised.value), f"{name}: {raised.value}"
    elif how == "api-limited":
        proc = _run_python_limited(what, sandbox)
        assert_one_line(name, proc.returncode, proc.stderr)
    elif how == "limited":
        argv = [a.replace("{h}", h).replace("{o}", o) for a in what]
        proc = run_limited(argv, sandbox, memory=LIMIT_MEMORY, timeout=LIMIT_SECONDS)
        assert_one_line(name, proc.returncode, proc.stderr.decode("utf-8", "replace"))
    else:
        argv = [a.replace("{h}", h).replace("{o}", o) for a in what]
        if how == "cli-closed":
            monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed file descriptor 0
        code, err = run_cli(argv, sandbox, stdin="hi\n" if how == "cli<" else None)
        assert_one_line(name, code, err)
    assert (snapshot(sandbox), snapshot(hostile_files)) == before, f"{name} changed or created files"
    assert not os.path.exists(o), f"{name} wrote {o}: it did work before refusing"


def test_the_memory_estimate_is_what_a_model_and_its_cache_allocate():
    import torch

    from gpt2lab.model import GPT, PYTHON_BYTES_PER_LAYER, GPTConfig, memory_needed

    config = GPTConfig.from_preset("gpt2-tiny", n_kv_head=2, sliding_window=[8, None])
    model = GPT(config)
    weights = sum(p.nbytes for p in model.parameters())
    assert memory_needed(config) == weights + config.n_layer * PYTHON_BYTES_PER_LAYER
    cache = model.new_cache(3, 40, dtype=torch.bfloat16)
    stored = sum(layer.k.nbytes + layer.v.nbytes + layer.slot_pos.nbytes for layer in cache.layers)
    assert memory_needed(config, model=False, cache=(3, 40), dtype_bytes=2) == stored
    assert memory_needed(config, model=False, train_copies=3) == 3 * weights


def test_yaml_within_the_bounds_reads_as_before(tmp_path):
    from gpt2lab.configparse import MAX_YAML_DEPTH, load_yaml, parse_scalar

    path = tmp_path / "aliases.yaml"
    path.write_text("base: &b {lr: 0.1, min_lr: 0.01}\noptim:\n  <<: *b\n  eps: 1.0e-6\n")
    data, lines = load_yaml(path)
    assert data["optim"] == {"lr": 0.1, "min_lr": 0.01, "eps": 1e-6} and lines["optim.eps"] == 4
    depth = MAX_YAML_DEPTH - 1  # the document's own mapping is one level
    assert parse_scalar("[" * depth + "1" + "]" * depth) is not None


def test_size_cases_cover_three_families_and_every_model_command():
    commands = {what[0] for _, how, what in SIZE_CASES if how.startswith(("cli", "limited"))}
    assert commands >= {"train", "finetune", "prepare", "sample", "chat", "eval", "bench", "model-info", "convert",
                        "merge-lora"}
    assert sum(how.startswith("api") for _, how, _ in SIZE_CASES) >= 5
    assert len(SIZE_CASES) >= 22


# ==================================================================================================
# Families 6, 7, 10: races, the user's own files, a real full disk

_TRAIN = ["train", "--data.dir", "DATA", "--data.prepare", "null", "--out", "exp",
          *[a for k, v in TINY.items() if k != "log.progress" for a in (f"--{k}", str(v))]]
_MORE_STEPS = ["--resume", "--train.max_steps", "3", "--checkpoint.allow_changes", "true"]
_OURS = {"metrics.jsonl", "resolved_config.yaml", "loss.png", ".gpt2lab.lock"}  # what a run rewrites


def _argv(argv: list[str], sandbox: Path) -> list[str]:
    return [a.replace("DATA", str(sandbox / "data")).replace("SANDBOX", str(sandbox)) for a in argv]


def _users_config(folder: Path, sandbox: Path) -> None:
    (folder / "exp").mkdir()
    (folder / "exp" / "config.yaml").write_text("# my experiment: keep these notes\ntrain:\n  max_steps: 2\n")


def _trained_with_config(folder: Path, sandbox: Path) -> None:
    _users_config(folder, sandbox)
    assert run_cli(_argv([*_TRAIN, "--config", "exp/config.yaml"], sandbox), cwd=folder)[0] == 0


def _trained(folder: Path, sandbox: Path) -> None:
    assert run_cli(_argv(_TRAIN, sandbox), cwd=folder)[0] == 0


def _run_of_an_earlier_gpt2lab(folder: Path, sandbox: Path) -> None:
    """A run directory as gpt2lab wrote it before the resolved config had a name of its own."""
    _trained(folder, sandbox)
    resolved = folder / "exp" / "resolved_config.yaml"
    (folder / "exp" / "config.yaml").write_text(resolved.read_text().split("\n", 1)[1])
    resolved.unlink()


def _users_file(name: str, content: bytes):
    def setup(folder: Path, sandbox: Path) -> None:
        (folder / "exp").mkdir()
        (folder / "exp" / name).write_bytes(content)
    return setup


def _users_folder(name: str):
    def setup(folder: Path, sandbox: Path) -> None:
        (folder / "exp" / name).mkdir(parents=True)
        (folder / "exp" / name / "keep.txt").write_text("keep me\n")
    return setup


def _link_to_users_file(name: str):
    def setup(folder: Path, sandbox: Path) -> None:
        (folder / "exp").mkdir()
        (folder / "notes.jsonl").write_text('{"note": "mine"}\n')
        (folder / "exp" / name).symlink_to("../notes.jsonl")
    return setup


# Family 7: the user's own files. (name, setup(folder, sandbox), argv run in the folder (DATA: the sandbox's
# dataset, SANDBOX: the sandbox), exit code, text of the one line). A case that exits 0 leaves every file of
# the user's byte-identical; one that exits 2 changes nothing at all.
OWN_FILE_CASES = [
    ("train --config DIR/config.yaml --out DIR", _users_config, [*_TRAIN, "--config", "exp/config.yaml"], 0, ""),
    ("train --out DIR holding the user's config.yaml", _users_config, _TRAIN, 0, ""),
    ("--resume with --config DIR/config.yaml --out DIR", _trained_with_config,
     [*_TRAIN, "--config", "exp/config.yaml", *_MORE_STEPS], 0, ""),
    ("--resume with the run's own resolved config as --config", _trained,
     [*_TRAIN, "--config", "exp/resolved_config.yaml", *_MORE_STEPS], 0, ""),
    ("--resume of a run an earlier gpt2lab wrote (its config.yaml)", _run_of_an_earlier_gpt2lab,
     [*_TRAIN, *_MORE_STEPS], 0, ""),
    ("the user's resolved_config.yaml in --out", _users_file("resolved_config.yaml", b"my: notes\n"), _TRAIN, 2,
     "resolved_config.yaml was not written by gpt2lab"),
    ("the user's metrics.jsonl in --out", _users_file("metrics.jsonl", b'{"accuracy": 0.9}\n'), _TRAIN, 2,
     "metrics.jsonl was not written by gpt2lab"),
    ("the user's loss.png in --out", _users_file("loss.png", b"\x89PNG\r\n\x1a\nmine"), _TRAIN, 2,
     "loss.png was not written by gpt2lab"),
    ("metrics.jsonl in --out links to the user's file", _link_to_users_file("metrics.jsonl"), _TRAIN, 2,
     "metrics.jsonl was not written by gpt2lab"),
    ("the user's adapter/ in a LoRA run's --out", _users_folder("adapter"),
     [*_TRAIN, "--model.init", "SANDBOX/run", "--lora.r", "2"], 2, "adapter was not written by gpt2lab"),
    ("the user's merged/ in a LoRA run's --out (lora.merge)", _users_folder("merged"),
     [*_TRAIN, "--model.init", "SANDBOX/run", "--lora.r", "2", "--lora.merge", "true"], 2,
     "merged was not written by gpt2lab"),
    ("convert --out DIR holding the user's config.yaml", _users_config,
     ["convert", "--init", "SANDBOX/run", "--out", "exp"], 2, "is not an earlier HF export"),
    ("prepare --out DIR holding the user's config.yaml", _users_config, ["prepare", "default", "--out", "exp"], 2,
     "holds files that are not a gpt2lab dataset"),
]

# Family 10: a real full disk, a small tmpfs. (name, free bytes left before the command from the pages of
# the step-1 checkpoint's files, argv after `train ... --out disk/run --resume`, exit code, text of the line)
_PAGE = os.sysconf("SC_PAGE_SIZE")  # a tmpfs counts space in pages
FULL_DISK_CASES = [
    ("the disk is full before the run starts", lambda pages: 0, [], 2, "no space left on device writing"),
    ("full while writing model.safetensors", lambda pages: _PAGE * (pages["model"] // 2), [], 2, "step_000002"),
    ("full while writing config.json", lambda pages: _PAGE * pages["model"], [], 2, "step_000002"),
    ("full while torch.save writes train_state.pt", lambda pages: _PAGE * (pages["model"] + pages["config"]
                                                                            + pages["state"] // 2), [], 2, "step_000002"),
    ("full while appending to metrics.jsonl", lambda pages: _PAGE,
     ["--train.max_steps", "60", "--checkpoint.every", "0", "--train.log_every", "1"], 2, "metrics.jsonl"),
    ("full at the final plot", lambda pages: _PAGE * (pages["model"] + pages["config"] + pages["state"] + 1),
     ["--checkpoint.keep_last", "0"], 0, "no plot: no space left on device writing"),
    ("prepare into a full disk", lambda pages: 16 * _PAGE, None, 2, "no space left on device writing"),
]


def _race_prepare_threads(tmp_path: Path, sandbox: Path) -> None:
    """Two prepares of different corpora into one folder at once, met where each writes its first
    shard: one must be refused, never both told they succeeded."""
    from gpt2lab.data import prepare as prep
    from gpt2lab.errors import UserError

    for name, text in (("a.txt", "abc def\n" * 4000), ("b.txt", "uvw xyz\n" * 4000)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "shared"
    met = threading.Condition()
    count = {"arrived": 0, "done": 0}
    local = threading.local()
    write_shard = prep.write_shard

    def meeting_write_shard(*args, **kwargs):
        if not getattr(local, "arrived", False):  # wait for the other prepare to get here, or to end
            local.arrived = True
            with met:
                count["arrived"] += 1
                met.notify_all()
                met.wait_for(lambda: count["arrived"] + count["done"] >= 2, timeout=60)
        return write_shard(*args, **kwargs)

    results: dict = {}

    def run(name: str) -> None:
        try:
            results[name] = prep.prepare(str(tmp_path / name), out, progress=False)
        except UserError as e:
            results[name] = e
        finally:
            with met:
                count["done"] += 1
                met.notify_all()

    prep.write_shard = meeting_write_shard
    try:
        threads = [threading.Thread(target=run, args=(name,)) for name in ("a.txt", "b.txt")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        prep.write_shard = write_shard
    won = [name for name, r in results.items() if isinstance(r, dict)]
    assert len(won) == 1, f"both prepares reported success: {results}"
    lost = next(r for r in results.values() if not isinstance(r, dict))
    assert "being written by another gpt2lab prepare" in str(lost), lost
    assert json.loads((out / "meta.json").read_text())["source"]["path"].endswith(won[0])


def _prepare_process(args: list[str], src: Path, new_group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt2lab", "prepare", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_group,
                            env={**os.environ, "PYTHONPATH": str(src)})


def _write_documents(path: Path, n: int, tag: str) -> None:
    import random

    rng = random.Random(tag)
    words = f"{tag} the cat sat on a mat while dogs ran far away from home and came back again".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n"
                            for _ in range(n)))


def _race_prepare_processes(tmp_path: Path, sandbox: Path) -> None:
    """Two `gpt2lab prepare` processes of different corpora into one --out at once: one exits 0, the
    other in one line, and the folder holds the dataset of the one that succeeded."""
    for tag in ("a", "b"):
        _write_documents(tmp_path / f"{tag}.jsonl", 1500, tag)
    procs = {tag: _prepare_process([str(tmp_path / f"{tag}.jsonl"), "--out", str(tmp_path / "shared"),
                                    "--tokenizer", "char", "--workers", "1"], _src()) for tag in ("a", "b")}
    done = {tag: (p.wait(60), p.communicate()[1].decode()) for tag, p in procs.items()}
    won = [tag for tag, (code, _) in done.items() if code == 0]
    assert len(won) == 1, f"both prepares exited 0: {done}"
    code, err = done[{"a": "b", "b": "a"}[won[0]]]
    assert_one_line("the second prepare", code, err)
    assert json.loads((tmp_path / "shared" / "meta.json").read_text())["source"]["path"].endswith(f"{won[0]}.jsonl")


def _race_sample_while_training(tmp_path: Path, sandbox: Path) -> None:
    """`sample --init RUN` again and again while RUN trains with a checkpoint every step and keep_last 1:
    every sample reads the newest complete checkpoint, although rotation deletes the one it picked."""
    from gpt2lab.config import load_config
    from gpt2lab.run import train

    run = tmp_path / "run"
    cfg = load_config("quickstart", {**TINY, "data.dir": str(sandbox / "data"), "data.prepare": None,
                                     "checkpoint.out_dir": str(run), "checkpoint.every": 1,
                                     "checkpoint.keep_last": 1, "train.max_steps": 100_000,
                                     "train.max_time": "8s"})
    failure: list = []

    def training() -> None:
        try:
            train(cfg)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            failure.append(e)

    trainer = threading.Thread(target=training)
    trainer.start()
    samples = []
    try:
        while trainer.is_alive() and not list(run.glob("checkpoints/step_*")):
            time.sleep(0.01)
        while trainer.is_alive():
            code, err = run_cli(["sample", "--init", str(run), "--prompt", "a", "--max-new-tokens", "2"], cwd=tmp_path)
            samples.append(code)
            assert code == 0 and "incomplete" not in err and "Traceback" not in err, \
                f"sample {len(samples)} while training:\n{err}"
    finally:
        trainer.join()
    assert not failure, failure
    assert len(samples) >= 5, f"only {len(samples)} samples ran while the run trained"


def _src() -> Path:
    import gpt2lab

    return Path(gpt2lab.__file__).parents[1]


def _stop_prepare(sig: signal.Signals, group: bool, line: str):
    def case(tmp_path: Path, sandbox: Path) -> None:
        """A multi-worker `prepare` stopped by a signal to it (or to its whole process group, as a
        terminal's Ctrl-C, systemd, Slurm or `timeout` send it) three times, each after a new shard: one
        line and exit 128+signal each time, no worker traceback (BrokenPipeError), no hang; the rerun
        finishes a dataset equal to an uninterrupted one."""
        from gpt2lab.data.prepare import prepare

        corpus, out = tmp_path / "docs.jsonl", tmp_path / "data"
        _write_documents(corpus, 3000, "c")
        args = [str(corpus), "--out", str(out), "--tokenizer", "gpt2", "--workers", "2", "--shard-tokens", "16384"]
        progress, generation, stopped = out / "progress.json", 0, []
        for attempt in range(3):
            proc = _prepare_process(args, _src(), new_group=group)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if json.loads(progress.read_text())["generation"] > generation:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.002)
            assert proc.poll() is None, f"attempt {attempt}: prepare ended before it could be stopped"
            generation = json.loads(progress.read_text())["generation"]
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            stopped.append((proc.communicate(timeout=60)[1].decode(), proc.returncode))
        assert not [err for err, _ in stopped if "Traceback" in err or "Error" in err], stopped
        assert stopped == [(line + "\n", 128 + sig)] * 3
        proc = _prepare_process(args, _src())
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        reference = prepare(str(corpus), tmp_path / "reference", tokenizer="gpt2", workers=1, shard_tokens=16384,
                            progress=False)
        assert snapshot(out) == snapshot(reference["dir"])
    return case


_SLOW_SAVE = """
import pathlib, sys, time
import safetensors.torch
save_file = safetensors.torch.save_file
def slow_save_file(*args, **kwargs):  # the weights are written; the command is stopped before it ends
    save_file(*args, **kwargs)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)
safetensors.torch.save_file = slow_save_file
from gpt2lab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _stop_convert_force(sig: signal.Signals, code: int, line: str):
    def case(tmp_path: Path, sandbox: Path) -> None:
        """`convert --force` stopped by a signal while it writes: its temporary folder is removed, the
        earlier export stays as it was, one line."""
        export = tmp_path / "export"
        argv = ["convert", "--init", str(sandbox / "run"), "--out", str(export)]
        assert run_cli(argv, cwd=tmp_path)[0] == 0
        before = snapshot(tmp_path)
        written = tmp_path / "written"
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(written), *argv, "--force"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(_src())})
        deadline = time.monotonic() + 60
        while not written.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(tmp_path.glob(".tmp-export-*")), "the export's temporary folder was not found"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        written.unlink()
        assert proc.returncode == code and err.decode().strip() == line, (proc.returncode, err.decode())
        assert snapshot(tmp_path) == before
    return case


# Family 6: concurrency and races, each run for real (threads or processes) as a whole. (name, test)
CONCURRENT_CASES = [
    ("two prepares of different corpora into one --out, met mid-write", _race_prepare_threads),
    ("two prepare processes of different corpora into one --out", _race_prepare_processes),
    ("sample --init RUN while RUN rotates its checkpoints", _race_sample_while_training),
    ("SIGTERM during a multi-worker prepare, then the rerun",
     _stop_prepare(signal.SIGTERM, False, "gpt2lab prepare: stopped by SIGTERM")),
    ("SIGTERM to the process group of a multi-worker prepare, then the rerun",
     _stop_prepare(signal.SIGTERM, True, "gpt2lab prepare: stopped by SIGTERM")),
    ("Ctrl-C to the process group of a multi-worker prepare, then the rerun",
     _stop_prepare(signal.SIGINT, True, "gpt2lab prepare: interrupted")),
    ("SIGTERM during convert --force", _stop_convert_force(signal.SIGTERM, 143, "gpt2lab convert: stopped by SIGTERM")),
    ("Ctrl-C during convert --force", _stop_convert_force(signal.SIGINT, 130, "gpt2lab convert: interrupted")),
]

RACE_CASES: list = [*OWN_FILE_CASES, *FULL_DISK_CASES, *CONCURRENT_CASES]


@pytest.mark.parametrize("name,setup,argv,code,text", OWN_FILE_CASES, ids=[c[0] for c in OWN_FILE_CASES])
def test_the_users_own_files(name, setup, argv, code, text, tmp_path, sandbox):
    setup(tmp_path, sandbox)
    before = snapshot(tmp_path)
    got, err = run_cli(_argv(argv, sandbox), cwd=tmp_path)
    if code == 2:
        assert text in assert_one_line(name, got, err)
        assert snapshot(tmp_path) == before
        return
    assert got == 0 and "Traceback" not in err, f"{name}: exit {got}\n{err}"
    after = snapshot(tmp_path)
    users = {k: v for k, v in before.items() if "checkpoints" not in Path(k).parts and Path(k).name not in _OURS}
    assert {k: after.get(k) for k in users} == users, f"{name}: a file of the user's changed"
    from gpt2lab.config import load_config
    from gpt2lab.run import RESOLVED_CONFIG_HEADER

    resolved = tmp_path / "exp" / "resolved_config.yaml"
    assert resolved.read_text().startswith(RESOLVED_CONFIG_HEADER)
    assert load_config(str(resolved)).train.max_steps == (3 if "--resume" in argv else 2)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (a real file system that fills up), mounted for the test; skipped where this
    process cannot mount one (not root, or no mount permission in its container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a file a failed case left open


@pytest.fixture(scope="module")
def step1_run(tmp_path_factory, sandbox) -> Path:
    """A run stopped at step 1 with its checkpoint (the one a full disk must leave intact)."""
    folder = tmp_path_factory.mktemp("step1")
    code, err = run_cli(_argv([*_TRAIN, "--train.max_steps", "1", "--checkpoint.every", "1"], sandbox), cwd=folder)
    assert code == 0, err
    return folder / "exp"


@pytest.mark.parametrize("name,free,argv,code,text", FULL_DISK_CASES, ids=[c[0] for c in FULL_DISK_CASES])
def test_a_real_full_disk(name, free, argv, code, text, small_disk, step1_run, sandbox, tmp_path):
    from gpt2lab.checkpoint import checkpoint_problem, find_latest

    ckpt = step1_run / "checkpoints" / "step_000001"
    pages = {key: -(-(ckpt / f).stat().st_size // _PAGE) for key, f in
             (("model", "model.safetensors"), ("config", "config.json"), ("state", "train_state.pt"))}
    run = small_disk / "run"
    if argv is None:  # prepare: into a new folder of the full disk
        command = ["prepare", "default", "--out", str(small_disk / "data")]
    else:
        shutil.copytree(step1_run, run, symlinks=True)
        step2 = ["--resume", "--train.max_steps", "2", "--checkpoint.allow_changes", "true"]
        command = [str(run) if a == "exp" else a for a in _argv([*_TRAIN, *step2, *argv], sandbox)]
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - free(pages)))
    before = snapshot(small_disk)
    got, err = run_cli(command, cwd=tmp_path)
    assert got == code and "Traceback" not in err, f"{name}: exit {got}\n{err}"
    last = err.strip().splitlines()[-1]  # a run that had begun said so first
    if code == 2:
        assert "error: no space left on device writing" in last and err.count("error") == 1, err
    assert text in last, err
    after = snapshot(small_disk)
    leftovers = [k for k in after if Path(k).name.startswith((".tmp-", ".old-")) or k.endswith(".tmp")]
    assert not leftovers, f"{name}: left behind {leftovers}"
    if argv is None:
        assert after == before
        return
    kept = [k for k in before if k.startswith("run/checkpoints/step_000001") or k == "run/loss.png"]
    assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
    assert checkpoint_problem(run / "checkpoints" / "step_000001") is None
    if code == 2:  # with space again, the run continues from the checkpoint the full disk left
        filler.unlink()
        got, err = run_cli(command, cwd=tmp_path)
        assert got == 0, err
        newest = find_latest(run)
        assert newest.name != "step_000001" and checkpoint_problem(newest) is None


@pytest.mark.parametrize("name,case", CONCURRENT_CASES, ids=[c[0] for c in CONCURRENT_CASES])
def test_concurrency_and_races(name, case, tmp_path, sandbox):
    case(tmp_path, sandbox)


# ==================================================================================================


def test_resume_with_damaged_metrics_is_one_line_and_writes_nothing(tmp_path, sandbox):
    """metrics.jsonl is read (and checked) before the resumed run writes anything, its resolved config included."""
    run = tmp_path / "run"
    shutil.copytree(sandbox / "run", run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    before = snapshot(tmp_path)
    argv = ["train", "--data.dir", str(sandbox / "data"), "--data.prepare", "null", "--out", str(run), "--resume",
            *[a for k, v in TINY.items() if k != "log.progress" for a in (f"--{k}", str(v))],
            "--train.max_steps", "4", "--checkpoint.allow_changes", "true"]
    code, err = run_cli(argv, tmp_path)  # the resume's own lines (what changes), then the one error
    assert code == 2 and "Traceback" not in err, err
    assert "error:" in err.splitlines()[-1] and "metrics.jsonl:2" in err.splitlines()[-1], err
    lock = "run/.gpt2lab.lock"  # the run's lock names its holder: the one file a refused resume may touch
    assert {k: v for k, v in snapshot(tmp_path).items() if k != lock} == {k: v for k, v in before.items() if k != lock}


def test_there_are_sixty_cases_across_the_ten_families():
    assert len(SHAPE_CASES) + len(SIZE_CASES) + len(RACE_CASES) >= 60
