"""Our compact LLaMA-family decoder (gpt-fast / litgpt style).

Module names mirror Hugging Face's (`embed_tokens`, `layers.i.self_attn.q_proj`, ...) so the one
converter in `model.convert` is a strict key/shape check. Notation: B batch, T tokens, D model dim,
nh / nkv query / key-value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import ATTENTION_BACKENDS, AttentionFn
from model.config import ModelConfig
from model.rope import apply_rope, inverse_frequencies, rope_angles

Injection = Callable[[torch.Tensor], torch.Tensor]  # (B, T, D) -> (B, T, D) residual update
# pre-RoPE q (B, nh, T, hd), k/v (B, nkv, T, hd) -> attention output (B, T, nh * hd), before o_proj
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Self-attention cache of one layer: preallocated k/v buffers (B, nkv, max_len, hd), written in place.

    Lifecycle: created per generation by `Transformer.new_cache` and passed to `forward` by the
    caller (never stored on the model, so concurrent generations share weights, not caches).
    `update` writes the new keys after the `length` already held and returns views of the filled
    prefix, so the caller's queries are the last T of the returned keys (bottom-right causal
    alignment). Nothing is reallocated per token (gpt-fast style). The length is tracked on the host,
    so no step synchronises with the device to learn where to write.

    Why views of a preallocated buffer: measured in one run (torch 2.13, 2 CPU cores, Qwen2-0.5B
    shapes), PyTorch's SDPA is as fast on a prefix view `[:, :, :S]` as on a contiguous tensor (the
    ~7x penalty measured with an earlier layout is gone), and appending by `torch.cat` cost O(S)
    per step and layer (0.45 ms per layer at 16K tokens, ~11 ms per token for 24 layers).

    `static=True` (CUDA graphs / torch.compile): `update` returns the whole buffers and `mask` the
    positions written so far, so every decode step has the same shapes.
    """

    def __init__(self, batch: int, max_len: int, n_kv: int, head_dim: int, device, dtype,
                 static: bool = False) -> None:
        self.max_len, self.static = max_len, static
        self.k = torch.zeros((batch, n_kv, max_len, head_dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.offset = 0  # RoPE position minus cache index (a merged prefix: `load_prefix(..., position)`)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.static:  # no host-side state: a compiled / graphed step must not see a changing int
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        start, t = self.length, k.shape[2]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (need {end})")
        if input_pos.device.type == "cpu" and (int(input_pos[0]) - self.offset != start or input_pos.numel() != t):
            raise ValueError(f"KV cache holds {start} positions (next at {start + self.offset}); input_pos must continue it")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def load_prefix(self, k: torch.Tensor, v: torch.Tensor, position: int | None = None) -> None:
        """Starts the cache from persisted states of a prompt prefix (B, nkv, P, hd); `position`, when
        given, is the RoPE position of the next token (a merged prefix holds fewer entries than the
        positions it spans: HOMER)."""
        if self.length:
            raise ValueError("load_prefix needs an empty cache")
        p = k.shape[2]
        if p > self.max_len:
            raise ValueError(f"a prefix of {p} positions does not fit a cache of {self.max_len}")
        if position is not None and position != p and self.static:
            raise ValueError("a static cache writes at the RoPE positions: it cannot take a merged prefix")
        self.k[:, :, :p] = k
        self.v[:, :, :p] = v
        self.length = p
        self.offset = 0 if position is None else position - p

    def prefix(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `length` (default: all written) positions, e.g. to persist them."""
        n = self.length if length is None else length
        return self.k[:, :, :n], self.v[:, :, :n]


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_head * config.head_dim, bias=config.attn_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=config.attn_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=config.attn_out_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, nh, T, hd), k and v (B, nkv, T, hd), before RoPE."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, cos, sin, attn_fn: AttentionFn, cache: KVCache | None = None,
               input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Rotates q/k, appends to the cache if any, attends causally; returns (B, T, D)."""
        b, _, t, _ = q.shape
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
            if cache.static:  # whole buffers: attend to the positions written so far, causally
                mask = torch.arange(cache.max_len, device=q.device)[None, :] <= input_pos[:, None]
                out = attn_fn(q, k, v, mask=mask[None, None])
                return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
        out = attn_fn(q, k, v, causal=True)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer. `inject`, when given, adds a residual update (SharedLLM's
    cross-attention) after self-attention and before the MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_fn: AttentionFn, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, inject: Injection | None = None,
                kv_out: list | None = None, attend: Attend | None = None) -> torch.Tensor:
        """`kv_out`: when given, this layer's keys and values (before RoPE) are appended to it (the
        lower model's node encoding keeps them). `attend`, when given, replaces the self-attention
        read-out over the cache (an engine's own attention over its memory, e.g. ActQKV's block
        retrieval); q/k/v come from this layer."""
        q, k, v = self.self_attn.project(self.input_layernorm(x))
        if kv_out is not None:
            kv_out.append((k, v))
        if attend is None:
            x = x + self.self_attn.attend(q, k, v, cos, sin, attn_fn, cache, input_pos)
        else:
            x = x + self.self_attn.o_proj(attend(q, k, v))
        if inject is not None:
            x = x + inject(x)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The base model. Device, dtype and attention kernel are decided by the loader."""

    def __init__(self, config: ModelConfig, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.inv_freq = inverse_frequencies(config)  # plain tensor: survives meta-device construction
        self.gradient_checkpointing = False  # set by the trainer: recompute layers in backward
        self.set_attention_backend(attention)

    def set_attention_backend(self, name: str) -> None:
        self.attention_backend = name
        self.attn_fn: AttentionFn = ATTENTION_BACKENDS[name]

    # --- KV cache ------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, static: bool = False) -> list[KVCache]:
        """A fresh per-layer cache for one generation; the caller owns it and passes it to forward."""
        ref = self.embed_tokens.weight
        cfg = self.config
        return [KVCache(batch, max_len, cfg.n_kv_head, cfg.head_dim, ref.device, ref.dtype, static)
                for _ in self.layers]

    # --- forward ------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(self.inv_freq, positions, dtype)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(hidden), weight)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                injections: Mapping[int, Injection] | None = None,
                cache: list[KVCache] | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only` (prefill: the (T, V)
        logits of a long prompt cost time and GB). With `input_pos` (T,) and a `cache` from
        `new_cache`, reads and extends the cache; without them, attends over `input_ids` alone."""
        hidden = self.hidden_states(input_ids, input_pos, injections, cache)
        return self.output_logits(hidden[:, -1:] if last_only else hidden)

    def hidden_states(self, input_ids, input_pos=None, injections=None, cache=None) -> torch.Tensor:
        if (input_pos is None) != (cache is None):
            raise RuntimeError("input_pos and cache go together: create the cache with new_cache()")
        t = input_ids.shape[1]
        positions = input_pos if input_pos is not None else torch.arange(t, device=input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rope(positions, x.dtype)
        injections = injections or {}
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and layer_cache is None:
                x = checkpoint(layer, x, cos, sin, self.attn_fn, None, None, injections.get(i), use_reentrant=False)
            else:
                x = layer(x, cos, sin, self.attn_fn, layer_cache, input_pos, injections.get(i))
        return x
