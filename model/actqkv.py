"""ActQKV: a training-free engine that reads a whole document from persisted block K/V.

Notation: L layers, nh / nkv query / KV heads (g = nh / nkv), hd head dim, T queries of a step,
S keys, B block size, W local window. Knobs and retrieval arithmetic: `model.block_retrieval`.

**Encoding (once per document, persisted).** The document's token stream (chat-template header,
system prompt, document) runs through the whole model in execution blocks of `exec_block` tokens.
In every layer one softmax covers three parts: the first `n_init` tokens, the blocks retrieved for
this execution block, and the local window (at least `n_local` tokens back to a block boundary,
ordinary RoPE at positions relative to the window). Memory keys are pre-RoPE and queries read them
rotated by the fixed angle `n_local`, as if they sat at that distance (InfLLM). A block becomes
retrievable once it has left the local window; its representative (per KV head) is the mean key of
the `repr_topk` tokens that received the most attention from local queries. What is stored per
layer: every token's pre-RoPE K and V, the blocks' representatives, the running statistics of the
queries (for the probe) and the mean normalised entropy of the block scores (first budget shares).

**Question time.** The question (and earlier turns) follow the document in the prompt, so the state
does not depend on them. The last document's final window is loaded as an ordinary KV cache
(rotated at positions 0..W-1); the question is prefilled after it and the answer decoded, every
layer attending to [init, its retrieved blocks, local] in one softmax. Retrieval (`model.block_retrieval`)
runs for the prompt; by default its selection serves the whole answer (`retrieval_interval` = 0).
Defaults measured on needles (docs/benchmarks.md): the newest query as the probe and each block
scored by its best token (`max_token`); ActQKV's activation-weighted probe and representative scores
are the `probe` / `score` options. Several documents: their blocks form one memory.

**Exactness anchor.** A stream within `n_init + n_local` tokens is all local: encoding and answering
are then ordinary causal attention, so `actqkv` equals `full` on the same prompt (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attribution import Attribution
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
from model.decoder import Transformer
from model.generate import PrefixState
from model.rope import apply_rope

SCORE_QUERIES = 32  # queries per execution block whose attention ranks tokens for representatives


def local_start(length: int, cfg: ActQKVConfig) -> int:
    """First token of the local window for queries starting at `length`: a block boundary at least
    `n_local` tokens back; 0 (everything local, no memory) while that would not pass `n_init`."""
    start = (length - cfg.n_local) // cfg.block_size * cfg.block_size
    return 0 if start <= cfg.n_init else start


def joint_attention(q_local, k_local, v_local, q_global=None, k_global=None, v_global=None):
    """One softmax over memory keys (read by `q_global`) and local keys (causal, read by `q_local`).

    q_* (nh, T, hd); k/v (nkv, S, hd), the T queries being the last T local positions. Returns the
    output (nh, T, hd), the attention each local key received summed over queries and heads
    (nkv, S_l), and the newest query's attention over [memory | local] summed over heads (S_g + S_l,)."""
    nh, t, hd = q_local.shape
    nkv, s_l = k_local.shape[0], k_local.shape[1]
    g = nh // nkv
    scale = hd**-0.5
    logits = (q_local.reshape(nkv, g * t, hd) @ k_local.transpose(1, 2)) * scale  # (nkv, g*T, S_l)
    if t > 1:
        causal = torch.arange(s_l, device=q_local.device)[None, :] <= torch.arange(s_l - t, s_l, device=q_local.device)[:, None]
        logits = logits.masked_fill(~causal.repeat(g, 1), float("-inf"))
    s_g = 0 if k_global is None else k_global.shape[1]
    if s_g:
        glob = (q_global.reshape(nkv, g * t, hd) @ k_global.transpose(1, 2)) * scale  # (nkv, g*T, S_g)
        logits = torch.cat([glob, logits], dim=-1)
    p = logits.softmax(-1)
    out = p[..., s_g:] @ v_local
    if s_g:
        out = out + p[..., :s_g] @ v_global
    local_received = p[..., s_g:].sum(1)  # (nkv, S_l)
    newest = p.view(nkv, g, t, -1)[:, :, -1].sum((0, 1))  # (S_g + S_l,)
    return out.reshape(nh, t, hd), local_received, newest


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


@dataclass
class BlockState:
    """One document's persisted ActQKV state (the stream it was encoded from included)."""

    config: ActQKVConfig
    token_ids: list[int]  # the whole stream: template header + document
    doc_offset: int  # stream index of the document's first token
    k: list[StoredKV]  # per layer (nkv, T, hd), pre-RoPE
    v: list[StoredKV]
    reprs: list[torch.Tensor]  # per layer (N, nkv, hd), N = ceil(T / B)
    stats: list[RunningStats]
    entropy: torch.Tensor  # (L,) mean normalised entropy of block scores while encoding

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.config.block_size)

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in (*self.k, *self.v)) + sum(r.numel() * r.element_size() for r in self.reprs)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"token_ids": torch.tensor(self.token_ids, dtype=torch.int32),
               "doc_offset": torch.tensor([self.doc_offset], dtype=torch.int64),
               "entropy": self.entropy.float()}
        for i, (k, v, r, s) in enumerate(zip(self.k, self.v, self.reprs, self.stats, strict=True)):
            out.update(k.to_tensors(f"k.{i}"))
            out.update(v.to_tensors(f"v.{i}"))
            out[f"repr.{i}"] = r.contiguous()
            out[f"stats.{i}"] = torch.stack([s.mean, s.m2])
            out[f"count.{i}"] = torch.tensor([s.count], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: ActQKVConfig) -> BlockState:
        n_layers = sum(1 for name in tensors if name.startswith("repr."))
        B = config.block_size
        stats = [RunningStats(tensors[f"stats.{i}"].shape[1], float(tensors[f"count.{i}"][0]),
                              tensors[f"stats.{i}"][0], tensors[f"stats.{i}"][1]) for i in range(n_layers)]
        return cls(config, tensors["token_ids"].tolist(), int(tensors["doc_offset"][0]),
                   [StoredKV.from_tensors(tensors, f"k.{i}", B) for i in range(n_layers)],
                   [StoredKV.from_tensors(tensors, f"v.{i}", B) for i in range(n_layers)],
                   [tensors[f"repr.{i}"] for i in range(n_layers)], stats, tensors["entropy"].float())


def _fixed_angle(base: Transformer, position: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return base.rope(torch.tensor([position], device=device), dtype)


def _heads_last(q: torch.Tensor) -> torch.Tensor:
    """(nh, T, hd) -> (T, nh * hd): a query's channels, heads concatenated."""
    return q.transpose(0, 1).reshape(q.shape[1], -1)


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
        self.cos_n, self.sin_n = _fixed_angle(base, cfg.n_local, self.dtype, self.device)

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
        channels = _heads_last(apply_rope(q, self.cos_n, self.sin_n))  # (t, C): read at distance n_local
        self.stats[i].update(channels)
        s_g = 0
        if available:
            probe = probe_query(channels, self.stats[i], cfg.encode_probe)
            if cfg.score == "max_token":
                B = cfg.block_size
                scores = max_token_scores(probe, self.k[i][:, first * B:(first + available) * B], B)
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


class BlockMemory:
    """The question-time memory of one generation over one or more documents' states.

    Owned by one generation (built per turn): its retrieval selections change as it answers, so it is
    never shared between concurrent requests; the attention mass for citations is the generation's
    own `attention_mass` (as for SharedLLM's `Memory`)."""

    def __init__(self, base: Transformer, states: list[BlockState]) -> None:
        if not states:
            raise ValueError("BlockMemory needs at least one document state")
        self.cfg = cfg = states[0].config
        if any(s.config != cfg for s in states):
            raise ValueError("documents encoded with different actqkv settings cannot be read together")
        c = base.config
        self.base, self.states = base, states
        self.device = base.embed_tokens.weight.device
        self.dtype = base.embed_tokens.weight.dtype
        self.groups = c.n_head // c.n_kv_head
        B, last = cfg.block_size, states[-1]
        self.w0 = local_start(last.length, cfg)
        first_blocks = cfg.n_init // B
        # the retrievable pool: (document, block) pairs; the first document's first blocks are init
        self.pool: list[tuple[int, int]] = []
        for d, st in enumerate(states):
            lo = first_blocks if d == 0 else 0
            hi = self.w0 // B if d == len(states) - 1 else st.n_blocks
            self.pool.extend((d, j) for j in range(lo, hi))
        self.has_memory = bool(self.pool) or len(states) > 1 or self.w0 > 0
        # follows[p]: pool entry p + 1 is the next block of the same document
        self._follows = torch.tensor([a[0] == b[0] and b[1] == a[1] + 1 for a, b in zip(self.pool, self.pool[1:])] + [False])
        self._pool_ranges = [(min((j for dd, j in self.pool if dd == d), default=0),
                              max((j + 1 for dd, j in self.pool if dd == d), default=0)) for d in range(len(states))]
        self.init_tokens = min(cfg.n_init, states[0].length) if self.has_memory else 0
        self.reprs = [self._pool_reprs(i) for i in range(c.n_layer)]
        self.stats = [RunningStats.pooled([st.stats[i] for st in states]) for i in range(c.n_layer)]
        self.weights = torch.stack([st.entropy for st in states]).mean(0).tolist()
        self.cos_n, self.sin_n = _fixed_angle(base, cfg.n_local, self.dtype, self.device)
        self._cos_b, self._sin_b = base.rope(torch.arange(max(cfg.block_size, cfg.n_init), device=self.device), self.dtype)
        self.selected: list[torch.Tensor | None] = [None] * c.n_layer
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * c.n_layer
        self._entropies: list[float | None] = [None] * c.n_layer
        self._shares: list[int] = []
        self._decoded = 0
        self._max_blocks = max(st.n_blocks for st in states)
        self._src: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * c.n_layer
        self._local_src = self._source_ids(len(states) - 1, torch.arange(self.w0, last.length))

    def _pool_reprs(self, layer: int) -> torch.Tensor:
        """The pool's representatives in pool order (each document's pool blocks are one range)."""
        parts = [st.reprs[layer][lo:hi] for st, (lo, hi) in zip(self.states, self._pool_ranges, strict=True) if hi > lo]
        if not parts:
            return torch.zeros(0, 1, 1)
        return torch.cat(parts).to(self.device, torch.float32)

    # --- the prompt ---------------------------------------------------------------------------
    def local_ids(self) -> list[int]:
        return self.states[-1].token_ids[self.w0:]

    def local_prefix(self) -> PrefixState:
        """The last document's final window as an ordinary KV cache (rotated at 0..W-1)."""
        last = self.states[-1]
        n = last.length - self.w0
        cos, sin = self.base.rope(torch.arange(n, device=self.device), self.dtype)
        ks = [apply_rope(k.read(self.w0, last.length)[None].to(self.device, self.dtype), cos, sin) for k in last.k]
        vs = [v.read(self.w0, last.length)[None].to(self.device, self.dtype) for v in last.v]
        return PrefixState(ks, vs)

    # --- one forward step ---------------------------------------------------------------------
    def begin_step(self, t: int) -> bool:
        """Whether this step retrieves: the prompt always, then every `retrieval_interval` tokens."""
        every = self.cfg.retrieval_interval
        refresh = t > 1 or self._kv[0] is None or (every > 0 and self._decoded % every == 0)
        if t == 1:
            self._decoded += 1
        if refresh and self.pool:
            n = len(self.pool)
            L = len(self.reprs)
            hi = [min(self.cfg.max_blocks, n)] * L
            self._shares = allocate_budget(self.weights, self.cfg.budget * L, [self.cfg.min_blocks] * L, hi)
        return refresh

    def end_step(self, refreshed: bool) -> None:
        if refreshed and self.pool:
            self.weights = [float(h) for h in self._entropies]

    @property
    def n_positions(self) -> int:
        """Length of a generation's `attention_mass`: one slot per (document, block)."""
        return len(self.states) * self._max_blocks

    def attend(self, layer: int, input_pos: torch.Tensor, cache, refresh: bool, mass: torch.Tensor | None,
               q, k, v) -> torch.Tensor:
        """One layer's attention over [init, retrieved blocks, local]; with `mass` (n_positions,), the
        newest query's attention on document blocks is added to it (the generation's citations)."""
        cos, sin = self.base.rope(input_pos, self.dtype)
        q_local = apply_rope(q, cos, sin)
        k_local, v_local = cache.update(input_pos, apply_rope(k, cos, sin), v)
        q_global = apply_rope(q[0], self.cos_n, self.sin_n) if self.has_memory else None
        if self.has_memory and refresh:
            self._retrieve(layer, q_global)
        kv = self._kv[layer] if self.has_memory else (None, None)
        out, _, newest = joint_attention(q_local[0], k_local[0], v_local[0], q_global, *kv)
        if mass is not None:
            self._track(layer, newest, k_local.shape[2], mass)
        return out.transpose(0, 1).reshape(1, q.shape[2], -1)

    def _retrieve(self, layer: int, q_global: torch.Tensor) -> None:
        chosen = torch.zeros(0, dtype=torch.long)
        if self.pool:
            probe = probe_query(_heads_last(q_global), self.stats[layer], self.cfg.probe)
            if self.cfg.score == "max_token":
                scores = self._max_token_scores(layer, probe)
            else:
                scores = block_scores(probe, self.reprs[layer], self.groups, self.cfg.score)
            self._entropies[layer] = normalised_entropy(scores, self.cfg.entropy_temperature)
            chosen = top_blocks(scores, self._shares[layer], self.cfg.span, self._follows)
        self.selected[layer] = chosen
        ks, vs = [], []
        first = self.states[0]
        if self.init_tokens:
            ks.append(first.k[layer].read(0, self.init_tokens))
            vs.append(first.v[layer].read(0, self.init_tokens))
        for d, j in (self.pool[int(p)] for p in chosen):
            st, B = self.states[d], self.cfg.block_size
            end = min((j + 1) * B, st.length)
            ks.append(st.k[layer].read(j * B, end))
            vs.append(st.v[layer].read(j * B, end))
        keys = [k.to(self.device, self.dtype) for k in ks]
        if self.cfg.memory_positions == "block":  # order inside each block: key t at position t
            keys = [apply_rope(k, self._cos_b[: k.shape[1]], self._sin_b[: k.shape[1]]) for k in keys]
        self._kv[layer] = (torch.cat(keys, 1), torch.cat([v.to(self.device, self.dtype) for v in vs], 1))
        B = self.cfg.block_size
        src = [self._source_ids(0, torch.arange(self.init_tokens))]
        for d, j in (self.pool[int(p)] for p in chosen):
            src.append(self._source_ids(d, torch.arange(j * B, min((j + 1) * B, self.states[d].length))))
        self._src[layer] = torch.cat(src)

    def _max_token_scores(self, layer: int, probe: torch.Tensor) -> torch.Tensor:
        """`max_token` scores of the pool, in pool order (each document's pool blocks are consecutive)."""
        B, parts = self.cfg.block_size, []
        for d, (lo, hi) in enumerate(self._pool_ranges):
            if hi > lo:
                st = self.states[d]
                keys = st.k[layer].read(lo * B, min(hi * B, st.length)).to(self.device)
                parts.append(max_token_scores(probe, keys, B))
        return torch.cat(parts)

    def _source_ids(self, d: int, tokens: torch.Tensor) -> torch.Tensor:
        """Flat (document, block) ids of stream tokens of document d; -1 for its template header."""
        ids = d * self._max_blocks + tokens // self.cfg.block_size
        return torch.where(tokens >= self.states[d].doc_offset, ids, torch.full_like(ids, -1))

    def _track(self, layer: int, newest: torch.Tensor, n_local: int, mass: torch.Tensor) -> None:
        """Adds the newest query's attention (one layer's share) to its (document, block) sources."""
        s_g = 0 if self._kv[layer] is None else self._kv[layer][0].shape[1]
        window = min(n_local, self._local_src.numel())
        src = torch.cat([self._src[layer] if s_g else self._local_src[:0], self._local_src[:window]])
        share = torch.cat([newest[:s_g], newest[s_g:s_g + window]]).float().to(mass.device) / len(self.reprs)
        keep = src >= 0
        mass.index_add_(0, src[keep].to(mass.device), share[keep])

    def attribution(self, mass: torch.Tensor, top: int = 16) -> list[Attribution]:
        """A generation's attention mass per (document, block) on document tokens, largest first."""
        total = float(mass.sum())
        if total <= 0:
            return []
        out = []
        for flat in mass.argsort(descending=True)[:top].tolist():
            m = float(mass[flat])
            if m <= 0:
                break
            d, j = divmod(flat, self._max_blocks)
            st, B = self.states[d], self.cfg.block_size
            start, end = max(j * B, st.doc_offset), min((j + 1) * B, st.length)
            out.append(Attribution(d, j, start - st.doc_offset, end - st.doc_offset, m / total))
        return out


class ActQKVRunner:
    """The base model read through a `BlockMemory`: the callable `generate_tokens` steps."""

    def __init__(self, base: Transformer) -> None:
        self.base = base

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, input_pos: torch.Tensor, memory: BlockMemory, cache,
                 last_only: bool = False, attention_mass: torch.Tensor | None = None) -> torch.Tensor:
        refresh = memory.begin_step(ids.shape[1])
        x = self.base.embed_tokens(ids)
        for i, layer in enumerate(self.base.layers):
            attend = functools.partial(memory.attend, i, input_pos, cache[i], refresh, attention_mass)
            x = layer(x, None, None, None, attend=attend)
        memory.end_step(refresh)
        return self.base.output_logits(x[:, -1:] if last_only else x)
