"""Context trees: chunking, node splitting, lower-model encoding and the persisted tensor layout.

A document of n tokens is cut into C = ceil(n / L) chunks; chunk c covers tokens
[c*L, min((c+1)*L, n)) (the last one may be short). Each chunk is the root of a binary tree of
height h. Level l (1..h) has 2^l nodes, left to right; node j's children are 2j and 2j+1 of level
l+1. A node of length l splits into l//2 - e and the rest (e = 0 at inference, e ~ N(0,
(sigma*l)^2) in training). Every node is encoded *on its own* by the lower model (the first M
layers of the base model, positions from 0), and keeps S_l = L/2^l * keep_rate_l of its positions
(uniformly: the last token of each of S_l equal segments, since causal states summarise what came
before them).

Stored layout of level l (C chunks, N = 2^l nodes, S = S_l slots, M layers):
    keys, values  (C, N, M, nkv, S, hd)  tree dtype, keys *before* RoPE
    positions     (C, N, S)   int32      position of the kept token inside its node, -1 = empty slot
    spans         (C, N, S, 2) int32     [start, end) document token offsets the slot summarises
    vectors       (C, N, D)   float32    retrieval vector (hidden state after layer 1)
A short last chunk fills fewer slots (round(len * keep_rate), at least 1); the rest are empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import SharedLLMConfig
from model.decoder import Transformer

Progress = Callable[[int, int], None]


@dataclass
class TreeLevel:
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    spans: torch.Tensor
    vectors: torch.Tensor

    FIELDS = ("keys", "values", "positions", "spans", "vectors")


@dataclass
class ContextTree:
    """All nodes of levels 1..h of every chunk of one document, as stored by the tensor store."""

    levels: list[TreeLevel]
    n_tokens: int
    chunk_len: int

    @property
    def n_chunks(self) -> int:
        return self.levels[0].vectors.shape[0]

    @property
    def height(self) -> int:
        return len(self.levels)

    @property
    def n_layers(self) -> int:
        return self.levels[0].keys.shape[2]

    def nbytes(self) -> int:
        return sum(getattr(lv, f).nbytes for lv in self.levels for f in TreeLevel.FIELDS)

    def kv_to(self, device: torch.device | str) -> ContextTree:
        """The same tree with its keys/values on `device` (a GPU-resident tree for hot documents: the
        query then gathers on the GPU instead of copying the memory over PCIe). Positions, spans and
        vectors stay where they are: the search reads them as small host tensors."""
        levels = [TreeLevel(keys=lv.keys.to(device), values=lv.values.to(device), positions=lv.positions,
                            spans=lv.spans, vectors=lv.vectors) for lv in self.levels]
        return ContextTree(levels=levels, n_tokens=self.n_tokens, chunk_len=self.chunk_len)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous, safetensors-ready dict (exact round trip with `from_tensors`)."""
        out = {"tree.meta": torch.tensor([self.n_tokens, self.chunk_len, self.height], dtype=torch.int64)}
        for index, level in enumerate(self.levels, start=1):
            for name in TreeLevel.FIELDS:
                out[f"level{index}.{name}"] = getattr(level, name).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors) -> ContextTree:
        try:
            n_tokens, chunk_len, height = (int(x) for x in tensors["tree.meta"].tolist())
            levels = [
                TreeLevel(**{name: tensors[f"level{i}.{name}"] for name in TreeLevel.FIELDS})
                for i in range(1, height + 1)
            ]
        except KeyError as exc:
            raise ValueError(f"not a context tree: missing tensor {exc}") from exc
        return cls(levels=levels, n_tokens=n_tokens, chunk_len=chunk_len)


# --- node geometry -------------------------------------------------------------------------------
def split_lengths(length: int, height: int, noise: float = 0.0,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Node lengths per level (levels 1..h), left to right; sums to `length` at every level."""
    levels, parents = [], [length]
    for _ in range(height):
        children = []
        for n in parents:
            e = 0
            if noise > 0 and n >= 4:
                e = round(float(torch.randn((), generator=generator)) * noise * n)
            left = min(max(n // 2 - e, 1 if n >= 2 else 0), max(n - 1, 0))
            children += [left, n - left]
        levels.append(children)
        parents = children
    return levels


def keep_indices(length: int, slots: int, rate: float) -> list[int]:
    """Kept positions of a node: the last token of each of k equal segments, k = round(len*rate)."""
    if length <= 0:
        return []
    k = min(max(round(length * rate), 1), slots, length)
    return [math.ceil((j + 1) * length / k) - 1 for j in range(k)]


# --- lower model ---------------------------------------------------------------------------------
def lower_forward(base: Transformer, input_ids: torch.Tensor, n_layers: int):
    """Runs the first `n_layers` layers on nodes encoded on their own (positions from 0).

    input_ids (B, T) right-padded -> keys/values (B, M, nkv, T, hd) before RoPE, and the hidden
    state after layer 1 (B, T, D). The last layer only needs its keys/values, so it stops there.
    """
    t = input_ids.shape[1]
    x = base.embed_tokens(input_ids)  # (B, T, D)
    cos, sin = base.rope(torch.arange(t, device=input_ids.device), x.dtype)
    kv, hidden1 = [], None
    for i, layer in enumerate(base.layers[:n_layers]):
        if i == n_layers - 1 and i > 0:  # the last layer: its keys and values are all we keep
            _, k, v = layer.self_attn.project(layer.input_layernorm(x))
            kv.append((k, v))
            break
        x = layer(x, cos, sin, base.attn_fn, kv_out=kv)  # the decoder's own block, keeping its K/V
        if i == 0:
            hidden1 = x
    keys, values = zip(*kv, strict=True)
    return torch.stack(keys, 1), torch.stack(values, 1), hidden1


def node_vector(hidden1: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """Retrieval vector of one encoded sequence: hidden1 (T, D) -> (D,) float32."""
    if mode == "mean":
        return hidden1[:length].float().mean(0)
    return hidden1[length - 1].float()


# --- encoding ------------------------------------------------------------------------------------
@dataclass
class _Node:
    chunk: int
    index: int
    start: int  # document token offset
    length: int


def _level_nodes(n_tokens: int, cfg: SharedLLMConfig, generator: torch.Generator | None,
                 noise: float) -> list[list[_Node]]:
    per_level: list[list[_Node]] = [[] for _ in range(cfg.tree_height)]
    for c, chunk_start in enumerate(range(0, n_tokens, cfg.chunk_len)):
        length = min(cfg.chunk_len, n_tokens - chunk_start)
        for level, lengths in enumerate(split_lengths(length, cfg.tree_height, noise, generator)):
            offset = chunk_start
            for j, n in enumerate(lengths):
                per_level[level].append(_Node(c, j, offset, n))
                offset += n
    return per_level


@torch.no_grad()
def encode_tree(base: Transformer, token_ids, cfg: SharedLLMConfig, progress: Progress | None = None,
                noise: float = 0.0, generator: torch.Generator | None = None) -> ContextTree:
    """Encodes every node of levels 1..h of every chunk, a level at a time, in token-budget batches."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n_tokens = ids.numel()
    if n_tokens == 0:
        raise ValueError("cannot encode an empty document")
    device = base.embed_tokens.weight.device
    cfg_m = base.config
    n_chunks = math.ceil(n_tokens / cfg.chunk_len)
    tree_dtype = getattr(torch, cfg.tree_dtype)
    per_level = _level_nodes(n_tokens, cfg, generator, noise)
    total_work, done = sum(len(nodes) for nodes in per_level), 0
    levels = []
    for level, nodes in enumerate(per_level, start=1):
        slots, n_nodes = cfg.slots(level), 2**level
        kv_shape = (n_chunks, n_nodes, cfg.n_inject_layers, cfg_m.n_kv_head, slots, cfg_m.head_dim)
        lv = TreeLevel(
            keys=torch.zeros(kv_shape, dtype=tree_dtype),
            values=torch.zeros(kv_shape, dtype=tree_dtype),
            positions=torch.full((n_chunks, n_nodes, slots), -1, dtype=torch.int32),
            spans=torch.zeros((n_chunks, n_nodes, slots, 2), dtype=torch.int32),
            vectors=torch.zeros((n_chunks, n_nodes, cfg_m.dim), dtype=torch.float32),
        )
        live = [n for n in nodes if n.length > 0]
        max_len = max(n.length for n in live)
        per_batch = max(1, _batch_tokens(cfg, device) // max_len)
        for b0 in range(0, len(live), per_batch):
            batch = live[b0:b0 + per_batch]
            _encode_batch(base, ids, batch, lv, cfg, level, device)
            done += len(batch)
            if progress is not None:
                progress(done, total_work)
        done += len(nodes) - len(live)
        levels.append(lv)
    if progress is not None:
        progress(total_work, total_work)
    return ContextTree(levels=levels, n_tokens=n_tokens, chunk_len=cfg.chunk_len)


def _batch_tokens(cfg: SharedLLMConfig, device: torch.device) -> int:
    """Tokens per encoding batch. On a CPU one chunk's nodes per batch, so progress is reported per
    chunk: a 16K-token batch of Qwen2.5-0.5B took minutes on two loaded cores with no progress at all,
    and smaller batches cost nothing measurable there (3.3K tokens: 98-158 tokens/s with 16K-token
    batches, 121-145 with 512, 137-160 with 1024, interleaved runs at load 5). Accelerators keep
    `encode_batch_tokens`: they need large batches to be busy."""
    if device.type == "cpu":
        return min(cfg.encode_batch_tokens, cfg.chunk_len)
    return cfg.encode_batch_tokens


def _encode_batch(base: Transformer, ids: torch.Tensor, batch: list[_Node], lv: TreeLevel,
                  cfg: SharedLLMConfig, level: int, device: torch.device) -> None:
    """Encodes one batch of nodes; the kept positions are gathered on the device and moved to the
    host in one transfer per tensor (on a GPU, per-node copies would cost a sync each)."""
    width = max(n.length for n in batch)
    tokens = torch.zeros((len(batch), width), dtype=torch.long)
    for row, node in enumerate(batch):
        tokens[row, : node.length] = ids[node.start: node.start + node.length]
    autocast = cfg.encode_dtype != "float32" and base.embed_tokens.weight.dtype == torch.float32
    with torch.autocast(device.type, dtype=getattr(torch, cfg.encode_dtype), enabled=autocast):
        keys, values, hidden1 = lower_forward(base, tokens.to(device), cfg.n_inject_layers)
    rate, slots = cfg.keep_rates[level - 1], cfg.slots(level)
    kept = [keep_indices(node.length, slots, rate) for node in batch]
    index = torch.zeros((len(batch), slots), dtype=torch.long)
    for row, positions in enumerate(kept):
        index[row, : len(positions)] = torch.tensor(positions, dtype=torch.long)
    # keys/values (B, M, nkv, T, hd) -> (B, slots, M, nkv, hd): one indexing op, one copy each
    rows, index = torch.arange(len(batch), device=device)[:, None], index.to(device)
    kept_keys = keys[rows, :, :, index].to("cpu", lv.keys.dtype)
    kept_values = values[rows, :, :, index].to("cpu", lv.values.dtype)
    vectors = torch.stack([node_vector(hidden1[row], node.length, cfg.retrieval_vector)
                           for row, node in enumerate(batch)]).cpu()
    for row, (node, positions) in enumerate(zip(batch, kept)):
        k = len(positions)
        lv.keys[node.chunk, node.index, :, :, :k] = kept_keys[row, :k].permute(1, 2, 0, 3)
        lv.values[node.chunk, node.index, :, :, :k] = kept_values[row, :k].permute(1, 2, 0, 3)
        lv.positions[node.chunk, node.index, :k] = torch.tensor(positions, dtype=torch.int32)
        starts = [0] + [p + 1 for p in positions[:-1]]
        lv.spans[node.chunk, node.index, :k, 0] = torch.tensor(starts, dtype=torch.int32) + node.start
        lv.spans[node.chunk, node.index, :k, 1] = torch.tensor(positions, dtype=torch.int32) + node.start + 1
        lv.vectors[node.chunk, node.index] = vectors[row]
