"""Chat templates as data: how a conversation becomes the text and token ids a model is trained and
prompted with.

    template = get_chat_template("chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    template.render(messages)                      # "### System:\\nBe brief.\\n\\n### User:\\nHi\\n\\n### Assistant:\\n"
    template.encode(messages, tokenizer)           # the prompt ids `chat` sends the model
    template.to_jinja()                            # the same rendering for `AutoTokenizer.apply_chat_template`

A template is a few strings: the text of a system turn and of a user turn (`{content}` is the
message; `{system}` in a user turn is the conversation's system prompt, for formats that repeat it),
the header that opens an assistant turn (the generation prompt), and the end of an assistant turn,
which is always `<|endoftext|>`. Built in:

    alpaca   the Stanford Alpaca prompt; a system message replaces its preamble
    chat     "### System:", "### User:", "### Assistant:" text headers (any tokenizer with <|endoftext|>)
    special  the reserved special tokens of a tokenizer trained by `gpt2lab tokenizer train`
             (<|system|>, <|user|>, <|assistant|>, <|end|>)

and any custom string such as "Q: {instruction}\\nA: {output}" (one user turn = the text before
`{output}`, with `{instruction}` as the message). Finetuning, `chat`, `sample --chat`, the Python
API and exported `tokenizer_config.json` files all render through this module.

Token ids: the conversation is cut into prompt and response pieces; consecutive prompt pieces are
joined and each piece is tokenized on its own (so the prompt/response boundary of the training mask
is exact), and every response is followed by the `<|endoftext|>` id. `apply_chat_template` of an
export tokenizes the rendered text in one go. For the built-in templates the ids are the same,
except for an assistant message that starts with whitespace after a text header (the header's last
newline and that whitespace may then merge into one token); with the `special` template every
boundary is a special token, so the ids always agree. A custom template whose prompt ends in a space
("A: ") differs at every answer (" Red" is one token, " " + "Red" two).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gpt2lab.errors import ArgumentError, UserError
from gpt2lab.fileio import json_type, show_json
from gpt2lab.tokenizer import CHAT_SPECIAL_TOKENS, EOT_TEXT

ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]  # (text, is_response); a response is followed by <|endoftext|>

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format (see the module docstring). Format strings take `{content}` and `{system}`."""

    name: str
    system: str  # a system turn ("" = not a turn of its own: the prompt goes into {system} of user turns)
    user: str
    assistant: str  # opens an assistant turn: the generation prompt
    default_system: str = ""  # {system} when the conversation has no system message
    stop: tuple[str, ...] = ()  # text that starts a new turn: generation that reaches it is cut there
    special: bool = False  # the headers are special tokens: encode with them allowed

    # ------------------------------------------------------------------ text

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[Segment]:
        """`messages` as (text, is_response) pieces; each response is followed by <|endoftext|>.
        With `add_generation_prompt` an assistant header follows a conversation that ends on a user turn."""
        check_messages(messages)
        system = self.default_system
        out: list[Segment] = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                system = content
                if self.system:
                    out.append((_fill(self.system, content=content, system=system), False))
            elif role == "user":
                out.append((_fill(self.user, content=content, system=system), False))
            else:
                out += [(self.assistant, False), (content, True)]
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            out.append((self.assistant, False))
        return [(text, is_response) for text, is_response in out if text or is_response]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text, `<|endoftext|>` after each assistant turn."""
        return "".join(text + (EOT_TEXT if is_response else "")
                       for text, is_response in self.segments(messages, add_generation_prompt))

    # ------------------------------------------------------------------ ids

    def encode_with_mask(self, messages: Sequence[dict], tokenizer: Any, mask_prompt: bool = True,
                         add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per id, whether it counts in a finetuning loss (every
        response id and each closing <|endoftext|>; every id when not `mask_prompt`)."""
        if self.special:
            check_special_tokens(tokenizer, self.name)
        return encode_segments(self.segments(messages, add_generation_prompt), tokenizer, mask_prompt,
                               allow_special=self.special)

    def encode(self, messages: Sequence[dict], tokenizer: Any, add_generation_prompt: bool = True,
               max_tokens: int | None = None) -> list[int]:
        """Prompt ids of the conversation. With `max_tokens`, the oldest exchanges after the system
        message are dropped until it fits; a last user turn that alone is too long is cut from the left."""
        check_messages(messages)
        messages = list(messages)
        while True:
            ids, _ = self.encode_with_mask(messages, tokenizer, add_generation_prompt=add_generation_prompt)
            if max_tokens is None or len(ids) <= max_tokens:
                return ids
            first = 1 if messages and messages[0]["role"] == "system" else 0
            # drop the oldest exchange: everything up to the next user message after the first
            nxt = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
            if nxt is None:
                return ids[-max_tokens:]
            del messages[first:nxt]

    # ------------------------------------------------------------------ export

    def to_jinja(self) -> str:
        """A Jinja chat template rendering exactly `render` (for tokenizer_config.json)."""
        def expr(fmt: str) -> str:
            pieces = []
            for literal, field, _, _ in string.Formatter().parse(fmt):
                if literal:
                    pieces.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
                if field == "content":
                    pieces.append("{{ message['content'] }}")
                elif field == "system":
                    pieces.append("{{ ns.system }}")
            return "".join(pieces)

        return (
            "{%- set ns = namespace(system=" + json.dumps(self.default_system, ensure_ascii=False) + ") -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}" + expr(self.system)
            + "{%- elif message['role'] == 'user' -%}" + expr(self.user)
            + "{%- elif message['role'] == 'assistant' -%}" + expr(self.assistant)
            + "{{ message['content'] }}{{ " + json.dumps(EOT_TEXT) + " }}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'assistant') -%}"
            + expr(self.assistant) + "{%- endif -%}"
        )


def _fill(fmt: str, **values: str) -> str:
    """`fmt` with its fields replaced in one pass (text in `values` is never itself formatted)."""
    return "".join(literal + (values.get(field, "") if field is not None else "")
                   for literal, field, _, _ in string.Formatter().parse(fmt))


def encode_segments(segments: Sequence[Segment], tokenizer: Any, mask_prompt: bool = True,
                    allow_special: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the segments and, per id, whether it is counted in the loss.

    Adjacent prompt segments are joined and tokenized together; each response segment is followed
    by the tokenizer's EOT id (counted). With `mask_prompt` False every id is counted.
    """
    if tokenizer.eot_id is None:
        raise UserError("chat templates need a tokenizer with <|endoftext|> (gpt2 or a trained BPE), not "
                        f"the {tokenizer.name} tokenizer")
    ids: list[int] = []
    counted: list[bool] = []
    for text, is_response in _merge_segments(segments):
        piece = tokenizer.encode(text, allow_special=allow_special)
        if is_response:
            piece.append(tokenizer.eot_id)
        ids += piece
        counted += [is_response or not mask_prompt] * len(piece)
    return ids, counted


def check_special_tokens(tokenizer: Any, template: str) -> None:
    """UserError unless `tokenizer` has the chat tokens the `special` template is made of."""
    if any(len(tokenizer.encode(t, allow_special=True)) != 1 for t in CHAT_SPECIAL_TOKENS):
        raise UserError(f"the {template!r} chat template needs a tokenizer with the chat tokens "
                        f"{' '.join(CHAT_SPECIAL_TOKENS)} (one trained by `gpt2lab tokenizer train`), not "
                        f"{tokenizer.name}; use the 'chat' or 'alpaca' template")


def _merge_segments(segments: Iterable[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for text, is_response in segments:
        if merged and not merged[-1][1] and not is_response:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, is_response))
    return merged


# --------------------------------------------------------------------------------------------------
# Messages


def conversation(turns: Iterable[tuple[str, str]], message: str, system: str | None = None) -> list[dict]:
    """Messages of an optional system prompt, earlier (user, assistant) `turns` and a new user `message`."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    return [*messages, {"role": "user", "content": message}]


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a list of {role, content} messages (a phrase naming the field), or None."""
    if not isinstance(messages, list):
        return "field 'messages' must be a list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"field 'messages[{i}]' must be an object with 'role' and 'content'"
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            return f"field 'messages[{i}].role' must be 'system', 'user' or 'assistant', got {show_json(m.get('role'))}"
        if m["role"] == "system" and i:
            return f"field 'messages[{i}].role': a 'system' message may only come first"
        if not isinstance(m.get("content"), str):
            return f"field 'messages[{i}].content' must be a string, got {json_type(m.get('content'))}"
    return None


def check_messages(messages: Any) -> None:
    """UserError unless `messages` is a list of {role, content} messages (system only first)."""
    problem = messages_problem(list(messages) if isinstance(messages, tuple) else messages)
    if problem is not None:
        raise ArgumentError(f"chat messages: {problem}")


# --------------------------------------------------------------------------------------------------
# Templates


_SYSTEM_TOKEN, _USER_TOKEN, _ASSISTANT_TOKEN, _END_TOKEN = CHAT_SPECIAL_TOKENS

TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca": ChatTemplate("alpaca", system="", user="{system}\n\n### Instruction:\n{content}\n\n",
                           assistant="### Response:\n", default_system=ALPACA_SYSTEM, stop=("### Instruction:",)),
    "chat": ChatTemplate("chat", system="### System:\n{content}\n\n", user="### User:\n{content}\n\n",
                         assistant="### Assistant:\n", stop=("### User:",)),
    "special": ChatTemplate("special", system=_SYSTEM_TOKEN + "{content}" + _END_TOKEN,
                            user=_USER_TOKEN + "{content}" + _END_TOKEN, assistant=_ASSISTANT_TOKEN, stop=(_USER_TOKEN,), special=True),
}
"""The built-in templates by name."""


def format_fields(template: str) -> list[str]:
    """Placeholder names of a custom template string, in order; it must contain `{output}`."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise UserError(f"data.sft.template {template!r} is not a valid format string: {e}") from None
    names = [name for name, _, _ in parsed]
    for name, spec, conversion in parsed:
        if spec or conversion:  # "{instruction:d}" fails on text, "{instruction:>99999999}" fills the memory
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(f"data.sft.template {template!r}: {shown} has a format spec or conversion; "
                            f"placeholders are plain field names like {{{name}}}")
    if "{output}" not in template:
        raise UserError(
            f"data.sft.template {template!r} has no {{output}} placeholder; use "
            f"{', '.join(repr(n) for n in TEMPLATES)} or a string "
            "like '### Q: {instruction}\\n### A: {output}' (the prompt is everything before {output})"
        )
    if any(not name.isidentifier() for name in names):
        raise UserError(f"data.sft.template {template!r}: placeholders must be plain field names like {{instruction}}")
    return names


def get_chat_template(spec: str | ChatTemplate) -> ChatTemplate:
    """A built-in template by name, or the one-user-turn template of a custom string such as
    "Q: {instruction}\\nA: {output}" (its text before `{output}`, with {instruction} the message)."""
    if isinstance(spec, ChatTemplate):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"a chat template is a name ({', '.join(TEMPLATES)}) or a format string, "
                        f"not {type(spec).__name__}")
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    format_fields(spec)
    prompt = spec[: spec.index("{output}")]
    # keep {instruction} as the message; other fields (such as {input}) render empty, literal braces stay literal
    user = "".join(literal.replace("{", "{{").replace("}", "}}")
                   + ("{content}" if field == "instruction" else "")
                   for literal, field, _, _ in string.Formatter().parse(prompt))
    return ChatTemplate(spec, system="", user=user, assistant="")


def check_template(template: str) -> None:
    """Raise UserError unless `template` names a built-in template or is a valid custom template string."""
    get_chat_template(template)
