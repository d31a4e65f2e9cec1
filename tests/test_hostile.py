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
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from misuse import TRAIN, assert_one_line, run_cli, snapshot

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

SIZE_CASES: list = []


# ==================================================================================================
# Families 6, 7, 10: races, the user's own files, a real full disk

RACE_CASES: list = []


# ==================================================================================================


def test_there_are_sixty_cases_across_the_ten_families():
    assert len(SHAPE_CASES) + len(SIZE_CASES) + len(RACE_CASES) >= 60
