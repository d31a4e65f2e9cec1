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

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from misuse import TINY, TRAIN, assert_one_line, run_cli, run_limited, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


# ==================================================================================================
# Families 1, 2, 5, 9: files of the wrong shape, damaged or hostile weight files, text that is not
# clean UTF-8, the Python API's exceptions

SHAPE_CASES: list = []


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

RACE_CASES: list = []


# ==================================================================================================


def test_there_are_sixty_cases_across_the_ten_families():
    assert len(SHAPE_CASES) + len(SIZE_CASES) + len(RACE_CASES) >= 60
