"""Evaluation: HellaSwag / perplexity / LAMBADA numbers equal direct computations from transformers'
logits, both HellaSwag formats parse to the same tasks, bad lines are named, downloads are checked,
and 2 ranks give the numbers of 1."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import socket
import threading
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.evaluate import RemoteFile, fetch, hellaswag, lambada, perplexity
from gpt2lab.evaluate.scoring import encode_pair, score_continuations
from gpt2lab.evaluate.training import TaskEvaluator
from gpt2lab.loading import load_model
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

TOK = get_tokenizer("gpt2")
BLOCK = 48

# Three official-format records and what the llama.cpp extractor writes for them: an ActivityNet task
# (ctx_b lower-case), a WikiHow task with markup, and one with a double space and a [bracketed] link.
RECORDS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 90, "activity_label": "Health",
     "ctx_a": "[header] How to manage grass allergies [title] Use over-the-counter allergy medication. [step] "
              "If you have minor grass allergies, an antihistamine may help.",
     "ctx_b": "", "ctx": "[header] How to manage grass allergies [title] Use over-the-counter allergy "
                         "medication. [step] If you have minor grass allergies, an antihistamine may help.",
     "label": 0, "endings": ["Take it daily [substeps] during the season.", "Eat grass.", "Ignore it.",
                             "[title] Mow the lawn."]},
    {"ind": 7, "activity_label": "Family Life", "ctx_a": "Visit a site like [www.kiddio.org] to find  games.",
     "ctx_b": "then you", "ctx": "Visit a site like [www.kiddio.org] to find  games. then you", "label": 2,
     "endings": ["play.", "sleep.", "choose small, simple games.", "leave."]},
]
TEXT_FORMAT = """\
Roof shingle removal: A man is sitting on a roof. he
3
is using wrap to wrap a pair of skis.
is ripping level tiles off.
is holding a rubik's cube.
starts pulling up roofing on a roof.
Health: How to manage grass allergies. Use over-the-counter allergy medication. If you have minor grass allergies, an antihistamine may help.
0
Take it daily during the season.
Eat grass.
Ignore it.
Mow the lawn.
Family Life: Visit a site like [www.kiddio.org] to find games. then you
2
play.
sleep.
choose small, simple games.
leave.
"""
PASSAGES = [
    "The old man walked slowly to the harbour, where his boat was waiting for him as it had every morning",
    "She opened the letter, read it twice, and handed it to her brother without a word.\n\nBrother",
    "“I can’t do this anymore,” said Maria. “You have to find someone else to help you with the garden",
    "He counted the coins on the table: one, two, three, four, five, six, seven, eight, nine, ten, eleven",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random transformers GPT-2 (GPT-2's vocabulary, block size 48) saved as an HF directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A wide init makes the next-token distributions peaked, so a misplaced position changes the numbers.
    config = GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    path = tmp_path_factory.mktemp("tiny_hf")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(hf_dir):
    from transformers import GPT2LMHeadModel

    ours, tokenizer = load_model(str(hf_dir))
    return ours, GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def hf_token_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, straight from transformers' logits (fp64 log-softmax)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()
    return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def write_tasks(tmp_path: Path) -> tuple[Path, Path]:
    jsonl = tmp_path / "hs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    text = tmp_path / "hs.txt"
    text.write_text(TEXT_FORMAT)
    return jsonl, text


# --------------------------------------------------------------------------------------------------
# Scoring equals transformers


def test_continuation_logprobs_equal_transformers(models):
    ours, hf = models
    task = hellaswag.Task(RECORDS[0]["activity_label"] + ": " + RECORDS[0]["ctx"], tuple(RECORDS[0]["endings"]), 3)
    pairs = hellaswag.encode_task(TOK, task)
    long_context = TOK.encode(" ".join(["the sea was calm and the sky was grey"] * 8))  # > block size
    pairs.append((long_context, TOK.encode(" tonight")))
    scores = score_continuations(ours, pairs, batch_size=3)
    for (context, continuation), score in zip(pairs, scores):
        ids = (context + continuation)[-(BLOCK + 1):]  # lm-evaluation-harness's left truncation
        expected = hf_token_logprobs(hf, ids)[-len(continuation):]
        assert score.n_tokens == len(continuation)
        assert abs(score.logprob - expected.sum().item()) <= 1e-4
    # the plain-forward path (used for FSDP models) gives the same numbers
    plain = score_continuations(ours, pairs, batch_size=2, use_kv_cache=False)
    assert all(abs(a.logprob - b.logprob) <= 1e-4 and a.greedy == b.greedy for a, b in zip(plain, scores))
    # greedy: the model's own argmax continuation is greedy, any other token is not
    context = TOK.encode("Once upon a time")
    with torch.no_grad():
        best = hf(torch.tensor([context])).logits[0, -1].argmax().item()
    g = score_continuations(ours, [(context, [best]), (context, [(best + 1) % 50257])])
    assert [s.greedy for s in g] == [True, False]


def test_hellaswag_metrics_follow_their_definitions(models):
    ours, hf = models
    tasks = [hellaswag.task_from_record(r) for r in RECORDS]
    result = hellaswag.evaluate(ours, TOK, tasks, batch_size=2)
    correct = Counter()
    for task in tasks:
        lls, ntok = [], []
        for ending in task.endings:
            context, continuation = encode_pair(TOK, task.context, " " + ending)
            lls.append(hf_token_logprobs(hf, context + continuation)[-len(continuation):].sum().item())
            ntok.append(len(continuation))
        correct["acc"] += max(range(4), key=lambda i: lls[i]) == task.label
        correct["acc_norm"] += max(range(4), key=lambda i: lls[i] / len(task.endings[i])) == task.label
        correct["acc_token_mean"] += max(range(4), key=lambda i: lls[i] / ntok[i]) == task.label
    assert result["n"] == 3
    for metric in hellaswag.METRICS:
        assert result[metric] == correct[metric] / 3


def test_acc_norm_divides_by_characters_not_tokens():
    task = hellaswag.Task("ctx", ("a b c d e f", "xy", "zzzzzzzzzzzz", "q"), 0)
    # -6 over 11 chars beats -2 over 2 chars; per token (-6 over 2 vs -2 over 1) it does not
    picked = hellaswag.predictions(task, [-6.0, -2.0, -13.0, -4.0], [2, 1, 1, 1])
    assert picked == {"acc": 1, "acc_norm": 0, "acc_token_mean": 1}


def test_perplexity_equals_sliding_window_reference(models):
    ours, hf = models
    text = " ".join(["It was the best of times, it was the worst of times, it was the age of wisdom."] * 5)
    ids = TOK.encode(text)
    assert len(ids) > 2 * BLOCK
    for stride in (BLOCK, 20, 7):
        nll, count = perplexity.sliding_window_nll(ours, ids, BLOCK, stride, batch_size=3)
        # The transformers guide's loop: labels of tokens already scored are -100.
        ref_nll, ref_count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + BLOCK, len(ids))
            window = ids[begin:end]
            logprobs = hf_token_logprobs(hf, window)  # predicts window[1:]
            first = max(prev_end - begin, 1)  # index in window of the first new token
            ref_nll -= logprobs[first - 1:].sum().item()
            ref_count += len(window) - first
            prev_end = end
            if end == len(ids):
                break
        assert count == ref_count
        if stride < BLOCK:
            assert count == len(ids) - 1  # every token but the first, exactly once
        assert abs(nll - ref_nll) <= 1e-4 * ref_count
    result = perplexity.evaluate(ours, TOK, text, max_length=BLOCK, stride=16)
    assert result["tokens_scored"] == len(ids) - 1
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert result["bits_per_byte"] == pytest.approx(result["nll"] * result["tokens_scored"]
                                                    / len(text.encode()) / math.log(2))


def test_perplexity_hf_rows_join(tmp_path):
    f = tmp_path / "wiki.raw"
    f.write_bytes(b" = Title = \r\n Body one .\r\n Body two .\r\n")
    assert perplexity.read_text(f) == " = Title = \n Body one .\n Body two .\n"
    assert perplexity.read_text(f, hf_rows=True) == " = Title = \n\n\n Body one .\n\n\n Body two .\n"


def test_lambada_equals_direct_computation(models):
    ours, hf = models
    result = lambada.evaluate(ours, TOK, PASSAGES, batch_size=3)
    correct, nlls, n_tokens = 0, [], 0
    for text in PASSAGES:
        ids, word = TOK.encode(text), text.split()[-1]
        # the target: the shortest suffix of the passage's tokens that spells its last word
        k = max(k for k in range(len(ids)) if TOK.decode(ids[k:]).strip() == word)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        correct += logits[k - 1:-1].argmax(-1).tolist() == ids[k:]
        nlls.append(-hf_token_logprobs(hf, ids)[k - 1:].sum().item())
        n_tokens += len(ids) - k
    assert result["n"] == 4 and result["target_tokens"] == n_tokens
    assert result["acc"] == correct / 4
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / 4), rel=1e-4)
    assert result["ppl_token"] == pytest.approx(math.exp(sum(nlls) / n_tokens), rel=1e-4)


def test_lambada_target_is_the_last_word_after_a_newline():
    context, target = lambada.split_passage(TOK, "kind of\n\nPower")
    assert TOK.decode(target) == "Power" and TOK.decode(context) == "kind of\n\n"
    context, target = lambada.split_passage(TOK, "he said hello")
    assert TOK.decode(target) == " hello"


# --------------------------------------------------------------------------------------------------
# Parsing


def test_both_hellaswag_formats_parse_to_the_same_tasks(tmp_path):
    jsonl, text = write_tasks(tmp_path)
    from_jsonl = hellaswag.load_tasks(jsonl)
    assert from_jsonl == hellaswag.load_tasks(text)
    assert from_jsonl[1].endings[0] == "Take it daily during the season."
    # lm-evaluation-harness's context: ctx_b capitalized, every [bracketed] span deleted
    harness = hellaswag.load_tasks(jsonl, style="harness")
    assert harness[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert harness[1].context.startswith("Health: How to manage grass allergies. Use over-the-counter")
    assert harness[2].context == "Family Life: Visit a site like to find games. Then you"
    with pytest.raises(UserError, match="needs the official hellaswag_val.jsonl"):
        hellaswag.load_tasks(text, style="harness")


@pytest.mark.parametrize("content, where", [
    (TEXT_FORMAT.replace("\n0\n", "\n7\n"), ":8: the label line must be 0, 1, 2 or 3"),
    ("\n".join(TEXT_FORMAT.splitlines()[:15]) + "\n", ":13: truncated task"),
])
def test_malformed_text_lines_are_named(tmp_path, content, where):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(UserError, match=f"bad.txt{where}"):
        hellaswag.load_tasks(f)


@pytest.mark.parametrize("line2, message", [
    ('{"activity_label": "x", "ctx": "y", "endings": ["a", "b", "c"', ":2: invalid JSON"),
    (json.dumps({**RECORDS[0], "label": 5}), ":2: 'label' must be 0, 1, 2 or 3"),
    (json.dumps({**RECORDS[0], "endings": ["a", "b"]}), ":2: 'endings' must be a list of 4 strings"),
    (json.dumps({k: v for k, v in RECORDS[0].items() if k != "label"}), ":2: no 'label'"),
])
def test_malformed_jsonl_lines_are_named(tmp_path, line2, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(RECORDS[0]) + "\n" + line2 + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl{message}"):
        hellaswag.load_tasks(f)


def test_malformed_lambada_line_is_named(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text('{"text": "a b c"}\n{"txt": "a b"}\n')
    with pytest.raises(UserError, match=r"l.jsonl:2: missing 'text'; each line is \{\"text\": PASSAGE\}$"):
        lambada.read_passages(f)


def test_shared_hellaswag_file(shared_data):
    tasks = hellaswag.load_tasks(shared_data / hellaswag.SHARED_FILE)
    assert len(tasks) == hellaswag.N_VAL_TASKS == 10042
    assert Counter(t.label for t in tasks) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}


def test_shared_lambada_targets_match_lm_eval_split(shared_data):
    passages = lambada.read_passages(shared_data / lambada.SHARED_FILE)
    assert len(passages) == 5153
    same = sum(lambada.split_passage(TOK, p) == encode_pair(TOK, p.rsplit(" ", 1)[0], " " + p.rsplit(" ", 1)[1])
               for p in passages)
    assert same == 5146  # the other 7 have a newline just before their last word


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_hellaswag_limit_and_json(hf_dir, tmp_path, capsys):
    _, text = write_tasks(tmp_path)
    out = tmp_path / "r.json"
    assert main(["eval", "hellaswag", "--init", str(hf_dir), "--data", str(text), "--limit", "2",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["task"] == "hellaswag" and result["data"] == str(text)
    assert {"acc", "acc_norm", "acc_token_mean", "model", "seconds"} <= set(result)
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "acc_token_mean" in printed


def test_cli_perplexity_and_lambada_json(hf_dir, tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text("A quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", "perplexity", "--init", str(hf_dir), "--data", str(corpus), "--stride", "24",
                 "--device", "cpu", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stride"] == 24 and result["max_length"] == BLOCK and result["ppl"] > 1
    passages = tmp_path / "l.jsonl"
    passages.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    assert main(["eval", "lambada", "--init", str(hf_dir), "--data", str(passages), "--limit", "3",
                 "--device", "cpu", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_cli_dtype_auto_decides_by_the_forward_passes(hf_dir, tmp_path, capsys, monkeypatch):
    from gpt2lab import dtype_choice, precision

    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    timed = []

    def compare(ops, low, backward=True, **kwargs):  # bf16 forward matmuls 3x faster, backward ones slow
        timed.append(backward)
        return (100e9, 300e9) if not backward else (100e9, 10e9)

    monkeypatch.setattr(precision, "_compare_matmuls", compare)
    # where the forward matmuls pass the gate, forward passes of the model decide: bf16 2x faster here
    monkeypatch.setattr(dtype_choice, "_compare_steps", lambda calls, tokens: (100.0, 200.0))
    corpus = tmp_path / "t.txt"
    corpus.write_text("A quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", "perplexity", "--init", str(hf_dir), "--data", str(corpus), "--dtype", "auto",
                 "--device", "cpu", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dtype"] == "bf16" and timed and not any(timed)
    assert "--dtype auto -> bf16 (bf16 forward passes 2.00x fp32" in captured.err and "(matmuls 3.00x)" in captured.err


def test_cli_bad_data_is_one_line_error(hf_dir, tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_text("ctx\nnine\na\nb\nc\nd\n")
    assert main(["eval", "hellaswag", "--init", str(hf_dir), "--data", str(f), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.txt:2:" in err


# --------------------------------------------------------------------------------------------------
# During training


def test_in_training_eval(models, tmp_path, monkeypatch):
    ours, _ = models
    (tmp_path / "shared" / "hellaswag").mkdir(parents=True)
    (tmp_path / "shared" / hellaswag.SHARED_FILE).write_text(TEXT_FORMAT)
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(tmp_path / "shared"))
    ours.train()
    got = TaskEvaluator([hellaswag.TASK], 2, ours, TOK)()
    assert ours.training  # mode restored
    expected = hellaswag.evaluate(ours.eval(), TOK, hellaswag.load_tasks(tmp_path / "shared" / hellaswag.SHARED_FILE)[:2])
    assert got == {"hellaswag/acc": expected["acc"], "hellaswag/acc_norm": expected["acc_norm"]}
    # no data anywhere: {} and one warning, never an exception
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "empty_cache"))
    evaluator = TaskEvaluator([hellaswag.TASK], 2, ours, TOK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluator() == {}
        assert evaluator() == {}
    assert len(caught) == 1 and "hellaswag skipped during training: no data" in str(caught[0].message)
    # a tokenizer that cannot encode the data (a character model): {} and a warning, not an exception
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(tmp_path / "shared"))
    with pytest.warns(UserWarning, match="hellaswag skipped during training: character"):
        assert TaskEvaluator([hellaswag.TASK], 2, ours, CharTokenizer.from_text("abc"))() == {}
    ours.eval()


# --------------------------------------------------------------------------------------------------
# Downloads, against a local HTTP server


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, set as the data mirror; the cache is tmp_path/cache."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPT2LAB_DATA_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    yield www, httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_sha_and_caches(server, tmp_path):
    import hashlib

    www, httpd = server
    body = b'{"text": "one two three"}\n'
    (www / "lambada_test.jsonl").write_bytes(body)
    good = RemoteFile("https://example.invalid/gpt-2/data/lambada_test.jsonl", hashlib.sha256(body).hexdigest())
    path = fetch(good)
    assert path == tmp_path / "cache" / "lambada_test.jsonl" and path.read_bytes() == body
    httpd.shutdown()  # a cached file needs no server
    assert fetch(good) == path


def test_download_sha_mismatch_leaves_no_cache_entry(server, tmp_path):
    www, _ = server
    (www / "lambada_test.jsonl").write_bytes(b'{"text": "tampered with"}\n')
    with pytest.raises(UserError, match="has sha256 .*, expected 4aa8d02c"):
        fetch(lambada.LAMBADA_TEST)
    assert not (tmp_path / "cache" / "lambada_test.jsonl").exists()
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no temporary file left either


def test_download_of_short_hellaswag_is_rejected(server, tmp_path):
    www, _ = server
    (www / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with pytest.raises(UserError, match="has 3 tasks, not 10042"):
        fetch(hellaswag.HELLASWAG_VAL, validate=hellaswag._validate_official)
    assert not (tmp_path / "cache" / "hellaswag_val.jsonl").exists()


def test_offline_download_is_one_line_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPT2LAB_DATA_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="could not download http://127.0.0.1") as e:
        fetch(lambada.LAMBADA_TEST, timeout=5)
    assert "\n" not in str(e.value) and "--data PATH" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Two ranks equal one


def _rank_worker(rank: int, world: int, port: int, hf_dir: str, out: str, data: dict) -> None:
    from types import SimpleNamespace

    from gpt2lab import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    env = parallel.init_distributed("cpu")
    try:
        results = _evaluate_all(hf_dir, data)
        # FSDP2-sharded weights: every rank must make the same number of forward calls
        cfg = SimpleNamespace(strategy="fsdp", activation_checkpointing="none", compile_blocks=False,
                              fsdp=SimpleNamespace(reshard_after_forward=True, mixed_precision=False))
        sharded = parallel.parallelize(load_model(hf_dir)[0], cfg, env)
        tasks = [hellaswag.Task(**t) for t in data["tasks"]]
        results["hellaswag_fsdp"] = hellaswag.evaluate(sharded, TOK, tasks, batch_size=1, env=env)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        parallel.destroy()


def _evaluate_all(hf_dir: str, data: dict) -> dict:
    model, tok = load_model(hf_dir)
    tasks = [hellaswag.Task(**t) for t in data["tasks"]]
    nll, count = perplexity.sliding_window_nll(model, tok.encode(data["text"]), BLOCK, 16, batch_size=2)
    return {
        "hellaswag": hellaswag.evaluate(model, tok, tasks, batch_size=1),
        "lambada": lambada.evaluate(model, tok, data["passages"], batch_size=2),
        "perplexity": [nll, count],
    }


def test_two_gloo_ranks_equal_one(hf_dir, tmp_path):
    tasks = [hellaswag.task_from_record(r) for r in RECORDS]
    data = {"tasks": [{"context": t.context, "endings": list(t.endings), "label": t.label} for t in tasks],
            "passages": PASSAGES[:3], "text": "The rain in Spain stays mainly in the plain. " * 12}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    mp.spawn(_rank_worker, args=(2, port, str(hf_dir), str(out), data), nprocs=2, join=True)
    two = json.loads(out.read_text())
    one = _evaluate_all(str(hf_dir), data)
    for metric in ("n", "acc", "acc_norm", "acc_token_mean"):
        assert two["hellaswag"][metric] == one["hellaswag"][metric]
        assert two["hellaswag_fsdp"][metric] == one["hellaswag"][metric]
    assert two["lambada"]["n"] == 3 and two["lambada"]["acc"] == one["lambada"]["acc"]
    assert two["lambada"]["ppl"] == pytest.approx(one["lambada"]["ppl"], rel=1e-6)
    assert two["perplexity"][1] == one["perplexity"][1]
    assert two["perplexity"][0] == pytest.approx(one["perplexity"][0], rel=1e-6)
