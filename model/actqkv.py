"""ActQKV: a training-free engine that reads a whole document from persisted block K/V.

This module is question time: the memory one generation reads (`BlockMemory`), the runner that
steps the model through it (`ActQKVRunner`), and the window geometry encoding shares with it
(`local_start`, the fixed angle `n_local`, a query's channels). Encoding, once per document:
`model.actqkv_encode`; the persisted state: `model.block_state`; knobs and retrieval arithmetic:
`model.block_retrieval`.

Notation: L layers, nh / nkv query / KV heads (g = nh / nkv), hd head dim, T queries of a step,
S keys, B block size, W local window.

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

import torch

from model.attribution import Attribution
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
from model.generate import PrefixState
from model.rope import apply_rope


def local_start(length: int, cfg: ActQKVConfig) -> int:
    """First token of the local window for queries starting at `length`: a block boundary at least
    `n_local` tokens back; 0 (everything local, no memory) while that would not pass `n_init`."""
    start = (length - cfg.n_local) // cfg.block_size * cfg.block_size
    return 0 if start <= cfg.n_init else start


def fixed_angle(base: Transformer, position: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) of the one angle `position`: how queries read memory keys (at `n_local`)."""
    return base.rope(torch.tensor([position], device=device), dtype)


def heads_last(q: torch.Tensor) -> torch.Tensor:
    """(nh, T, hd) -> (T, nh * hd): a query's channels, heads concatenated."""
    return q.transpose(0, 1).reshape(q.shape[1], -1)


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


# stored keys scored per piece: a piece's float copy stays in the CPU's cache (at 128K tokens the
# whole pool's copy per layer was 2/3 of the scoring time)
SCORE_TOKENS = 8192


class BlockMemory:
    """The question-time memory of one generation over one or more documents' states.

    Owned by one generation (built per turn): its retrieval selections change as it answers, so it is
    never shared between concurrent requests; the attention mass for citations is the generation's
    own `attention_mass` (as for SharedLLM's `Memory`)."""

    def __init__(self, base: Transformer, states: list[BlockState],
                 pinned: list[tuple[int, int]] | None = None) -> None:
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
        self.cos_n, self.sin_n = fixed_angle(base, cfg.n_local, self.dtype, self.device)
        self._cos_b, self._sin_b = base.rope(torch.arange(max(cfg.block_size, cfg.n_init), device=self.device), self.dtype)
        self.selected: list[torch.Tensor | None] = [None] * c.n_layer
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * c.n_layer
        self._entropies: list[float | None] = [None] * c.n_layer
        self._shares: list[int] = []
        self._decoded = 0
        self._max_blocks = max(st.n_blocks for st in states)
        self._src: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * c.n_layer
        self._local_src = self._source_ids(len(states) - 1, torch.arange(self.w0, last.length))
        # (document, block) pairs every layer reads first, best first (the engine's lexical matches);
        # those outside the pool (init blocks, the local window) are read anyway
        where = {entry: p for p, entry in enumerate(self.pool)}
        self.pinned = torch.tensor([where[b] for b in dict.fromkeys(pinned or []) if b in where], dtype=torch.long)

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
            probe = probe_query(heads_last(q_global), self.stats[layer], self.cfg.probe)
            if self.cfg.score.startswith("max_token"):
                scores = self._max_token_scores(layer, probe)
            else:
                scores = block_scores(probe, self.reprs[layer], self.groups, self.cfg.score)
            self._entropies[layer] = normalised_entropy(scores, self.cfg.entropy_temperature)
            if self.pinned.numel():  # ranked above every scored block, in their given order
                scores = scores.clone()
                top = scores.max() + 1
                scores[self.pinned.to(scores.device)] = top + torch.arange(self.pinned.numel(), 0, -1,
                                                                           device=scores.device, dtype=scores.dtype)
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
        if self.cfg.read_layout == "sequence":  # key i of m at i - m: distance n_local + m - i from the query
            cat = torch.cat(keys, 1)
            cos, sin = self.base.rope(torch.arange(-cat.shape[1], 0, device=self.device), self.dtype)
            keys = [apply_rope(cat, cos, sin)]
        elif self.cfg.memory_positions == "block":  # order inside each block: key t at position t
            keys = [apply_rope(k, self._cos_b[: k.shape[1]], self._sin_b[: k.shape[1]]) for k in keys]
        self._kv[layer] = (torch.cat(keys, 1), torch.cat([v.to(self.device, self.dtype) for v in vs], 1))
        B = self.cfg.block_size
        src = [self._source_ids(0, torch.arange(self.init_tokens))]
        for d, j in (self.pool[int(p)] for p in chosen):
            src.append(self._source_ids(d, torch.arange(j * B, min((j + 1) * B, self.states[d].length))))
        self._src[layer] = torch.cat(src)

    def _max_token_scores(self, layer: int, probe: torch.Tensor) -> torch.Tensor:
        """`max_token(_head)` scores of the pool, in pool order (each document's pool blocks are consecutive)."""
        B, parts = self.cfg.block_size, []
        step = B * max(1, SCORE_TOKENS // B)
        for d, (lo, hi) in enumerate(self._pool_ranges):
            st = self.states[d]
            for start in range(lo * B, min(hi * B, st.length), step):
                keys = st.k[layer].read(start, min(start + step, hi * B, st.length)).to(self.device)
                parts.append(max_token_scores(probe, keys, B, per_head=self.cfg.score == "max_token_head"))
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
