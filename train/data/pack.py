"""Tokenisation of samples into training items, and the on-disk shard format.

An *item* is a dict::

    {"context_ids": np.int32[...],  # the document: compressed into the context tree
     "prompt_ids":  np.int32[...],  # running text: chat-templated conversation ending with the
                                    # assistant header (empty for LM continuation items)
     "target_ids":  np.int32[...],  # loss tokens: the answer + <|im_end|> (instruction items) or
                                    # the next 128-512 tokens of the text (LM items)
     "task": str, "meta": dict}     # meta: source, evidence, depth, ... (JSON-serialisable)

Shard format (a directory; no pickle anywhere, every file is loadable with
``np.load(..., allow_pickle=False, mmap_mode="r")`` or ``json``)::

    manifest.json                 format version, tokenizer, vocab size, dtype, seed, counts, shards
    shard-00000.tokens.npy        1-D uint16 (vocab <= 65536) or uint32: all ids back to back
    shard-00000.index.npy         int64 [n_items, 7]: ctx_off, ctx_len, prompt_off, prompt_len,
                                  target_off, target_len, task_id (index into manifest["tasks"])
    shard-00000.meta.jsonl        one JSON object per item (task, source, evidence, ...)

A shard is closed before its files exceed ``max_shard_bytes`` (default 48 MiB, so that one shard
plus code fits the 64 MiB that can be carried to the GPU machine in one call).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from model.prompts import SHAREDLLM_SYSTEM_PROMPT

from .tasks import TASKS, Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SYSTEM_PROMPT = SHAREDLLM_SYSTEM_PROMPT
DEFAULT_MAX_SHARD_BYTES = 48 * 1024 * 1024


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None and i >= 0:
            return i
    return int(tokenizer.eos_token_id)


def chat_prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    msgs = list(messages)
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, text)


def pack_sample(sample: Sample, tokenizer, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> dict:
    if sample.context_ids is not None:
        ctx = sample.context_ids
    else:
        ctx = _encode(tokenizer, sample.context)
    if sample.task == "lm":
        prompt: list[int] = []
        target = list(sample.target_ids or [])
    else:
        prompt = chat_prompt_ids(tokenizer, sample.messages, system_prompt)
        target = _encode(tokenizer, sample.answer) + [end_of_turn_id(tokenizer)]
    meta = {"source": sample.source, **sample.meta}
    if sample.evidence is not None:
        meta["evidence"] = sample.evidence
    if sample.task != "lm":
        meta["answer"] = sample.answer
    return {"context_ids": np.asarray(ctx, dtype=np.int32), "prompt_ids": np.asarray(prompt, dtype=np.int32),
            "target_ids": np.asarray(target, dtype=np.int32), "task": sample.task, "meta": meta}


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Streams items into shards under ``out_dir``; ``close()`` writes ``manifest.json``."""

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 info: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.max_bytes = max_shard_bytes
        self.info = dict(info or {})
        self.shards: list[dict] = []
        self.task_counts: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self._tok: list[np.ndarray] = []
        self._idx: list[list[int]] = []
        self._meta: list[str] = []
        self._n_tok = 0
        self._meta_bytes = 0

    def _size_if(self, n_new_tokens: int, meta_len: int) -> int:
        return ((self._n_tok + n_new_tokens) * self.dtype.itemsize + (len(self._idx) + 1) * 7 * 8
                + self._meta_bytes + meta_len + 512)

    def add(self, item: dict) -> None:
        parts = [item["context_ids"], item["prompt_ids"], item["target_ids"]]
        n = sum(len(p) for p in parts)
        meta = json.dumps({"task": item["task"], **item.get("meta", {})}, ensure_ascii=False, sort_keys=True)
        if self._idx and self._size_if(n, len(meta.encode()) + 1) > self.max_bytes:
            self.flush()
        if self._size_if(n, len(meta.encode()) + 1) > self.max_bytes:
            raise ValueError("one item is larger than max_shard_bytes")
        row = []
        for p in parts:
            arr = np.asarray(p)
            if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
                raise ValueError("token id out of range")
            row += [self._n_tok, len(arr)]
            self._tok.append(arr.astype(self.dtype, copy=False))
            self._n_tok += len(arr)
        task = item["task"]
        row.append(TASKS.index(task))
        self._idx.append(row)
        self._meta.append(meta)
        self._meta_bytes += len(meta.encode()) + 1
        self.task_counts[task] = self.task_counts.get(task, 0) + 1

    def flush(self) -> None:
        if not self._idx:
            return
        k = len(self.shards)
        stem = f"shard-{k:05d}"
        tokens = np.concatenate(self._tok) if self._tok else np.zeros(0, self.dtype)
        np.save(self.out / f"{stem}.tokens.npy", tokens.astype(self.dtype, copy=False), allow_pickle=False)
        np.save(self.out / f"{stem}.index.npy", np.asarray(self._idx, dtype=np.int64), allow_pickle=False)
        (self.out / f"{stem}.meta.jsonl").write_text("\n".join(self._meta) + "\n", encoding="utf-8")
        size = sum((self.out / f"{stem}{s}").stat().st_size for s in (".tokens.npy", ".index.npy", ".meta.jsonl"))
        self.shards.append({"name": stem, "items": len(self._idx), "tokens": int(tokens.size), "bytes": size})
        log.info("wrote %s: %d items, %d tokens, %.1f MiB", stem, len(self._idx), tokens.size, size / 2**20)
        self._reset()

    def close(self) -> dict:
        self.flush()
        manifest = {
            "format": "sharedllm-train-shards", "version": FORMAT_VERSION, "dtype": self.dtype.name,
            "vocab_size": self.vocab_size, "tasks": list(TASKS),
            "index_columns": ["ctx_off", "ctx_len", "prompt_off", "prompt_len", "target_off", "target_len", "task_id"],
            "n_items": sum(s["items"] for s in self.shards), "n_tokens": sum(s["tokens"] for s in self.shards),
            "task_counts": dict(sorted(self.task_counts.items())), "shards": self.shards, **self.info,
        }
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


class ShardReader:
    """Random access to a shard directory (memory-mapped). ``reader[i]`` returns an item dict with
    int64 numpy arrays; ``with_meta=True`` adds the meta dict."""

    def __init__(self, path: str | os.PathLike, with_meta: bool = True):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        if self.manifest.get("format") != "sharedllm-train-shards":
            raise ValueError(f"{path} is not a shard directory")
        self.tasks = self.manifest["tasks"]
        self._tokens, self._index, self._meta = [], [], []
        self._starts = [0]
        for s in self.manifest["shards"]:
            self._tokens.append(np.load(self.path / f"{s['name']}.tokens.npy", mmap_mode="r", allow_pickle=False))
            self._index.append(np.load(self.path / f"{s['name']}.index.npy", allow_pickle=False))
            if with_meta:
                lines = (self.path / f"{s['name']}.meta.jsonl").read_text(encoding="utf-8").splitlines()
                self._meta.append([json.loads(x) for x in lines if x])
            self._starts.append(self._starts[-1] + len(self._index[-1]))
        self.with_meta = with_meta

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, i - self._starts[s]

    def __getitem__(self, i: int) -> dict:
        s, j = self._locate(i)
        co, cl, po, pl, to, tl, task = (int(x) for x in self._index[s][j])
        tok = self._tokens[s]
        item = {"context_ids": np.asarray(tok[co:co + cl], dtype=np.int64),
                "prompt_ids": np.asarray(tok[po:po + pl], dtype=np.int64),
                "target_ids": np.asarray(tok[to:to + tl], dtype=np.int64), "task": self.tasks[task]}
        if self.with_meta:
            item["meta"] = {k: v for k, v in self._meta[s][j].items() if k != "task"}
        return item

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> np.ndarray:
        """[n_items, 3] context/prompt/target lengths (for length-bucketed batching)."""
        return np.concatenate([ix[:, [1, 3, 5]] for ix in self._index]) if self._index else np.zeros((0, 3), np.int64)


def write_shards(items: Iterable[dict], out_dir, vocab_size: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 info: dict | None = None) -> dict:
    w = ShardWriter(out_dir, vocab_size, max_shard_bytes, info)
    for it in items:
        w.add(it)
    return w.close()


def read_shards(path) -> Iterator[dict]:
    return iter(ShardReader(path))
