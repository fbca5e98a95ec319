"""`decode`: the KV-cache layout and the decode attention, before and after, in one run.

Until 2026-12-01 the cache grew by `torch.cat` per token and layer (contiguous tensors, because CPU
SDPA had been ~7x slower on prefix views of a preallocated buffer) and one-token attention went
through SDPA. Now the cache is preallocated and written in place, and one-token attention on CPU
batches each KV head's query heads in one matmul. This benchmark prefills one long prompt, copies
its K/V into each variant's cache and times the same greedy decoding steps with each:

- `torch.cat cache + SDPA` (before): a re-creation of the old cache class, below;
- `preallocated + SDPA`: the new cache, decode attention forced through SDPA;
- `preallocated + grouped decode` (now, the product's path).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from bench.report import Table, ratio
from bench.run import Run

log = logging.getLogger(__name__)

VARIANTS = ("torch.cat cache + SDPA (before)", "preallocated + SDPA", "preallocated + grouped decode (now)")


class GrowingKVCache:
    """The old cache: contiguous k/v re-allocated by torch.cat on every update (O(S) per step)."""

    static = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k.clone(), v.clone()

    def update(self, input_pos, k, v):
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


def _sdpa_only(q, k, v, causal: bool = False, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _decode(base, cache, first_token: torch.Tensor, position: int, steps: int) -> tuple[float, list[int]]:
    from model.generate import decode_one_token

    token, pos, out = first_token.view(1, 1), torch.tensor([position]), []
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = decode_one_token(base, token, pos, None, cache)
        token = logits.argmax().view(1, 1)
        out.append(int(token))
        pos = pos + 1
    return steps / (time.perf_counter() - t0), out


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory with all torch threads (best of a few `sum`s of a
    tensor far larger than the caches): the hardware's bound for batch-1 decoding."""
    t = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best


def bytes_per_token(base, n_tokens: int) -> int:
    """What one decoding step must read: every weight except the embedding table (one row of it is
    read; with tied embeddings it is read whole as the output matrix) plus the KV cache."""
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    if base.lm_head is not None:
        weights -= base.embed_tokens.weight.numel() * base.embed_tokens.weight.element_size()
    c = base.config
    kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * n_tokens * base.embed_tokens.weight.element_size()
    return weights + kv


@torch.no_grad()
def measure(lm, n_tokens: int, steps: int) -> dict:
    from model.generate import prefill

    base = lm.model.base
    ids = torch.randint(100, base.config.vocab_size - 100, (1, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    ref = base.new_cache(1, n_tokens + steps + 1)
    t0 = time.perf_counter()
    logits = prefill(base, ids, None, ref)
    prefill_s = time.perf_counter() - t0
    first = logits.argmax()
    row = {"tokens": n_tokens, "prefill_s": prefill_s, "steps": steps, "variants": {},
           "bytes_per_token": bytes_per_token(base, n_tokens)}
    def fresh(name: str) -> list:
        """The variant's cache holding the prefilled prompt's K/V."""
        if name.startswith("torch.cat"):
            return [GrowingKVCache(*layer.prefix()) for layer in ref]
        cache = base.new_cache(1, n_tokens + steps + 1)
        for layer, src in zip(cache, ref, strict=True):
            layer.load_prefix(*src.prefix())
        return cache

    fn = base.attn_fn
    for name in VARIANTS:
        base.attn_fn = _sdpa_only if "SDPA" in name else fn
        try:
            _decode(base, fresh(name), first, n_tokens, 2)  # warm-up (allocations); not timed
            tok_s, tokens = _decode(base, fresh(name), first, n_tokens, steps)
        finally:
            base.attn_fn = fn
        row["variants"][name] = {"tokens_per_s": tok_s, "tokens": tokens}
        log.info("decode at %d tokens, %s: %.2f tok/s", n_tokens, name, tok_s)
    toks = [v["tokens"] for v in row["variants"].values()]
    row["same_tokens"] = all(t == toks[0] for t in toks)
    return row


def run_decode(run: Run, lengths: list[int], steps: int = 32):
    started = time.perf_counter()
    section = run.section("decode", "Decoding: KV-cache layout and one-token attention, before and after")
    rows = []
    bandwidth = read_bandwidth()
    for n in lengths:
        rows.append(measure(run.lm, n, steps))
        rows[-1]["bound_tokens_per_s"] = bandwidth / rows[-1]["bytes_per_token"]
        section.raw = {"rows": rows, "read_bandwidth_gb_s": bandwidth / 1e9}
    before, now = VARIANTS[0], VARIANTS[-1]
    section.tables.append(Table(
        ["context tokens", *VARIANTS, "now / before", "memory bound tok/s", "now / bound", "same greedy tokens"],
        [[r["tokens"], *(r["variants"][v]["tokens_per_s"] for v in VARIANTS),
          ratio(r["variants"][now]["tokens_per_s"], r["variants"][before]["tokens_per_s"]),
          r["bound_tokens_per_s"], ratio(r["variants"][now]["tokens_per_s"], r["bound_tokens_per_s"]),
          r["same_tokens"]]
         for r in rows],
        title=f"decode tokens/s after a prompt of that many tokens ({steps} greedy steps, batch 1, {run.lm.name})"))
    section.notes.append("The prompt is prefilled once per length; its K/V are copied into each variant's cache, "
                         "so every variant decodes the same steps from the same state.")
    section.notes.append(f"memory bound: this machine reads {bandwidth / 1e9:.1f} GB/s (best `sum` of a 1 GiB tensor "
                         "with all threads); a batch-1 step must read every weight but the embedding table plus "
                         "the KV cache, so bound = bandwidth / those bytes.")
    return run.write(section, started)
