"""SharedLLM's cross-attention block, injected into each of the bottom M layers of the upper model.

Notation: B batch, T running-text tokens, D model dim, nh query heads, nkv key/value heads,
hd head dim, P memory positions (L/8 per retrieved chunk).

    h = h + o_proj(attn(rope_n(q_proj(norm(h))), K_l, V_l))

K_l, V_l are the keys/values the *same* layer l produced in the lower model for the context
(self-injection), gathered by the tree search and already rotated to chunk-level positions
(`model.memory`). Queries all sit at position n = number of chunks, so the decoder perceives
chunk order through RoPE's relative angle n - i. New parameters: norm, q_proj, o_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import AttentionFn
from model.config import ModelConfig
from model.decoder import Block, RMSNorm
from model.rope import apply_rope


class CrossAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.q_proj = nn.Linear(config.dim, config.n_head * config.head_dim, bias=config.attn_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=config.attn_out_bias)

    @torch.no_grad()
    def initialise(self, layer: Block, mode: str) -> None:
        """`copy`: q/o projections from the layer's self-attention, norm from its post-attention
        norm. `zero`: the same but o_proj = 0, so the block adds exactly nothing until trained.
        `none`: random q/o projections (normal, std 0.02, zero biases) and a unit norm, as the
        authors start (their `init_mode none`)."""
        if mode == "none":
            self.norm.weight.fill_(1.0)
            for proj in (self.q_proj, self.o_proj):
                proj.weight.normal_(0.0, 0.02)
                if proj.bias is not None:
                    proj.bias.zero_()
            return
        self.q_proj.weight.copy_(layer.self_attn.q_proj.weight)
        if self.q_proj.bias is not None:
            self.q_proj.bias.copy_(layer.self_attn.q_proj.bias)
        self.norm.weight.copy_(layer.post_attention_layernorm.weight)
        if mode == "copy":
            self.o_proj.weight.copy_(layer.self_attn.o_proj.weight)
            if self.o_proj.bias is not None:
                self.o_proj.bias.copy_(layer.self_attn.o_proj.bias)
        elif mode == "zero":
            self.o_proj.weight.zero_()
            if self.o_proj.bias is not None:
                self.o_proj.bias.zero_()
        else:
            raise ValueError(f"unknown init mode {mode!r}")

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> rotated queries (B, nh, T, hd)."""
        b, t, _ = x.shape
        q = self.q_proj(self.norm(x)).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attn_fn: AttentionFn, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); keys/values (B, nkv, P, hd); mask (B, 1, 1, P) bool or None -> (B, T, D)."""
        b, t, _ = x.shape
        q = self.queries(x, cos, sin)
        out = attn_fn(q, keys, values, causal=False, mask=mask)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))

    @staticmethod
    def attention_weights(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Explicit softmax weights (B, nh, T, P), float32; used for citations only."""
        groups = q.shape[1] // keys.shape[1]
        k = keys.repeat_interleave(groups, dim=1).float()
        scores = (q.float() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)
