"""Failed-login counting shared by the account check (per account) and the web guard (per client)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LoginThrottle:
    """At most `max_failures` failed logins per key within `window_s`; then the key is refused until
    its oldest failure leaves the window."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window_s, self._clock = max_failures, window_s, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str) -> list[float]:
        now = self._clock()
        kept = [t for t in self._failures.get(key, []) if now - t < self.window_s]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def blocked(self, key: str) -> bool:
        with self._lock:
            return len(self._recent(key)) >= self.max_failures

    def failed(self, key: str) -> None:
        with self._lock:
            self._failures[key] = [*self._recent(key), self._clock()]

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
