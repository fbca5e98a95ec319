"""The cross-attention memory of one turn: the gathered, rotated K/V of the selected tree nodes.

Layout (P = memory positions, in chunk order; within a chunk, in document order):
    keys, values  (M, 1, nkv, P, hd)  compute dtype; keys rotated to their chunk's position
    mask          (1, 1, 1, P) bool or None (None when every slot is filled)
    doc_index, chunk_index  (P,) int64  which document / chunk each position belongs to
    spans         (P, 2) int64          [start, end) document token offsets the position summarises
    mass          (P,) float32          cross-attention mass accumulated while generating (citations)
Lifecycle: built once per turn by `build_memory`, read by every decoding step, discarded after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import SharedLLMConfig
from model.rope import apply_rope, rope_angles
from model.search import preselect_chunks, select_nodes
from model.tree import ContextTree


@dataclass
class Memory:
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    n_chunks: int
    doc_index: torch.Tensor
    chunk_index: torch.Tensor
    spans: torch.Tensor
    mass: torch.Tensor = field(default=None)  # type: ignore[assignment]
    tracking: bool = False

    def __post_init__(self) -> None:
        if self.mass is None:
            self.mass = torch.zeros(self.keys.shape[3], dtype=torch.float32)

    @property
    def n_positions(self) -> int:
        return self.keys.shape[3]

    def reset_mass(self) -> None:
        self.mass.zero_()


def gather_tree(tree: ContextTree, preserved: list[torch.Tensor], chunks: torch.Tensor):
    """Gathers the preserved nodes of `chunks`: keys/values (C', M, nkv, Q, hd), positions (C', Q),
    spans (C', Q, 2), with Q = slots per chunk, ordered by document position inside each chunk."""
    ks, vs, ps, ss = [], [], [], []
    for level, nodes in zip(tree.levels, preserved):
        c = chunks[:, None].expand_as(nodes)  # (C', k)
        k = level.keys[c, nodes]  # (C', k, M, nkv, S, hd)
        v = level.values[c, nodes]
        ks.append(k.permute(0, 2, 3, 1, 4, 5).flatten(3, 4))  # (C', M, nkv, k*S, hd)
        vs.append(v.permute(0, 2, 3, 1, 4, 5).flatten(3, 4))
        ps.append(level.positions[c, nodes].flatten(1))  # (C', k*S)
        ss.append(level.spans[c, nodes].flatten(1, 2))  # (C', k*S, 2)
    keys, values = torch.cat(ks, dim=3), torch.cat(vs, dim=3)
    positions, spans = torch.cat(ps, dim=1), torch.cat(ss, dim=1)
    # document order inside each chunk (empty slots, start 0 / position -1, are moved last)
    order_key = torch.where(positions >= 0, spans[..., 0].long(), torch.iinfo(torch.int32).max)
    order = order_key.argsort(dim=1, stable=True)  # (C', Q)
    idx = order[:, None, None, :, None].expand_as(keys)
    keys, values = keys.gather(3, idx), values.gather(3, idx)
    positions = positions.gather(1, order)
    spans = spans.gather(1, order[..., None].expand_as(spans))
    return keys, values, positions, spans


@torch.no_grad()
def build_memory(trees: list[ContextTree], query: torch.Tensor | None, cfg: SharedLLMConfig,
                 inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 top_k_chunks: int | None = None) -> Memory:
    """Search every tree with `query` (None: language-modelling policy), gather and rotate."""
    if not trees:
        raise ValueError("build_memory needs at least one context tree")
    if top_k_chunks is not None and query is not None:
        chunk_sets = preselect_chunks(trees, query, top_k_chunks)
    else:
        chunk_sets = [torch.arange(t.n_chunks) for t in trees]
    parts, metas, chunk_pos = [], [], 0
    for d, (tree, chunks) in enumerate(zip(trees, chunk_sets)):
        if len(chunks) == 0:
            continue
        keys, values, positions, spans = gather_tree(tree, select_nodes(tree, query, chunks), chunks)
        n, q = keys.shape[0], keys.shape[3]
        global_chunk = (torch.arange(n) + chunk_pos)[:, None].expand(n, q)  # (C', Q)
        parts.append((keys, values))
        metas.append((positions, spans, global_chunk, chunks[:, None].expand(n, q), torch.full((n, q), d)))
        chunk_pos += n
    keys = torch.cat([k for k, _ in parts]).permute(1, 2, 0, 3, 4)  # (M, nkv, C, Q, hd)
    values = torch.cat([v for _, v in parts]).permute(1, 2, 0, 3, 4)
    positions, spans, gchunk, lchunk, docs = (torch.cat([m[i] for m in metas]).flatten(0, 1) for i in range(5))
    spans = spans.reshape(-1, 2)
    keys = keys.flatten(2, 3).to(device=device, dtype=dtype)  # (M, nkv, P, hd)
    values = values.flatten(2, 3).to(device=device, dtype=dtype)
    angle = gchunk.clone()
    if cfg.key_rotation == "node_and_chunk":
        angle = angle + positions.clamp(min=0)
    cos, sin = rope_angles(inv_freq, angle.to(device), dtype)  # (P, hd)
    keys = apply_rope(keys, cos, sin)
    valid = positions >= 0
    mask = None if bool(valid.all()) else valid.to(device)[None, None, None, :]
    return Memory(
        keys=keys[:, None], values=values[:, None], mask=mask, n_chunks=chunk_pos,
        doc_index=docs.long(), chunk_index=lchunk.long(), spans=spans.long(),
    )
