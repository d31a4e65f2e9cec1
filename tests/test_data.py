"""Token shards, `gpt2lab prepare` and the step-indexed loader."""

import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from gpt2lab.cli import main
from gpt2lab.data import prepare as prep
from gpt2lab.data import sources
from gpt2lab.data.loader import TokenLoader, iter_eval_batches
from gpt2lab.data.prepare import (
    check_min_tokens,
    load_meta,
    prepare,
    prepare_documents,
    prepare_tokens,
)
from gpt2lab.data.shards import open_shard, read_header, write_shard
from gpt2lab.data.sources import Corpus, Source, hf_documents
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import EOT_TEXT, CharTokenizer, get_tokenizer

GPT2 = {"kind": "gpt2"}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) + f" #{i}." for i in range(n)]


def all_tokens(meta: dict, split: str) -> np.ndarray:
    return np.concatenate([open_shard(p)[0] for p in meta["splits"][split]["paths"]])


def files_of(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 17, 65535 % 50257], dtype=np.int64)
    write_shard(tmp_path / "a.bin", tokens, GPT2)
    got, header = open_shard(tmp_path / "a.bin")
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert header["tokens"] == 5 and header["tokenizer"] == GPT2 and header["header_bytes"] == 1024
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 5 * 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left behind


def test_shard_large_vocab_uses_uint32_and_grows_header(tmp_path):
    chars = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))  # > 65,536 ids, long JSON
    tok = CharTokenizer(chars)
    write_shard(tmp_path / "big.bin", [0, 69_999, 65_536], tok.to_dict())
    got, header = open_shard(tmp_path / "big.bin")
    assert got.dtype == np.uint32 and got.tolist() == [0, 69_999, 65_536]
    assert header["header_bytes"] % 1024 == 0 and header["header_bytes"] > 70_000
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "bad.bin", [70_000], tok.to_dict())


def test_shard_errors(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), GPT2)
    with open(path, "r+b") as f:
        f.truncate(1024 + 99 * 2 + 1)
    with pytest.raises(UserError, match=r"s.bin is truncated: header says 100 tokens but file holds 99; re-run gpt2lab prepare"):
        open_shard(path)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"hello world" * 200)
    with pytest.raises(UserError, match="foreign.bin is not a gpt2lab token shard"):
        open_shard(foreign)
    write_shard(path, np.arange(10), GPT2)
    data = bytearray(path.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard format version 99, this gpt2lab reads version 1"):
        read_header(path)
    with pytest.raises(UserError, match="does not exist"):
        open_shard(tmp_path / "missing.bin")


# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """A dataset whose token at stream position p is p (train) or 5000 + p (val), in 1000-token shards."""
    out = tmp_path_factory.mktemp("counting")
    return prepare_tokens({"train": np.arange(5000), "val": np.arange(5000, 5600)}, out, get_tokenizer("gpt2"),
                          source={"name": "counting"}, settings={"val": "test"}, shard_tokens=1000)


def test_counting_dataset_layout(counting):
    assert counting["splits"]["train"]["shards"] == [f"train_{i:06d}.bin" for i in range(5)]
    assert counting["splits"]["train"]["tokens"] == 5000 and counting["splits"]["val"]["tokens"] == 600


def loader(meta, split="train", **kw):
    kw = {"block_size": 16, "global_batch_size": 8, "seed": 3, **kw}
    return TokenLoader(meta["dir"], split, **kw)


def test_random_batches_depend_only_on_seed_and_step(counting):
    x, y = loader(counting).get_batch(7)
    x2, y2 = loader(counting).get_batch(7)  # a new loader instance
    assert x.dtype == torch.int64 and x.shape == (8, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(y, x + 1)  # y is x shifted by one (token value = position)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window
    assert not torch.equal(x, loader(counting).get_batch(8)[0])
    assert not torch.equal(x, loader(counting, seed=4).get_batch(7)[0])


def test_sequential_walks_the_stream_and_wraps(counting):
    seq = loader(counting, order="sequential")
    windows = (5000 - 1) // 16
    assert seq.windows == windows == 312
    for step in (0, 7, 39, 40):  # 39: windows 312..319 wrap to the first ones (next epoch)
        x, y = seq.get_batch(step)
        starts = [16 * ((step * 8 + i) % windows) for i in range(8)]
        expect = torch.tensor([list(range(s, s + 17)) for s in starts])
        assert torch.equal(x, expect[:, :-1]) and torch.equal(y, expect[:, 1:])
    # window 62 = tokens 992..1008 spans shards 0 and 1
    assert seq.get_batch(7)[0][6].tolist() == list(range(992, 1008))


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_rank_slices_concatenate_to_single_rank_batch(counting, order):
    full_x, full_y = loader(counting, order=order, global_batch_size=8).get_batch(5)
    for world in (1, 2, 4):
        parts = [loader(counting, order=order, rank=r, world_size=world).get_batch(5) for r in range(world)]
        assert all(p[0].shape == (8 // world, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_state_dict_round_trip(counting, tmp_path):
    first = loader(counting)
    for step in range(3):
        first.get_batch(step)
    state = first.state_dict()
    assert state["step"] == 3 and state["seed"] == 3 and state["order"] == "random"
    resumed = loader(counting, seed=99, order="sequential")
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert torch.equal(resumed.next_batch()[0], first.get_batch(3)[0])
    other = prepare_tokens({"train": np.arange(5001), "val": np.arange(600)}, tmp_path / "other",
                           get_tokenizer("gpt2"), source={"name": "other"}, settings={})
    with pytest.raises(UserError, match="is not the dataset this run was trained on"):
        loader(other).load_state_dict(state)


def test_loader_errors(counting, tmp_path):
    with pytest.raises(UserError, match="global batch of 6 sequences does not divide among 4 ranks"):
        loader(counting, global_batch_size=6, world_size=4)
    small = prepare_tokens({"train": np.arange(100), "val": np.arange(40)}, tmp_path / "small",
                           get_tokenizer("gpt2"), source={"name": "small"}, settings={})
    with pytest.raises(UserError, match=r"val split of .*small has 40 tokens, fewer than block_size\+1=65; "
                                        "use a larger corpus or smaller block_size"):
        loader(small, "val", block_size=64)
    with pytest.raises(UserError, match="is not a prepared dataset"):
        TokenLoader(tmp_path, "train", block_size=8, global_batch_size=2)


def test_loader_rejects_damaged_shard(tmp_path):
    meta = prepare_tokens({"train": np.arange(300), "val": np.arange(300)}, tmp_path / "d",
                          get_tokenizer("gpt2"), source={"name": "d"}, settings={})
    path = meta["splits"]["train"]["paths"][0]
    with open(path, "r+b") as f:
        f.truncate(1024 + 10)
    with pytest.raises(UserError, match="train_000000.bin is truncated: header says 300 tokens but file holds 5"):
        loader(meta)


def test_eval_batches_fixed_and_disjoint(counting):
    def run(rank=0, world=1):
        return list(iter_eval_batches(counting["dir"], "val", 16, 8, max_batches=3, rank=rank, world_size=world))

    once, twice = run(), run()
    assert len(once) == 3 == len(twice)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(once, twice))
    halves = [run(r, 2) for r in range(2)]
    for j in range(3):
        assert torch.equal(torch.cat([halves[0][j][0], halves[1][j][0]]), once[j][0])
    assert once[0][0][0, 0].item() == 5000 and once[1][0][0, 0].item() == 5000 + 8 * 16
    # 600 tokens = 37 windows = 4 full batches of 8: max_batches=None gives all of them
    assert len(list(iter_eval_batches(counting["dir"], "val", 16, 8))) == 4


def test_check_min_tokens():
    check_min_tokens(65, 64, "x")
    with pytest.raises(UserError, match="x has 64 tokens, fewer than block_size"):
        check_min_tokens(64, 64, "x")


# ----------------------------------------------------------------------------- prepare: local corpora


def test_prepare_single_text_file(tmp_path):
    text = "\n".join(make_docs(40))
    (tmp_path / "corpus.txt").write_text(text)
    meta = prepare(str(tmp_path / "corpus.txt"), tmp_path / "out", progress=False)
    tok = get_tokenizer("gpt2")
    train, val = tok.decode(all_tokens(meta, "train")), tok.decode(all_tokens(meta, "val"))
    assert train + val == text and len(train) == int(len(text) * 0.9)
    assert meta["source"]["name"] == "local" and meta["vocab_size"] == 50257
    # re-running the same command keeps the finished dataset untouched
    inode = (tmp_path / "out" / "train_000000.bin").stat().st_ino
    prepare(str(tmp_path / "corpus.txt"), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "train_000000.bin").stat().st_ino == inode


def test_prepare_folder_of_few_files_splits_token_stream(tmp_path):
    docs = make_docs(3)
    (tmp_path / "in").mkdir()
    for name, doc in zip(["b.txt", "a.txt", "c.txt"], docs):
        (tmp_path / "in" / name).write_text(doc)
    meta = prepare(str(tmp_path / "in"), tmp_path / "out", progress=False)
    tok = get_tokenizer("gpt2")
    stream = np.concatenate([all_tokens(meta, "train"), all_tokens(meta, "val")])
    in_order = [docs[1], docs[0], docs[2]]  # files sorted by name
    assert tok.decode(stream) == "".join(EOT_TEXT + d for d in in_order)
    assert meta["splits"]["train"]["tokens"] == int(len(stream) * 0.9)


def test_prepare_jsonl_splits_documents(tmp_path):
    docs = make_docs(120)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    meta = prepare(str(path), tmp_path / "out", text_field="body", workers=1, progress=False)
    tok = get_tokenizer("gpt2")
    val_ids = [i for i in range(120) if (i + 1) % 10 == 0]  # every 10th document
    assert tok.decode(all_tokens(meta, "val")) == "".join(EOT_TEXT + docs[i] for i in val_ids)
    assert tok.decode(all_tokens(meta, "train")) == "".join(EOT_TEXT + d for i, d in enumerate(docs) if i not in val_ids)
    with pytest.raises(UserError, match="docs.jsonl:1: missing 'text'; pass --text-field NAME"):
        prepare(str(path), tmp_path / "out2", progress=False)


def test_prepare_parquet_char_tokenizer(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = make_docs(200)
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet")
    meta = prepare(str(tmp_path / "docs.parquet"), tmp_path / "out", tokenizer="char", progress=False)
    tok = get_tokenizer(meta["tokenizer"])
    assert tok.name == "char" and tok.chars == "".join(sorted(set("".join(docs)) | {"\n"}))
    expect = "".join(d + "\n\n" for i, d in enumerate(docs) if (i + 1) % 10 != 0)
    assert tok.decode(all_tokens(meta, "train")) == expect


# ----------------------------------------------------------------------------- prepare: the streaming pipeline


@pytest.fixture()
def parquet_docs(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(prep, "DOCS_PER_TASK", 4)  # several tokenizer tasks even for a tiny corpus
    docs = make_docs(60, seed=1)
    path = tmp_path / "stream.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(60))}), path)
    return path, docs


def stream_prepare(path, out, **kw):
    pytest.importorskip("datasets")
    kw = {"source": {"name": "test-stream"}, "val_fraction": None, "shard_tokens": 200, "progress": False, **kw}
    return prepare_documents(hf_documents("parquet", data_files=str(path)), out, get_tokenizer("gpt2"), **kw)


def test_hf_stream_first_shard_is_val(parquet_docs, tmp_path):
    path, docs = parquet_docs
    meta = stream_prepare(path, tmp_path / "out")
    tok = get_tokenizer("gpt2")
    stream = np.concatenate([all_tokens(meta, "val"), all_tokens(meta, "train")])
    assert tok.decode(stream) == "".join(EOT_TEXT + d for d in docs)
    assert meta["splits"]["val"]["tokens"] == 200 and meta["splits"]["val"]["shards"] == ["val_000000.bin"]
    sizes = [len(open_shard(p)[0]) for p in meta["splits"]["train"]["paths"]]
    assert len(sizes) >= 3 and all(s == 200 for s in sizes[:-1]) and 0 < sizes[-1] <= 200
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["meta.json", "val_000000.bin"] + meta["splits"]["train"]["shards"])
    # worker processes give the same bytes
    stream_prepare(path, tmp_path / "pool", workers=2)
    assert files_of(tmp_path / "pool") == files_of(tmp_path / "out")


def test_hf_stream_resume_skips_finished_shards(parquet_docs, tmp_path, monkeypatch):
    path, docs = parquet_docs
    reference = stream_prepare(path, tmp_path / "ref", val_fraction=0.1)

    def interrupted():
        for i, doc in enumerate(hf_documents("parquet", data_files=str(path))):
            if i == 40:
                raise KeyboardInterrupt
            yield doc

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_documents(interrupted(), out, get_tokenizer("gpt2"), source={"name": "test-stream"},
                          val_fraction=0.1, shard_tokens=200, progress=False)
    progress = json.loads((out / "progress.json").read_text())
    done = progress["documents"]
    assert 0 < done <= 40 and progress["splits"]["train"]["shards"]
    with pytest.raises(UserError, match="half-finished"):
        load_meta(out)
    finished = {name: (out / name).stat().st_ino for name in progress["splits"]["train"]["shards"]}

    tokenized = []
    original = prep._tokenize_documents
    monkeypatch.setattr(prep, "_tokenize_documents", lambda batch: tokenized.extend(batch) or original(batch))
    meta = stream_prepare(path, out, val_fraction=0.1)
    assert len(tokenized) == 60 - done  # documents in finished shards were skipped, not re-tokenized
    assert all((out / name).stat().st_ino == ino for name, ino in finished.items())
    assert files_of(out) == files_of(tmp_path / "ref")
    assert meta["splits"]["train"]["tokens"] == reference["splits"]["train"]["tokens"]


def test_stream_refuses_other_settings_and_empty_corpus(parquet_docs, tmp_path):
    path, _ = parquet_docs
    stream_prepare(path, tmp_path / "out")
    with pytest.raises(UserError, match="already holds a dataset from other settings"):
        stream_prepare(path, tmp_path / "out", shard_tokens=300)
    with pytest.raises(UserError, match="is empty"):
        prepare_documents(["", ""], tmp_path / "empty", get_tokenizer("gpt2"), source={"name": "e"}, progress=False)


# ----------------------------------------------------------------------------- prepare: named sources


def test_shakespeare_char_nanogpt_split(shared_data, tmp_path):
    out = tmp_path / "sc"
    code = main(["prepare", "shakespeare_char", "--input", str(shared_data / "tinyshakespeare" / "input.txt"),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    meta = load_meta(out)
    assert meta["splits"]["train"]["tokens"] == 1_003_854 and meta["splits"]["val"]["tokens"] == 111_540
    assert meta["vocab_size"] == 65 and meta["source"]["sha256"] == sources.SHAKESPEARE_SHA256


def test_default_corpus_offline(tmp_path):
    meta = prepare("default", tmp_path / "default", progress=False)
    train, val = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    # ~465k characters on Python 3.11; the language reference grows a little with each Python version
    assert train + val >= 400_000 and val == train + val - int((train + val) * 0.9)
    assert meta["tokenizer"]["kind"] == "char" and meta["vocab_size"] < 128
    text = get_tokenizer(meta["tokenizer"]).decode(all_tokens(meta, "train")[:2000])
    assert "statement" in text


@pytest.fixture()
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shakespeare_download_and_cache(http_dir, tmp_path, monkeypatch):
    www, base = http_dir
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (www / "input.txt").write_text(text)
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2LAB_SHAKESPEARE_URL", f"{base}/input.txt")
    meta = prepare("shakespeare_char", tmp_path / "out", progress=False)
    assert meta["splits"]["train"]["tokens"] == int(len(text) * 0.9)
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_text() == text
    (www / "input.txt").unlink()  # the second time comes from the cache
    assert sources.shakespeare_text() == text


def test_shakespeare_download_errors(http_dir, tmp_path, monkeypatch):
    www, base = http_dir
    (www / "input.txt").write_text("not shakespeare")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"input.txt has sha256 [0-9a-f]{64}, expected 86c4e6aa.*pass --input PATH"):
        sources.shakespeare_text(url=f"{base}/input.txt")
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()
    with socket.socket() as s:  # a port nobody listens on: the offline case
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:\d+/x \(.*\); download it yourself and pass --input PATH"):
        sources.shakespeare_text(url=f"http://127.0.0.1:{port}/x")


# ----------------------------------------------------------------------------- prepare: the source registry


def test_a_new_source_is_one_registry_entry(tmp_path, monkeypatch, capsys):
    docs = make_docs(100)
    entry = Source("numbers", "one hundred test documents", lambda spec, args: Corpus(lambda: iter(docs), 100,
                   {"name": spec}), tokenizer="char", val_fraction=0.2, tokens={None: 4321})
    monkeypatch.setitem(sources.SOURCES, "numbers", entry)
    meta = prepare("numbers", tmp_path / "out", progress=False)
    tok = get_tokenizer(meta["tokenizer"])
    val_ids = [i for i in range(100) if (i + 1) % 5 == 0]  # the entry's val_fraction, evenly spread
    assert meta["tokenizer"]["kind"] == "char" and meta["source"] == {"name": "numbers"}
    assert tok.decode(all_tokens(meta, "val")) == "".join(docs[i] + "\n\n" for i in val_ids)
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = capsys.readouterr().out
    assert "  numbers           one hundred test documents\n" in help_text
    assert "tokenizer char, val 0.2, ~4.32k tokens" in help_text


def test_prepare_help_imports_neither_torch_nor_numpy():
    code = ("import sys, gpt2lab.cli, gpt2lab.commands.prepare as p, argparse; p.add_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("source, kwargs, message", [
    ("default", {"subset": "x"}, "--subset applies to fineweb-edu, hf:NAME, not default; drop --subset"),
    ("shakespeare", {"text_field": "body"}, "--text-field applies to openwebtext, fineweb-edu, hf:NAME, PATH, not "
                                            "shakespeare"),
    ("hf:some/dataset", {"input_path": "x.txt"}, "--input applies to shakespeare, shakespeare_char, not hf:NAME"),
    ("openwebtext", {"tokenizer": "char"}, "openwebtext is streamed: the char tokenizer needs a local corpus"),
])
def test_source_arguments_are_checked_against_the_entry(tmp_path, source, kwargs, message):
    with pytest.raises(UserError, match=message):
        prepare(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- prepare: errors


def test_prepare_input_errors(tmp_path):
    with pytest.raises(UserError, match="unknown source .*nope.txt"):
        prepare(str(tmp_path / "nope.txt"), tmp_path / "out")
    with pytest.raises(UserError, match="--input .*missing.txt does not exist"):
        prepare("shakespeare_char", tmp_path / "out", input_path=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        prepare(str(tmp_path / "empty.txt"), tmp_path / "out")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="has no .txt files"):
        prepare(str(tmp_path / "emptydir"), tmp_path / "out")
    (tmp_path / "tiny.txt").write_text("a few words only, repeated twice. " * 2)
    with pytest.raises(UserError, match=r"split of .*out has \d+ tokens, fewer than block_size\+1=65"):
        prepare(str(tmp_path / "tiny.txt"), tmp_path / "out", tokenizer="char", block_size=64)
    assert not (tmp_path / "out").exists()  # nothing written


def test_prepare_output_dir_checks(tmp_path):
    (tmp_path / "c.txt").write_text(" ".join(make_docs(30)))
    prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer="gpt2")
    before = files_of(tmp_path / "out")
    with pytest.raises(UserError, match="already holds a dataset with the gpt2 tokenizer, not char.*--overwrite"):
        prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer="char")
    assert files_of(tmp_path / "out") == before  # nothing overwritten
    meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer="char", overwrite=True)
    assert meta["tokenizer"]["kind"] == "char"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--out .*file"):
        prepare(str(tmp_path / "c.txt"), tmp_path / "file")
    with pytest.raises(UserError, match="cannot create --out|not writable"):
        prepare(str(tmp_path / "c.txt"), tmp_path / "file" / "sub")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_prepare_unwritable_out(tmp_path):
    (tmp_path / "c.txt").write_text(" ".join(make_docs(30)))
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(UserError, match="is not writable"):
            prepare(str(tmp_path / "c.txt"), tmp_path / "ro" / "out")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_cli_prepare_reports_user_error(tmp_path, capsys):
    code = main(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab prepare: error: unknown source") and err.count("\n") == 1


def test_validation_set_is_the_same_for_any_micro_batch_and_ranks(default_data):
    """train.eval_tokens fixes the rows; micro-batch size and world size only change how they are read.
    The same weights give the same val loss at micro-batch 6 and 12, in 1 or 2 ranks."""
    from gpt2lab.model import GPT, GPTConfig

    block, rows = 64, 40  # 40 rows: neither 6 * 2 nor 12 divides it, so the last batches are partial
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block, vocab_size=128, n_layer=1, n_head=2, n_embd=32)).eval()
    seen, losses = {}, {}
    for mbs in (6, 12):
        for world in (1, 2):
            got, total, count = [], 0.0, 0
            for rank in range(world):
                for x, y in iter_eval_batches(default_data, "val", block, mbs * world, rank=rank, world_size=world,
                                              max_rows=rows):
                    got += [tuple(r) for r in x.tolist()]
                    if len(x):
                        with torch.no_grad():
                            total += model(x, y, loss_reduction="sum")[1].double().item()
                    count += y.numel()
            seen[mbs, world], losses[mbs, world] = sorted(got), total / count
    assert len(seen[6, 1]) == rows and all(v == seen[6, 1] for v in seen.values())
    reference = losses[12, 1]
    assert all(abs(v - reference) <= 1e-6 * reference for v in losses.values()), losses
