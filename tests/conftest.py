"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def machine_independent_defaults(tmp_path_factory):
    """Environment defaults for the whole session (a value already set is kept; subprocesses inherit them).

    GPT2LAB_CPU_DTYPE=fp32: `dtype: auto` on a CPU is measured (gpt2lab.dtype_choice) and picks bf16 where
    bf16 runs faster, as on CPUs with AMX; tests compare against fp32 references, so auto must mean
    fp32 on every machine. tests/test_precision.py removes it where it tests the measurement itself.
    GPT2LAB_CACHE: a fresh folder, so the suite never writes into (or reads from) the user's ~/.cache/gpt2lab.
    """
    defaults = {"GPT2LAB_CPU_DTYPE": "fp32", "GPT2LAB_CACHE": str(tmp_path_factory.mktemp("gpt2lab_cache"))}
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    yield
    for name in added:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public data files of /work/shared/data ($GPT2LAB_SHARED_DATA, default <repo>/../shared/data); skip if absent."""
    path = Path(os.environ.get("GPT2LAB_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set GPT2LAB_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models spend their time in op overhead, which extra OpenMP threads only add to on a shared CPU.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def default_data(tmp_path_factory) -> Path:
    """The quickstart's corpus (Python's language reference, char tokenizer), prepared once per session."""
    from gpt2lab.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "default"
    prepare("default", out, progress=False)
    return out


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, default_data) -> Path:
    """A working directory as a user would have it after a first run (all paths below are relative):
    a run, a checkpoint, a LoRA adapter, a prepared dataset and some files of the user's own. The misuse
    tests run in it and check that nothing in it changes."""
    import shutil

    from misuse import TINY

    from gpt2lab.checkpoint import save_checkpoint, step_dir
    from gpt2lab.config import load_config
    from gpt2lab.lora import LoraConfig, apply_lora, save_adapter
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.run import train

    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(default_data, root / "data")
    train(load_config("quickstart", {**TINY, "data.dir": str(root / "data"), "data.prepare": None,
                                     "checkpoint.out_dir": str(root / "run")}))
    ckpt = step_dir(root / "run", 2)
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig.from_preset("gpt2-tiny"))  # GPT-2 vocabulary: the base of the adapter
    save_checkpoint(root / "base", gpt2, gpt2.config, {"kind": "gpt2"}, step=1)
    apply_lora(gpt2, LoraConfig(r=2))
    save_adapter(root / "adapter", gpt2, LoraConfig(r=2), base_init=str(root / "base"), tokenizer={"kind": "gpt2"})
    rope = GPT(GPTConfig.from_preset("gpt2-tiny", pos_emb="rope"))
    save_checkpoint(root / "rope", rope, rope.config, {"kind": "gpt2"}, step=1)
    (root / "notes.txt").write_text("the user's own notes\n")
    (root / "mydir").mkdir()
    (root / "mydir" / "keep.txt").write_text("keep me\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "lambada.jsonl").write_text('{"text": "the cat sat on the mat"}\n')
    (root / "bad.yaml").write_text("train:\n  max_steps: [1,\n")
    (root / "junk_ckpt").mkdir()
    (root / "junk_ckpt" / "config.json").write_text((ckpt / "config.json").read_text())
    (root / "junk_ckpt" / "model.safetensors").write_bytes(os.urandom(2048))
    (root / "trunc_cfg").mkdir()
    (root / "trunc_cfg" / "config.json").write_text((ckpt / "config.json").read_text()[:40])
    (root / "trunc_cfg" / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    return root


@pytest.fixture(scope="session")
def trained_bpe(tmp_path_factory, shared_data) -> Path:
    """A 2,000-id byte-level BPE trained on Tiny Shakespeare, as `gpt2lab tokenizer train` writes it (DIR)."""
    from gpt2lab.tokenizer import TOKENIZER_FILE, train_bpe

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    out = tmp_path_factory.mktemp("bpe")
    (out / TOKENIZER_FILE).write_text(train_bpe(text.split("\n\n"), 2000).json, encoding="utf-8")
    return out
