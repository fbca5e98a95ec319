"""HOMER's persisted per-document leaves, and the per-question run that starts from them.

Causal attention makes a leaf's prefix and context states in the leaf layers independent of the
suffix that follows them: encoded once per document (`encode_document`), stored, and at question
time only the suffix runs the leaf layers, reading the stored K/V (`leaf_chunk`); the reductions and
merges above the leaves run per question (`model.homer.Merger`). What a document stores, per piece:
the post-RoPE K/V of its tokens in layers [0, leaf_end of its own tree) and its hidden state at the
top of the leaves for its own tree height and `extra_heights` taller ones (several documents asked
together make a taller tree whose leaves end lower; a height not stored is computed on the spot).
The prefix (chat header) is stored once per document: it is the same in every chunk.

`answer_prefix` is the whole question-time step: the documents' leaves (stored or computed), the
merge tree, and the result as the prompt cache generation continues from (`HomerPrefix`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.decoder import KVCache
from model.generate import PrefixState
from model.config import ConfigError
from model.homer import (
    LEXICAL_BLOCK,
    Chunk,
    HomerConfig,
    Merger,
    Schedule,
    keep_mask,
    pieces,
    protected_tokens,
    significance,
    tree_height,
)
from model.rope import apply_rope


@dataclass
class HomerState:
    """One document's stored leaves (the stream they were encoded from included)."""

    config: HomerConfig
    prefix_ids: list[int]
    token_ids: list[int]  # the context stream: "Document: name" line + the document's tokens
    doc_offset: int  # stream index of the document's first token
    piece: int  # nominal piece size (suffix positions start at prefix + piece)
    ranges: list[tuple[int, int]]  # the pieces' stream ranges
    prefix_k: list[torch.Tensor]  # per stored layer (nkv, P, hd), post-RoPE
    prefix_v: list[torch.Tensor]
    prefix_hidden: dict[int, torch.Tensor]  # leaf end -> (P, D)
    k: list[list[torch.Tensor]]  # per piece, per stored layer (nkv, n, hd)
    v: list[list[torch.Tensor]]
    hidden: list[dict[int, torch.Tensor]]  # per piece: leaf end -> (n, D)

    @property
    def height(self) -> int:
        return tree_height(len(self.ranges))

    @property
    def n_layers(self) -> int:
        return len(self.prefix_k)

    def nbytes(self) -> int:
        tensors = [*self.prefix_k, *self.prefix_v, *self.prefix_hidden.values()]
        for kk, vv, hh in zip(self.k, self.v, self.hidden, strict=True):
            tensors += [*kk, *vv, *hh.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prefix_ids": torch.tensor(self.prefix_ids, dtype=torch.int64),
               "token_ids": torch.tensor(self.token_ids, dtype=torch.int64),
               "meta": torch.tensor([self.doc_offset, self.piece], dtype=torch.int64),
               "ranges": torch.tensor(self.ranges, dtype=torch.int64).reshape(-1, 2)}
        for i, (k, v) in enumerate(zip(self.prefix_k, self.prefix_v, strict=True)):
            out[f"prefix.k.{i}"], out[f"prefix.v.{i}"] = k, v
        for end, h in self.prefix_hidden.items():
            out[f"prefix.hidden.{end}"] = h
        for j in range(len(self.ranges)):
            for i, (k, v) in enumerate(zip(self.k[j], self.v[j], strict=True)):
                out[f"piece.{j}.k.{i}"], out[f"piece.{j}.v.{i}"] = k, v
            for end, h in self.hidden[j].items():
                out[f"piece.{j}.hidden.{end}"] = h
        return {name: t.contiguous() for name, t in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: HomerConfig) -> HomerState:
        ranges = [tuple(r) for r in tensors["ranges"].tolist()]
        n_layers = sum(1 for name in tensors if name.startswith("prefix.k."))
        ends = sorted(int(name.rsplit(".", 1)[1]) for name in tensors if name.startswith("prefix.hidden."))
        doc_offset, piece = tensors["meta"].tolist()
        return cls(config, tensors["prefix_ids"].tolist(), tensors["token_ids"].tolist(), int(doc_offset),
                   int(piece), ranges,
                   [tensors[f"prefix.k.{i}"] for i in range(n_layers)],
                   [tensors[f"prefix.v.{i}"] for i in range(n_layers)],
                   {e: tensors[f"prefix.hidden.{e}"] for e in ends},
                   [[tensors[f"piece.{j}.k.{i}"] for i in range(n_layers)] for j in range(len(ranges))],
                   [[tensors[f"piece.{j}.v.{i}"] for i in range(n_layers)] for j in range(len(ranges))],
                   [{e: tensors[f"piece.{j}.hidden.{e}"] for e in ends} for j in range(len(ranges))])


def leaf_ends(cfg: HomerConfig, n_layer: int, height: int) -> list[int]:
    """The leaf ends a document of tree height `height` stores (its own and `extra_heights` taller)."""
    ends = set()
    for h in range(height, height + cfg.extra_heights + 1):
        try:
            ends.add(Schedule(n_layer, cfg.warmup_layers, h).leaf_end)
        except ConfigError:  # taller trees than the layers allow: nothing more to store
            break
    return sorted(ends)


def check_height(cfg: HomerConfig, n_layer: int, height: int, n_tokens: int) -> None:
    """A clear error when the input needs a taller tree than the model's layers can merge."""
    try:
        Schedule(n_layer, cfg.warmup_layers, height)
    except ConfigError:
        raise ConfigError(f"{n_tokens} tokens need {2**height} HOMER chunks of {cfg.chunk_tokens} tokens, more "
                          f"than {n_layer - cfg.warmup_layers} merging layers can merge: set a larger "
                          f"chunk_tokens or fewer warmup_layers (SHAREDLLM_HOMER)") from None


def max_piece(cfg: HomerConfig, prefix_len: int) -> int:
    return cfg.chunk_tokens - prefix_len - cfg.suffix_reserve


@torch.no_grad()
def encode_document(base, cfg: HomerConfig, prefix_ids: list[int], token_ids: list[int], doc_offset: int,
                    progress: Callable[[int, int], None] | None = None, ends: list[int] | None = None) -> HomerState:
    """The leaves of one document's context stream `token_ids` (cfg resolved for `base`). `ends`
    (default: the document's own heights) names the leaf ends whose hidden states are kept."""
    n_layer = base.config.n_layer
    ranges, piece = pieces(len(token_ids), max_piece(cfg, len(prefix_ids)))
    check_height(cfg, n_layer, tree_height(len(ranges)), len(token_ids))
    ends = ends or leaf_ends(cfg, n_layer, tree_height(len(ranges)))
    top = max(ends)
    device = base.embed_tokens.weight.device
    store = cfg.float_dtype
    p = len(prefix_ids)
    pre_hidden, pre_cache = _run_leaf_layers(base, torch.tensor([prefix_ids], device=device), 0, top, ends, None)
    pre_k = [c.prefix()[0][0] for c in pre_cache]
    pre_v = [c.prefix()[1][0] for c in pre_cache]
    ks, vs, hiddens = [], [], []
    for j, (s, e) in enumerate(ranges):
        ids = torch.tensor([token_ids[s:e]], device=device)
        hidden, cache = _run_leaf_layers(base, ids, p, top, ends, (pre_k, pre_v))
        ks.append([c.prefix()[0][0, :, p:].to("cpu", store) for c in cache])
        vs.append([c.prefix()[1][0, :, p:].to("cpu", store) for c in cache])
        hiddens.append({end: h.to("cpu", store) for end, h in hidden.items()})
        if progress is not None:
            progress(j + 1, len(ranges))
    return HomerState(cfg, list(prefix_ids), list(token_ids), doc_offset, piece, ranges,
                      [k.to("cpu", store) for k in pre_k], [v.to("cpu", store) for v in pre_v],
                      {end: h.to("cpu", store) for end, h in pre_hidden.items()}, ks, vs, hiddens)


def _run_leaf_layers(base, ids: torch.Tensor, start: int, top: int, ends: list[int], prefix):
    """ids (1, n) at positions start.. through layers [0, top) with an ordinary KV cache (after the
    prefix's K/V when given); returns the hidden states (n, D) at each of `ends` and the caches."""
    n = ids.shape[1]
    ref, c = base.embed_tokens.weight, base.config
    cache = [KVCache(1, start + n, c.n_kv_head, c.head_dim, ref.device, ref.dtype) for _ in range(top)]
    if prefix is not None:
        for c, k, v in zip(cache, prefix[0], prefix[1], strict=False):
            c.load_prefix(k[None], v[None])
    input_pos = torch.arange(start, start + n, device=ids.device)
    x = base.embed_tokens(ids)
    cos, sin = base.rope(input_pos, x.dtype)
    hidden = {}
    for i in range(top):
        x = base.layers[i](x, cos, sin, base.attn_fn, cache[i], input_pos)
        if i + 1 in ends:  # the top of all layers is never read (no merge above): kept as a 0-wide marker
            hidden[i + 1] = x[0] if i + 1 < len(base.layers) else x[0, :, :0]
    return hidden, cache


def leaf_chunk(base, state: HomerState, j: int, d: int, suffix_ids: list[int], leaf_end: int, target: int,
               bias: torch.Tensor | None, window: int = 0, n_queries: int = 1,
               protected: dict[int, torch.Tensor] | None = None) -> Chunk:
    """Piece j of document d as a reduced leaf: the suffix runs layers [0, leaf_end) reading the
    stored prefix and piece K/V; the reduction at the last leaf layer (when the chunk is longer than
    `target`) drops context tokens from every leaf layer (`protected` ones last)."""
    device, dtype = base.embed_tokens.weight.device, base.embed_tokens.weight.dtype
    p, s = len(state.prefix_ids), len(suffix_ids)
    start, end = state.ranges[j]
    n = end - start
    s_pos = torch.arange(p + state.piece, p + state.piece + s, device=device)
    cos, sin = base.rope(s_pos, dtype)
    pos = torch.cat([torch.arange(p + n, device=device), s_pos])
    reduce = p + n + s > target
    ks, vs, sig = [], [], []
    x = base.embed_tokens(torch.tensor([suffix_ids], device=device))
    for i in range(leaf_end):
        stored_k = torch.cat([state.prefix_k[i], state.k[j][i]], 1).to(device, dtype)
        stored_v = torch.cat([state.prefix_v[i], state.v[j][i]], 1).to(device, dtype)

        def attend(q, k, v, i=i, stored_k=stored_k, stored_v=stored_v):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = torch.cat([stored_k, k[0]], 1), torch.cat([stored_v, v[0]], 1)
            ks.append(keys)
            vs.append(values)
            if reduce and i == leaf_end - 1:
                sig.append(significance(q[0, :, -n_queries:], keys, pos, None if bias is None else bias[i]))
            out = base.attn_fn(q, keys[None], values[None], causal=True)
            return out.transpose(1, 2).reshape(1, q.shape[2], -1)

        x = base.layers[i](x, None, None, None, attend=attend)
    top = torch.cat([state.prefix_hidden[leaf_end], state.hidden[j][leaf_end]]).to(device, dtype)
    if top.shape[1] == 0:  # a single leaf: nothing runs above it, its top hidden state is never read
        top = x.new_zeros(p + n, x.shape[2])
    affix = torch.full((p,), -1, dtype=torch.long, device=device)
    tail = torch.full((s,), -1, dtype=torch.long, device=device)
    chunk = Chunk(torch.cat([top, x[0]]), pos, ks, vs,
                  torch.cat([affix, torch.full((n,), d, dtype=torch.long, device=device), tail]),
                  torch.cat([affix, torch.arange(start, end, device=device), tail]), p, s,
                  torch.cat([affix, torch.full((n,), (d << 20) + j, dtype=torch.long, device=device),
                             tail]))
    if sig:
        chunk.prune(keep_mask(sig[0], p, s, target, window, protected_tokens(chunk.doc, chunk.tok, protected)))
    return chunk


@dataclass
class HomerPrefix:
    """The merged KV cache of one question, less its final suffix token: generation prefills that
    token at its HOMER position and decodes from there. `doc` / `tok` say where each cached token
    came from (citations); `peak_tokens` is the most chunk tokens held at once during the merge."""

    prefix: PrefixState
    prompt_ids: list[int]
    doc: torch.Tensor
    tok: torch.Tensor
    input_tokens: int
    peak_tokens: int
    leaves_computed: int = 0  # leaves whose stored state did not serve this tree (computed on the spot)
    notes: dict = field(default_factory=dict)


@torch.no_grad()
def answer_prefix(base, cfg: HomerConfig, states: list[HomerState], suffix_ids: list[int],
                  bias: torch.Tensor | None, progress: Callable[[int, int], None] | None = None,
                  protected: list[tuple[int, int]] | None = None) -> HomerPrefix:
    """The question-time HOMER run over the documents' leaves (one tree over all their pieces);
    `progress(merges done, merges)` after each merge level; the tokens of the `protected` (document,
    block of `LEXICAL_BLOCK` tokens) pairs are dropped by no reduction while others remain."""
    if not states:
        raise ValueError("HOMER needs at least one document")
    prefix_ids = states[0].prefix_ids
    if any(st.prefix_ids != prefix_ids for st in states):
        raise ValueError("documents encoded with different prompt headers cannot be merged together")
    if not suffix_ids:
        raise ValueError("HOMER needs a suffix (the question)")
    p, s = len(prefix_ids), len(suffix_ids)
    refs = [(d, j) for d, st in enumerate(states) for j in range(len(st.ranges))]
    height = tree_height(len(refs))
    check_height(cfg, base.config.n_layer, height, sum(len(st.token_ids) for st in states))
    schedule = Schedule(base.config.n_layer, cfg.warmup_layers, height)
    fresh: dict[int, HomerState] = {}
    marks = block_marks(states, protected or [])

    def leaf(ref, leaf_end: int, target: int) -> Chunk:
        d, j = ref
        st = states[d]
        if leaf_end not in st.prefix_hidden:  # a tree taller than the stored heights: computed here
            if d not in fresh:
                fresh[d] = encode_document(base, cfg, prefix_ids, st.token_ids, st.doc_offset, ends=[leaf_end])
            st = fresh[d]
        return leaf_chunk(base, st, j, d, suffix_ids, leaf_end, target, bias, cfg.keep_window, n_queries, marks)

    lengths = {(d, j): p + (e - b) + s for d, st in enumerate(states) for j, (b, e) in enumerate(st.ranges)}
    total = p + sum(len(st.token_ids) for st in states) + s
    n_queries = s if cfg.significance_query == "suffix" else 1
    merger = Merger(base, schedule, bias, leaf, lengths, p, s, max_piece(cfg, p), cfg.keep_window, n_queries,
                    cfg.positions == "sequential", progress, marks, cfg.merge_attention)
    padded = refs + [None] * (2**height - len(refs))
    chunk = merger.run(padded, height, min(cfg.target_tokens, total))
    if len(chunk.k) != base.config.n_layer:
        raise RuntimeError(f"merge tree ran {len(chunk.k)} of {base.config.n_layer} layers")
    ids = _kept_ids(chunk, states, prefix_ids, suffix_ids)
    last = chunk.length - 1
    prefix = PrefixState([k[None, :, :last] for k in chunk.k], [v[None, :, :last] for v in chunk.v],
                         position=int(chunk.pos[last]))
    computed = sum(len(states[d].ranges) for d in fresh)
    return HomerPrefix(prefix, ids, chunk.doc[:last].cpu(), chunk.tok[:last].cpu(), total, merger.peak_tokens, computed)


def block_marks(states: list[HomerState], blocks: list[tuple[int, int]]) -> dict[int, torch.Tensor] | None:
    """Document index -> (stream length,) bool: True on the tokens of the (document, block) pairs."""
    if not blocks:
        return None
    out: dict[int, torch.Tensor] = {}
    for d, j in blocks:
        marks = out.setdefault(d, torch.zeros(len(states[d].token_ids), dtype=torch.bool))
        marks[j * LEXICAL_BLOCK:(j + 1) * LEXICAL_BLOCK] = True
    return out


def _kept_ids(chunk: Chunk, states: list[HomerState], prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """The token ids of the merged cache's positions (the prompt generation is given)."""
    p, s = chunk.prefix, chunk.suffix
    docs, toks = chunk.doc.tolist(), chunk.tok.tolist()
    body = [states[d].token_ids[t] for d, t in zip(docs[p:len(docs) - s], toks[p:len(toks) - s], strict=True)]
    return list(prefix_ids) + body + list(suffix_ids)
