"""Tensor store: one safetensors file per (document, model fingerprint), written atomically, checksummed.

Why this shape:
- atomic write (temporary name, fsync file, rename, fsync directory) so a crash leaves either the
  old state or the complete new file, never a half-written one under the final name;
- the sha256 is returned to the caller, who records it in the database *after* the rename, so the row
  marking a tree ready always points at a complete file;
- loading memory-maps the file (`torch.from_file`, copy-on-write) so a large tree costs page cache,
  not private memory, and verifies the checksum first, so a damaged file is never served;
- safetensors only: no pickle, hence no code execution from a tampered file.

Paths given to and returned by the store are relative to its root, so the data directory can move.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorStoreError(Exception):
    """A stored tensor file cannot be used; the document's tree must be re-encoded."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class TensorFileMissing(TensorStoreError):
    """The file recorded in the database does not exist."""


class TensorFileTruncated(TensorStoreError):
    """The file is shorter than its own header says (or its header is cut or unreadable)."""


class TensorChecksumMismatch(TensorStoreError):
    """The file's sha256 differs from the recorded one (bit rot, tampering, partial overwrite)."""


@dataclass(frozen=True)
class StoredTensors:
    path: str  # relative to the store root
    sha256: str
    bytes: int


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_name(fingerprint: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_.-]", "_", fingerprint)[:80]
    if name != fingerprint:  # keep distinct fingerprints distinct after sanitising
        name += "-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return name


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TensorStore:
    """Files live at `<root>/<document_id>/<fingerprint>.safetensors`."""

    # A file verified in this process is not hashed again while its identity (inode, size, mtime,
    # ctime) is unchanged: any write to it, a truncation or a flipped bit, moves its ctime, which user
    # space cannot set back. Only files settled for SETTLED_S are remembered, so a write within the
    # file system's timestamp granularity of the verification cannot hide. Media corruption under an
    # unchanged file is caught by the next process's first read. Hashing a 128K-token tree of a 7B
    # model (15 GB) per question would cost seconds of every answer.
    SETTLED_S = 2.0

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._verified: dict[str, tuple[tuple[int, ...], str]] = {}
        self._verified_lock = threading.Lock()

    def relative_path(self, document_id: int, fingerprint: str) -> str:
        return f"{int(document_id)}/{_safe_name(fingerprint)}{SUFFIX}"

    def absolute(self, path: str) -> Path:
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise ValueError(f"tensor path escapes the store: {path!r}")
        return resolved

    def save(
        self,
        document_id: int,
        fingerprint: str,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str] | None = None,
    ) -> StoredTensors:
        """Write `tensors` atomically; returns the relative path, sha256 and size to record."""
        rel = self.relative_path(document_id, fingerprint)
        final = self.absolute(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        meta = {"fingerprint": fingerprint, "document_id": str(document_id), **(metadata or {})}
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = tmp.stat().st_size
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("stored %d tensors (%d bytes) at %s", len(tensors), size, rel)
        return StoredTensors(path=rel, sha256=digest, bytes=size)

    def verify(self, path: str, sha256: str) -> None:
        """Raise a specific TensorStoreError unless the file is complete and matches `sha256`."""
        absolute = self.absolute(path)
        self._read_header(absolute)
        identity = _file_identity(absolute)
        with self._verified_lock:
            if self._verified.get(str(absolute)) == (identity, sha256):
                return
        actual = file_sha256(absolute)
        if actual != sha256:
            with self._verified_lock:
                self._verified.pop(str(absolute), None)
            raise TensorChecksumMismatch(path, f"sha256 {actual[:12]}... != recorded {sha256[:12]}...")
        if time.time() - identity[2] / 1e9 > self.SETTLED_S and _file_identity(absolute) == identity:
            with self._verified_lock:
                self._verified[str(absolute)] = (identity, sha256)

    def load(self, path: str, sha256: str | None) -> dict[str, torch.Tensor]:
        """Memory-map the file's tensors after checking its structure and (when given) its sha256."""
        absolute = self.absolute(path)
        header, data_start, size = self._read_header(absolute)
        if sha256 is not None:
            self.verify(path, sha256)
        if size == 0 or data_start == size:
            return {name: torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]]) for name, info in header.items()}
        buffer = torch.from_file(str(absolute), shared=False, size=size, dtype=torch.uint8)
        out: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            raw = buffer[data_start + begin : data_start + end]
            dtype = _DTYPES[info["dtype"]]
            if (data_start + begin) % dtype.itemsize:  # unaligned: pay for a copy rather than fail
                raw = raw.clone()
            out[name] = raw.view(dtype).reshape(info["shape"])
        return out

    def metadata(self, path: str) -> dict[str, str]:
        """The string metadata stored with the tensors (fingerprint, document id, ...)."""
        absolute = self.absolute(path)
        with open(absolute, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__", {})

    def _read_header(self, absolute: Path) -> tuple[dict[str, dict], int, int]:
        try:
            size = absolute.stat().st_size
            with open(absolute, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise TensorFileTruncated(absolute, f"{size} bytes, no safetensors header")
                (n,) = struct.unpack("<Q", prefix)
                if 8 + n > size:
                    raise TensorFileTruncated(absolute, f"header claims {n} bytes, file has {size}")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise TensorFileMissing(absolute, "file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TensorFileTruncated(absolute, f"unreadable header ({exc})") from None
        header.pop("__metadata__", None)
        data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + n + data_end > size:
            raise TensorFileTruncated(absolute, f"data needs {8 + n + data_end} bytes, file has {size}")
        if any(info.get("dtype") not in _DTYPES for info in header.values()):
            raise TensorFileTruncated(absolute, "unknown dtype in header")
        return header, 8 + n, size

    def delete(self, path: str) -> None:
        absolute = self.absolute(path)
        with self._verified_lock:
            self._verified.pop(str(absolute), None)
        absolute.unlink(missing_ok=True)
        try:
            absolute.parent.rmdir()  # only succeeds when the document has no other file
        except OSError:
            pass

    def cleanup(self, keep: set[str]) -> list[str]:
        """Remove temporary files and tensor files not in `keep` (relative paths); returns what went.

        Only safe when no ingestion is running (start-up): a file being written looks like an orphan.
        """
        removed: list[str] = []
        if not self.root.exists():
            return removed
        for file in sorted(self.root.rglob("*")):
            if not file.is_file():
                continue
            rel = file.relative_to(self.root).as_posix()
            if file.name.endswith(TMP_SUFFIX) or (file.name.endswith(SUFFIX) and rel not in keep):
                file.unlink(missing_ok=True)
                removed.append(rel)
        for directory in sorted((d for d in self.root.rglob("*") if d.is_dir()), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass
        if removed:
            log.warning("removed %d orphan tensor file(s): %s", len(removed), ", ".join(removed[:10]))
        return removed
