"""The GPT-2 model family in one file, readable top to bottom.

    GPTConfig  -> the architecture (torch-free, in gpt2lab.architecture with its presets: gpt2,
                  gpt2-medium, gpt2-large, gpt2-xl, and tiny ones)
    RoPE       -> rotary position embeddings (optional, `pos_emb="rope"`)
    KVCache    -> preallocated key/value storage for fast generation (ring buffer under a sliding window)
    Attention  -> causal self-attention: MHA / GQA / MQA, optional sliding window; one mask, one SDPA call
    MLP, Block -> the pre-LayerNorm transformer block of GPT-2
    GPT        -> embeddings, blocks, final LayerNorm, tied LM head; `logits, loss = model(idx, targets)`,
                  `model.predict(idx)`, `model.generate(idx, max_new_tokens, temperature, top_k)`
    cost model -> `model_stats` (parameters, FLOPs, KV bytes) and `memory_needed` / `check_memory`: every
                  model and KV cache is sized before it is allocated and refused in one line if it cannot fit

With the default config this is OpenAI's GPT-2 exactly: learned absolute positions, pre-LayerNorm,
GELU (tanh approximation), fused qkv projection, token embedding tied to the LM head, biases.
Shape comments use B (batch), T (time), C (n_embd), nh (heads), nkv (kv heads), hs (head size).
This module imports torch only (and its config, the memory check of gpt2lab.devices, and inside
`GPT.generate` the token loop of gpt2lab.sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.architecture import PRESETS as PRESETS  # re-exported: the presets' old home
from gpt2lab.architecture import GPTConfig
from gpt2lab.devices import check_fits
from gpt2lab.errors import UserError
from gpt2lab.losses import linear_cross_entropy

# --------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_cache(head_size: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_size // 2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) of x (B, nh, T, hs) by angles given as cos/sin
    (B or 1, 1, T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


# --------------------------------------------------------------------------------------------------
# KV cache


class LayerKVCache(nn.Module):
    """Preallocated keys/values of one layer: (B, nkv, S, hs), never grown. It only stores; attention
    is computed in `CausalSelfAttention`.

    Rows advance in lockstep by columns (a left-padded row simply has padding in its first columns);
    column c is stored in slot c (full attention, S = max_len) or c % S (sliding window: a ring of
    S = window slots). `slot_pos` records the absolute position each slot holds (-1 = empty or
    padding), so the attention mask is computed from positions, never assumed.

    In static mode (`KVCache.start_static_decoding`) `update` takes one-token steps whose shapes and
    Python state never change from step to step (for torch.compile / CUDA graphs).
    """

    def __init__(self, batch_size: int, n_kv_head: int, size: int, head_size: int, window: int | None,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, size, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "slot_pos", torch.full((batch_size, size), -1, dtype=torch.long, device=device), persistent=False
        )
        self.size = size
        self.window = window
        self.next_col = 0
        # Static mode: the next column as a device tensor, advanced by the step itself.
        self.register_buffer("col", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.static = False
        self.padded = False  # a padding position (-1) was stored (see `KVCache.note_positions`)

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_col = 0
        self.static = False
        self.padded = False

    def sees_every_slot(self, T: int) -> bool:
        """Whether one new query (T == 1) may attend over every key `update` returns, so attention
        needs no mask: no padding was stored and no empty slot is returned (a ring only once full).
        Known on the host, without reading the cache."""
        return (T == 1 and not self.static and not self.padded
                and (self.window is None or self.next_col >= self.size))

    def update(self, k: torch.Tensor, v: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) of absolute positions pos (B or 1, T) (-1 = padding) and return
        what the T new queries may attend over: keys and values (B, nkv, Tk, hs) with their positions
        (B, Tk) (-1 = empty or padding, to be masked).

        Tk is the filled prefix (full attention), the S ring slots (one-token steps, static mode) or
        S + T (a multi-token step into a ring: the old slots followed by the new keys).
        """
        pos = pos.expand(k.shape[0], -1)
        T = k.shape[2]
        if self.static:
            # Fixed shapes: the column is the tensor `col`, the write an index_copy_ into slot col % S,
            # and all S slots are returned. Nothing is read back to the host; the caller must not step
            # past the cache's max_len.
            if T != 1:
                raise ValueError(f"static KV-cache steps take one token per row, got {T}")
            slot = self.col % self.size  # (1,)
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.slot_pos.index_copy_(1, slot, pos)
            self.col += 1
            return self.k, self.v, self.slot_pos
        start = self.next_col
        if self.window is None:
            if start + T > self.size:
                raise ValueError(f"KV cache holds {self.size} tokens per row; {start + T} were requested")
            self._write(k, v, pos, start)
            n = start + T  # the filled prefix only
            return self.k[:, :, :n], self.v[:, :, :n], self.slot_pos[:, :n]
        if T == 1:
            # The slot overwritten holds position p - window, which is already outside the window.
            self._write(k, v, pos, start)
            return self.k, self.v, self.slot_pos
        # A multi-token step into a ring could overwrite keys its own earlier queries still need:
        # return [old ring, new keys], then keep only the newest S columns.
        out = (torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2),
               torch.cat((self.slot_pos, pos), dim=1))
        keep = min(T, self.size)
        self._write(k[:, :, T - keep:], v[:, :, T - keep:], pos[:, T - keep:], start + T - keep)
        return out

    def _write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, start_col: int) -> None:
        T = k.shape[2]
        first = start_col % self.size
        if first + T <= self.size:  # contiguous slots: plain copies, no index tensor (the decode step)
            self.k.narrow(2, first, T).copy_(k)
            self.v.narrow(2, first, T).copy_(v)
            self.slot_pos.narrow(1, first, T).copy_(pos)
        else:
            slots = torch.arange(start_col, start_col + T, device=k.device) % self.size
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            self.slot_pos.index_copy_(1, slots, pos)
        self.next_col = start_col + T


class KVCache(nn.Module):
    """The caches of all layers, sized for `max_len` columns (tokens incl. left padding) per row."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        if max_len > config.block_size and config.pos_emb == "learned":
            raise UserError(
                f"generation needs {max_len} positions but the model's block_size is {config.block_size}"
            )
        check_memory(config, device, f"a KV cache of {batch_size:,} x {max_len:,} tokens",
                     "generate fewer tokens (max_new_tokens) or fewer sequences at once", model=False,
                     cache=(batch_size, max_len), dtype_bytes=dtype.itemsize)
        self.max_len = max_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, config.n_kv_head, min(w, max_len) if w else max_len, config.head_size, w,
                         dtype, device)
            for w in config.layer_windows()
        )

    @property
    def next_col(self) -> int:
        """Columns filled so far (outside static mode); every layer advances in lockstep."""
        return self.layers[0].next_col

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def note_positions(self, pos: torch.Tensor) -> None:
        """Record whether the positions about to be stored hold padding (-1), once per forward pass.
        Only a CPU tensor is read (at no cost); elsewhere padding is assumed, so nothing waits on the
        device and attention always takes the mask."""
        if self.layers[0].padded or self.layers[0].static:  # static steps always take the mask
            return
        if pos.device.type != "cpu" or bool((pos < 0).any()):
            for layer in self.layers:
                layer.padded = True

    def start_static_decoding(self) -> None:
        """From the next step on, take one-token steps of fixed shapes (see `LayerKVCache.update`),
        which torch.compile can capture whole (mode="reduce-overhead": CUDA graphs). Call it after the
        prefill; every later step must pass `pos`. `reset()` goes back to the ordinary mode."""
        for layer in self.layers:
            layer.col.fill_(layer.next_col)
            layer.static = True

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)


# --------------------------------------------------------------------------------------------------
# Attention


class CausalSelfAttention(nn.Module):
    """Causal self-attention (MHA / GQA / MQA, optional sliding window), the one place attention is
    computed: training (no cache), prefill, decode and static decode all go through `forward`, which
    takes its mask from `attention_mask` (built from positions) and calls SDPA once. A new attention
    variant is an edit to this class only: a new mask rule in `attention_mask`, new scores or kernels
    at the SDPA call in `forward`; the KV cache just stores keys, values and their positions."""

    def __init__(self, config: GPTConfig, window: int | None) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.window = window
        # One fused projection for q, k, v (k and v are smaller under GQA/MQA).
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_size,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def attention_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, Tq, Tk) of `dtype` (0 = visible, -inf = hidden) from absolute positions
        q_pos (B, Tq) and k_pos (B, Tk) (B may be 1 in either): causal, within the window, never
        padding or an empty slot (-1)."""
        allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
        if self.window is not None:
            allowed = allowed & ((q_pos[:, :, None] - k_pos[:, None, :]) < self.window)
        # A padding query sees nothing; let it see the last key so softmax stays finite (output unused).
        last = torch.arange(k_pos.shape[1], device=k_pos.device) == k_pos.shape[1] - 1
        allowed = allowed | ((q_pos[:, :, None] < 0) & last)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerKVCache | None, pos: torch.Tensor, masks: dict) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). pos (B or 1, T): absolute positions of the tokens (-1 = padding);
        cache: this layer's KV store, or None (training: the T tokens attend among themselves);
        masks: this forward pass's masks by (window, Tk), shared by layers that see the same keys."""
        B, T, C = x.shape
        hs = self.head_size
        # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs): views of the projection, heads second
        q, k, v = (self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, hs).transpose(1, 2)
                   .split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pos = pos
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)  # (B, nkv, Tk, hs), (B, Tk): every key q may see
        mask = None  # plain causal attention: is_causal, no materialised mask, the flash kernels
        if cache is not None and cache.sees_every_slot(T):
            pass  # a decode step that sees every key returned: no mask, not causal
        elif cache is not None or (self.window is not None and self.window < T):
            # Caches advance in lockstep, so layers of equal (window, Tk) hold equal key positions.
            key = (self.window, k_pos.shape[1])
            mask = masks.get(key)
            if mask is None:
                mask = masks[key] = self.attention_mask(pos, k_pos, q.dtype)
        if self.n_kv_head != self.n_head:  # GQA/MQA: each kv head serves n_head // n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout_p = self.dropout if self.training and cache is None else 0.0  # a cache means inference
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                           dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, window: int | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, window)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerKVCache | None, pos: torch.Tensor, masks: dict) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the other arguments are `CausalSelfAttention.forward`'s."""
        x = x + self.attn(self.ln_1(x), rope, cache, pos, masks)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        device = torch.get_default_device()
        if device.type != "meta":  # GPT.empty builds on meta, having checked its target device
            check_memory(config, device, describe_size(config), "choose a smaller model")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, w) for w in config.layer_windows()),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.rope_len = 0
        if config.pos_emb == "rope":
            self._build_rope(config.block_size)
        self.apply(self._init_weights)

    def _build_rope(self, length: int, device: torch.device | str | None = None) -> None:
        cos, sin = rope_cache(self.config.head_size, length, self.config.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_len = length

    def _apply(self, fn, recurse=True):
        # Keep the rotary tables in fp32 whatever dtype the weights are cast to: bf16 angles lose
        # precision at large positions.
        super()._apply(fn, recurse)
        if self.rope_len and self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            self._build_rope(self.rope_len, self.rope_cos.device)
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale_init", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters with the tied embedding counted once; `non_embedding` drops position/token tables."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields the tied weight once
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        loss_reduction: str = "mean",
        fused_loss: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        targets (B, T): next-token ids, -100 = ignored. `loss_reduction` "mean" averages over the
        counted tokens; "sum" returns their sum (for normalising across micro-batches or ranks).
        pos (B, T): absolute positions (default 0..T-1, continuing after the tokens already in
        `cache`; -1 marks left padding, masked with a cache; without one, full-attention layers are
        causal by column). cache: a KVCache from `new_cache` to decode incrementally.
        last_only: logits of the last position only.
        fused_loss: with targets, compute the LM head and the loss chunk by chunk
        (`gpt2lab.losses.linear_cross_entropy`, same value and gradients) and return logits None.
        """
        B, T = idx.shape
        if pos is None:
            if cache is None and T > self.config.block_size and self.config.pos_emb == "learned":
                raise UserError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            # With a cache, positions continue after the tokens it already holds.
            start = cache.next_col if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T): the same in every row
        x = self.transformer.wte(idx)
        if self.config.pos_emb == "learned":
            # Looked up per row (B, T, C): broadcasting would change the order wpe's gradient is summed in.
            x = x + self.transformer.wpe(pos.clamp(min=0).expand(B, T))
        rope = None
        if self.config.pos_emb == "rope":
            # Positions never exceed the columns a cache holds, so no device sync is needed here.
            need = cache.max_len if cache is not None else T
            if need > self.rope_len:
                self._build_rope(max(need, 2 * self.rope_len), idx.device)
            p = pos.clamp(min=0)
            rope = (self.rope_cos[p][:, None], self.rope_sin[p][:, None])  # (B or 1, 1, T, hs/2)
        x = self.transformer.drop(x)
        if cache is not None:
            cache.note_positions(pos)
        masks: dict = {}  # attention masks are built once per forward pass (CausalSelfAttention.forward)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache.layers[i] if cache is not None else None, pos, masks)
        x = self.transformer.ln_f(x)
        if fused_loss and targets is not None:  # never materialises the (B*T, V) logits
            if not isinstance(self.lm_head, nn.Linear):
                raise UserError("fused_loss needs a plain LM head; it cannot be used with LoRA on lm_head")
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        vocab_size=self.config.vocab_size, reduction=loss_reduction)
            return None, loss
        if last_only and targets is None:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                reduction=loss_reduction,
            )
        return logits, loss

    @classmethod
    def empty(cls, config: GPTConfig, device: torch.device | str = "cpu") -> GPT:
        """A model with uninitialised weights (no init cost), for loading weights into right after."""
        check_memory(config, device, describe_size(config), "choose a smaller model")
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        model.lm_head.weight = model.transformer.wte.weight  # to_empty breaks the tie; restore it
        if config.pos_emb == "rope":
            model._build_rope(model.rope_len, device)  # buffers are not weights: compute them
        return model

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for `batch_size` rows of up to `max_len` tokens, on the model's device."""
        w = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, dtype or w.dtype, w.device)

    # nanoGPT's inference interface, backed by the KV-cache generator (gpt2lab.sampling).
    @torch.no_grad()
    def predict(self, idx: torch.Tensor, targets: bool = True) -> torch.Tensor:
        """Logits for the ids idx (B, T): the prediction after every position (B, T, vocab_size)
        with `targets=True`, or after the last position only (B, 1, vocab_size)."""
        logits, _ = self(idx, last_only=not targets)
        return logits

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, top_p: float | None = None, seed: int | None = None,
                 stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """Complete the sequences idx (B, T) with `max_new_tokens` tokens each, feeding every
        prediction back in; returns prompt + continuation, (B, T + max_new_tokens).

        temperature 0 = greedy; top_k / top_p restrict sampling; `seed` makes it reproducible. A row
        that produces one of `stop_ids` ends there; its remaining columns repeat that stop id. This is
        `gpt2lab.sampling.generate` (KV cache; a learned-position model slides its context past
        block_size) with tensors in and out."""
        from gpt2lab.sampling import generate

        out = generate(self, idx.tolist(), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_ids=stop_ids)
        fill = stop_ids[0] if stop_ids else 0
        new = [o + [fill] * (max_new_tokens - len(o)) for o in out]  # a stopped row: padded with its stop id
        return torch.cat((idx, torch.tensor(new, dtype=idx.dtype, device=idx.device)), dim=1)


# --------------------------------------------------------------------------------------------------
# Cost model (used by model-info, MFU and benchmarks)


@dataclass
class ModelStats:
    params: int
    non_embedding_params: int
    flops_per_token_train: float
    """6N + attention term (forward + backward) at full context."""
    flops_per_token_forward: float
    kv_cache_bytes_per_token: int
    """Per token of context at the given dtype size, all layers (windowed layers stop growing)."""
    extra: dict = field(default_factory=dict)


def _param_counts(config: GPTConfig) -> tuple[int, int, int, int]:
    """(parameters, embedding parameters, attention and MLP parameters of one layer)."""
    C, V, kv_dim = config.n_embd, config.padded_vocab_size, config.n_kv_head * config.head_size
    b = 1 if config.bias else 0
    attn = C * (C + 2 * kv_dim) + b * (C + 2 * kv_dim) + C * C + b * C
    mlp = C * 4 * C + b * 4 * C + 4 * C * C + b * C
    emb = V * C + (config.block_size * C if config.pos_emb == "learned" else 0)
    params = config.n_layer * (attn + mlp + 2 * (C + b * C)) + emb + (C + b * C)
    return params, emb, attn, mlp


def model_stats(config: GPTConfig, seq_len: int | None = None, dtype_bytes: int = 2) -> ModelStats:
    """Analytic parameter count, FLOPs per token and KV-cache bytes, without building the model."""
    C, L, V, hs = config.n_embd, config.n_layer, config.padded_vocab_size, config.head_size
    kv_dim = config.n_kv_head * hs
    b = 1 if config.bias else 0
    params, emb, attn, mlp = _param_counts(config)
    non_emb = params - emb
    T = seq_len or config.block_size
    # Matmul FLOPs: 2 per multiply-add for the weights (including the LM head), plus attention
    # scores and weighted values: 2 * 2 * T_eff * C per layer, T_eff = average keys seen per query.
    weight_flops = 2 * (L * (attn - b * (C + 2 * kv_dim) - b * C + mlp - b * 5 * C) + V * C)
    attn_flops = 0
    for w in config.layer_windows():
        t_eff = (T + 1) / 2 if w is None or w >= T else w - (w * (w - 1)) / (2 * T)
        attn_flops += 2 * 2 * t_eff * C
    fwd = weight_flops + attn_flops
    kv_bytes = 2 * kv_dim * dtype_bytes * L
    return ModelStats(
        params=params,
        non_embedding_params=non_emb,
        flops_per_token_train=3 * fwd,
        flops_per_token_forward=fwd,
        kv_cache_bytes_per_token=kv_bytes,
        extra={"seq_len": T, "layer_windows": config.layer_windows()},
    )


def kv_cache_bytes(config: GPTConfig, seq_len: int, dtype_bytes: int, batch_size: int = 1, *,
                   positions: bool = False) -> int:
    """Bytes of a KV cache of `batch_size` rows of `seq_len` tokens: keys and values of `dtype_bytes`
    each (a windowed layer keeps `window` slots), and with `positions` each slot's position (int64) as
    `KVCache` stores it."""
    sw = config.sliding_window
    windows = [w or None for w in sw] if isinstance(sw, list) else None
    slots = (sum(min(w or seq_len, seq_len) for w in windows) if windows is not None
             else config.n_layer * min(sw or seq_len, seq_len))  # no per-layer list: n_layer may be absurd
    per_slot = 2 * config.n_kv_head * config.head_size * dtype_bytes + (8 if positions else 0)
    return batch_size * slots * per_slot


PYTHON_BYTES_PER_LAYER = 32 * 1024
"""Memory of the Python objects (modules, parameter and buffer tensors) of one block, measured: ~33 KiB."""
ACTIVATION_BYTES = 32
"""Bytes a training step keeps for backward per token, layer and unit of width: a lower bound (fp32
measures ~70, bf16 autocast about half of that)."""


def memory_needed(config: GPTConfig, *, model: bool = True, shards: int = 1, train_copies: int = 0,
                  batch: tuple[int, int] | None = None, fused_loss: bool = False, checkpointing: bool = False,
                  cache: tuple[int, int] | None = None, dtype_bytes: int = 4) -> int:
    """Bytes that a model of `config`, or what is computed with it, needs at least, without building it
    (the cost model of `model_stats`): the one estimate that every model, cache and training batch is
    checked against before it is allocated (`check_memory`).

    model: its weights (`dtype_bytes` each; / `shards` when sharded) and the Python objects of its layers.
    train_copies: more fp32 copies of the weights a training step holds (gradients and optimizer state:
    3 for AdamW). batch (rows, seq_len): the activations a training step keeps for backward (per layer,
    only its input with `checkpointing`) and its fp32 logits (none with `fused_loss`).
    cache (rows, max_len): a KV cache of `dtype_bytes` values, with the position of each slot.
    """
    params = _param_counts(config)[0]
    need = -(-params * 4 * train_copies // shards)
    if model:
        need += -(-params * dtype_bytes // shards) + config.n_layer * PYTHON_BYTES_PER_LAYER
    if batch is not None:
        tokens = batch[0] * batch[1]
        per_layer = 4 if checkpointing else ACTIVATION_BYTES
        need += tokens * (config.n_layer * config.n_embd * per_layer + (0 if fused_loss else 4 * config.vocab_size))
    if cache is not None:
        need += kv_cache_bytes(config, cache[1], dtype_bytes, cache[0], positions=True)
    return need


def check_memory(config: GPTConfig, device: torch.device | str | None, what: str, fix: str, **sizes) -> None:
    """UserError, before anything is allocated, when `memory_needed(config, **sizes)` bytes do not fit in
    the memory `device` has available (`gpt2lab.devices.check_fits`): "WHAT needs N of memory, but M is
    available on this machine; FIX"."""
    check_fits(memory_needed(config, **sizes), torch.device("cpu" if device is None else device), what, fix)


def describe_size(config: GPTConfig) -> str:
    """"a model of 124,439,808 parameters (12 layers x 768)": what `check_memory` names for a model."""
    layers = f"{config.n_layer:,} layer{'s' if config.n_layer != 1 else ''}"
    return f"a model of {_param_counts(config)[0]:,} parameters ({layers} x {config.n_embd:,})"
