"""ActQKV's encoding: the one streaming pass that turns a document's token stream into its persisted
`BlockState` (`model.block_state`). Notation and question time: `model.actqkv`; knobs and retrieval
arithmetic: `model.block_retrieval`.

**Encoding (once per document, persisted).** The document's token stream (chat-template header,
system prompt, document) runs through the whole model in execution blocks of `exec_block` tokens.
In every layer one softmax covers three parts: the first `n_init` tokens, the blocks retrieved for
this execution block, and the local window (at least `n_local` tokens back to a block boundary,
ordinary RoPE at positions relative to the window). Memory keys are pre-RoPE and queries read them
rotated by the fixed angle `n_local`, as if they sat at that distance (InfLLM). A block becomes
retrievable once it has left the local window; its representative (per KV head) is the mean key of
the `repr_topk` tokens that received the most attention from local queries. The pass ends in the
`BlockState` that is stored (what it holds per layer: `model.block_state`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.actqkv import fixed_angle, heads_last, local_start
from model.block_kv import StoredKV
from model.block_retrieval import (
    ActQKVConfig,
    RunningStats,
    allocate_budget,
    block_scores,
    max_token_scores,
    normalised_entropy,
    probe_query,
    top_blocks,
)
from model.block_state import BlockState
from model.decoder import Transformer
from model.rope import apply_rope

SCORE_QUERIES = 32  # queries per execution block whose attention ranks tokens for representatives


def representatives(k: torch.Tensor, received: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """k (nkv, S, hd) pre-RoPE keys of consecutive blocks, received (nkv, S) -> (ceil(S / B), nkv, hd):
    per block and KV head, the mean key of its `topk` most attended tokens (a short last block: of
    at most as many tokens as it has)."""
    nkv, length, hd = k.shape
    full = length // block_size * block_size
    parts = []
    if full:
        kb = k[:, :full].reshape(nkv, -1, block_size, hd)
        top = received[:, :full].reshape(nkv, -1, block_size).topk(topk, dim=-1).indices  # (nkv, n, r)
        picked = torch.gather(kb, 2, top[..., None].expand(-1, -1, -1, hd))  # (nkv, n, r, hd)
        parts.append(picked.mean(2).transpose(0, 1))
    if full < length:
        tail_k, tail_r = k[:, full:], received[:, full:]
        top = tail_r.topk(min(topk, length - full), dim=-1).indices  # (nkv, r)
        parts.append(torch.gather(tail_k, 1, top[..., None].expand(-1, -1, hd)).mean(1)[None])
    return torch.cat(parts).contiguous()


class _Encoder:
    """The streaming pass over one document (working buffers in float32, stored in `state_dtype`)."""

    def __init__(self, base: Transformer, ids: list[int], cfg: ActQKVConfig) -> None:
        c = base.config
        self.base, self.cfg, self.ids = base, cfg, ids
        self.device = base.embed_tokens.weight.device
        self.dtype = base.embed_tokens.weight.dtype
        n, L = len(ids), c.n_layer
        self.groups = c.n_head // c.n_kv_head
        shape = (c.n_kv_head, n, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(L)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(L)]
        self.received = [torch.zeros(c.n_kv_head, n, device=self.device) for _ in range(L)]
        self.reprs = [torch.zeros(-(-n // cfg.block_size), c.n_kv_head, c.head_dim, device=self.device)
                      for _ in range(L)]
        self.n_repr = 0  # blocks whose representative is final
        self.stats = [RunningStats(c.n_head * c.head_dim) for _ in range(L)]
        self.entropy_sum = torch.zeros(L)
        self.entropy_steps = 0
        self.weights = [1.0] * L  # budget shares of the next step: the last step's entropies
        self.cos_n, self.sin_n = fixed_angle(base, cfg.n_local, self.dtype, self.device)

    @torch.no_grad()
    def run(self, progress=None) -> None:
        n, E = len(self.ids), self.cfg.exec_block
        total_steps = -(-n // E)
        for step, s in enumerate(range(0, n, E)):
            e = min(n, s + E)
            w0 = local_start(s, self.cfg)
            self._finalise_blocks(w0 // self.cfg.block_size)
            self._step(s, e, w0)
            if progress is not None:
                progress(step + 1, total_steps)
        self._finalise_blocks(-(-n // self.cfg.block_size))

    def _step(self, s: int, e: int, w0: int) -> None:
        cfg, L = self.cfg, len(self.k)
        first = cfg.n_init // cfg.block_size
        available = max(0, w0 // cfg.block_size - first)  # retrievable blocks [first, w0 / B)
        hi = [min(cfg.max_blocks, available)] * L
        shares = allocate_budget(self.weights, cfg.budget * L, [cfg.min_blocks] * L, hi)
        cos, sin = self.base.rope(torch.arange(e - w0, device=self.device), self.dtype)
        entropies = [None] * L
        x = self.base.embed_tokens(torch.tensor([self.ids[s:e]], device=self.device))
        for i, layer in enumerate(self.base.layers):
            attend = functools.partial(self._attend, i, s, e, w0, cos, sin, first, available, shares[i], entropies)
            x = layer(x, None, None, None, attend=attend)
        if available:
            self.weights = [float(h) for h in entropies]
            self.entropy_sum += torch.tensor(self.weights)
            self.entropy_steps += 1

    def _attend(self, i, s, e, w0, cos, sin, first, available, share, entropies, q, k, v):
        cfg = self.cfg
        q, k, v = q[0], k[0], v[0]  # (nh, t, hd), (nkv, t, hd)
        t = q.shape[1]
        self.k[i][:, s:e], self.v[i][:, s:e] = k, v
        keys, values = apply_rope(self.k[i][:, w0:e], cos, sin), self.v[i][:, w0:e]
        q_local = apply_rope(q, cos[s - w0:], sin[s - w0:])
        channels = heads_last(apply_rope(q, self.cos_n, self.sin_n))  # (t, C): read at distance n_local
        self.stats[i].update(channels)
        s_g = 0
        if available:
            probe = probe_query(channels, self.stats[i], cfg.encode_probe)
            if cfg.score.startswith("max_token"):
                B = cfg.block_size
                scores = max_token_scores(probe, self.k[i][:, first * B:(first + available) * B], B,
                                          per_head=cfg.score == "max_token_head")
            else:
                scores = block_scores(probe, self.reprs[i][first:first + available], self.groups, cfg.score)
            entropies[i] = normalised_entropy(scores, cfg.entropy_temperature)
            idx = torch.cat([torch.arange(cfg.n_init), _token_index(top_blocks(scores, share, cfg.span) + first, cfg, e)])
            idx = idx.to(self.device)
            # memory keys sit n_local positions before this step's first query (one SDPA call for the
            # whole step; at question time, where T is small, each query reads them at exactly n_local)
            offset = idx % cfg.block_size if cfg.memory_positions == "block" else torch.zeros_like(idx)
            cos_g, sin_g = self.base.rope(s - w0 - cfg.n_local + offset, self.dtype)
            keys = torch.cat([apply_rope(self.k[i][:, idx], cos_g, sin_g), keys], dim=1)
            values = torch.cat([self.v[i][:, idx], values], dim=1)
            s_g = idx.numel()
        n_keys = keys.shape[1]
        mask = torch.arange(n_keys, device=self.device)[None, :] <= torch.arange(n_keys - t, n_keys, device=self.device)[:, None]
        mask[:, :s_g] = True
        out = F.scaled_dot_product_attention(q_local[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
        self.received[i][:, w0:e] += self._received(q_local, keys, mask)[:, s_g:]
        return out[0].transpose(0, 1).reshape(1, t, -1)

    def _received(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention each key receives from a strided sample of the step's queries (nkv, S): ranks
        the tokens of a block for its representative at 1/16 of the cost of every query's row."""
        nh, t, hd = q.shape
        nkv = keys.shape[0]
        rows = torch.linspace(0, t - 1, min(t, SCORE_QUERIES), device=q.device).round().long()
        qs = q[:, rows].reshape(nkv, -1, hd)  # (nkv, g * r, hd)
        logits = (qs @ keys.transpose(1, 2)) * hd**-0.5
        logits = logits.masked_fill(~mask[rows].repeat(nh // nkv, 1), float("-inf"))
        return logits.softmax(-1).sum(1)

    def _finalise_blocks(self, upto: int) -> None:
        """Representatives of blocks [n_repr, upto): they left the local window (or the stream ended)."""
        if upto <= self.n_repr:
            return
        B = self.cfg.block_size
        lo, hi = self.n_repr * B, min(upto * B, len(self.ids))
        for i in range(len(self.k)):
            self.reprs[i][self.n_repr:upto] = representatives(self.k[i][:, lo:hi].float(), self.received[i][:, lo:hi],
                                                              B, self.cfg.repr_topk)
        self.n_repr = upto

    def state(self, doc_offset: int) -> BlockState:
        cfg = self.cfg
        steps = max(self.entropy_steps, 1)
        entropy = self.entropy_sum / steps if self.entropy_steps else torch.ones(len(self.k))
        return BlockState(self.cfg, list(self.ids), doc_offset,
                          [StoredKV.encode(k, cfg.state_dtype, cfg.block_size) for k in self.k],
                          [StoredKV.encode(v, cfg.state_dtype, cfg.block_size) for v in self.v],
                          [r.to("cpu", cfg.float_dtype) for r in self.reprs], self.stats, entropy)


def _token_index(blocks: torch.Tensor, cfg: ActQKVConfig, length: int) -> torch.Tensor:
    """Token indices of `blocks` (sorted), clipped to a stream of `length` tokens."""
    idx = (blocks[:, None] * cfg.block_size + torch.arange(cfg.block_size)[None, :]).flatten()
    return idx[idx < length]


def encode_stream(base: Transformer, ids: list[int], cfg: ActQKVConfig, doc_offset: int = 0,
                  progress=None) -> BlockState:
    """Streams `ids` through the model (see the module docstring); `progress(done, total)` per block."""
    cfg.check_window(base.config.max_position)
    encoder = _Encoder(base, ids, cfg)
    encoder.run(progress)
    return encoder.state(doc_offset)
