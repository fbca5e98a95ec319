"""Seeded mixture of tasks -> packed items.

Reproducibility: item ``i`` of a data set with seed ``S`` is drawn from its own RNG
``Random(f"sharedllm-data:{S}:{i}:{attempt}")`` (string seeds are hashed with SHA-512 by
:class:`random.Random`, so they do not depend on ``PYTHONHASHSEED``). The task of item ``i`` is drawn
from attempt 0; when a generator cannot make an item (returns ``None`` or the packed context is out of
range) the next attempt of the *same* task is tried. Items are therefore independent of each other,
of the number of worker processes and of generation order: the same (corpus, tokenizer, seed, i,
weights, lengths) always gives the same item.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from collections.abc import Iterator
from random import Random

from .pack import DEFAULT_SYSTEM_PROMPT, pack_sample
from .sources import Corpus
from .tasks import DEFAULT_SOURCE_WEIGHTS, GENERATORS, TASKS, Tokens

log = logging.getLogger(__name__)

DEFAULT_TASK_WEIGHTS = {"lm": 0.25, "passkey": 0.05, "needle": 0.08, "kv": 0.06, "quote": 0.08,
                        "extractive": 0.13, "contract": 0.25, "chat": 0.10}
MAX_ATTEMPTS = 12


def item_rng(seed: int, i: int, attempt: int = 0) -> Random:
    return Random(f"sharedllm-data:{seed}:{i}:{attempt}")


def sample_ctx_len(rng: Random, min_ctx: int, max_ctx: int) -> int:
    """Log-uniform in [min_ctx, max_ctx] with a small safety margin (the exact length is only known
    after tokenisation)."""
    lo, hi = min_ctx * 1.03 + 16, max_ctx * 0.97
    if hi <= lo:
        return int((min_ctx + max_ctx) / 2)
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def make_item(i: int, seed: int, corpus: Corpus, tokenizer, min_ctx: int = 1024, max_ctx: int = 8192,
              task_weights: dict | None = None, source_weights: dict | None = None,
              system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, tk: Tokens | None = None) -> dict | None:
    tw = task_weights or DEFAULT_TASK_WEIGHTS
    names = [t for t in TASKS if tw.get(t, 0) > 0]
    tk = tk or Tokens(tokenizer)
    task = item_rng(seed, i).choices(names, weights=[tw[t] for t in names])[0]
    for attempt in range(MAX_ATTEMPTS):
        rng = item_rng(seed, i, attempt)
        rng.random()  # decorrelate from the task draw
        ctx_len = sample_ctx_len(rng, min_ctx, max_ctx)
        sample = GENERATORS[task](rng, corpus, tk, ctx_len, source_weights or DEFAULT_SOURCE_WEIGHTS)
        if sample is None:
            continue
        item = pack_sample(sample, tokenizer, system_prompt)
        n = len(item["context_ids"])
        if not (min_ctx <= n <= max_ctx) or len(item["target_ids"]) == 0:
            log.debug("item %d attempt %d (%s): context %d out of range", i, attempt, task, n)
            continue
        item["meta"].update({"i": i, "seed": seed, "attempt": attempt})
        return item
    log.warning("item %d (%s): no valid sample after %d attempts", i, task, MAX_ATTEMPTS)
    return None


# -- worker pool (fork: the corpus entry list and tokenizer are inherited) -------------------------
_W: dict = {}


def _init_worker(state: dict) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _W.update(state)
    _W["tk"] = Tokens(state["tokenizer"])


def _work(i: int) -> dict | None:
    w = _W
    return make_item(i, w["seed"], w["corpus"], w["tokenizer"], w["min_ctx"], w["max_ctx"], w["task_weights"],
                     w["source_weights"], w["system_prompt"], w["tk"])


def build_dataset(tokenizer, n_items: int, seed: int, min_ctx: int = 1024, max_ctx: int = 8192, *,
                  corpus: Corpus | None = None, task_weights: dict | None = None,
                  source_weights: dict | None = None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                  start: int = 0, workers: int = 1) -> Iterator[dict]:
    """Yield ``n_items`` packed items (indices ``start .. start+n_items-1``) in index order.

    ``corpus`` defaults to ``Corpus.discover()`` (the ``train`` split of this machine's text).
    ``workers > 1`` uses forked processes; the output is identical to ``workers=1``.
    An index whose task cannot be generated after ``MAX_ATTEMPTS`` attempts is skipped (logged).
    """
    if min_ctx < 1 or max_ctx < min_ctx:
        raise ValueError("need 1 <= min_ctx <= max_ctx")
    corpus = corpus if corpus is not None else Corpus.discover()
    idx = range(start, start + n_items)
    if workers <= 1 or n_items < 4:
        tk = Tokens(tokenizer)
        for i in idx:
            item = make_item(i, seed, corpus, tokenizer, min_ctx, max_ctx, task_weights, source_weights,
                             system_prompt, tk)
            if item is not None:
                yield item
        return
    state = dict(seed=seed, corpus=corpus, tokenizer=tokenizer, min_ctx=min_ctx, max_ctx=max_ctx,
                 task_weights=task_weights, source_weights=source_weights, system_prompt=system_prompt)
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
        for item in pool.imap(_work, idx, chunksize=4):
            if item is not None:
                yield item
