"""One document's persisted ActQKV state: what encoding (`model.actqkv_encode`) produces once and
question time (`model.actqkv`) reads for every question.

Its own module because it is the stored format: saved as named tensors (`to_tensors`), loaded back
(`from_tensors`, e.g. memory-mapped by app/services/block_states.py) without the encoder or the
memory. Stored per layer: every token's pre-RoPE K and V (`model.block_kv.StoredKV`), the blocks'
representatives, the running statistics of the queries (for the probe); for the whole stream: its
token ids, the document's offset in it and the mean normalised entropy of the block scores per layer
(the first budget shares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.block_kv import StoredKV
from model.block_retrieval import ActQKVConfig, RunningStats


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
