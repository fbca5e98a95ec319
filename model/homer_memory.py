"""Decoding over HOMER's merged cache, with the attention mass that becomes citations.

The merged cache is an ordinary KV cache (`HomerPrefix.prefix`); what HOMER adds at decoding time
is where each cached position came from. `HomerMemory` keeps that map and, in every layer, adds the
newest query's attention on the cached positions to the generation's own `attention_mass` (one
(nh, S) product per layer and step); `attribution` folds it into 64-token spans of the documents
(pages and passages in the app). `HomerRunner` is the callable `generate_tokens` steps.
"""

from __future__ import annotations

import functools

import torch

from model.attribution import Attribution
from model.rope import apply_rope

SPAN_TOKENS = 64  # document tokens per cited span


class HomerMemory:
    def __init__(self, base, doc: torch.Tensor, tok: torch.Tensor, doc_offsets: list[int]) -> None:
        self.base = base
        self.doc, self.tok = doc.long().cpu(), tok.long().cpu()
        offsets = torch.tensor(doc_offsets, dtype=torch.long)
        inside = self.doc >= 0
        doc_tok = torch.where(inside, self.tok - offsets[self.doc.clamp(min=0)], torch.full_like(self.tok, -1))
        self.doc_tok = torch.where(doc_tok >= 0, doc_tok, torch.full_like(doc_tok, -1))  # header lines: -1

    @property
    def n_positions(self) -> int:
        return int(self.doc.numel())

    def runner(self) -> HomerRunner:
        return HomerRunner(self.base)

    def attend(self, layer: int, input_pos: torch.Tensor, cache, mass: torch.Tensor | None, q, k, v) -> torch.Tensor:
        base = self.base
        cos, sin = base.rope(input_pos, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(input_pos, k, v)
        out = base.attn_fn(q, keys, values, causal=True)
        if mass is not None:
            nh, hd = q.shape[1], q.shape[3]
            nkv = keys.shape[1]
            logits = (q[0, :, -1].float().reshape(nkv, nh // nkv, hd) @ keys[0].float().transpose(1, 2)) * hd**-0.5
            newest = logits.softmax(-1).sum((0, 1))[: self.n_positions] / (nh * len(base.layers))
            mass.add_(newest.to(mass.device))
        return out.transpose(1, 2).reshape(1, q.shape[2], -1)

    def attribution(self, mass: torch.Tensor, top: int = 16) -> list[Attribution]:
        """The generation's attention mass per 64-token document span, largest first (shares of the
        mass on document tokens)."""
        keep = self.doc_tok >= 0
        if not bool(keep.any()):
            return []
        spans = self.doc[keep] * (1 << 40) + self.doc_tok[keep] // SPAN_TOKENS
        ids, where = torch.unique(spans, return_inverse=True)
        per_span = torch.zeros(ids.numel()).index_add_(0, where, mass[keep].float().cpu())
        total = float(per_span.sum())
        if total <= 0:
            return []
        out = []
        for i in per_span.argsort(descending=True)[:top].tolist():
            if per_span[i] <= 0:
                break
            d, span = divmod(int(ids[i]), 1 << 40)
            out.append(Attribution(d, span, span * SPAN_TOKENS, (span + 1) * SPAN_TOKENS, float(per_span[i]) / total))
        return out


class HomerRunner:
    """The base model reading a merged cache through `HomerMemory` (same calls as `Transformer`)."""

    def __init__(self, base) -> None:
        self.base = base

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, input_pos: torch.Tensor, memory: HomerMemory, cache,
                 last_only: bool = False, attention_mass: torch.Tensor | None = None) -> torch.Tensor:
        x = self.base.embed_tokens(ids)
        for i, layer in enumerate(self.base.layers):
            attend = functools.partial(memory.attend, i, input_pos, cache[i], attention_mass)
            x = layer(x, None, None, None, attend=attend)
        return self.base.output_logits(x[:, -1:] if last_only else x)
