"""Query-aware tree search (the policy pi) and optional top-k chunk pre-selection.

For each chunk, start at the root; at levels 1..h-1 compare the query vector with the two children
of the current node by cosine similarity, *select* the more similar child (descend into it) and
*preserve* the other (its stored KV at that level goes to the memory). At level h preserve both
children of the selected node. Without a query (language modelling) the right child is always
selected. Result per chunk: one node index per level 1..h-1 and two at level h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.tree import ContextTree


def cosine(query: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """query (D,), vectors (..., D) -> (...) cosine similarities in float32."""
    return F.cosine_similarity(vectors.float(), query.float().expand_as(vectors), dim=-1)


def select_nodes(tree: ContextTree, query: torch.Tensor | None,
                 chunks: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Preserved node indices per level for the chunks `chunks` (default: all, in order).

    Returns a list of h tensors; level l < h has shape (C', 1), level h has shape (C', 2).
    """
    chunks = torch.arange(tree.n_chunks) if chunks is None else chunks
    current = torch.zeros(len(chunks), dtype=torch.long)  # index of the selected node at the level above
    preserved = []
    for level in range(1, tree.height + 1):
        left, right = 2 * current, 2 * current + 1
        if level == tree.height:
            preserved.append(torch.stack([left, right], dim=1))
            break
        if query is None:
            go_right = torch.ones(len(chunks), dtype=torch.bool)
        else:
            vectors = tree.levels[level - 1].vectors[chunks]  # (C', N, D)
            sims = cosine(query, vectors)  # (C', N)
            rows = torch.arange(len(chunks))
            go_right = sims[rows, right] > sims[rows, left]
        selected = torch.where(go_right, right, left)
        preserved.append(torch.where(go_right, left, right)[:, None])
        current = selected
    return preserved


def preselect_chunks(trees: list[ContextTree], query: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """Keeps the top-k chunks over all documents by the best cosine of their level-1 vectors,
    returned per tree as sorted chunk indices (document and chunk order are kept)."""
    scores = [cosine(query, t.levels[0].vectors).max(dim=1).values for t in trees]  # (C_t,) each
    flat = torch.cat(scores)
    if top_k >= flat.numel():
        return [torch.arange(t.n_chunks) for t in trees]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(top_k).indices] = True
    out, offset = [], 0
    for t in trees:
        out.append(torch.nonzero(keep[offset: offset + t.n_chunks]).flatten())
        offset += t.n_chunks
    return out
