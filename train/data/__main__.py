"""``python -m train.data --out DIR --items N --seed S`` writes a shard directory."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import time

log = logging.getLogger("train.data")


def load_model_tokenizer(model: str | None = None, data_dir: str = "data"):
    """The tokenizer the items are made with, and its model's name (recorded in the manifest; the
    trainer refuses shards made for another model). `model`: a bundled name (default: the default
    model), a Hugging Face directory or a .gguf file; converted once under `data_dir` like the app."""
    from pathlib import Path  # noqa: PLC0415

    from model.loading import load_tokenizer, model_display_name, resolve_checkpoint  # noqa: PLC0415

    return load_tokenizer(resolve_checkpoint(model, Path(data_dir))), model_display_name(model)


def main(argv: list[str] | None = None) -> int:
    from . import build_dataset, write_shards  # noqa: PLC0415
    from .mix import DEFAULT_TASK_WEIGHTS  # noqa: PLC0415
    from .sources import Corpus  # noqa: PLC0415
    from .tasks import DEFAULT_SOURCE_WEIGHTS  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m train.data", description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None,
                    help="whose tokenizer: bundled name (default: qwen2.5-0.5b; smollm2), HF directory or .gguf")
    ap.add_argument("--data-dir", default="data", help="where a bundled model is converted once")
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first item index (to extend a data set)")
    ap.add_argument("--min-ctx", type=int, default=1024)
    ap.add_argument("--max-ctx", type=int, default=8192)
    ap.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--max-shard-mib", type=float, default=48.0)
    ap.add_argument("--task-weights", default=None, help='JSON, e.g. \'{"lm": 1, "contract": 1}\'')
    ap.add_argument("--source-weights", default=None, help="JSON, e.g. '{\"man\": 1}'")
    ap.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                        "sharedllm", "corpus-text"),
                    help="on-disk cache of rendered/cleaned source texts ('' to disable)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok, tok_name = load_model_tokenizer(a.model, a.data_dir)
    corpus = Corpus.discover(split=a.split, cache_dir=a.cache_dir or None)
    tw = json.loads(a.task_weights) if a.task_weights else DEFAULT_TASK_WEIGHTS
    sw = json.loads(a.source_weights) if a.source_weights else DEFAULT_SOURCE_WEIGHTS
    entries_digest = hashlib.sha256("\n".join(e.name for s in corpus.sources for e in corpus.entries[s]).encode()).hexdigest()
    t0 = time.time()
    counter = {"n": 0, "tok": 0}

    def items():
        for it in build_dataset(tok, a.items, a.seed, a.min_ctx, a.max_ctx, corpus=corpus, task_weights=tw,
                                source_weights=sw, start=a.start, workers=a.workers):
            counter["n"] += 1
            counter["tok"] += len(it["context_ids"]) + len(it["prompt_ids"]) + len(it["target_ids"])
            if counter["n"] % 100 == 0:
                dt = time.time() - t0
                log.info("%d/%d items, %.1f items/s, %.0f tokens/s", counter["n"], a.items, counter["n"] / dt,
                         counter["tok"] / dt)
            yield it

    info = {"seed": a.seed, "start": a.start, "requested_items": a.items, "min_ctx": a.min_ctx, "max_ctx": a.max_ctx,
            "split": a.split, "tokenizer": tok_name, "task_weights": tw, "source_weights": sw,
            "corpus_entries": {s: len(v) for s, v in corpus.entries.items()}, "corpus_digest": entries_digest}
    m = write_shards(items(), a.out, vocab_size=len(tok), max_shard_bytes=int(a.max_shard_mib * 2**20), info=info)
    dt = time.time() - t0
    m["seconds"] = round(dt, 1)
    with open(os.path.join(a.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(m, f, indent=2, sort_keys=True)
    log.info("done: %d items, %d tokens, %d shards in %.0f s (%.2f items/s)", m["n_items"], m["n_tokens"],
             len(m["shards"]), dt, m["n_items"] / max(dt, 1e-9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
