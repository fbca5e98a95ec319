"""Citations: which parts of the document the answer drew on.

While an answer is generated, the last injected layer's cross-attention weights of each generated
position are summed per memory position into the generation's own `attention_mass` (computed for
the newest query row only, so it costs one extra (nh, P) product per token). Each memory position knows its document, chunk
and document-token range, so the app can map the mass to pages and passages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.memory import Memory


@dataclass
class Attribution:
    doc_index: int
    chunk_index: int
    token_start: int
    token_end: int
    mass: float



def attribute(memory: Memory, mass: torch.Tensor, top: int = 16) -> list[Attribution]:
    """The largest shares of `mass` (P,), the cross-attention one generation paid to each position
    of `memory`, with each position's document, chunk and token range."""
    if hasattr(memory, "attribution"):  # a memory that maps its own positions (ActQKV's BlockMemory)
        return memory.attribution(mass, top)
    total = float(mass.sum())
    if total <= 0:
        return []
    order = mass.argsort(descending=True)[:top]
    return [
        Attribution(int(memory.doc_index[p]), int(memory.chunk_index[p]), int(memory.spans[p, 0]),
                    int(memory.spans[p, 1]), float(mass[p]) / total)
        for p in order.tolist()
    ]
