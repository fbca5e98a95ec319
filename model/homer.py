"""HOMER: training-free hierarchical context merging (Song et al., ICLR 2024; read from alinlab/HOMER).

Notation: L layers, W warm-up layers, h tree height, P / S prefix / suffix tokens, nh / nkv query /
KV heads (GQA group g = nh / nkv), hd head dim, T tokens of a chunk.

The input is prefix (chat header) + context (the documents) + suffix (earlier turns, the question,
the assistant header). The context is cut into 2^h pieces (`pieces`); each leaf chunk is
prefix + piece + suffix with positions from 0, so every chunk fits the model's window (HOMER: half of
it; `HomerConfig.chunk_tokens` says why ours defaults to the whole window less the answer's room). The
layers above the first W are split into h + 1 groups (`Schedule`): a leaf runs the warm-up layers and
the first group, each merge level one further group. At the last layer of each group the chunk is
reduced to its target length (`keep_mask`): a context token's significance is the final suffix
token's pre-softmax attention logit to it, maximised over the query heads (keys repeated per GQA
group: the released code breaks on GQA models), minus a per-layer, per-distance calibration bias
(`model.homer_calibration`); the least significant context tokens go, prefix and suffix never. Two
adjacent reduced chunks merge (`merge`): contexts concatenated, prefix and suffix states averaged.
Every drop removes the token from the K/V of all lower layers too (propagative refinement), so the
root leaves one ordinary KV cache of about the target length in every layer, read by decoding.

The tree is walked depth first (`Merger.run`): a left subtree is reduced to one chunk before the
right one starts, so at most one chunk per level is alive (memory logarithmic in the input).
Leaves come from `leaf` callbacks, so their suffix-independent part can be persisted per document
(`model.homer_state`) and only the suffix, the reductions and the merges run per question.

Exactness anchor: with one chunk and no reduction (prefix + context + suffix within the target)
HOMER is ordinary causal attention over the whole prompt, i.e. `full` (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ConfigError, KnobSet, ModelConfig
from model.homer_attention import piece_attention, position_attention
from model.rope import apply_rope

HOMER_FORMAT_VERSION = 1
MERGE_ATTENTION = ("causal", "piece", "position")  # `HomerConfig.merge_attention`'s values


@dataclass(frozen=True)
class HomerConfig(KnobSet):
    """Every HOMER knob; the per-document fields are saved with a document's state and fingerprinted."""

    knob_name = "homer"  # not a field: no annotation

    # a chunk's length (prefix + piece + suffix); 0: the model's window less room for the answer
    # (`answer_room`). HOMER's own setting is half the window ({"chunk_tokens": 16384} for Qwen2.5):
    # measured on the needle grid (docs/benchmarks.md, "homer" against "homer-window"), whole-window
    # chunks answered 2/3 at 16K and 32K against 1/3 (half as many leaves sharing positions), and a
    # document within the window is then one leaf, i.e. `full` (TTFT 1.9 s at 16K instead of 69 s)
    chunk_tokens: int = 0
    warmup_layers: int = -1  # layers without merging; -1: 3/8 of the layers (HOMER: 12 of Llama-2's 32)
    target_tokens: int = 0  # the final KV cache's length; 0: chunk_tokens (HOMER's setting)
    # question tokens (earlier turns, question, assistant header) the chunking leaves room for: the
    # pieces are cut before any question is known, so their leaf states can be persisted
    suffix_reserve: int = 256
    # a document's stored leaves serve trees up to this many levels taller than its own (several
    # documents asked together): the leaf's top hidden state is stored for each such height
    extra_heights: int = 2
    state_dtype: str = "bfloat16"  # persisted leaf K/V and hidden states: bfloat16, float16 or float32
    # a context token ranks by the best significance within this many tokens of it (0: its own, as
    # HOMER): keeps a salient token's neighbours, e.g. the other digits of a number. Measured on an 8K
    # needle document in 4 leaves (docs/benchmarks.md, "homer-dev"): 0 kept 5/7 and 2/7 of two needles'
    # digits (1/3 answered), 2 and 6 kept every digit (2/3)
    keep_window: int = 4
    # whose attention logits rank the context: "last" (the final suffix token, HOMER) or "suffix" (the
    # best over every suffix token: the question's own words, e.g. the noun asked about)
    significance_query: str = "last"
    # the positions of a merged chunk: "homer" (each piece keeps its own from 0, so two merged pieces'
    # tokens share positions, as HOMER does: a right piece's token then reads the left pieces' tokens
    # at positions ahead of its own) or "sequential" (beyond HOMER: renumbered 0..T-1 in reading order
    # at every merge, every lower layer's keys re-rotated to match: the merged cache reads like one
    # shorter document, its order intact, within the window since T <= the chunk length). Measured
    # (docs/benchmarks.md, "homer-single64-fix"): a lone needle at 64K, depth 90 % (the 4th of 4
    # leaves), 3/3 documents against 0/3, but at depth 10 % (the 1st leaf, now ~30K positions from the
    # answer instead of ~10K) 0/1 against 1/1; on the three-needle grid ("homer-seq") 32K 1/3 against
    # 2/3, 64K 1/3 against 1/3: neither setting reads every depth, HOMER's stays the default (the
    # negative distances are removed by `merge_attention` "position" instead)
    positions: str = "homer"
    # whom a merged chunk's context tokens attend to in the merge levels: "position" (beyond HOMER: an
    # earlier token of the chunk only when its position is not ahead of the reader's, so no relative
    # distance is negative; the first piece and the suffix read as in "causal"), "causal" (every
    # earlier token, as HOMER: a right piece's token then reads the left pieces' tokens at positions
    # ahead of its own, relative distances the model never saw) or "piece" (beyond HOMER: only the
    # prefix and its own piece, as in its leaf; the suffix reads every piece). Measured on the 64K
    # single-needle documents (docs/benchmarks.md, "homer-position"): depth 90 % 3/3 ("causal" 0/3,
    # "piece" 1/2), depth 10 % 1/1 (1/1); attention 1.2x causal's time (8K tokens, one thread)
    merge_attention: str = "position"
    # question time, beyond HOMER: the tokens of this many blocks of `LEXICAL_BLOCK` tokens whose words
    # best match the question (BM25 over two-block windows of each document, chosen by the engine, which
    # holds the text, as actqkv's lexical blocks) are dropped by no reduction while others remain.
    # Measured on an 8-leaf needle document (docs/benchmarks.md, "homer-lexical-dev"): every needle
    # sentence kept whole (15/32 tokens without), the same answers (1/3) -> off by default
    lexical_blocks: int = 0
    calibration_tokens: int = 4096  # calibration window: biases measured for distances up to it
    calibration_windows: int = 2
    calibration_queries: int = 64  # last tokens of each window whose logits are averaged per distance

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "target_tokens", "extra_heights", "keep_window", "lexical_blocks"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"homer {name} must be >= 0, got {getattr(self, name)}")
        for name in ("suffix_reserve", "calibration_tokens", "calibration_windows", "calibration_queries"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"homer {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_layers < -1:
            raise ConfigError(f"homer warmup_layers must be >= 0 (or -1: automatic), got {self.warmup_layers}")
        if self.calibration_queries >= self.calibration_tokens:
            raise ConfigError("homer calibration_queries must be fewer than calibration_tokens")
        if self.significance_query not in ("last", "suffix"):
            raise ConfigError(f"homer significance_query {self.significance_query!r}: use last or suffix")
        if self.positions not in ("homer", "sequential"):
            raise ConfigError(f"homer positions {self.positions!r}: use homer or sequential")
        if self.merge_attention not in MERGE_ATTENTION:
            raise ConfigError(f"homer merge_attention {self.merge_attention!r}: use {', '.join(MERGE_ATTENTION)}")
        if self.state_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"homer state_dtype {self.state_dtype!r}: use bfloat16, float16 or float32")

    def resolve(self, model: ModelConfig) -> HomerConfig:
        """The automatic values made concrete for `model`, checked against its layers and window."""
        chunk = self.chunk_tokens or model.max_position - answer_room(model.max_position)
        warmup = self.warmup_layers if self.warmup_layers >= 0 else round(model.n_layer * 3 / 8)
        out = dataclasses.replace(self, chunk_tokens=chunk, warmup_layers=warmup,
                                  target_tokens=self.target_tokens or chunk)
        if warmup >= model.n_layer:
            raise ConfigError(f"homer warmup_layers={warmup} leaves none of the model's {model.n_layer} layers to merge in")
        if chunk > model.max_position:
            raise ConfigError(f"homer chunk_tokens={chunk} exceeds the model's {model.max_position} positions")
        if chunk < self.suffix_reserve + 64:
            raise ConfigError(f"homer chunk_tokens={chunk} leaves no room for context beside the "
                              f"suffix_reserve of {self.suffix_reserve}")
        return out

    @property
    def float_dtype(self) -> torch.dtype:
        return getattr(torch, self.state_dtype)

    def state_fields(self) -> dict:
        """What a document's stored leaves depend on (not the question-time target or calibration)."""
        return {k: v for k, v in self.to_dict().items() if k in
                ("chunk_tokens", "warmup_layers", "suffix_reserve", "extra_heights", "state_dtype")}

    def fingerprint(self, checkpoint_hash: str, prompt_layout: str) -> str:
        ident = {"format": HOMER_FORMAT_VERSION, "checkpoint": checkpoint_hash, "layout": prompt_layout,
                 **self.state_fields()}
        return "homer-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


LEXICAL_BLOCK = 64  # tokens per block of `lexical_blocks` (actqkv's block size)


def answer_room(max_position: int) -> int:
    """Positions the default chunk leaves after the merged cache for the answer: 1,024 (the app's
    max_new_tokens limit) or a quarter of a small window."""
    return min(1024, max_position // 4)


@dataclass(frozen=True)
class Schedule:
    """Which layers a leaf and each merge level run (HOMER's `layers_per_chunk` / `layers_leftover`)."""

    n_layer: int
    warmup: int
    height: int

    def __post_init__(self) -> None:
        if self.per_group < 1:
            raise ConfigError(f"a merge tree of height {self.height} needs more than the model's "
                              f"{self.n_layer - self.warmup} layers above the warm-up: use longer chunks")

    @property
    def per_group(self) -> int:
        return (self.n_layer - self.warmup) // (self.height + 1)

    @property
    def leftover(self) -> int:
        return self.n_layer - self.warmup - self.per_group * (self.height + 1)

    @property
    def leaf_end(self) -> int:
        """Leaves run layers [0, leaf_end): the warm-up, the leftover and the first group."""
        return self.warmup + self.leftover + self.per_group

    def level_layers(self, level: int) -> range:
        start = self.warmup + self.leftover + self.per_group * level
        return range(start, start + self.per_group)


def tree_height(n_leaves: int) -> int:
    return max(0, math.ceil(math.log2(max(1, n_leaves))))


def pieces(n_tokens: int, max_piece: int) -> tuple[list[tuple[int, int]], int]:
    """HOMER's chunking of a context of `n_tokens`: ceil(n / max_piece) rounded up to a power of two,
    equal pieces of ceil(n / count) (empty trailing ones left out). Returns the ranges and the
    nominal piece size (the suffix sits right after it in every chunk)."""
    if max_piece < 1:
        raise ConfigError("homer chunks leave no room for context")
    count = 2 ** tree_height(math.ceil(max(1, n_tokens) / max_piece))
    size = max(1, math.ceil(n_tokens / count))
    return [(s, min(s + size, n_tokens)) for s in range(0, n_tokens, size)], size


@dataclass
class Chunk:
    """A chunk between layers: hidden states (T, D) at the next layer's input, post-RoPE K/V of every
    layer it has run (nkv, T, hd), positions (T,), and where each token came from: document index and
    context-stream token index (-1 for prefix and suffix tokens)."""

    hidden: torch.Tensor
    pos: torch.Tensor
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    doc: torch.Tensor
    tok: torch.Tensor
    prefix: int
    suffix: int
    piece: torch.Tensor | None = None  # (T,) which leaf a context token came from (-1: affixes)

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])

    def prune(self, keep: torch.Tensor) -> None:
        """Keeps the tokens where `keep` (T,) is True, in every layer's K/V too."""
        self.hidden = self.hidden[keep]
        self.pos, self.doc, self.tok = self.pos[keep], self.doc[keep], self.tok[keep]
        self.piece = None if self.piece is None else self.piece[keep]
        self.k = [k[:, keep] for k in self.k]
        self.v = [v[:, keep] for v in self.v]


def merge(left: Chunk, right: Chunk) -> Chunk:
    """Two adjacent chunks as one: prefix and suffix states averaged, contexts concatenated; the
    prefix positions are the left's, the suffix positions the right's (as HOMER's `Chunk.merge`)."""
    p, s = left.prefix, left.suffix
    if (right.prefix, right.suffix) != (p, s) or len(left.k) != len(right.k):
        raise ValueError("chunks with different affixes or layers cannot be merged")

    def join(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        n_a, n_b = a.shape[dim], b.shape[dim]
        return torch.cat([(a.narrow(dim, 0, p) + b.narrow(dim, 0, p)) / 2, a.narrow(dim, p, n_a - p - s),
                          b.narrow(dim, p, n_b - p - s), (a.narrow(dim, n_a - s, s) + b.narrow(dim, n_b - s, s)) / 2],
                         dim)

    def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a[:p], a[p:a.shape[0] - s], b[p:b.shape[0] - s], b[b.shape[0] - s:]])

    return Chunk(join(left.hidden, right.hidden, 0), concat(left.pos, right.pos),
                 [join(a, b, 1) for a, b in zip(left.k, right.k, strict=True)],
                 [join(a, b, 1) for a, b in zip(left.v, right.v, strict=True)],
                 concat(left.doc, right.doc), concat(left.tok, right.tok), p, s,
                 None if left.piece is None or right.piece is None else concat(left.piece, right.piece))


def renumber(base, chunk: Chunk) -> Chunk:
    """`chunk` at positions 0..T-1 in its order: every stored key is rotated by its token's change
    of position (RoPE is a rotation per frequency pair, so R(new - old) R(old) = R(new)); values and
    hidden states carry no position. Exact for a uniform shift (relative positions unchanged)."""
    new = torch.arange(chunk.length, device=chunk.pos.device)
    delta = new - chunk.pos
    if bool((delta == 0).all()):
        return chunk
    if chunk.k:
        cos, sin = base.rope(delta, chunk.k[0].dtype)
        chunk.k = [apply_rope(k, cos, sin) for k in chunk.k]
    chunk.pos = new
    return chunk


def significance(q_last: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """q_last (nh, hd) post-RoPE query of the final suffix token (or (nh, Q, hd): several suffix
    tokens' queries), keys (nkv, T, hd) post-RoPE -> (T,): the pre-softmax logit to each token, max
    over query heads (each KV head's keys serve its group of query heads) and queries, minus the
    calibration bias at the token's distance from the last position (bias (D,), clamped at D - 1)."""
    q = q_last[:, None] if q_last.dim() == 2 else q_last
    nh, n_q, hd = q.shape
    nkv = keys.shape[0]
    logits = (q.float().reshape(nkv, nh // nkv * n_q, hd) @ keys.float().transpose(1, 2)) * hd**-0.5
    sig = logits.amax(dim=(0, 1))  # (T,)
    if bias is not None and bias.numel():
        dist = (pos[-1] - pos).clamp(0, bias.numel() - 1)
        sig = sig - bias.to(sig.device)[dist.to(sig.device)]
    return sig


def keep_mask(sig: torch.Tensor, prefix: int, suffix: int, target: int, window: int = 0,
              protect: torch.Tensor | None = None) -> torch.Tensor:
    """(T,) True for the tokens kept when a chunk of T is reduced to `target` (or to its affixes when
    the target is shorter): the least significant context tokens are dropped, never an affix. With
    `window` > 0 a token ranks by the best significance within `window` tokens of it (so the digits
    of a number or the words of a name around a salient token stay together). Tokens where `protect`
    (T,) is True rank above every other context token (dropped only when nothing else is left)."""
    t = sig.shape[0]
    n_drop = min(max(0, t - target), t - prefix - suffix)
    keep = torch.ones(t, dtype=torch.bool, device=sig.device)
    if n_drop <= 0:
        return keep
    ranked = sig.float().clone()
    if window > 0:
        ctx = ranked[prefix:t - suffix][None, None]
        pooled = torch.nn.functional.max_pool1d(ctx, 2 * window + 1, stride=1, padding=window)[0, 0]
        # ties inside a pooled span are broken by the token's own significance
        ranked[prefix:t - suffix] = pooled + 1e-3 * torch.tanh(ranked[prefix:t - suffix])
    if protect is not None and bool(protect.any()):
        ctx = ranked[prefix:t - suffix]
        lift = float(ctx.max() - ctx.min()) + 1.0  # every protected token above every other one, in its order
        ranked = torch.where(protect.to(ranked.device), ranked + lift, ranked)
    ranked[:prefix] = math.inf
    ranked[t - suffix:] = math.inf
    keep[ranked.topk(n_drop, largest=False).indices] = False
    return keep


def protected_tokens(doc: torch.Tensor, tok: torch.Tensor, protected: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
    """(T,) True for a chunk's tokens that `protected` (document index -> (stream length,) bool) marks;
    None without protection. Affix tokens (document -1) are never marked (they are never dropped)."""
    if not protected:
        return None
    out = torch.zeros(doc.shape[0], dtype=torch.bool, device=doc.device)
    for d, marks in protected.items():
        at = doc == d
        if bool(at.any()):
            out[at] = marks.to(doc.device)[tok[at]]
    return out


def piece_lengths(chunk: Chunk) -> list[int]:
    """The lengths of a merged chunk's pieces (runs of one leaf's context tokens), in order; one
    piece when the chunk does not say where its tokens came from."""
    if chunk.piece is None:
        return [chunk.length - chunk.prefix - chunk.suffix]
    ctx = chunk.piece[chunk.prefix:chunk.length - chunk.suffix]
    starts = [0, *(torch.nonzero(ctx[1:] != ctx[:-1]).flatten() + 1).tolist(), ctx.numel()]
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def run_layers(base, chunk: Chunk, layers: range, target: int, bias: torch.Tensor | None, window: int = 0,
               n_queries: int = 1, protected: dict[int, torch.Tensor] | None = None,
               attention: str = "causal") -> Chunk:
    """Runs `chunk` through `layers` (causal attention over its own tokens, or a `merge_attention`
    variant: "piece", "position"; RoPE at its positions), appending each layer's
    K/V; at the last layer, reduces it to `target` when longer (ranked by the last `n_queries`
    tokens' queries; `protected` tokens kept first)."""
    dtype = chunk.hidden.dtype
    cos, sin = base.rope(chunk.pos, dtype)
    x = chunk.hidden[None]
    reduce = chunk.length > target
    lengths = piece_lengths(chunk) if attention == "piece" else []
    # "position" masks only where positions go backwards (pieces sharing them); else it is causal
    by_position = attention == "position" and bool((chunk.pos[1:] < chunk.pos[:-1]).any())
    sig: list[torch.Tensor] = []
    for n, i in enumerate(layers):
        if i != len(chunk.k):
            raise ValueError(f"layer {i} after {len(chunk.k)} layers: groups must run in order")
        last = reduce and n == len(layers) - 1

        def attend(q, k, v, last=last, i=i):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            chunk.k.append(k[0])
            chunk.v.append(v[0])
            if last:
                sig.append(significance(q[0, :, -n_queries:], k[0], chunk.pos, _row(bias, i)))
            if len(lengths) > 1:
                out = piece_attention(base.attn_fn, q, k, v, chunk.prefix, chunk.suffix, lengths)
            elif by_position:
                out = position_attention(base.attn_fn, q, k, v, chunk.pos)
            else:
                out = base.attn_fn(q, k, v, causal=True)
            return out.transpose(1, 2).reshape(1, q.shape[2], -1)

        x = base.layers[i](x, None, None, None, attend=attend)
    chunk.hidden = x[0]
    if sig:
        chunk.prune(keep_mask(sig[0], chunk.prefix, chunk.suffix, target, window,
                              protected_tokens(chunk.doc, chunk.tok, protected)))
    return chunk


def _row(bias: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    return None if bias is None else bias[layer]


# A leaf: (leaf reference, the schedule's leaf_end, target length) -> the reduced leaf chunk
LeafFn = Callable[[object, int, int], Chunk]


def count_merges(refs: list) -> int:
    """The merge levels `Merger` runs over `refs`: one per inner node, a node whose right side is
    padding included (it runs its level over the left chunk alone)."""
    if len(refs) == 1:
        return 0
    half = len(refs) // 2
    right = 0 if refs[half] is None else count_merges(refs[half:])
    return 1 + count_merges(refs[:half]) + right


class Merger:
    """The depth-first walk of one question's merge tree (HOMER's `_merge`, with its targets)."""

    def __init__(self, base, schedule: Schedule, bias: torch.Tensor | None, leaf: LeafFn,
                 leaf_lengths: dict, prefix: int, suffix: int, max_piece: int, window: int = 0,
                 n_queries: int = 1, sequential: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 protected: dict[int, torch.Tensor] | None = None, attention: str = "causal") -> None:
        self.base, self.schedule, self.bias, self.leaf, self.window = base, schedule, bias, leaf, window
        self.n_queries, self.sequential, self.protected, self.attention = n_queries, sequential, protected, attention
        # progress(merges done, merges in the tree): the merges are the question's minutes on a CPU
        self.progress, self.merges_done, self.merges_total = progress, 0, 0
        self.leaf_lengths = leaf_lengths  # leaf reference -> its chunk length P + piece + S
        self.prefix, self.suffix, self.max_piece = prefix, suffix, max_piece
        self.peak_tokens = 0  # most tokens held in chunks at once (depth-first: O(chunk * height))
        self._held = 0

    @property
    def max_len(self) -> int:
        return self.prefix + self.max_piece + self.suffix

    def run(self, refs: list, height: int, target: int) -> Chunk:
        """The reduced chunk of the subtree over `refs` (leaf references, None for padding)."""
        if not self.merges_total:
            self.merges_total = count_merges(refs)
        return self._run(refs, height, target)

    def _run(self, refs: list, height: int, target: int) -> Chunk:
        if len(refs) == 1:
            chunk = self.leaf(refs[0], self.schedule.leaf_end, target)
            self._note(chunk.length)
            return chunk
        half = len(refs) // 2
        left, right = refs[:half], refs[half:]
        if right[0] is None:  # padding: the left subtree alone, reduced to a chunk's length at most
            l_chunk, r_chunk = self._run(left, height - 1, self.max_len), None
        else:
            default = self.prefix + self.max_piece // 2 + self.suffix
            r_len = self.leaf_lengths[right[0]]
            if r_len < default:  # a short right chunk leaves its room to the left one
                r_target, l_target = r_len, self.max_len - (r_len - self.prefix - self.suffix)
            else:
                r_target = l_target = default
            l_chunk = self._run(left, height - 1, l_target)
            self._held += l_chunk.length
            r_chunk = self._run(right, height - 1, r_target)
            self._held -= l_chunk.length
        merged = l_chunk if r_chunk is None else merge(l_chunk, r_chunk)
        if self.sequential:
            merged = renumber(self.base, merged)
        self._note(merged.length)
        out = run_layers(self.base, merged, self.schedule.level_layers(height), target, self.bias, self.window,
                         self.n_queries, self.protected, self.attention)
        self.merges_done += 1
        if self.progress is not None:
            self.progress(self.merges_done, self.merges_total)
        return out

    def _note(self, length: int) -> None:
        self.peak_tokens = max(self.peak_tokens, self._held + length)
