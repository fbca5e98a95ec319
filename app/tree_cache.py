"""Trees of recently asked documents, kept on the model's device (the GPU).

Without it every question maps the stored tree and copies its memory to the GPU: on an H200 with
Llama-2-7B shapes that is 1.9 s of a 128K-token document's TTFT, against 0.10 s when the tree's K/V
already sit in GPU memory (docs/benchmarks.md, section "GPU"). Keyed by (tree path, sha256), so a
re-encoded or replaced tree is a new entry and the old one is dropped; bounded in bytes, least
recently used out first. Callers check ownership before they ask (DocumentService.load_for_qa
filters by owner first).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)


class DeviceTreeCache:
    def __init__(self, max_bytes: int, device: Any) -> None:
        self.max_bytes = int(max_bytes)
        self.device = device
        self._entries: OrderedDict[tuple[str, str], tuple[Any, Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    @classmethod
    def for_model(cls, lm: Any, gigabytes: float) -> DeviceTreeCache | None:
        """A cache on the model's device when that is a GPU and the budget is positive, else None
        (on a CPU the store's memory map already serves the tree without a copy)."""
        device = getattr(lm, "device", None)
        if gigabytes <= 0 or getattr(device, "type", "cpu") != "cuda":
            return None
        return cls(int(gigabytes * 2**30), device)

    def get(self, path: str, sha256: str) -> tuple[Any, Any] | None:
        with self._lock:
            entry = self._entries.get((path, sha256))
            if entry is None:
                return None
            self._entries.move_to_end((path, sha256))
            return entry[0], entry[1]

    def put(self, path: str, sha256: str, tree: Any, token_ids: Any) -> Any:
        """Moves the tree's K/V to the device and keeps it (unless larger than the whole budget);
        returns the tree to use."""
        size = int(tree.nbytes())
        if size > self.max_bytes:
            return tree
        moved = tree.kv_to(self.device)
        with self._lock:
            self._discard_path_locked(path)
            self._entries[(path, sha256)] = (moved, token_ids, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                (old_path, _), (_, _, old_size) = self._entries.popitem(last=False)
                self.bytes -= old_size
                log.info("device tree cache: evicted %s (%d bytes)", old_path, old_size)
        return moved

    def discard_path(self, path: str, keep_sha256: str | None = None) -> None:
        """Drops the entries of `path` (all, or all but the version `keep_sha256`)."""
        with self._lock:
            self._discard_path_locked(path, keep_sha256)

    def _discard_path_locked(self, path: str, keep_sha256: str | None = None) -> None:
        for key in [k for k in self._entries if k[0] == path and k[1] != keep_sha256]:
            self.bytes -= self._entries.pop(key)[2]

    def __len__(self) -> int:
        return len(self._entries)
