"""Persisted prompt caches of the `full` engine: the self-attention K/V of a prompt's document prefix.

A follow-up question about the same documents should cost the question, not the document: the
prefix of `full`'s prompt (chat-template header, system prompt, the documents at the start of the
first user message) is the same every turn, so its K/V states are computed once per (documents,
model, prompt layout) and persisted under the same rules as context trees: one safetensors file
per (document, fingerprint) in the tensor store (temporary name, fsync, rename, sha256 recorded in
the same `context_trees` table only after the rename, memory-mapped and verified when read). The
row belongs to the first document of the prompt, so deleting or re-encoding that document removes
it; the fingerprint covers every document's token ids, so a cache is never used for other text.

The fingerprint is the hash of (layout version, checkpoint content hash, dtype, the prefix's token
ids): a different model, precision, system prompt or document text is a different file. A file that
fails verification is dropped and recomputed; the answer never depends on whether a cache was hit
(tested: same tokens with and without).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.services.derived_state import DerivedStateStore
from storage import TensorStore

logger = logging.getLogger(__name__)

# bump when the prompt text around the documents changes shape (engines.FullContextEngine)
PROMPT_LAYOUT_VERSION = 1
FINGERPRINT_PREFIX = "prompt-"
TOKEN_IDS_KEY = "prefix_token_ids"
# shorter prefixes are cheaper to prefill than to read back from a file
MIN_CACHED_TOKENS = 256


def is_prompt_cache(fingerprint: str) -> bool:
    return fingerprint.startswith(FINGERPRINT_PREFIX)


@dataclass(frozen=True)
class PrefixKey:
    document_id: int  # the row's owner: the prompt's first document
    fingerprint: str
    token_ids: tuple[int, ...]


class PromptCacheService:
    def __init__(self, sessions: sessionmaker[Session], tensors: TensorStore,
                 min_tokens: int = MIN_CACHED_TOKENS) -> None:
        self._store = DerivedStateStore(sessions, tensors)
        self.min_tokens = min_tokens

    def key(self, lm: Any, document_id: int, prefix_ids: list[int]) -> PrefixKey | None:
        """The cache identity of a prompt prefix, or None when it is too short to be worth a file."""
        if len(prefix_ids) < self.min_tokens:
            return None
        digest = hashlib.sha256()
        dtype = str(lm.model.base.embed_tokens.weight.dtype)
        digest.update(f"layout={PROMPT_LAYOUT_VERSION};model={lm.checkpoint_hash};dtype={dtype};".encode())
        digest.update(torch.tensor(prefix_ids, dtype=torch.int64).numpy().tobytes())
        return PrefixKey(document_id, FINGERPRINT_PREFIX + digest.hexdigest()[:32], tuple(prefix_ids))

    def has(self, key: PrefixKey) -> bool:
        return self._store.has(key.document_id, key.fingerprint)

    def load(self, key: PrefixKey) -> Any | None:
        """The persisted `PrefixState`, memory-mapped and verified, or None (missing or damaged)."""
        from model.generate import PrefixState

        tensors = self._store.load(key.document_id, key.fingerprint)
        if tensors is None:
            return None
        stored_ids = tensors.get(TOKEN_IDS_KEY)
        if stored_ids is None or tuple(stored_ids.tolist()) != key.token_ids:
            logger.warning("prompt cache of document %s holds other tokens: recomputing it", key.document_id)
            self._store.drop(key.document_id, key.fingerprint)
            return None
        n_layers = sum(1 for name in tensors if name.startswith("k."))
        return PrefixState([tensors[f"k.{i}"] for i in range(n_layers)], [tensors[f"v.{i}"] for i in range(n_layers)])

    def save(self, key: PrefixKey, cache: list[Any]) -> None:
        """Persists the first len(key.token_ids) positions of a generation's KV cache (per layer)."""
        if self.has(key):  # stored by a concurrent request: keep its file
            return
        n = len(key.token_ids)
        tensors: dict[str, torch.Tensor] = {TOKEN_IDS_KEY: torch.tensor(key.token_ids, dtype=torch.int32)}
        for i, layer in enumerate(cache):
            k, v = layer.prefix(n)
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k, v
        written = self._store.save(key.document_id, key.fingerprint, tensors, {"kind": "prompt-cache"})
        if written:
            logger.info("prompt cache of %d tokens stored for document %d (%d bytes)", n, key.document_id, written)
