"""Citations: which parts of the document the answer drew on.

While an answer is generated, the last injected layer's cross-attention weights of each generated
position are summed per memory position (`Memory.mass`, computed for the newest query row only,
so it costs one extra (nh, P) product per token). Each memory position knows its document, chunk
and document-token range, so the app can map the mass to pages and passages.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.memory import Memory


@dataclass
class Attribution:
    doc_index: int
    chunk_index: int
    token_start: int
    token_end: int
    mass: float



def attribute(memory: Memory, top: int = 16) -> list[Attribution]:
    """Cross-attention mass per memory position, merged per (document, chunk, token range). A memory
    that keeps its own account (ActQKV's `BlockMemory`) reports it itself."""
    if hasattr(memory, "attribution"):
        return memory.attribution(top)
    mass = memory.mass
    total = float(mass.sum())
    if total <= 0:
        return []
    order = mass.argsort(descending=True)[:top]
    return [
        Attribution(int(memory.doc_index[p]), int(memory.chunk_index[p]), int(memory.spans[p, 0]),
                    int(memory.spans[p, 1]), float(mass[p]) / total)
        for p in order.tolist()
    ]
