"""Offline training data for SharedLLM's cross-attention (see docs/training.md).

``build_dataset(tokenizer, n_items, seed)`` yields items ``{context_ids, prompt_ids, target_ids, task,
meta}``; ``write_shards`` / ``ShardReader`` store and read them; ``python -m train.data`` is the
command-line generator.
"""

from .mix import DEFAULT_TASK_WEIGHTS, build_dataset, make_item
from .pack import DEFAULT_SYSTEM_PROMPT, ShardReader, ShardWriter, pack_sample, read_shards, write_shards
from .sources import Corpus, Document, looks_like_licence
from .tasks import DEFAULT_SOURCE_WEIGHTS, TASKS

__all__ = ["build_dataset", "make_item", "DEFAULT_TASK_WEIGHTS", "DEFAULT_SOURCE_WEIGHTS", "TASKS",
           "DEFAULT_SYSTEM_PROMPT", "ShardReader", "ShardWriter", "pack_sample", "read_shards", "write_shards",
           "Corpus", "Document", "looks_like_licence"]
