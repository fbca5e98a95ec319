"""ActQKV's knobs and its retrieval arithmetic: probe-query, block scores, per-layer budgets.

Notation: L layers, nh query heads, nkv key/value heads (GQA group g = nh / nkv), hd head dim,
C = nh * hd (a query's channels, heads concatenated), T queries of one step, N memory blocks.

The method (ActQKV, built on InfLLM's block memory; read from MrXiaoaa/ActQKV and thunlp/InfLLM):
- a step's queries are weighted by their *activation bias* against running per-layer statistics of
  the document's queries, `mean_c (q_c - mu_c)^2 / (var_c + eps)`, and summed into one probe;
- blocks are scored by cosine(representative, probe) per layer;
- each layer's share of the block budget follows the normalised entropy of its block scores
  (flat scores = the information is spread = more blocks), clamped to [min_blocks, max_blocks].
The released code keeps the statistics as module globals shared by every layer and never reset;
here they belong to one layer of one document (`RunningStats`, persisted with the document).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ConfigError, KnobSet

ACTQKV_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ActQKVConfig(KnobSet):
    """Every ActQKV knob; saved with a document's state and part of its fingerprint."""

    knob_name = "actqkv"  # not a field: no annotation

    block_size: int = 64  # tokens per memory block (ActQKV's Qwen2.5 config: 64; InfLLM: 128)
    n_init: int = 64  # start tokens every query attends (attention sinks: chat header, system prompt)
    n_local: int = 1024  # local window (ordinary RoPE); ActQKV uses 512 at a 32K window
    exec_block: int = 512  # document tokens per streamed forward (ActQKV 256, InfLLM 512)
    budget: int = 24  # retrieved blocks per layer on average; the layers' total is budget * L
    min_blocks: int = 8  # per-layer clamps of the entropy-driven shares
    max_blocks: int = 48
    # positions of memory keys: "block" keeps the order inside each block (key t of a block at distance
    # n_local - t from the query), "none" reads every memory key at distance n_local (InfLLM). The same
    # answers on the dev needles (docs/design.md), so the default stays InfLLM's
    memory_positions: str = "none"
    span: int = 1  # blocks read per retrieved block: it and the span - 1 after it (a fact cut by a boundary;
    # span 2 gave 3/6 dev needles, as span 1)
    repr_topk: int = 4  # a block's representative: mean key of its most-attended tokens (per KV head)
    # decoded tokens between re-retrievals; 0: the prompt's selection serves the whole answer (measured
    # best: a single decoded token is a poor probe, docs/benchmarks.md "actqkv-dev")
    retrieval_interval: int = 0
    entropy_temperature: float = 0.5  # softmax temperature of the standardised scores for the entropy
    # the query that retrieves, at question time and while encoding: "activation" (ActQKV's weighting of
    # the step's queries), "mean" (InfLLM), "last" (the newest query: at question time the position that
    # produces the answer's first token). Measured on needles (docs/benchmarks.md, "actqkv-dev"): "last"
    # for questions; an execution block of 512 queries keeps ActQKV's weighting
    probe: str = "last"
    encode_probe: str = "activation"
    # block score: "cosine" / "dot" of the probe with the block's representative (ActQKV / InfLLM), or
    # "max_token": the block's best token, by the probe's attention logit averaged over heads (reads
    # every stored key of the pool per retrieval; no representative involved). Measured best: max_token.
    # "max_token_head": the same with the logit maximised over heads instead of averaged (measured on the
    # needle grid, docs/benchmarks.md "actqkv-head": 16K 1/3, 32K 0/3 against max_token's 1/3, 1/3)
    score: str = "max_token"
    state_dtype: str = "bfloat16"  # persisted K/V: bfloat16, float16, float32, or int8 (a scale per block)
    # question time, beyond ActQKV: this many pool blocks whose text best matches the question's words
    # (BM25 over two-block windows, chosen by the engine, which holds the text) are read by every layer
    # before the attention-scored ones (within its share); 0: ActQKV's retrieval alone. Measured
    # (docs/benchmarks.md, "actqkv-lexical-dev", "quality-lexical4-nettle"): needles at 8K-32K 5/15 (0),
    # 11/15 (2), 12/15 (4), 11/15 (8); a 92.6K-token manual's 16 questions 3/16 (0), 13/16 (4 and 8)
    lexical_blocks: int = 4
    # question time: how the question reads the retrieved memory. "state": as the document was encoded
    # (`memory_positions`); "sequence": the init tokens and retrieved blocks in document order at
    # consecutive positions ending just beyond the local window, as if the question followed an
    # excerpt of the document (each token keeps its neighbours' order, e.g. a noun before its number).
    # Measured on 15 needle questions at 8K-32K (docs/benchmarks.md, "actqkv-layout-dev"): 12/15 either way
    read_layout: str = "state"

    def __post_init__(self) -> None:
        positive = ("block_size", "n_init", "n_local", "exec_block", "budget", "min_blocks", "max_blocks",
                    "repr_topk", "span")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"actqkv {name} must be >= 1, got {getattr(self, name)}")
        if self.lexical_blocks < 0:
            raise ConfigError(f"actqkv lexical_blocks must be >= 0, got {self.lexical_blocks}")
        if self.retrieval_interval < 0:
            raise ConfigError(f"actqkv retrieval_interval must be >= 0, got {self.retrieval_interval}")
        if self.n_init % self.block_size:
            raise ConfigError(f"actqkv n_init={self.n_init} must be a multiple of block_size={self.block_size}")
        if self.n_local < self.block_size:
            raise ConfigError(f"actqkv n_local={self.n_local} is shorter than a block ({self.block_size})")
        if not self.min_blocks <= self.budget <= self.max_blocks:
            raise ConfigError(f"actqkv needs min_blocks <= budget <= max_blocks, got {self.min_blocks}, "
                              f"{self.budget}, {self.max_blocks}")
        if self.repr_topk > self.block_size:
            raise ConfigError(f"actqkv repr_topk={self.repr_topk} exceeds block_size={self.block_size}")
        if self.read_layout not in ("state", "sequence"):
            raise ConfigError(f"actqkv read_layout {self.read_layout!r}: use state or sequence")
        if self.memory_positions not in ("block", "none"):
            raise ConfigError(f"actqkv memory_positions {self.memory_positions!r}: use block or none")
        if self.score not in ("cosine", "dot", "max_token", "max_token_head"):
            raise ConfigError(f"actqkv score {self.score!r}: use cosine, dot, max_token or max_token_head")
        for name in ("probe", "encode_probe"):
            if getattr(self, name) not in ("activation", "mean", "last"):
                raise ConfigError(f"actqkv {name} {getattr(self, name)!r}: use activation, mean or last")
        if self.entropy_temperature <= 0:
            raise ConfigError("actqkv entropy_temperature must be > 0")
        if self.state_dtype not in ("bfloat16", "float16", "float32", "int8"):
            raise ConfigError(f"actqkv state_dtype {self.state_dtype!r}: use bfloat16, float16, float32 or int8")

    def check_window(self, max_position: int) -> None:
        """The local window, an execution block and an answer must fit the model's positions."""
        if self.n_local + self.block_size + self.exec_block + 1024 > max_position:
            raise ConfigError(f"actqkv n_local={self.n_local} + exec_block={self.exec_block} leaves too few of "
                              f"the model's {max_position} positions for the question and the answer")

    @property
    def float_dtype(self) -> torch.dtype:
        """The floating-point type of stored representatives (bfloat16 beside int8 K/V)."""
        return torch.bfloat16 if self.state_dtype == "int8" else getattr(torch, self.state_dtype)

    def encoding_fields(self) -> dict:
        """What the persisted state depends on: the document is itself streamed with retrieval, so
        every knob but the question-time ones (probe, decoding interval, lexical blocks, read layout) shapes the stored K/V."""
        out = self.to_dict()
        out.pop("retrieval_interval")
        out.pop("probe")
        out.pop("lexical_blocks")
        out.pop("read_layout")
        return out

    def fingerprint(self, checkpoint_hash: str, prompt_layout: str) -> str:
        ident = {"format": ACTQKV_FORMAT_VERSION, "checkpoint": checkpoint_hash, "layout": prompt_layout,
                 **self.encoding_fields()}
        return "actqkv-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


class RunningStats:
    """Per-channel mean and variance of one layer's queries over a document (Chan's parallel update)."""

    def __init__(self, channels: int, count: float = 0.0, mean: torch.Tensor | None = None,
                 m2: torch.Tensor | None = None) -> None:
        self.count = float(count)
        self.mean = torch.zeros(channels) if mean is None else mean.float().clone()
        self.m2 = torch.zeros(channels) if m2 is None else m2.float().clone()

    def update(self, x: torch.Tensor) -> None:
        """x (T, C)."""
        x = x.float().cpu()
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1.0)

    @staticmethod
    def pooled(parts: list[RunningStats]) -> RunningStats:
        """The statistics of several documents' queries together."""
        out = RunningStats(parts[0].mean.numel())
        for p in parts:
            if p.count == 0:
                continue
            total = out.count + p.count
            delta = p.mean - out.mean
            out.mean = out.mean + delta * (p.count / total)
            out.m2 = out.m2 + p.m2 + delta**2 * (out.count * p.count / total)
            out.count = total
        return out


def probe_query(q: torch.Tensor, stats: RunningStats, kind: str = "activation") -> torch.Tensor:
    """q (T, C) -> (C,): the queries weighted by their activation bias against `stats`.

    bias_t = mean_c (q_tc - mu_c)^2 / (var_c + eps), eps = mean(var) / 100 (as the authors' code);
    weights = bias / sum(bias). With no statistics yet (or `kind="mean"`), the plain mean; `kind="last"`:
    the newest query alone."""
    q = q.float()
    if kind == "last":
        return q[-1]
    if kind == "mean" or stats.count < 2 or q.shape[0] == 1:
        return q.mean(0)
    mean, var = stats.mean.to(q.device), stats.var.to(q.device)
    bias = ((q - mean) ** 2 / (var + var.mean() / 100)).mean(-1)  # (T,)
    weights = bias / bias.sum().clamp_min(1e-12)
    return (weights[:, None] * q).sum(0)


def block_scores(probe: torch.Tensor, reprs: torch.Tensor, groups: int, kind: str = "cosine") -> torch.Tensor:
    """probe (C,), reprs (N, nkv, hd) -> scores (N,), the KV heads' representatives repeated over their
    query heads (GQA) so they line up with the probe's channels. "cosine": of the concatenations;
    "dot": the attention logit q.k / sqrt(hd) averaged over heads (a key component every block shares,
    e.g. Qwen2's k_proj bias, shifts all scores alike instead of rescaling them)."""
    expanded = reprs.float().repeat_interleave(groups, dim=1)  # (N, nh, hd)
    probe = probe.float().to(expanded.device)
    if kind == "dot":
        nh, hd = expanded.shape[1], expanded.shape[2]
        return expanded.flatten(1) @ probe / (nh * hd**0.5)
    return F.normalize(expanded.flatten(1), dim=-1) @ F.normalize(probe, dim=0)


def max_token_scores(probe: torch.Tensor, keys: torch.Tensor, block_size: int, per_head: bool = False) -> torch.Tensor:
    """probe (C,) = (nh * hd,), keys (nkv, n * B', hd) of consecutive blocks -> (ceil(n B' / B),): per
    block, the largest attention logit q.k / sqrt(hd) of any of its tokens, averaged over heads (or,
    `per_head`, the largest over heads: one head that finds the token is enough)."""
    nkv, length, hd = keys.shape
    q = probe.float().view(nkv, -1, hd).to(keys.device)  # (nkv, g, hd)
    if per_head:
        logits = (q @ keys.float().transpose(1, 2)).amax(dim=(0, 1)) / hd**0.5  # (S,)
    else:  # the mean over a group's heads of q.k is its mean query's dot product: one (S, hd) product per KV head
        q_mean = q.mean(1)  # (nkv, hd)
        logits = sum(keys[h].float() @ q_mean[h] for h in range(nkv)) / (nkv * hd**0.5)
    n = -(-length // block_size)
    padded = logits.new_full((n * block_size,), float("-inf"))
    padded[:length] = logits
    return padded.view(n, block_size).amax(-1)


def normalised_entropy(scores: torch.Tensor, temperature: float) -> float:
    """Entropy of softmax(z / T) over the blocks, z the standardised scores, divided by its maximum
    log(N): in [0, 1] whatever the scores' scale (cosines, logits)."""
    n = scores.numel()
    if n < 2:
        return 1.0
    z = scores.float()
    z = (z - z.mean()) / z.std().clamp_min(1e-6)
    p = torch.softmax(z / temperature, dim=0)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return float(h / math.log(n))


def allocate_budget(weights: list[float], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, each within [lo_i, hi_i].

    Shares sum to `total` whenever sum(lo) <= total <= sum(hi) (else to the nearer bound). Water
    filling: layers whose proportional share breaks a clamp are fixed at it and the rest is shared
    again; the fractions are rounded by largest remainder within the bounds."""
    n = len(weights)
    lo = [min(a, b) for a, b in zip(lo, hi, strict=True)]
    if total >= sum(hi):
        return list(hi)
    if total <= sum(lo):
        return list(lo)
    w = [max(float(x), 1e-6) for x in weights]
    share = [0.0] * n
    free = set(range(n))
    remaining = float(total)
    while free:
        norm = sum(w[i] for i in free)
        trial = {i: remaining * w[i] / norm for i in free}
        broken = {i for i, s in trial.items() if s < lo[i] or s > hi[i]}
        if not broken:
            for i, s in trial.items():
                share[i] = s
            break
        for i in broken:
            share[i] = float(lo[i] if trial[i] < lo[i] else hi[i])
            remaining -= share[i]
            free.discard(i)
    out = [int(math.floor(s)) for s in share]
    order = sorted(range(n), key=lambda i: share[i] - out[i], reverse=True)
    missing = total - sum(out)
    for i in order * 2:
        if missing <= 0:
            break
        if out[i] < hi[i]:
            out[i] += 1
            missing -= 1
    return out


def top_blocks(scores: torch.Tensor, k: int, span: int = 1, follows: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of k blocks in document order (the gathered K/V keep the text's order): the best ones,
    each with the `span - 1` blocks after it (`follows[i]`: block i + 1 continues block i's text)
    while they fit k, then the next best."""
    n = scores.numel()
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if span == 1:
        return scores.topk(k).indices.sort().values.cpu()
    chosen: list[int] = []
    seen: set[int] = set()
    for i in scores.argsort(descending=True).tolist():
        run = [i]
        while len(run) < span and run[-1] + 1 < n and (follows is None or bool(follows[run[-1]])):
            run.append(run[-1] + 1)
        for j in run:
            if j not in seen and len(chosen) < k:
                seen.add(j)
                chosen.append(j)
        if len(chosen) >= k:
            break
    return torch.tensor(sorted(chosen), dtype=torch.long)
