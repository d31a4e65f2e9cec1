"""One-sequence decoding on a CPU through one compiled C function per token.

    step = native_step(model, cache)   # None where it cannot run; `sampling.one_token_step` asks by itself
    logits = step(model, cache, token, pos)      # (1, V), like sampling.decode_one_token

A decode step reads every weight once, so its floor is the memory's bandwidth. Through torch, a
gpt2 (124M) step also pays for ~150 operator calls, each with its dispatch, allocation and
thread-pool hand-off, and for kernels that reach part of the bandwidth on one row; on a 2-core
Zen 4 that held a bfloat16 step at 16 ms where llama.cpp took 9. `native_decode.c` computes the
same step (GPT.forward for one token, at the model's precision: float32, bfloat16 or gpt2lab.int8)
in one call over the weights where they lie, its matrix-vector products split between torch's
OpenMP threads. `sampling.one_token_step` picks it for every one-row step it covers, so
`gpt2lab sample`, `chat` and `gpt2lab.generate` get it without asking; `lay_out` (what
`generate.optimize_for_one_row` does) moves the weight matrices onto huge pages once, for a faster
stream.

The C file is compiled once per machine with the system's C compiler (`cc`, or $CC) for this CPU
(-march=native) into gpt2lab's cache folder ($GPT2LAB_CACHE, else ~/.cache/gpt2lab), keyed by the
source, the compiler and the CPU. Where there is no compiler, the build fails, or the model is not
one it covers (LoRA layers, oneDNN-packed layers, another device or dtype), `native_step` returns
None and decoding goes through torch. GPT2LAB_NATIVE_DECODE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gpt2lab.devices import cpu_flags, cpu_name
from gpt2lab.download import cache_dir

SOURCE = Path(__file__).with_name("native_decode.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
ENV_SWITCH = "GPT2LAB_NATIVE_DECODE"
WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
# The pointer list, as native_decode.c numbers it (G_*, L_*): 8 of the model's, then 19 per layer.
GLOBAL_PTRS, LAYER_PTRS = 8, 19
GLOBAL_ACT, HEAD = (0, 1, 2, 3), 4  # wte, wpe, ln_f weight and bias; the head's weight
LAYER_NORMS, LAYER_MATRICES, LAYER_CACHE = (0, 1, 8, 9), (2, 5, 10, 13), 16  # LayerNorms; weights; k, v, slots


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step for this machine (built on first use), or None where it cannot be built: no
    C compiler, or a failed build, e.g. a compiler without OpenMP (`build_error()` says why)."""
    global _BUILD_ERROR
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _BUILD_ERROR = f"{ENV_SWITCH}=0"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _BUILD_ERROR = "no C compiler (cc) on PATH"
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        cpu = [cpu_name(), " ".join(sorted(cpu_flags())), platform.machine()]  # -march=native builds for this CPU
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), *cpu,
                                        torch.__version__]).encode()).hexdigest()[:16]
        out = cache_dir() / "native" / f"decode-{key}.so"
        try:
            lib = ctypes.CDLL(str(out)) if out.exists() else None
        except OSError:  # a damaged file where the library should be (gpt2lab's own): built again
            lib = None
        if lib is None:
            _BUILD_ERROR = _build(compiler, out)
            if _BUILD_ERROR is not None:
                return None
            lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as e:
        _BUILD_ERROR = f"{type(e).__name__}: {e}"
        return None
    i64p, vp = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p
    lib.gpt2lab_decode_step.argtypes = [vp, vp, vp, vp, vp, *[ctypes.c_int64] * 4, vp]
    lib.gpt2lab_decode_step.restype = ctypes.c_int
    lib.gpt2lab_scratch_floats.argtypes = [i64p, i64p]
    lib.gpt2lab_scratch_floats.restype = ctypes.c_int64
    return lib


_BUILD_ERROR: str | None = None


def _build(compiler: str, out: Path) -> str | None:
    """Compile SOURCE into `out`; None when done, else why not. Built beside its final name and renamed
    into place, so processes building at once never load half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return f"{compiler} could not build {SOURCE.name}: {last[0]}"
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_error() -> str | None:
    """Why `library()` is None (after it was called), else None."""
    return _BUILD_ERROR


def _is_int8(layer: nn.Module) -> bool:
    """A `gpt2lab.int8.Int8Linear` (int8 rows `weight_int8`, bfloat16 row scales `scale`), known by
    its buffers: this module sits below the model's layers and does not import them."""
    return hasattr(layer, "weight_int8") and hasattr(layer, "scale")


def _linear_ptrs(layer: nn.Module, wkind: int, act: torch.dtype) -> list[torch.Tensor | None] | None:
    """weight, bias, scale of a linear layer the C step reads in place, or None if it cannot."""
    if wkind == WEIGHT_KINDS[torch.int8]:
        if not _is_int8(layer) or not layer.weight_int8.is_contiguous() or layer.scale.dtype != torch.bfloat16:
            return None
        bias = layer.bias
        if bias is not None and bias.dtype != torch.float32:
            return None
        return [layer.weight_int8, bias, layer.scale]
    if type(layer) is not nn.Linear or layer.weight.dtype != act or not layer.weight.is_contiguous():
        return None
    if layer.bias is not None and layer.bias.dtype != act:
        return None
    return [layer.weight, layer.bias, None]


class NativeStep:
    """The C step bound to one model and one single-row cache (pointers gathered once)."""

    def __init__(self, lib: ctypes.CDLL, model: Any, cache: Any, plan: _Plan) -> None:
        self.lib, self.model, self.cache = lib, model, cache
        self._layers = list(cache.layers)
        slots = [layer.size for layer in cache.layers]
        tensors = list(plan.tensors)
        for i, layer in enumerate(cache.layers):  # the cache's three slots of each layer's pointers
            at = GLOBAL_PTRS + i * LAYER_PTRS + LAYER_CACHE
            tensors[at: at + 3] = [layer.k, layer.v, layer.slot_pos]
        self._keep = tensors  # the pointers below stay valid while these tensors live
        self._ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])
        self._cfg = (ctypes.c_int64 * len(plan.cfg))(*plan.cfg)
        self._slots = (ctypes.c_int64 * len(slots))(*slots)
        self._fcfg = (ctypes.c_float * 2)(plan.eps, 1.0 / math.sqrt(model.config.head_size))
        self._scratch = torch.empty(lib.gpt2lab_scratch_floats(self._cfg, self._slots), dtype=torch.float32)
        self._logits = torch.empty(plan.cfg[6], dtype=torch.float32)
        self.vocab_size = model.config.vocab_size

    def __call__(self, model: Any, cache: Any, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (1, vocab_size) float32 of the token after `token` (1, 1) at position `pos` (1, 1),
        its keys and values appended to the cache (as `sampling.decode_one_token`)."""
        if model is not self.model or cache is not self.cache:
            raise ValueError("this native step is bound to another model or cache; build one with native_step")
        col, first = cache.next_col, self._layers[0]  # every layer is in the same mode, at the same column
        if col >= cache.max_len or first.static or first.ragged or first.padded:
            raise ValueError("the native step takes one-token steps into a plain one-row cache with room left")
        t, p = int(token), int(pos)  # one element each
        config = model.config
        if not 0 <= t < self._cfg[6] or p < 0 or p >= (config.block_size if config.pos_emb == "learned"
                                                        else model.rope_len):
            raise ValueError(f"token {t} at position {p} is outside the model's vocabulary or positions")
        self.lib.gpt2lab_decode_step(self._cfg, self._fcfg, self._slots, self._ptrs, self._scratch.data_ptr(),
                                     t, p, col, torch.get_num_threads(), self._logits.data_ptr())
        for layer in self._layers:
            layer.__dict__["next_col"] = col + 1  # a plain attribute; Module.__setattr__ costs ~2 us a layer
        return self._logits[None, : self.vocab_size].clone()


class _Plan:
    """What the C step reads of a model: its tensors in the C order (cache slots left None), the
    integer configuration and the LayerNorm epsilon."""

    def __init__(self, tensors: list[torch.Tensor | None], cfg: list[int], eps: float) -> None:
        self.tensors, self.cfg, self.eps = tensors, cfg, eps


def _plan(model: Any) -> _Plan | None:
    """The model's tensors as the C step reads them, or None when it cannot: not on a CPU, not in
    eval mode, a dtype other than float32/bfloat16/gpt2lab.int8, layers other than plain (or int8)
    linear ones, or tensors not contiguous."""
    w = model.transformer.wte.weight
    act = w.dtype
    config = model.config
    if w.device.type != "cpu" or act not in (torch.float32, torch.bfloat16) or model.training:
        return None
    if config.n_head % config.n_kv_head or config.head_size % 2:
        return None
    wkind = WEIGHT_KINDS[torch.int8] if _is_int8(model.lm_head) else WEIGHT_KINDS[act]
    if wkind == WEIGHT_KINDS[torch.int8] and act != torch.float32:
        return None
    head = _linear_ptrs(model.lm_head, wkind, act)
    if head is None or head[0].shape[0] != config.padded_vocab_size:
        return None
    rope = config.pos_emb == "rope"
    tensors: list[torch.Tensor | None] = [
        w, model.transformer.wpe.weight if config.pos_emb == "learned" else None,
        model.transformer.ln_f.weight, model.transformer.ln_f.bias, head[0], head[2],
        model.rope_cos if rope else None, model.rope_sin if rope else None,
    ]
    blocks = model.transformer.h
    for block in blocks:
        linears = [_linear_ptrs(m, wkind, act) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                          block.mlp.c_proj)]
        if any(x is None for x in linears):
            return None
        tensors += [block.ln_1.weight, block.ln_1.bias, *linears[0], *linears[1], block.ln_2.weight,
                    block.ln_2.bias, *linears[2], *linears[3], None, None, None]
    eps = {block.ln_1.eps for block in blocks} | {block.ln_2.eps for block in blocks} | {model.transformer.ln_f.eps}
    if len(eps) != 1 or any(t is not None and (t.device.type != "cpu" or not t.is_contiguous()) for t in tensors):
        return None
    if any(t is not None and t.dtype != act for i, t in enumerate(tensors) if _is_act_tensor(i)):
        return None
    if rope and model.rope_cos.dtype != torch.float32:
        return None
    cfg = [config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.head_size, 4 * config.n_embd,
           config.padded_vocab_size, wkind, int(act == torch.bfloat16), int(config.pos_emb == "learned"), int(rope)]
    return _Plan(tensors, cfg, eps.pop())


def runs(model: Any) -> bool:
    """Whether one-row decoding of `model` goes through the C step here (the model qualifies and
    the step builds on this machine)."""
    return _plan(model) is not None and library() is not None


HUGE_PAGE = 2 << 20


@torch.no_grad()
def lay_out(model: Any) -> Any:
    """Move the weight matrices the step streams (every linear layer's weight, the LM head, which
    is the tied token embedding) into one anonymous memory map, each on its own 4 KiB pages, the map
    offered to the kernel's transparent huge pages (madvise; 2 MiB pages where the system allows
    them): fewer TLB misses on a stream of hundreds of megabytes. On a 2-core Zen 4 a gpt2 (124M)
    step took 14% (float32) and 6% (bfloat16) less time than over torch's own allocations. In place,
    one matrix at a time (each original is freed as its copy replaces it); the values are unchanged
    and the parameters stop requiring gradients (inference only). Returns `model`."""
    plan = _plan(model)
    if plan is None:
        return model
    streamed = {id(t): t for i, t in enumerate(plan.tensors) if t is not None and _is_streamed(i)}
    del plan
    pages = [(t.nbytes + 4095) // 4096 * 4096 for t in streamed.values()]
    arena = mmap.mmap(-1, sum(pages) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages still stream well
            pass
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # holds the map open while any view lives
    offset = (-memory.data_ptr()) % HUGE_PAGE
    for key, size in zip(list(streamed), pages):
        tensor = streamed.pop(key)
        view = memory[offset: offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        offset += size
        _replace(model, tensor, view)
        del tensor  # the original is freed here, before the next matrix is copied
    return model


def _replace(model: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` wherever a module of `model` holds `old`, as a parameter (one Parameter object for
    every holder, so a tie stays a tie) or a buffer."""
    param = nn.Parameter(new, requires_grad=False)
    for module in model.modules():
        for name in [n for n, t in module._parameters.items() if t is old]:
            module._parameters[name] = param
        for name in [n for n, t in module._buffers.items() if t is old]:
            module._buffers[name] = new


def _is_streamed(index: int) -> bool:
    """Whether the tensor at `index` of the pointer list is a weight matrix the step reads whole."""
    if index < GLOBAL_PTRS:
        return index == HEAD
    return (index - GLOBAL_PTRS) % LAYER_PTRS in LAYER_MATRICES


def missing_build_note(model: Any) -> str | None:
    """A line for the user when `model` would decode one row through the C step but it could not be
    built here (not when switched off), else None."""
    if _plan(model) is None or library() is not None or os.environ.get(ENV_SWITCH) == "0":
        return None
    return (f"decoding through torch's step: the compiled one-row step could not be built ({build_error()}); "
            "with a C compiler with OpenMP (e.g. apt-get install gcc) CPU decoding is about 2x faster")


def native_step(model: Any, cache: Any) -> NativeStep | None:
    """The C step for `model` decoding into `cache`, or None where it does not apply (see `_plan`,
    `library`; the cache must hold one row and its dtype be the model's, and CPU autocast be off)."""
    if torch.is_autocast_enabled("cpu"):  # torch's step would compute in the autocast dtype
        return None
    plan = _plan(model)
    if plan is None or cache.layers[0].k.shape[0] != 1 or cache.layers[0].k.dtype != model.transformer.wte.weight.dtype:
        return None
    if model.config.pos_emb == "rope" and model.rope_len < cache.max_len:
        return None
    lib = library()
    return NativeStep(lib, model, cache, plan) if lib is not None else None


def _is_act_tensor(index: int) -> bool:
    """Whether the tensor at `index` of the pointer list is stored in the activation dtype: the
    embeddings, LayerNorms and KV caches (not weights, int8 scales, rotary tables or slot positions)."""
    if index < GLOBAL_PTRS:
        return index in GLOBAL_ACT
    return (index - GLOBAL_PTRS) % LAYER_PTRS in (*LAYER_NORMS, LAYER_CACHE, LAYER_CACHE + 1)


if __name__ == "__main__":  # python -m gpt2lab.native_decode: build it now and say where
    lib = library()
    print(lib._name if lib is not None else f"not built: {build_error()}", file=sys.stdout if lib else sys.stderr)
    sys.exit(0 if lib is not None else 1)
