"""Text generation: text in, text out, streamed piece by piece, with stop strings.

    for text in stream_text(model, tok, "Hello", max_new_tokens=50, stop_strings=["\\n\\n"]):
        print(text, end="", flush=True)

The token loop (sampling, batched prompts, the KV cache) is `gpt2lab.sampling`; this module adds
text around it. `optimize_for_decoding(model)` (what `gpt2lab sample` does) stores the weights in the
layout a one-token step reads fastest on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gpt2lab.model import GPT
from gpt2lab.sampling import stream
from gpt2lab.tokenizer import StreamDecoder, Tokenizer


def optimize_for_decoding(model: GPT, *, rows: int | None = None) -> GPT:
    """Lay out each Linear weight the way one-token steps (and other inference passes) read it
    fastest on the device; in place, for inference only (call it after any dtype change; training
    and saving expect the default).

    rows=1 (one sequence at a time: `gpt2lab sample`, `chat`): where the compiled one-row step
    (`gpt2lab.native_decode`) runs this model, the weight matrices stay row-major, which is how it
    reads them, moved onto huge pages (`native_decode.lay_out`); it decodes faster than torch's step
    over packed layers (docs/benchmarks.md).

    Otherwise (batches: `serve`, `eval`, lm-eval), on a CPU in float32 or bfloat16, every plain
    Linear becomes a `gpt2lab.packed.PackedLinear`
    holding its weight in oneDNN's packed layout: a gpt2 (124M) decode step's matrices ran 1.4x
    (float32) and 1.5x (bfloat16) faster than through `F.linear`, a 16-row step 3x, and each row's
    result no longer depends on how many rows share the batch. The tied LM head gets its own packed
    copy; LoRA layers stay as they are. Where oneDNN cannot pack (another dtype, a torch without
    it), float32 weights are stored column-major (`w.t().contiguous().t()`, the layout MKL's
    matrix-vector product reads ~1.3-1.6x faster) except those with more inputs than outputs, and
    everything else keeps the default row-major layout (GPUs included).
    """
    if rows == 1:
        from gpt2lab.native_decode import lay_out, runs

        if runs(model):
            return lay_out(model)
    from gpt2lab.packed import pack_linears

    if pack_linears(model):  # CPU layers only
        return model
    w = model.transformer.wte.weight
    fp32_cpu = w.device.type == "cpu" and w.dtype == torch.float32
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                data = module.weight.data
                column_major = fp32_cpu and module.in_features <= module.out_features
                module.weight.data = data.t().contiguous().t() if column_major else data.contiguous()
    return model


def optimize_for_one_row(model: GPT) -> GPT:
    """`optimize_for_decoding(model, rows=1)`: the layout for decoding one sequence at a time, as
    `gpt2lab sample` and `chat` do."""
    return optimize_for_decoding(model, rows=1)


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    **kwargs,
) -> Iterator[str]:
    """Stream the text generated after one prompt (text or ids), piece by piece.

    Characters split across tokens come out whole; text that might be the start of a stop string is
    held back until it is known not to be, and a stop string itself is never emitted. Takes the
    keyword arguments of `stream`.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    out = StopText(tokenizer, stop_strings)
    steps = stream(model, [ids], max_new_tokens=max_new_tokens, stop_strings=out.stops, tokenizer=tokenizer, **kwargs)
    for (t,) in steps:
        piece = out.feed(t) if t is not None else ""
        if piece:
            yield piece
        if out.stopped:
            steps.close()
            return
    piece = out.flush()
    if piece:
        yield piece


class StopText:
    """The text of generated tokens, released piece by piece with stop strings cut (`stream_text`,
    and the server's streamed choices).

    `feed(token)` returns the text now safe to show: characters split across tokens come out whole,
    and text that might be the start of a stop string is held back until it is known not to be. Once
    a stop string appears, `stopped` is set and nothing more is returned (the stop string never is);
    `flush()` returns what is left at the end. `shown` is all the text returned so far."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.stops = [s for s in stop_strings if s]
        self.decoder = StreamDecoder(tokenizer)
        self.text, self.emitted, self.stopped = "", 0, False

    @property
    def shown(self) -> str:
        return self.text[:self.emitted]

    def feed(self, token: int) -> str:
        self.text += self.decoder.feed(token)
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = _first_stop(self.text, self.stops)
        if end is not None:
            self.stopped = True
        else:
            end = len(self.text) - (0 if final else _held_back(self.text, self.stops))
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
