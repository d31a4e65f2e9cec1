"""Chat templates: rendering as today's finetuning formats, system prompts and multi-turn, prompt
trimming, and the Jinja export: `AutoTokenizer.apply_chat_template` gives gpt2lab's ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpt2lab.chat_template import get_chat_template
from gpt2lab.data.sft import encode_chat_prompt, render_prompt
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import BPETokenizer, get_tokenizer

SYSTEM = {"role": "system", "content": "You answer in one short line."}
TURNS = [
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And one more, with émoji 🎨 and 中文?"},
    {"role": "assistant", "content": "Blue, 蓝色 🎨\n\nDone."},
    {"role": "user", "content": "Thanks!\nBye."},
]
CONVERSATIONS = {"no system": TURNS, "system": [SYSTEM, *TURNS], "one turn": TURNS[:1],
                 "system only": [SYSTEM], "ends on assistant": TURNS[:4]}


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_builtin_templates_render_the_finetuning_formats():
    assert get_chat_template("alpaca").render(TURNS[:1]) == render_prompt("Name a primary color.")
    assert get_chat_template("chat").render(TURNS[:1]) == render_prompt("Name a primary color.", template="chat")
    assert get_chat_template("chat").render([SYSTEM, *TURNS[:2]], add_generation_prompt=False) == (
        "### System:\nYou answer in one short line.\n\n### User:\nName a primary color.\n\n"
        "### Assistant:\nRed.<|endoftext|>")
    # alpaca: a system message replaces the preamble of every instruction
    assert get_chat_template("alpaca").render([SYSTEM, *TURNS[:3]]) == (
        "You answer in one short line.\n\n### Instruction:\nName a primary color.\n\n### Response:\nRed.<|endoftext|>"
        "You answer in one short line.\n\n### Instruction:\nAnd one more, with émoji 🎨 and 中文?\n\n### Response:\n")
    assert get_chat_template("special").render([SYSTEM, *TURNS[:2]]) == (
        "<|system|>You answer in one short line.<|end|><|user|>Name a primary color.<|end|>"
        "<|assistant|>Red.<|endoftext|>")  # ends on an answer: no generation prompt
    custom = get_chat_template("Q: {instruction}\nA: {output}")
    assert custom.render(TURNS[:3]) == "Q: Name a primary color.\nA: Red.<|endoftext|>Q: And one more, with émoji 🎨 and 中文?\nA: "


@pytest.mark.parametrize("template", ["alpaca", "chat", "Q: {instruction}\nA: {output}"])
def test_encode_matches_the_chat_prompt_of_earlier_versions(gpt2, template):
    """`encode_chat_prompt` (the old entry point) is now the template's encode; trimming keeps the newest turns."""
    turns = [("Name a primary color.", "Red."), ("And one more?", "Blue.")]
    messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    messages.append({"role": "user", "content": "Thanks"})
    tpl = get_chat_template(template)
    full = tpl.encode(messages, gpt2)
    assert encode_chat_prompt(turns, "Thanks", gpt2, template) == full
    # by hand: every prompt piece tokenized alone, each answer followed by <|endoftext|>
    by_hand = []
    for u, a in turns:
        by_hand += gpt2.encode(render_prompt(u, template=template)) + gpt2.encode(a) + [gpt2.eot_id]
    assert full == by_hand + gpt2.encode(render_prompt("Thanks", template=template))
    newest = tpl.encode(messages[2:], gpt2)
    assert tpl.encode(messages, gpt2, max_tokens=len(full) - 1) == newest  # the oldest exchange goes first
    alone = tpl.encode(messages[-1:], gpt2)
    assert tpl.encode(messages, gpt2, max_tokens=3) == alone[-3:]


def test_trimming_keeps_the_system_prompt(gpt2):
    tpl = get_chat_template("chat")
    messages = [SYSTEM, *TURNS]
    kept = tpl.encode([SYSTEM, *TURNS[2:]], gpt2)
    assert tpl.encode(messages, gpt2, max_tokens=len(kept)) == kept


def test_mask_counts_only_answers_and_their_end(gpt2):
    ids, counted = get_chat_template("chat").encode_with_mask([SYSTEM, *TURNS[:2]], gpt2)
    answer = [i for i, c in zip(ids, counted) if c]
    assert answer == gpt2.encode("Red.") + [gpt2.eot_id]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "robot", "content": "x"}], "messages[0].role' must be 'system', 'user' or 'assistant'"),
    ([{"role": "user", "content": "x"}, SYSTEM], "a 'system' message may only come first"),
    ([{"role": "user", "content": 3}], "messages[0].content' must be a string"),
    ("hello", "must be a list"),
])
def test_bad_messages_are_one_line(gpt2, messages, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        get_chat_template("chat").encode(messages, gpt2)


def test_unknown_template_names_the_choices():
    with pytest.raises(UserError, match="no {output} placeholder; use 'alpaca', 'chat', 'special'"):
        get_chat_template("nonsense")


def _export(out: Path, tokenizer, template: str) -> Path:
    """The tokenizer files `convert` writes for `tokenizer`, with `template` as chat_template."""
    from gpt2lab import hf

    out.mkdir()
    if isinstance(tokenizer, BPETokenizer):
        hf.write_bpe_tokenizer_files(out, tokenizer)
    else:
        hf.write_gpt2_tokenizer_files(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = get_chat_template(template).to_jinja()
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("which, template", [("gpt2", "alpaca"), ("gpt2", "chat"), ("bpe", "alpaca"), ("bpe", "chat"),
                                             ("bpe", "special")])
def test_apply_chat_template_gives_gpt2lab_ids(tmp_path, gpt2, trained_bpe, which, template):
    """Multi-turn conversations with and without a system prompt: HF's rendering and ids equal gpt2lab's."""
    transformers = pytest.importorskip("transformers")
    tok = gpt2 if which == "gpt2" else BPETokenizer.from_dir(trained_bpe)
    hf_tok = transformers.AutoTokenizer.from_pretrained(_export(tmp_path / "export", tok, template))
    tpl = get_chat_template(template)
    for name, messages in CONVERSATIONS.items():
        for generation in (True, False):
            text = hf_tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
            assert text == tpl.render(messages, add_generation_prompt=generation), name
            ids = hf_tok.apply_chat_template(messages, add_generation_prompt=generation)["input_ids"]
            assert ids == tpl.encode(messages, tok, add_generation_prompt=generation), name


def test_finetuning_examples_have_the_ids_of_the_template(gpt2, trained_bpe):
    """The special template trains on the chat token ids, exactly as the prompt is later encoded."""
    from gpt2lab.data.sft import tokenize_records

    bpe = BPETokenizer.from_dir(trained_bpe)
    record = {"messages": [SYSTEM, *TURNS[:4]]}
    for template, tok in (("special", bpe), ("chat", bpe), ("chat", gpt2), ("alpaca", gpt2)):
        examples, _ = tokenize_records([record], tok, template, block_size=512)
        ids, counted = get_chat_template(template).encode_with_mask(record["messages"], tok)
        assert examples.ids[0].tolist() == ids and examples.counted[0].tolist() == counted
    special_ids = tokenize_records([record], bpe, "special", block_size=512)[0].ids[0].tolist()
    assert special_ids[0] == 1 and special_ids.count(2) == 2 and special_ids.count(3) == 2  # <|system|>, <|user|>, <|assistant|>
    with pytest.raises(UserError, match="needs a tokenizer with the chat tokens"):
        tokenize_records([record], gpt2, "special", block_size=512)


def test_jinja_keeps_any_literal_text(tmp_path, gpt2):
    """Quotes, backslashes, non-ASCII and astral characters in a template survive the Jinja export."""
    transformers = pytest.importorskip("transformers")
    template = 'Frage «{instruction}» \\ "quoted" 🎉 {{braces}}\n{output}'
    hf_tok = transformers.AutoTokenizer.from_pretrained(_export(tmp_path / "export", gpt2, template))
    for generation in (True, False):
        assert hf_tok.apply_chat_template(TURNS, add_generation_prompt=generation, tokenize=False) == \
            get_chat_template(template).render(TURNS, add_generation_prompt=generation)
    assert get_chat_template(template).render(TURNS[:1]).startswith('Frage «Name a primary color.» \\ "quoted" 🎉 {braces}\n')
