"""SFT data: templates, prompt masking token by token, length policy, batching, validation, download."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from gpt2lab.data.sft import (
    SFTConfig,
    SFTData,
    build_sft_data,
    collate,
    encode_chat_prompt,
    encode_segments,
    fetch_alpaca,
    load_records,
    read_records,
    render_prompt,
    render_segments,
    tokenize_records,
)
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import get_tokenizer

EOT = 50256
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a primary color.\n\n### Response:\n"
)
STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def sft_cfg(path, **kw) -> SFTConfig:
    return SFTConfig(path=str(path), **{"val_fraction": 0.0, **kw})


def check_row(x: torch.Tensor, y: torch.Tensor, prompt_ids: list[int], response_ids: list[int]) -> None:
    """x, y of one unpadded example: every prompt token -100, every response token and the eot counted."""
    ids = prompt_ids + response_ids + [EOT]
    assert x.tolist() == ids[:-1]
    expected = [-100] * (len(prompt_ids) - 1) + response_ids + [EOT]
    assert y.tolist() == expected
    for t in range(len(ids) - 1):  # token by token: target t is ids[t+1], counted iff it is not prompt
        assert (y[t] == -100) == (t + 1 < len(prompt_ids))


# --------------------------------------------------------------------------------------------------
# Templates and masking


def test_render_prompt_is_the_stanford_template():
    assert render_prompt("Name a primary color.") == STANFORD_NO_INPUT
    assert render_prompt("Name a primary color.", "") == STANFORD_NO_INPUT
    assert render_prompt("Translate to French.", "Good morning") == STANFORD_WITH_INPUT
    assert render_prompt("Hi", template="Q: {instruction}\nA: {output}") == "Q: Hi\nA: "
    assert render_prompt("Hi", template="chat") == "### User:\nHi\n\n### Assistant:\n"


@pytest.mark.parametrize("record,prompt", [
    ({"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."}, STANFORD_NO_INPUT),
    ({"instruction": "Name a primary color.", "output": "Red is a primary color."}, STANFORD_NO_INPUT),
    ({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}, STANFORD_WITH_INPUT),
])
def test_alpaca_labels_mask_every_prompt_token(tok, record, prompt):
    ex, report = tokenize_records([record], tok, "alpaca", block_size=128)
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 0)
    x, y = collate(ex, [[0]], EOT)
    prompt_ids, response_ids = tok.encode(prompt), tok.encode(record["output"])
    check_row(x[0], y[0], prompt_ids, response_ids)
    assert int((y != -100).sum()) == len(response_ids) + 1


def test_prompt_and_response_are_tokenized_separately(tok):
    # " world" joined to "hello" would be one token sequence; the boundary must stay at the template's cut
    ids, counted = encode_segments([("Say:", False), (" world", True)], tok)
    assert ids == tok.encode("Say:") + tok.encode(" world") + [EOT]
    assert counted == [False] * len(tok.encode("Say:")) + [True] * (len(tok.encode(" world")) + 1)


def test_mask_prompt_off_counts_everything(tok):
    record = {"instruction": "Name a primary color.", "output": "Red."}
    ex, _ = tokenize_records([record], tok, "alpaca", block_size=128, mask_prompt=False)
    x, y = collate(ex, [[0]], EOT)
    assert y[0].tolist() == x[0].tolist()[1:] + [EOT]


def test_chat_masking_counts_assistant_turns_only(tok):
    record = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]}
    ex, _ = tokenize_records([record], tok, "chat", block_size=256)
    x, y = collate(ex, [[0]], EOT)
    counted = y[0][y[0] != -100].tolist()
    assert counted == tok.encode("Paris.") + [EOT] + tok.encode("Rome.") + [EOT]
    prompt1 = "### System:\nYou are terse.\n\n### User:\nCapital of France?\n\n### Assistant:\n"
    prompt2 = "### User:\nAnd of Italy?\n\n### Assistant:\n"
    full = (tok.encode(prompt1) + tok.encode("Paris.") + [EOT] + tok.encode(prompt2) + tok.encode("Rome.") + [EOT])
    assert x[0].tolist() == full[:-1]
    # inference renders the second prompt exactly as training saw it
    assert encode_chat_prompt([("Capital of France?", "Paris.")], "And of Italy?", tok, "chat") == (
        tok.encode("### User:\nCapital of France?\n\n### Assistant:\n") + tok.encode("Paris.") + [EOT]
        + tok.encode(prompt2))


def test_custom_template(tok):
    record = {"question": "2+2?", "answer": "4"}
    assert render_segments(record, "Q: {question}\nA: {answer}{output}") == [("Q: 2+2?\nA: 4", False), ("", True)]
    record = {"instruction": "2+2?", "output": "4"}
    ex, _ = tokenize_records([record], tok, "Q: {instruction}\nA: {output}", block_size=64)
    x, y = collate(ex, [[0]], EOT)
    check_row(x[0], y[0], tok.encode("Q: 2+2?\nA: "), tok.encode("4"))


def test_chat_history_is_trimmed_to_the_context(tok):
    turns = [(f"question {i}", f"answer {i}") for i in range(20)]
    full = encode_chat_prompt(turns, "last", tok, "alpaca")
    short = encode_chat_prompt(turns, "last", tok, "alpaca", max_tokens=200)
    assert len(full) > 200 >= len(short)
    assert tok.decode(short).endswith(render_prompt("last"))
    assert "answer 19<|endoftext|>" in tok.decode(short) and "answer 0<" not in tok.decode(short)


# --------------------------------------------------------------------------------------------------
# Context-length policy


def test_truncate_and_drop_policies_report_counts(tok):
    short = {"instruction": "Hi", "output": "Hello"}
    long_out = {"instruction": "Hi", "output": "word " * 100}
    long_prompt = {"instruction": "word " * 100, "output": "x"}
    block = 64
    ex, report = tokenize_records([short, long_out, long_prompt], tok, "alpaca", block, truncation="truncate")
    assert str(report) == "kept 1, truncated 1, dropped 1"
    assert [len(i) for i in ex.ids][1] == block + 1
    x, y = collate(ex, [[1]], EOT)
    assert x.shape == (1, block) and (y != -100).sum() > 0 and y[0, -1] != EOT  # the tail (and eot) were cut
    ex, report = tokenize_records([short, long_out, long_prompt], tok, "alpaca", block, truncation="drop")
    assert str(report) == "kept 1, truncated 0, dropped 2" and len(ex) == 1


def test_truncation_keeps_at_least_one_response_token(tok):
    prompt_len = len(tok.encode(render_prompt("a b c")))
    record = {"instruction": "a b c", "output": "one two three four"}
    ex, report = tokenize_records([record], tok, "alpaca", block_size=prompt_len, truncation="truncate")
    assert str(report) == "kept 0, truncated 1, dropped 0"
    x, y = collate(ex, [[0]], EOT)
    assert x.shape == (1, prompt_len) and y[0].tolist() == [-100] * (prompt_len - 1) + tok.encode("one")[:1]
    ex, report = tokenize_records([record], tok, "alpaca", block_size=prompt_len - 1, truncation="truncate")
    assert str(report) == "kept 0, truncated 0, dropped 1"


# --------------------------------------------------------------------------------------------------
# Batches


def alpaca_file(tmp_path: Path, n: int, jsonl: bool = False) -> Path:
    records = [{"instruction": f"Count to {i}.", "input": "" if i % 3 else f"start {i}", "output": " ".join(
        str(j) for j in range(i % 17 + 1))} for i in range(n)]
    if jsonl:
        return write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    return write(tmp_path, "d.json", records)


def unpadded(x: torch.Tensor, y: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Rows without trailing padding (identified from y: padding has no counted target after it)."""
    out = []
    for xr, yr in zip(x, y):
        last = int((yr != -100).nonzero().max()) + 1
        out.append((xr[:last].tolist(), yr[:last].tolist()))
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_get_batch_is_pure_and_world_size_independent(tok, tmp_path, packing):
    path = alpaca_file(tmp_path, 40)
    one, _ = build_sft_data(sft_cfg(path, packing=packing), tok, 96, 8, 0, 1, seed=3, log=lambda m: None)
    shards = [build_sft_data(sft_cfg(path, packing=packing), tok, 96, 8, r, 2, seed=3, log=lambda m: None)[0]
              for r in range(2)]
    for step in (0, 1, 7, 30):
        x, y = one.get_batch(step)
        assert x.shape[0] == 8 and x.shape[1] <= 96 and x.dtype == torch.int64
        assert torch.equal(x, one.get_batch(step)[0])
        parts = [shards[r].get_batch(step) for r in range(2)]
        assert unpadded(x, y) == unpadded(*parts[0]) + unpadded(*parts[1])
    other_seed, _ = build_sft_data(sft_cfg(path, packing=packing), tok, 96, 8, 0, 1, seed=4, log=lambda m: None)
    assert not torch.equal(other_seed.get_batch(0)[0][:, :10], one.get_batch(0)[0][:, :10])


def test_each_epoch_visits_every_example_once(tok, tmp_path):
    data, _ = build_sft_data(sft_cfg(alpaca_file(tmp_path, 24)), tok, 96, 4, 0, 1, seed=0, log=lambda m: None)
    for epoch in range(2):
        seen = [tuple(x) for s in range(6 * epoch, 6 * epoch + 6) for x, _ in unpadded(*data.get_batch(s))]
        assert len(set(seen)) == 24
    assert data.rows_of_epoch(0) != data.rows_of_epoch(1)


def test_packing_keeps_examples_whole_and_masked(tok, tmp_path):
    data, _ = build_sft_data(sft_cfg(alpaca_file(tmp_path, 30), packing=True), tok, 128, 2, 0, 1, seed=0,
                             log=lambda m: None)
    rows = data.rows_of_epoch(0)
    assert sorted(i for row in rows for i in row) == list(range(30))
    assert all(sum(len(data.examples.ids[i]) for i in row) <= 129 for row in rows)
    assert any(len(row) > 1 for row in rows)
    x, y = collate(data.examples, [rows[0]], EOT)
    expected = torch.cat([torch.from_numpy(data.examples.counted[i]) for i in rows[0]])[1:]
    assert torch.equal(y[0, : len(expected)] != -100, expected)


def test_validation_split_and_eval_batches(tok, tmp_path):
    path = alpaca_file(tmp_path, 50)
    train, val = build_sft_data(sft_cfg(path, val_fraction=0.2), tok, 96, 4, 0, 1, seed=1, log=lambda m: None)
    train2, val2 = build_sft_data(sft_cfg(path, val_fraction=0.2), tok, 96, 4, 0, 1, seed=1, log=lambda m: None)
    assert (train.num_examples, val.num_examples) == (40, 10)
    train_rows = {tuple(i.tolist()) for i in train.examples.ids}
    val_rows = [tuple(i.tolist()) for i in val.examples.ids]
    assert not train_rows & set(val_rows) and val_rows == [tuple(i.tolist()) for i in val2.examples.ids]
    # global eval batch of 4 over 2 ranks: every val example exactly once, padding rows count nothing
    seen = []
    for rank in range(2):
        batches = list(val.iter_eval_batches(4, None, rank, 2))
        assert len(batches) == 3 and all(x.shape[0] == 2 for x, _ in batches)
        seen += [tuple(r) for x, y in batches for r, _ in unpadded(x[(y != -100).any(1)], y[(y != -100).any(1)])]
    assert sorted(seen) == sorted(tuple(r[:-1]) for r in val_rows)
    assert len(list(val.iter_eval_batches(4, 1, 0, 1))) == 1


def test_state_dict_guards_resume_on_other_data(tok, tmp_path):
    train, _ = build_sft_data(sft_cfg(alpaca_file(tmp_path, 20)), tok, 96, 4, 0, 1, seed=1, log=lambda m: None)
    train.load_state_dict(train.state_dict())
    other, _ = build_sft_data(sft_cfg(alpaca_file(tmp_path, 21)), tok, 96, 4, 0, 1, seed=1, log=lambda m: None)
    with pytest.raises(UserError, match="cannot resume"):
        other.load_state_dict(train.state_dict())


def test_jsonl_and_json_give_the_same_examples(tok, tmp_path):
    a = load_records(alpaca_file(tmp_path, 10), "alpaca")
    b = load_records(alpaca_file(tmp_path, 10, jsonl=True), "alpaca")
    assert a == b and len(a) == 10


def test_shared_alpaca_subset_is_valid(tok, shared_data):
    records = load_records(shared_data / "alpaca" / "alpaca_5000.json", "alpaca")
    assert len(records) == 5000
    ex, report = tokenize_records(records[:500], tok, "alpaca", block_size=256)
    assert report.kept + report.truncated + report.dropped == 500 and report.kept > 450


# --------------------------------------------------------------------------------------------------
# Validation of records


GOOD = '{"instruction": "a", "output": "b"}'


@pytest.mark.parametrize("name,content,template,message", [
    ("bad.jsonl", f'{GOOD}\n{GOOD}\n{{"instruction": "a", "output": }}\n', "alpaca",
     r"bad.jsonl:3: invalid JSON at column 32: Expecting value; pass --data.sft.skip_invalid true"),
    ("missing.jsonl", f'{GOOD}\n\n{{"instruction": "a"}}\n', "alpaca",
     r"missing.jsonl:3: missing 'output'; pass --data.sft.skip_invalid true to skip invalid records$"),
    ("type.json", '[\n' + GOOD + ',\n{"instruction": 5, "output": "b"}\n]', "alpaca",
     r"type.json:3: record 1: field 'instruction' must be a string, got number"),
    ("input.json", '[{"instruction": "a", "input": ["x"], "output": "b"}]', "alpaca",
     r"input.json:1: record 0: field 'input' must be a string, got array"),
    ("notobj.jsonl", f'{GOOD}\n[1, 2]\n', "alpaca", r"notobj.jsonl:2: expected a JSON object, got array"),
    ("empty.json", "  \n\n", "alpaca", r"empty.json is empty"),
    ("text.txt", "instruction: hello\n", "alpaca", r"text.txt:1: neither a JSON array nor JSONL"),
    ("broken.json", '[\n' + GOOD + ',\n{"instruction": "a" "output": "b"}\n]', "alpaca",
     r"broken.json:3: record 1: invalid JSON at column 21: Expecting ',' delimiter"),
    ("unclosed.json", '[\n' + GOOD + ',\n', "alpaca", r"unclosed.json:3: invalid JSON"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "chat",
     r"chat.jsonl:1: field 'messages' has no 'assistant' turn"),
    ("role.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n', "chat",
     r"role.jsonl:1: field 'messages\[0\].role' must be 'system', 'user' or 'assistant'"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}\n', "chat",
     r"content.jsonl:1: field 'messages\[1\].content' must be a string, got null"),
    ("msgs.jsonl", '{"messages": "hello"}\n', "chat", r"msgs.jsonl:1: field 'messages' must be a non-empty list"),
    ("wrongtemplate.jsonl", '{"messages": []}\n', "alpaca", r"wrongtemplate.jsonl:1: has 'messages'.*template=chat"),
    ("custom.jsonl", '{"question": "a", "output": "b"}\n', "Q: {question} {context}\nA: {output}",
     r"custom.jsonl:1: missing 'context'"),
    ("latin1.jsonl", GOOD + '\n{"instruction": "caf\udce9", "output": "b"}\n', "alpaca",
     r"latin1.jsonl:2: not UTF-8 text \(byte offset 56\); convert the file to UTF-8"),
])
def test_malformed_input_is_one_user_error(tmp_path, name, content, template, message):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogateescape"))  # \udce9: the lone byte 0xe9 (Latin-1 é)
    with pytest.raises(UserError, match=message) as err:
        load_records(path, template)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.json", "alpaca")
    with pytest.raises(UserError, match="no {output} placeholder"):
        load_records(write(tmp_path, "a.jsonl", GOOD), "Q: {instruction}")


def test_skip_invalid_reports_exact_counts(tmp_path):
    lines = [GOOD, '{"instruction": "a"}', GOOD, "{oops", '{"instruction": 1, "output": "b"}', GOOD]
    path = write(tmp_path, "mixed.jsonl", "\n".join(lines) + "\n")
    logged: list[str] = []
    records = load_records(path, "alpaca", skip_invalid=True, log=logged.append)
    assert len(records) == 3
    assert logged == [f"{path}: skipped 3 invalid records (line 2: missing 'output'; line 4: invalid JSON at "
                      "column 2: Expecting property name enclosed in double quotes; line 5: field 'instruction' "
                      "must be a string, got number)"]
    with pytest.raises(UserError, match="mixed.jsonl:2: missing 'output'"):
        load_records(path, "alpaca")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
def test_jsonl_record_holding_a_unicode_line_separator_is_one_record(tmp_path, separator):
    # str.splitlines() cut such a record into two invalid lines; JSONL lines end at "\n" only
    record = {"instruction": f"one{separator}two", "output": "b"}
    path = write(tmp_path, "sep.jsonl", json.dumps(record, ensure_ascii=False) + "\r\n" + GOOD + "\n")
    assert [(r.line, r.data) for r in read_records(path)] == [(1, record), (2, json.loads(GOOD))]
    assert load_records(path, "alpaca") == [record, json.loads(GOOD)]


def test_val_fraction_has_one_default(tok, tmp_path):
    # build_sft_data used to default val_fraction to 0.0 when the config left it out, SFTConfig to 0.05
    path = alpaca_file(tmp_path, 40)
    train, val = build_sft_data(SFTConfig(path=str(path)), tok, 96, 4, 0, 1, seed=0,
                                log=lambda m: None)
    assert SFTConfig().val_fraction == 0.05
    assert (train.num_examples, val.num_examples) == (38, 2)


# --------------------------------------------------------------------------------------------------
# Download


def test_fetch_alpaca_downloads_once_into_the_cache(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    (served / "alpaca_data.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/alpaca_data.json"
        path = fetch_alpaca(url, cache=tmp_path / "cache", log=lambda m: None)
        assert path == tmp_path / "cache" / "alpaca" / "alpaca_data.json"
        assert load_records(path, "alpaca") == [{"instruction": "a", "input": "", "output": "b"}]
        (served / "alpaca_data.json").unlink()  # a second call must not download again
        assert fetch_alpaca(url, cache=tmp_path / "cache", log=lambda m: None) == path
        with pytest.raises(UserError, match=r"could not download Alpaca data from .*404") as err:
            fetch_alpaca(url, cache=tmp_path / "other", log=lambda m: None)
        assert "\n" not in str(err.value) and not list((tmp_path / "other" / "alpaca").iterdir())
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_alpaca_offline_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"could not download Alpaca data from http://127.0.0.1:9/"):
        fetch_alpaca("http://127.0.0.1:9/alpaca_data.json", cache=tmp_path, log=lambda m: None)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_sftdata_rejects_indivisible_batch(tok, tmp_path):
    ex, _ = tokenize_records([{"instruction": "a", "output": "b"}], tok, "alpaca", 64)
    with pytest.raises(UserError, match="not divisible"):
        SFTData(ex, block_size=64, global_batch_size=3, rank=0, world_size=2, seed=0, packing=False, pad_id=EOT,
                fingerprint="x")
