"""The batched training step: many items per forward, the same loss as the per-item path.

Notation: B items, C chunks of all items (C_b of item b), N_l = 2^l nodes per chunk at level l,
n live nodes of a level, W widest node, S_l kept slots per node, Q kept slots per chunk after the
search, P memory positions of the item with the most chunks, M injected layers, T running text.

Per micro-batch (everything after the host-side geometry runs on the model's device):
1. geometry (host): every item's chunks are split exactly as `model.tree.encode_tree` splits them,
   item by item, so the same generator gives the same split noise;
2. one lower-model forward per level for all items' nodes (`lower_forward`, right-padded);
3. kept positions, retrieval vectors and the query-aware search are vectorised over all chunks;
   kept K/V pass through the tree dtype (what a stored tree holds at inference);
4. the memory of each item is gathered into (M, B, nkv, P, hd), rotated to chunk positions,
   padded slots masked; queries of item b sit at position C_b;
5. one upper-model forward over the right-padded running texts; logits only at target positions;
   the loss is the mean over items of each item's mean target cross-entropy (a tensor: no host sync).

`tests/train/test_batched.py` pins loss and gradients to `train.loop.item_loss` on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.rope import apply_rope, rope_angles
from model.sharedllm import SharedLLM
from model.tree import lower_forward, split_lengths


@dataclass
class Geometry:
    """Node table of one micro-batch (host tensors); level l's tensors have shape (C, N_l)."""

    starts: list[torch.Tensor]  # offset of each node in the flat token tensor of all contexts
    lengths: list[torch.Tensor]
    chunk_item: torch.Tensor  # (C,) which item each chunk belongs to
    chunk_local: torch.Tensor  # (C,) chunk index inside its item
    item_chunks: torch.Tensor  # (B,) C_b


def geometry(context_lengths: list[int], chunk_len: int, height: int, noise: float,
             generator: torch.Generator | None) -> Geometry:
    """Splits every item's chunks in item order (the same draws as one `encode_tree` per item)."""
    starts: list[list[list[int]]] = [[] for _ in range(height)]
    lengths: list[list[list[int]]] = [[] for _ in range(height)]
    chunk_item, chunk_local, item_chunks, offset = [], [], [], 0
    for b, n_tokens in enumerate(context_lengths):
        n_chunks = 0
        for c, chunk_start in enumerate(range(0, n_tokens, chunk_len)):
            per_level = split_lengths(min(chunk_len, n_tokens - chunk_start), height, noise, generator)
            for level, nodes in enumerate(per_level):
                cuts = torch.tensor([0] + nodes[:-1]).cumsum(0) + offset + chunk_start
                starts[level].append(cuts.tolist())
                lengths[level].append(nodes)
            chunk_item.append(b)
            chunk_local.append(c)
            n_chunks += 1
        item_chunks.append(n_chunks)
        offset += n_tokens
    return Geometry(
        starts=[torch.tensor(s) for s in starts], lengths=[torch.tensor(n) for n in lengths],
        chunk_item=torch.tensor(chunk_item), chunk_local=torch.tensor(chunk_local),
        item_chunks=torch.tensor(item_chunks),
    )


def kept_slots(lengths: torch.Tensor, slots: int, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised `model.tree.keep_indices`: lengths (...) -> kept positions (..., S) inside the
    node and their validity. k = round(len * rate) clamped to [1, min(S, len)]; position j is the
    last token of the j-th of k equal segments, ceil((j+1) len / k) - 1."""
    k = torch.round(lengths.double() * rate).long().clamp(min=1).minimum(lengths.clamp(max=slots))
    j = torch.arange(slots, device=lengths.device)
    positions = ((j + 1) * lengths[..., None] + k[..., None] - 1) // k.clamp(min=1)[..., None] - 1
    valid = j < k[..., None]
    return positions.clamp(min=0) * valid, valid


def pooled_vectors(hidden1: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Vectorised `model.tree.node_vector`: hidden1 (n, W, D), lengths (n,) -> (n, D) float32."""
    if mode == "mean":
        live = torch.arange(hidden1.shape[1], device=hidden1.device) < lengths[:, None]  # (n, W)
        return (hidden1.float() * live[..., None]).sum(1) / lengths[:, None].float()
    return hidden1[torch.arange(len(lengths), device=hidden1.device), lengths - 1].float()


@dataclass
class Level:
    """One level of all chunks of a micro-batch, on the device."""

    keys: torch.Tensor  # (C, N_l, S_l, M, nkv, hd) compute dtype, before RoPE
    values: torch.Tensor
    inner: torch.Tensor  # (C, N_l, S_l) kept position inside its node
    absolute: torch.Tensor  # (C, N_l, S_l) position in the flat token tensor (document order)
    valid: torch.Tensor  # (C, N_l, S_l) bool
    vectors: torch.Tensor  # (C, N_l, D) float32 (zeros for empty nodes)


def encode_level(model: SharedLLM, tokens: torch.Tensor, nodes: dict[str, torch.Tensor], width: int,
                 level: int, node_batch_tokens: int | None = None) -> Level:
    """All nodes of one level of all items through the lower model, in forwards of at most
    `node_batch_tokens` padded tokens (None: one forward; on a CPU, batches past ~16K tokens lose
    more to cache misses than they gain). `nodes`: the level's device tensors from `Prepared` (live
    node ids, their starts and lengths), `width` the padded node width (a host int: nothing here
    waits for the device)."""
    cfg, base = model.config, model.base
    device = tokens.device
    compute = base.embed_tokens.weight.dtype
    c, n_nodes = nodes["shape"]
    live, node_len, node_start = nodes["live"], nodes["length"], nodes["start"]  # (n,) each
    slots, rate = cfg.slots(level), cfg.keep_rates[level - 1]
    inner, valid = kept_slots(node_len, slots, rate)  # (n, S)
    tree_dtype = getattr(torch, cfg.tree_dtype)
    offsets = torch.arange(width, device=device)
    autocast = cfg.encode_dtype != "float32" and compute == torch.float32
    per_call = len(live) if node_batch_tokens is None else max(1, node_batch_tokens // width)
    parts: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "vectors": []}
    for b0 in range(0, len(live), per_call):
        lengths, starts, kept_at = node_len[b0:b0 + per_call], node_start[b0:b0 + per_call], inner[b0:b0 + per_call]
        inside = offsets < lengths[:, None]  # (n', W)
        ids = tokens[(starts[:, None] + offsets).clamp(max=tokens.numel() - 1)] * inside  # (n', W) right-padded
        with torch.no_grad(), torch.autocast(device.type, dtype=getattr(torch, cfg.encode_dtype), enabled=autocast):
            keys, values, hidden1 = lower_forward(base, ids, cfg.n_inject_layers)  # (n', M, nkv, W, hd)
        rows = torch.arange(len(lengths), device=device)[:, None]
        # (n', M, nkv, W, hd) -> kept (n', S, M, nkv, hd), rounded to the precision a stored tree has
        parts["keys"].append(keys[rows, :, :, kept_at].to(tree_dtype).to(compute))
        parts["values"].append(values[rows, :, :, kept_at].to(tree_dtype).to(compute))
        parts["vectors"].append(pooled_vectors(hidden1, lengths, cfg.retrieval_vector))

    def table(x: torch.Tensor, fill) -> torch.Tensor:  # live rows (n, ...) -> (C, N_l, ...), empty nodes filled
        full = torch.full((c * n_nodes, *x.shape[1:]), fill, dtype=x.dtype, device=device)
        return full.index_copy(0, live, x).view(c, n_nodes, *x.shape[1:])

    kept = {name: table(torch.cat(tensors), 0) for name, tensors in parts.items()}
    return Level(keys=kept["keys"], values=kept["values"], inner=table(inner, 0),
                 absolute=table(inner + node_start[:, None], 0), valid=table(valid, False),
                 vectors=kept["vectors"].float())


def search(levels: list[Level], queries: torch.Tensor, has_query: torch.Tensor) -> list[torch.Tensor]:
    """Vectorised `model.search.select_nodes` over all chunks: queries (C, D) float32, has_query (C,)
    bool (False: the language-modelling policy, always right) -> preserved node indices per level,
    (C, 1) for levels < h and (C, 2) at level h."""
    c = queries.shape[0]
    rows = torch.arange(c, device=queries.device)
    current = torch.zeros(c, dtype=torch.long, device=queries.device)
    preserved = []
    for level, lv in enumerate(levels, start=1):
        left, right = 2 * current, 2 * current + 1
        if level == len(levels):
            preserved.append(torch.stack([left, right], dim=1))
            break
        sim_left = F.cosine_similarity(lv.vectors[rows, left], queries, dim=-1)
        sim_right = F.cosine_similarity(lv.vectors[rows, right], queries, dim=-1)
        go_right = (sim_right > sim_left) | ~has_query
        preserved.append(torch.where(go_right, left, right)[:, None])
        current = torch.where(go_right, right, left)
    return preserved


@dataclass
class BatchMemory:
    keys: torch.Tensor  # (M, B, nkv, P, hd) rotated to chunk positions
    values: torch.Tensor  # (M, B, nkv, P, hd)
    mask: torch.Tensor  # (B, 1, 1, P) bool, True = a filled slot
    n_chunks: torch.Tensor  # (B,) the queries' position


def gather_memory(model: SharedLLM, levels: list[Level], preserved: list[torch.Tensor], prep: Prepared) -> BatchMemory:
    """Each item's preserved slots, chunk by chunk in document order, padded to the longest item."""
    device = levels[0].keys.device
    rows = torch.arange(preserved[0].shape[0], device=device)[:, None]
    parts = {name: torch.cat([getattr(lv, name)[rows, nodes].flatten(1, 2) for lv, nodes in zip(levels, preserved)], 1)
             for name in ("keys", "values", "inner", "absolute", "valid")}  # (C, Q, ...)
    key = torch.where(parts["valid"], parts["absolute"], torch.iinfo(torch.long).max)
    order = key.argsort(dim=1, stable=True)  # (C, Q): document order, empty slots last
    q = order.shape[1]
    sorted_ = {name: t[rows, order] for name, t in parts.items()}
    item_chunks = prep.item_chunks  # (B,) on the device; its maximum from the host copy
    b, c_max = len(item_chunks), int(prep.geo.item_chunks.max())
    first = torch.cumsum(item_chunks, 0) - item_chunks  # (B,) first chunk row of each item
    local = torch.arange(c_max, device=device)
    present = local < item_chunks[:, None]  # (B, C_max)
    chunk_rows = (first[:, None] + local).clamp(max=rows.shape[0] - 1)  # (B, C_max)
    valid = (sorted_["valid"][chunk_rows] & present[..., None]).flatten(1)  # (B, P)
    angle = local[None, :, None].expand(b, c_max, q)
    if model.config.key_rotation == "node_and_chunk":
        angle = angle + sorted_["inner"][chunk_rows]
    compute = model.base.embed_tokens.weight.dtype
    cos, sin = rope_angles(model.base.inv_freq, angle.flatten(1), compute)  # (B, P, hd)

    def per_layer(x: torch.Tensor) -> torch.Tensor:  # (C, Q, M, nkv, hd) -> (M, B, nkv, P, hd)
        return x[chunk_rows].flatten(1, 2).permute(2, 0, 3, 1, 4)

    keys = apply_rope(per_layer(sorted_["keys"]), cos[:, None], sin[:, None])
    return BatchMemory(keys=keys, values=per_layer(sorted_["values"]), mask=valid[:, None, None, :],
                       n_chunks=item_chunks)


def question_batch(questions: list[list[int] | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host side of `batched_query_vectors`: right-padded ids (A, W) of the A items that ask a
    question, their lengths (A,) and item indices (A,)."""
    asked = [b for b, q in enumerate(questions) if q]
    lengths = torch.tensor([len(questions[b]) for b in asked], dtype=torch.long)
    ids = torch.zeros((len(asked), int(lengths.max()) if asked else 0), dtype=torch.long)
    for row, b in enumerate(asked):
        ids[row, : lengths[row]] = torch.tensor(questions[b])
    return ids, lengths, torch.tensor(asked, dtype=torch.long)


def batched_query_vectors(model: SharedLLM, ids: torch.Tensor, lengths: torch.Tensor, asked: torch.Tensor,
                          n_items: int) -> torch.Tensor:
    """`SharedLLM.query_vector` for many questions at once -> (B, D) float32 (zeros without one)."""
    base = model.base
    out = torch.zeros(n_items, base.config.dim, device=ids.device)
    if ids.shape[0] == 0:
        return out
    with torch.no_grad():
        x = base.embed_tokens(ids)
        cos, sin = base.rope(torch.arange(ids.shape[1], device=ids.device), x.dtype)
        x = base.layers[0](x, cos, sin, base.attn_fn)  # (A, W, D)
        out[asked] = pooled_vectors(x, lengths, model.config.retrieval_vector)
    return out


def injections(model: SharedLLM, memory: BatchMemory) -> dict:
    """Residual updates of the M cross-attention blocks for a batch whose items differ in memory
    length (mask) and query position (item b's queries sit at its chunk count C_b)."""
    compute = model.base.embed_tokens.weight.dtype
    cos, sin = rope_angles(model.base.inv_freq, memory.n_chunks, compute)  # (B, hd)
    cos, sin = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, hd): broadcast over heads and T

    def make(i: int):
        block = model.xattn[i]
        return lambda x: block(x, memory.keys[i], memory.values[i], cos, sin, model.base.attn_fn, memory.mask)

    return {i: make(i) for i in range(model.config.n_inject_layers)}


@dataclass
class RunningText:
    ids: torch.Tensor  # (B, T) right-padded
    rows: torch.Tensor  # (n_t,) item of each target
    cols: torch.Tensor  # (n_t,) position whose logits predict it
    labels: torch.Tensor  # (n_t,)


def running_text(items: list[dict], device: torch.device, pad_multiple: int) -> RunningText:
    """The decoder's input per item (prompt + target[:-1], or target[:-1] for LM items whose
    prompt is empty) and the flat (item, position, label) triples of its target tokens."""
    seqs, rows, cols, labels = [], [], [], []
    for b, item in enumerate(items):
        prompt = [int(t) for t in item["prompt_ids"]]
        target = [int(t) for t in item["target_ids"]]
        seq = prompt + target[:-1]
        lab = target if prompt else target[1:]
        seqs.append(seq)
        rows += [b] * len(lab)
        cols += range(len(seq) - len(lab), len(seq))
        labels += lab
    width = max(len(s) for s in seqs)
    width = -(-width // pad_multiple) * pad_multiple
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    return RunningText(ids=ids.to(device, non_blocking=True), rows=as_tensor(rows), cols=as_tensor(cols),
                       labels=as_tensor(labels))


@dataclass
class Prepared:
    """Everything the device needs for one micro-batch, moved there before any kernel is queued
    (a host-to-device copy queued behind kernels would wait for them)."""

    tokens: torch.Tensor  # (sum of context lengths,) all contexts back to back
    nodes: list[dict]  # per level: live, start, length (n,) on the device; shape (C, N_l)
    widths: list[int]  # per level: padded node width
    geo: Geometry
    questions: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    chunk_item: torch.Tensor  # (C,)
    item_chunks: torch.Tensor  # (B,)


def prepare(model: SharedLLM, contexts: list[np.ndarray], questions: list[list[int] | None], noise: float,
            generator: torch.Generator | None, pad_multiple: int = 1) -> Prepared:
    cfg = model.config
    device = model.base.embed_tokens.weight.device
    move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    geo = geometry([len(c) for c in contexts], cfg.chunk_len, cfg.tree_height, noise, generator)
    nodes, widths = [], []
    for starts, lengths in zip(geo.starts, geo.lengths):
        live = (lengths.flatten() > 0).nonzero().flatten()
        nodes.append({"live": move(live), "start": move(starts.flatten()[live]),
                      "length": move(lengths.flatten()[live]), "shape": tuple(lengths.shape)})
        widths.append(-(-int(lengths.max()) // pad_multiple) * pad_multiple)
    tokens = move(torch.from_numpy(np.concatenate([np.asarray(c, dtype=np.int64) for c in contexts])))
    return Prepared(tokens=tokens, nodes=nodes, widths=widths, geo=geo,
                    questions=tuple(move(t) for t in question_batch(questions)), chunk_item=move(geo.chunk_item),
                    item_chunks=move(geo.item_chunks))


def default_node_batch_tokens(device: torch.device) -> int | None:
    """Lower-model tokens per forward: all of a level on a GPU, 16K on a CPU (cache)."""
    return None if device.type == "cuda" else 16384


def build_batch_memory(model: SharedLLM, prep: Prepared, node_batch_tokens: int | None = None) -> BatchMemory:
    """Steps 2-4 of the module docstring: prepared contexts and questions -> every item's memory."""
    levels = [encode_level(model, prep.tokens, nodes, width, level, node_batch_tokens)
              for level, (nodes, width) in enumerate(zip(prep.nodes, prep.widths), start=1)]
    n_items = len(prep.geo.item_chunks)
    query = batched_query_vectors(model, *prep.questions, n_items)[prep.chunk_item]  # (C, D)
    has_query = torch.zeros(n_items, dtype=torch.bool, device=query.device).index_fill_(0, prep.questions[2], True)
    return gather_memory(model, levels, search(levels, query, has_query[prep.chunk_item]), prep)


def batch_loss(model: SharedLLM, items: list[dict], questions: list[list[int] | None],
               max_context_tokens: int | None, generator: torch.Generator | None,
               pad_multiple: int = 1, bf16: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over items of each item's mean target cross-entropy, and the per-item losses (B,),
    detached; `generator` None means evaluation (no split noise). `bf16`: the upper model under
    bfloat16 autocast (default: on CUDA only; on CPUs with AMX it is several times faster)."""
    contexts = [np.asarray(it["context_ids"])[:max_context_tokens or None] for it in items]
    noise = model.config.split_noise if generator is not None else 0.0
    device = model.base.embed_tokens.weight.device
    text = running_text(items, device, pad_multiple)  # host work and copies first, then the kernels
    prep = prepare(model, contexts, questions, noise, generator, pad_multiple)
    memory = build_batch_memory(model, prep, default_node_batch_tokens(device))
    # bfloat16 compute over float32 cross-attention weights (the base may itself be bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if bf16 is None else bf16):
        hidden = model.base.hidden_states(text.ids, injections=injections(model, memory))  # (B, T, D)
        logits = model.base.output_logits(hidden[text.rows, text.cols])  # (n_t, V): targets only
    per_token = F.cross_entropy(logits.float(), text.labels, reduction="none")
    counts = torch.zeros(len(items), device=device).index_add_(0, text.rows, torch.ones_like(per_token))
    per_item = torch.zeros(len(items), device=device).index_add_(0, text.rows, per_token) / counts
    return per_item.mean(), per_item.detach()
