"""A tiny stand-in for model.LoadedModel (byte tokenizer, deterministic 'tree') for fast tests.

It follows docs/contracts.md: `.tokenizer` (HF call signature + decode), `.fingerprint`,
`.config.chunk_len`, `.encode_tree(ids, progress)` returning an object with `to_tensors()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class ByteTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, **_: object) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class FakeConfig:
    chunk_len: int = 64


@dataclass
class FakeTree:
    chunk_means: torch.Tensor  # (n_chunks, 4) float32
    n_tokens: int

    @property
    def n_chunks(self) -> int:
        return self.chunk_means.shape[0]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"fake.chunk_means": self.chunk_means.contiguous(),
                "fake.meta": torch.tensor([self.n_tokens], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> FakeTree:
        return cls(tensors["fake.chunk_means"], int(tensors["fake.meta"][0]))


class FakeModel:
    def __init__(self, chunk_len: int = 64, fingerprint: str = "fake-v1", delay_per_chunk: float = 0.0) -> None:
        self.tokenizer = ByteTokenizer()
        self.config = FakeConfig(chunk_len)
        self.fingerprint = fingerprint
        self.name = "fake"
        self.weights_trained, self.weights_warning = True, None
        self.delay_per_chunk = delay_per_chunk
        self.encode_calls = 0

    def encode_tree(self, token_ids, progress=None) -> FakeTree:
        self.encode_calls += 1
        ids = torch.tensor(list(token_ids), dtype=torch.float32)
        n_chunks = (len(ids) + self.config.chunk_len - 1) // self.config.chunk_len
        rows = []
        for i in range(n_chunks):
            part = ids[i * self.config.chunk_len : (i + 1) * self.config.chunk_len]
            rows.append(torch.stack([part.mean(), part.min(), part.max(), torch.tensor(float(len(part)))]))
            if self.delay_per_chunk:
                time.sleep(self.delay_per_chunk)
            if progress:
                progress(i + 1, n_chunks)
        return FakeTree(torch.stack(rows), len(ids))
