"""HOMER's merge-layer attention variants (`HomerConfig.merge_attention`), apart from the merge tree:
a merged chunk's pieces share positions (each from the prefix on), so plain causal attention lets a
later piece read earlier pieces' tokens at positions ahead of its own. These kernels restrict that;
each takes q (1, nh, T, hd), k/v (1, nkv, T, hd) post-RoPE and an attention backend
(`model.attention`), and returns (1, nh, T, hd)."""

from __future__ import annotations

import torch


def piece_attention(attn_fn, q, k, v, prefix: int, suffix: int, lengths: list[int]) -> torch.Tensor:
    """Attention of a merged chunk whose context tokens read only the prefix and their own piece
    (causal inside it), its prefix only itself, its suffix everything before it: q (1, nh, T, hd),
    k/v (1, nkv, T, hd) -> (1, nh, T, hd)."""
    outs = [attn_fn(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], causal=True)] if prefix else []
    start = prefix
    for n in lengths:
        keys = torch.cat([k[:, :, :prefix], k[:, :, start:start + n]], 2)
        values = torch.cat([v[:, :, :prefix], v[:, :, start:start + n]], 2)
        outs.append(attn_fn(q[:, :, start:start + n], keys, values, causal=True))
        start += n
    if suffix:
        outs.append(attn_fn(q[:, :, start:], k, v, causal=True))
    return torch.cat(outs, 2)


def position_attention(attn_fn, q, k, v, pos: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Attention where a token reads an earlier token of the chunk only when that token's position is
    not ahead of its own (pos (T,)): q (1, nh, T, hd), k/v (1, nkv, T, hd) -> (1, nh, T, hd). Queries
    go in blocks of `block` so the boolean mask is (block, T), never (T, T); with positions increasing
    in chunk order it is the causal mask."""
    t = q.shape[2]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        order = torch.arange(end, device=pos.device)[None, :] <= torch.arange(start, end, device=pos.device)[:, None]
        mask = order & (pos[None, :end] <= pos[start:end, None])
        outs.append(attn_fn(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask=mask[None, None]))
    return torch.cat(outs, 2)
