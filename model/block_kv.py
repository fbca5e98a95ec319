"""One layer's persisted ActQKV keys or values: a float tensor, or int8 codes with a scale per block.

Layout (nkv, T, hd) along the document stream. `int8` stores `round(x / s)` with one scale
`s = absmax / 127` per (KV head, block of `block_size` tokens): half the bytes of bfloat16, and a
block's codes are read with the block's own scale, so an outlier in one block costs precision there
only. Reads always return floating point (`read`), so the engine never sees the codes.
"""

from __future__ import annotations

import torch

QUANTISED = "int8"


class StoredKV:
    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None = None, block_size: int = 0) -> None:
        self.data, self.scale, self.block_size = data, scale, block_size

    @classmethod
    def encode(cls, x: torch.Tensor, dtype: str, block_size: int) -> StoredKV:
        """x (nkv, T, hd) float -> stored as `dtype` ("bfloat16", "float16", "float32" or "int8")."""
        x = x.detach().to("cpu")
        if dtype != QUANTISED:
            return cls(x.to(getattr(torch, dtype)).contiguous())
        nkv, t, hd = x.shape
        n = -(-t // block_size)
        padded = torch.zeros(nkv, n * block_size, hd, dtype=torch.float32)
        padded[:, :t] = x.float()
        blocks = padded.view(nkv, n, block_size, hd)
        scale = (blocks.abs().amax(dim=(2, 3)) / 127).clamp_min(1e-12)  # (nkv, n)
        codes = torch.round(blocks / scale[:, :, None, None]).clamp(-127, 127).to(torch.int8)
        return cls(codes.view(nkv, n * block_size, hd)[:, :t].contiguous(), scale.to(torch.float16), block_size)

    @property
    def length(self) -> int:
        return int(self.data.shape[1])

    def read(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) as floating point (nkv, end - start, hd)."""
        part = self.data[:, start:end]
        if self.scale is None:
            return part
        blocks = torch.arange(start, end) // self.block_size
        return part.float() * self.scale[:, blocks].float()[:, :, None]

    def nbytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.data.numel() * self.data.element_size() + extra

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {name: self.data}
        if self.scale is not None:
            out[f"{name}.scale"] = self.scale
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, block_size: int) -> StoredKV:
        scale = tensors.get(f"{name}.scale")
        return cls(tensors[name], scale, block_size if scale is not None else 0)
