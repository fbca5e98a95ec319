"""HOMER's calibration: a per-layer, per-distance bias subtracted from the significance logits.

The final suffix token's attention logits carry a component that depends only on how far back a
token sits (RoPE's decay, attention sinks), not on what it says; without the correction the
reduction would keep tokens for their position. HOMER subtracts a per-layer bias by relative
distance but publishes biases only for Llama-2 and no script to make them. Ours, for any model:

1. the calibration text (`CALIBRATION_TEXT`, bundled prose: the same for every installation) is
   tokenized and cut into `calibration_windows` consecutive windows of `calibration_tokens`;
2. each window runs through the whole model; in every layer the last `calibration_queries` tokens'
   post-RoPE queries are scored against all earlier keys of the window (pre-softmax logits, scaled by
   1/sqrt(hd), maximised over query heads: the same statistic as the significance);
3. the bias of layer l at distance d is the mean of those logits over every (window, query) pair at
   distance d. Distances are measured only up to `calibration_tokens - calibration_queries`, where
   every query contributes; longer distances use the last measured value (`significance` clamps).

Deterministic for a model, its dtype and these knobs (`calibration_identity`); computed once per
model and stored (app/services/homer_states.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from model.homer import HomerConfig
from model.rope import apply_rope

CALIBRATION_TEXT = Path(__file__).with_name("data") / "homer_calibration.txt"
CALIBRATION_VERSION = 1


def calibration_identity(cfg: HomerConfig, checkpoint_hash: str, dtype: str) -> str:
    text = hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()[:16]
    ident = {"version": CALIBRATION_VERSION, "checkpoint": checkpoint_hash, "dtype": dtype, "text": text,
             "tokens": cfg.calibration_tokens, "windows": cfg.calibration_windows,
             "queries": cfg.calibration_queries}
    return "homer-bias-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def calibration_windows(token_ids: list[int], cfg: HomerConfig) -> list[list[int]]:
    n = cfg.calibration_tokens
    windows = [token_ids[i:i + n] for i in range(0, len(token_ids) - n + 1, n)][: cfg.calibration_windows]
    if not windows:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens, fewer than one window of {n}")
    return windows


@torch.no_grad()
def calibrate(base, windows: list[list[int]], n_queries: int) -> torch.Tensor:
    """(L, D) float32 biases, D = window length - n_queries + 1 distances (0 = the token itself)."""
    device = base.embed_tokens.weight.device
    n = min(len(w) for w in windows)
    span = n - n_queries + 1
    total = torch.zeros(base.config.n_layer, span, dtype=torch.float64)
    for window in windows:
        ids = torch.tensor([window[:n]], device=device)
        pos = torch.arange(n, device=device)
        cos, sin = base.rope(pos, base.embed_tokens.weight.dtype)
        x = base.embed_tokens(ids)
        for i, layer in enumerate(base.layers):
            def attend(q, k, v, i=i):
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                total[i] += _logits_by_distance(q[0, :, -n_queries:], k[0], span).double().cpu()
                out = base.attn_fn(q, k, v, causal=True)
                return out.transpose(1, 2).reshape(1, q.shape[2], -1)

            x = layer(x, None, None, None, attend=attend)
    return (total / (len(windows) * n_queries)).float()


def _logits_by_distance(q: torch.Tensor, k: torch.Tensor, span: int) -> torch.Tensor:
    """q (nh, Q, hd) the window's last Q queries, k (nkv, n, hd) -> (span,): per distance d < span,
    the sum over queries of the max-over-heads logit to the key d tokens back."""
    nh, n_q, hd = q.shape
    nkv, n, _ = k.shape
    logits = (q.float().reshape(nkv, nh // nkv * n_q, hd) @ k.float().transpose(1, 2)) * hd**-0.5
    best = logits.reshape(nkv, nh // nkv, n_q, n).amax(dim=(0, 1))  # (Q, n)
    out = torch.zeros(span, dtype=torch.float32, device=q.device)
    for j in range(n_q):
        p = n - n_q + j  # this query's position
        out += best[j, p - span + 1:p + 1].flip(0)  # distances 0..span-1
    return out
