"""What Gradio's routes do not scope by user, scoped here: uploads, downloads, exports and logins.

Gradio hands a file in its cache (`/gradio_api/file=...`) to any logged-in user who knows the path,
and accepts any cached path as an event's file input. So an upload is recorded with the account that
sent it (`UploadRegistry`); the upload handler takes only the caller's own, unused uploads, and
Gradio's file route does not serve an upload to anyone else. Exports are never files: a link names a
random, expiring token bound to its owner, and the bytes are rendered when that owner fetches it
(`ExportLinks`). Logins are throttled per client address (`LoginThrottle`; accounts lock themselves
out in `app.auth`). All of it is one ASGI middleware (`AccessGuard`) in front of Gradio's app.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from app.export import MEDIA_TYPES, default_filename, export
from app.throttle import LoginThrottle

logger = logging.getLogger(__name__)

EXPORT_ROUTE = "/sharedllm/export/"
EXPORT_TTL_S = 600.0
Username = str | None  # None: single-user mode (no login in force)


def _key(path: str | Path) -> str:
    return os.path.realpath(str(path))


class UploadRegistry:
    """Which account uploaded which file in Gradio's cache; an upload is consumed by its first use.
    Entries older than `max_age_s` are forgotten (Gradio deletes its cached uploads after an hour)."""

    def __init__(self, max_age_s: float = 2 * 3600.0) -> None:
        self._owner: dict[str, Username] = {}
        self._recorded: dict[str, float] = {}
        self._used: set[str] = set()
        self._max_age_s = max_age_s
        self._lock = threading.Lock()

    def record(self, username: Username, paths: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for old in [k for k, t in self._recorded.items() if now - t > self._max_age_s]:
                self._owner.pop(old, None)
                self._used.discard(old)
                del self._recorded[old]
            for path in paths:  # a new upload of the same bytes lands on the same path: usable again
                self._owner[_key(path)] = username
                self._recorded[_key(path)] = now
                self._used.discard(_key(path))

    def claim(self, username: Username, path: str | Path) -> bool:
        """True (once) when `username` uploaded `path` and has not used it yet."""
        with self._lock:
            key = _key(path)
            if key in self._owner and self._owner[key] == username and key not in self._used:
                self._used.add(key)  # still served to nobody else while (and after) it is ingested
                return True
            return False

    def readable_by(self, username: Username, path: str | Path) -> bool:
        """Files nobody uploaded are Gradio's own (assets, outputs); an upload only to its uploader."""
        with self._lock:
            key = _key(path)
            return key not in self._owner or self._owner[key] == username


@dataclass(frozen=True)
class _ExportLink:
    owner_id: int
    conversation_id: int
    fmt: str
    expires: float


class ExportLinks:
    """Short-lived download links for a conversation's export, usable only by its owner."""

    def __init__(self, transcript: Callable[[int, int], dict[str, Any]], ttl_s: float = EXPORT_TTL_S):
        self._transcript = transcript  # (owner_id, conversation_id) -> transcript, owner-checked
        self._ttl_s = ttl_s
        self._links: dict[str, _ExportLink] = {}
        self._lock = threading.Lock()

    def create(self, owner_id: int, conversation_id: int, fmt: str) -> str:
        """The URL path of a new link (the conversation is checked to be the owner's first)."""
        transcript = self._transcript(owner_id, conversation_id)
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            for old in [t for t, link in self._links.items() if link.expires < now]:
                del self._links[old]
            self._links[token] = _ExportLink(owner_id, conversation_id, fmt, now + self._ttl_s)
        return f"{EXPORT_ROUTE}{token}/{default_filename(transcript, fmt)}"

    def render(self, token: str, owner_id: int | None) -> tuple[str, str, bytes] | None:
        """(file name, media type, bytes) for the link's owner; None for anyone else or when expired."""
        with self._lock:
            link = self._links.get(token)
        if link is None or link.expires < time.monotonic() or link.owner_id != owner_id:
            return None
        transcript = self._transcript(owner_id, link.conversation_id)
        return default_filename(transcript, link.fmt), MEDIA_TYPES[link.fmt], export(transcript, link.fmt)


_FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file=(.+)$")


class AccessGuard:
    """ASGI middleware in front of Gradio's FastAPI app (installed through `launch(app_kwargs=...)`)."""

    def __init__(self, app: Any, uploads: UploadRegistry, exports: ExportLinks,
                 resolve_owner: Callable[[Username], int | None], logins: LoginThrottle):
        self.app = app
        self.uploads, self.exports, self.resolve_owner, self.logins = uploads, exports, resolve_owner, logins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "POST" and path.rstrip("/") == "/login":
            return await self._login(scope, receive, send)
        if method == "POST" and path.rstrip("/") == "/gradio_api/upload":
            return await self._upload(scope, receive, send)
        if method in ("GET", "HEAD") and path.startswith(EXPORT_ROUTE):
            return await self._export(scope, send)
        match = _FILE_ROUTE.match(path)
        if match and not self.uploads.readable_by(_username(scope), unquote(match.group(1))):
            return await _respond(send, 404, b"Not Found")
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        if self.logins.blocked(client):
            logger.warning("login from %s refused: too many failed attempts", client)
            return await _respond(send, 429, b'{"detail": "too many failed logins: try again later"}',
                                  "application/json")
        status = await _forward(self.app, scope, receive, send)
        if status == 200:
            self.logins.succeeded(client)
        elif status in (400, 401):
            self.logins.failed(client)

    async def _upload(self, scope, receive, send):
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
            await send(message)

        status = await _forward(self.app, scope, receive, capture)
        if status == 200:
            try:
                paths = [p for p in json.loads(bytes(body)) if isinstance(p, str)]
            except ValueError:
                paths = []
            self.uploads.record(_username(scope), paths)

    async def _export(self, scope, send):
        token = scope["path"][len(EXPORT_ROUTE):].split("/", 1)[0]
        try:
            owner = self.resolve_owner(_username(scope))
            found = self.exports.render(token, owner) if owner is not None else None
        except Exception:  # an unknown user, a deleted conversation: nothing to hand out
            logger.info("export link refused", exc_info=True)
            found = None
        if found is None:
            return await _respond(send, 404, b"Not Found")
        name, media_type, data = found
        headers = [(b"content-disposition", f'attachment; filename="{name}"'.encode())]
        await _respond(send, 200, data if scope["method"] == "GET" else b"", media_type, headers)


def _username(scope) -> Username:
    """The logged-in user of a request, as Gradio's own `get_current_user` finds it."""
    gradio_app = scope.get("app")
    cookie_id = getattr(gradio_app, "cookie_id", None)
    if cookie_id is None:
        return None
    cookies = {}
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                cookies[key] = val
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return gradio_app.tokens.get(token) if token else None


async def _forward(app, scope, receive, send) -> int:
    """Runs the request through `app`; returns the response status."""
    status = 0

    async def watch(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, watch)
    return status


async def _respond(send, status: int, body: bytes, media_type: str = "text/plain",
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
