"""The cross-attention memory of one turn: the gathered, rotated K/V of the selected tree nodes.

Layout (P = memory positions, in chunk order; within a chunk, in document order):
    keys, values  (M, 1, nkv, P, hd)  compute dtype; keys rotated to their chunk's position
    mask          (1, 1, 1, P) bool or None (None when every slot is filled)
    doc_index, chunk_index  (P,) int64  which document / chunk each position belongs to
    spans         (P, 2) int64          [start, end) document token offsets the position summarises
Lifecycle: built once per turn by `build_memory`, read (never written) by every decoding step,
discarded after. The cross-attention mass that cites pages belongs to each generation, not to the
memory (`generate_tokens(attention_mass=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import SharedLLMConfig
from model.rope import apply_rope_, rope_angles
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

    @property
    def n_positions(self) -> int:
        return self.keys.shape[3]


def slot_order(tree: ContextTree, preserved: list[torch.Tensor], chunks: torch.Tensor):
    """Where each gathered slot goes, from the small index tensors only (no K/V is touched).

    Slots of the preserved nodes are listed level by level (level 1's node, level 2's, ...); inside
    each chunk they are put in document order (empty slots, position -1, last). Returns
    positions (C', Q), spans (C', Q, 2) in that order and `dest` (C', Q): the in-chunk output
    index of the j-th listed slot."""
    ps, ss = [], []
    for level, nodes in zip(tree.levels, preserved):
        c = chunks[:, None].expand_as(nodes)  # (C', k)
        ps.append(level.positions[c, nodes].flatten(1))  # (C', k*S)
        ss.append(level.spans[c, nodes].flatten(1, 2))  # (C', k*S, 2)
    positions, spans = torch.cat(ps, dim=1), torch.cat(ss, dim=1)
    order_key = torch.where(positions >= 0, spans[..., 0].long(), torch.iinfo(torch.int32).max)
    order = order_key.argsort(dim=1, stable=True)  # (C', Q): listed slot at each output index
    dest = order.argsort(dim=1)  # inverse permutation: output index of each listed slot
    return positions.gather(1, order), spans.gather(1, order[..., None].expand_as(spans)), dest


def gather_into(out: torch.Tensor, source: str, tree: ContextTree, preserved: list[torch.Tensor],
                chunks: torch.Tensor, dest: torch.Tensor, first_slot: int) -> None:
    """Copies the preserved nodes' `source` ("keys"/"values") of `chunks` into out (M, nkv, P, hd)
    at `first_slot + row * Q + dest`: one gather and one index_copy per level, no reordering pass."""
    q = dest.shape[1]
    base = first_slot + torch.arange(len(chunks))[:, None] * q  # (C', 1)
    column = 0
    for level, nodes in zip(tree.levels, preserved):
        c = chunks[:, None].expand_as(nodes)  # (C', k)
        stored = getattr(level, source).permute(2, 3, 0, 1, 4, 5)  # view (M, nkv, C, N, S, hd)
        part = stored[:, :, c, nodes]  # (M, nkv, C', k, S, hd): one copy
        width = part.shape[3] * part.shape[4]
        index = (base + dest[:, column:column + width]).flatten()
        out.index_copy_(2, index.to(out.device), part.flatten(2, 4).to(out.device))
        column += width


@torch.no_grad()
def build_memory(trees: list[ContextTree], query: torch.Tensor | None, cfg: SharedLLMConfig,
                 inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 top_k_chunks: int | None = None) -> Memory:
    """Search every tree with `query` (None: language-modelling policy), gather and rotate.

    The selection and the in-chunk order are computed on small index tensors first; the K/V are
    then copied once per level straight to their final slots (in the tree dtype, where the tree's K/V
    live: host memory, or the GPU for a tree moved there with `kv_to`), moved to the device and
    cast once, and rotated by their chunk's position."""
    if not trees:
        raise ValueError("build_memory needs at least one context tree")
    if top_k_chunks is not None and query is not None:
        chunk_sets = [c.long() for c in preselect_chunks(trees, query, top_k_chunks)]
    else:
        chunk_sets = [torch.arange(t.n_chunks) for t in trees]
    plans, metas, chunk_pos = [], [], 0
    for d, (tree, chunks) in enumerate(zip(trees, chunk_sets)):
        if len(chunks) == 0:
            continue
        preserved = select_nodes(tree, query, chunks)
        positions, spans, dest = slot_order(tree, preserved, chunks)
        n, q = positions.shape
        plans.append((tree, preserved, chunks, dest))
        metas.append((positions, spans, (torch.arange(n) + chunk_pos)[:, None].expand(n, q),
                      chunks[:, None].expand(n, q), torch.full((n, q), d)))
        chunk_pos += n
    positions, spans, gchunk, lchunk, docs = (torch.cat([m[i] for m in metas]).flatten(0, 1) for i in range(5))
    spans = spans.reshape(-1, 2)
    ref = trees[0].levels[0].keys
    m, nkv, hd = ref.shape[2], ref.shape[3], ref.shape[5]
    gathered = []
    for source in ("keys", "values"):
        out = torch.empty(m, nkv, positions.numel(), hd, dtype=ref.dtype, device=ref.device)  # the tree's device
        first = 0
        for tree, preserved, chunks, dest in plans:
            gather_into(out, source, tree, preserved, chunks, dest, first)
            first += dest.numel()
        gathered.append(out.to(device=device, dtype=dtype))  # (M, nkv, P, hd)
    keys, values = gathered
    angle = gchunk.clone()
    if cfg.key_rotation == "node_and_chunk":
        angle = angle + positions.clamp(min=0)
    cos, sin = rope_angles(inv_freq, angle.to(device), dtype)  # (P, hd)
    keys = apply_rope_(keys, cos, sin)  # `keys` is this function's own buffer
    valid = positions >= 0
    mask = None if bool(valid.all()) else valid.to(device)[None, None, None, :]
    return Memory(
        keys=keys[:, None], values=values[:, None], mask=mask, n_chunks=chunk_pos,
        doc_index=docs.long(), chunk_index=lchunk.long(), spans=spans.long(),
    )
