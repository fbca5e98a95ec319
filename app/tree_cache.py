"""Loaded context trees, one cache in two tiers, keyed by (tree file path, sha256).

Host tier: the last `host_entries` trees as loaded from the store (memory-mapped; their checksum is
verified once, when loaded, not per question). Device tier (CUDA only, bounded in bytes): trees whose
K/V were moved to the GPU: on an H200 with Llama-2-7B shapes a 128K-token document's TTFT is 1.9 s
with the memory copied from the store per question, 0.10 s with the tree resident (docs/benchmarks.md,
"GPU"). A tree lives in one tier. A re-encoded or replaced tree has a new sha256, so it is a new entry
and `discard(path, keep_sha256=...)` drops the old one from both tiers. Callers check ownership
before they ask (the library filters by owner first).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tree file path, sha256)
Entry = tuple[Any, Any]  # (tree, token ids)


class TreeCache:
    def __init__(self, host_entries: int = 8, device_bytes: int = 0,
                 device: Callable[[], Any] | None = None, device_types: tuple[str, ...] = ("cuda",)) -> None:
        """`device` returns the model's device when first needed (the model loads lazily); the device
        tier is used only when that device's type is in `device_types` and `device_bytes` > 0 (on a
        CPU the store's memory map already serves a tree without a copy; tests pass "cpu")."""
        self.host_entries = host_entries
        self.device_types = device_types
        self.device_bytes = int(device_bytes)
        self._device = device
        self._host: OrderedDict[Key, Entry] = OrderedDict()
        self._on_device: OrderedDict[Key, tuple[Any, Any, int]] = OrderedDict()
        self.bytes_on_device = 0
        self._lock = threading.Lock()

    def get(self, path: str, sha256: str) -> Entry | None:
        key = (path, sha256)
        with self._lock:
            for tier in (self._on_device, self._host):
                if key in tier:
                    tier.move_to_end(key)
                    return tier[key][0], tier[key][1]
        return None

    def put(self, path: str, sha256: str, tree: Any, token_ids: Any) -> Entry:
        """Keeps a freshly loaded tree (on the GPU when it fits the device budget); returns it as kept."""
        device = self._gpu()
        size = int(tree.nbytes()) if device is not None else 0
        if device is not None and size <= self.device_bytes:
            tree = tree.kv_to(device)
            with self._lock:
                self._discard_locked(path)
                self._on_device[(path, sha256)] = (tree, token_ids, size)
                self.bytes_on_device += size
                while self.bytes_on_device > self.device_bytes:
                    (old, _), (_, _, old_size) = self._on_device.popitem(last=False)
                    self.bytes_on_device -= old_size
                    log.info("tree cache: evicted %s from the device (%d bytes)", old, old_size)
            return tree, token_ids
        with self._lock:
            self._discard_locked(path)
            self._host[(path, sha256)] = (tree, token_ids)
            while len(self._host) > self.host_entries:
                self._host.popitem(last=False)
        return tree, token_ids

    def discard(self, path: str, keep_sha256: str | None = None) -> None:
        """Drops the entries of `path` (all, or all but the version `keep_sha256`) from both tiers."""
        with self._lock:
            self._discard_locked(path, keep_sha256)

    def _discard_locked(self, path: str, keep_sha256: str | None = None) -> None:
        for key in [k for k in self._host if k[0] == path and k[1] != keep_sha256]:
            del self._host[key]
        for key in [k for k in self._on_device if k[0] == path and k[1] != keep_sha256]:
            self.bytes_on_device -= self._on_device.pop(key)[2]

    def _gpu(self) -> Any | None:
        if self.device_bytes <= 0 or self._device is None:
            return None
        device = self._device()
        return device if getattr(device, "type", str(device)) in self.device_types else None

    def sizes(self) -> tuple[int, int]:
        """(trees in host memory, trees on the device)."""
        with self._lock:
            return len(self._host), len(self._on_device)
