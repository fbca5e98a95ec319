"""PDF text extraction, page by page, in a child process with wall-clock and memory limits.

Why a child process: a hostile or broken PDF can make a parser loop or allocate without bound, and
the server must survive it. The child (`app.pdf_worker`) sets RLIMIT_AS before importing pypdf; the
parent kills its whole process group at the deadline. Cheap checks (missing, empty, too large, not a
PDF) happen here first so they never cost a process start.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ProgressFn = Callable[[str, int, int], None]

OK = "ok"
NEEDS_PASSWORD = "needs_password"
NO_TEXT_LAYER = "no_text_layer"
FAILED = "failed"


@dataclass(frozen=True)
class ExtractionLimits:
    """Bounds for one extraction; the defaults fit a 2-core / few-GiB server."""

    timeout_s: float = 300.0  # wall clock for the child, start-up included
    memory_bytes: int = 2 * 1024**3  # RLIMIT_AS of the child (virtual address space)
    max_file_bytes: int = 200 * 1024**2
    max_pages: int = 5000


@dataclass
class ExtractionResult:
    status: str  # ok | needs_password | no_text_layer | failed
    pages: list[str] = field(default_factory=list)  # normalised text, one entry per page
    n_pages: int = 0
    reason: str | None = None  # why, for every status but ok
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # of the child, as reported by itself


def precheck(path: Path, limits: ExtractionLimits) -> ExtractionResult | None:
    """A failed result for files that need no parser to reject, else None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ExtractionResult(FAILED, reason="file not found")
    if size == 0:
        return ExtractionResult(FAILED, reason="empty file (0 bytes)")
    if size > limits.max_file_bytes:
        return ExtractionResult(FAILED, reason=f"too large: {size} bytes (limit {limits.max_file_bytes})")
    with open(path, "rb") as f:
        head = f.read(1024)
    if b"%PDF-" not in head:
        return ExtractionResult(FAILED, reason="not a PDF: no %PDF- header")
    return None


def extract_pdf(
    path: Path | str, limits: ExtractionLimits | None = None, progress: ProgressFn | None = None
) -> ExtractionResult:
    """Extract normalised page texts; never raises for a bad file, reports it in the result."""
    limits = limits or ExtractionLimits()
    path = Path(path)
    started = time.monotonic()
    result = precheck(path, limits) or _run_child(path, limits, progress)
    result.seconds = time.monotonic() - started
    log.info("extracted %s: %s (%d pages, %.2fs) %s", path.name, result.status, result.n_pages,
             result.seconds, result.reason or "")
    return result


def _child_command(path: Path, limits: ExtractionLimits) -> list[str]:
    return [sys.executable, "-m", "app.pdf_worker", str(path), "--max-pages", str(limits.max_pages),
            "--memory-bytes", str(limits.memory_bytes)]


def _run_child(path: Path, limits: ExtractionLimits, progress: ProgressFn | None) -> ExtractionResult:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    deadline = time.monotonic() + limits.timeout_s
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(_child_command(path, limits), stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT, env=env, start_new_session=True)
        try:
            payload = _read_until_result(proc, deadline, progress)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        if payload is not None:
            return ExtractionResult(
                status=payload["status"], pages=payload["pages"], n_pages=payload["n_pages"],
                reason=payload["reason"], peak_rss_bytes=payload["maxrss_kb"] * 1024,
            )
        if time.monotonic() >= deadline:
            return ExtractionResult(FAILED, reason=f"timeout: extraction took longer than {limits.timeout_s:g} s")
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 2000))
        tail = stderr.read().decode(errors="replace").strip().splitlines()
        log.warning("extraction child of %s died with %s: %s", path.name, proc.returncode, tail[-3:])
        if proc.returncode == -signal.SIGKILL or any("MemoryError" in line for line in tail):
            return ExtractionResult(FAILED, reason="out of memory: the extraction process was killed")
        return ExtractionResult(FAILED, reason=f"extraction crashed (exit code {proc.returncode})")


def _read_until_result(proc: subprocess.Popen, deadline: float, progress: ProgressFn | None) -> dict | None:
    """Read the child's JSON lines until its result, EOF or the deadline."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                return None
            data = os.read(proc.stdout.fileno(), 1 << 20)
            if not data:
                return None
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if "result" in message:
                    return message["result"]
                if progress is not None and "progress" in message:
                    progress("extract", *message["progress"])
    finally:
        selector.close()
