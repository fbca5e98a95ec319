"""Engines' persisted per-document states (ActQKV's block K/V, HOMER's leaves): loaded or built on
first use, so a library pays only for the engines it uses.

A document's state depends on the model (checkpoint, compute dtype), the engine's knobs and the text
around the document in the prompt (`prompt_layout.actqkv_layout`): all of it is in the fingerprint, so a
state is used only by the configuration that made it. A digest of what the stream is made from (the
header, the document's name and page texts) is compared before use (a renamed document has another
"Document: name" line), and a file that fails verification is dropped and re-encoded
(`DerivedStateStore`). Each engine's kind of state is a `StateKind` (`STATE_KINDS`); an engine names
its kind in `state_kind`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.services.derived_state import DerivedStateStore
from app.services.documents import DocumentContext
from app.services.prompt_layout import actqkv_layout, document_stream, homer_stream, stream_digest
from storage import TensorStore

logger = logging.getLogger(__name__)

DIGEST_KEY = "source_digest"  # sha256 of what the stream was made from (prompt_layout.stream_digest)
Progress = Callable[[str, int, int], None]


class StateKind(Protocol):
    """One engine's per-document state: how it is identified, encoded and (de)serialised."""

    name: str  # also where a loaded state sits in DocumentContext.extra

    def fingerprint(self, lm: Any) -> str: ...

    def encode(self, lm: Any, doc: DocumentContext, progress: Callable[[int, int], None] | None) -> Any: ...

    def from_tensors(self, tensors: dict[str, torch.Tensor], lm: Any) -> Any: ...

    def settings(self, lm: Any) -> dict: ...  # saved in the file's metadata


class ActQKVStates:
    name = "actqkv"

    def fingerprint(self, lm):
        return lm.actqkv_fingerprint(actqkv_layout(lm))

    def encode(self, lm, doc, progress):
        return lm.encode_blocks(*document_stream(lm, doc), progress)

    def from_tensors(self, tensors, lm):
        from model.block_state import BlockState

        return BlockState.from_tensors(tensors, lm.actqkv)

    def settings(self, lm):
        return lm.actqkv.to_dict()


class HomerStates:
    name = "homer"

    def fingerprint(self, lm):
        return lm.homer_fingerprint(actqkv_layout(lm))  # the same header text around the documents

    def encode(self, lm, doc, progress):
        return lm.encode_homer(*homer_stream(lm, doc), progress)

    def from_tensors(self, tensors, lm):
        from model.homer_state import HomerState

        return HomerState.from_tensors(tensors, lm.homer_config())

    def settings(self, lm):
        return lm.homer_config().to_dict()


STATE_KINDS: dict[str, StateKind] = {k.name: k for k in (ActQKVStates(), HomerStates())}


class DocumentStateService:
    def __init__(self, sessions: sessionmaker[Session], tensors: TensorStore) -> None:
        self._store = DerivedStateStore(sessions, tensors)
        self._calibration_dir = Path(tensors.root) / "calibration"

    def has(self, kind: str, lm: Any, document_id: int) -> bool:
        return self._store.has(document_id, STATE_KINDS[kind].fingerprint(lm))

    def ensure(self, kind: str, lm: Any, docs: list[DocumentContext], progress: Progress | None = None) -> int:
        """Attaches each document's `kind` state (loaded, or encoded and persisted); returns how many
        were encoded. `progress(kind, done, total)` reports the encoding's steps."""
        impl = STATE_KINDS[kind]
        if kind == "homer":
            self.ensure_homer_calibration(lm, progress)
        fingerprint = impl.fingerprint(lm)
        encoded = 0
        for doc in docs:
            digest = stream_digest(lm, doc)
            state = None
            tensors = self._store.load(doc.id, fingerprint)
            if tensors is not None:
                if bytes(tensors.get(DIGEST_KEY, torch.zeros(0, dtype=torch.uint8)).tolist()).hex() == digest:
                    state = impl.from_tensors(tensors, lm)
                else:
                    logger.info("%s state of document %s was made from other text: re-encoding", kind, doc.id)
                    self._store.drop(doc.id, fingerprint)
            if state is None:
                state = self._encode(impl, lm, doc, digest, fingerprint, progress)
                encoded += 1
            doc.extra[kind] = state
        return encoded

    def _encode(self, impl: StateKind, lm: Any, doc: DocumentContext, digest: str, fingerprint: str,
                progress: Progress | None) -> Any:
        t0 = time.perf_counter()
        report = (lambda done, total: progress(impl.name, done, total)) if progress else None
        state = impl.encode(lm, doc, report)
        seconds = time.perf_counter() - t0
        metadata = {"kind": impl.name, "config": json.dumps(impl.settings(lm), sort_keys=True)}
        tensors = {**state.to_tensors(), DIGEST_KEY: torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)}
        written = self._store.save(doc.id, fingerprint, tensors, metadata)
        n = len(state.token_ids)
        logger.info("document %s: %s state of %d tokens encoded in %.1f s (%.0f tokens/s, %d bytes, "
                    "%.0f bytes per token)", doc.id, impl.name, n, seconds, n / max(seconds, 1e-9), written,
                    written / max(1, n))
        return state

    def ensure_homer_calibration(self, lm: Any, progress: Progress | None = None) -> None:
        """HOMER's significance bias for the model: loaded from the store's calibration folder, or
        computed (model/homer_calibration.py) and written atomically; once per model and knobs."""
        if lm.homer_bias is not None:
            return
        from safetensors.torch import load_file, save_file

        path = self._calibration_dir / f"{lm.homer_calibration_id()}.safetensors"
        if path.is_file():
            try:
                bias = load_file(str(path))["bias"]
                if bias.ndim == 2:  # the identity names the checkpoint: its layers are the rows
                    lm.homer_bias = bias
                    return
            except Exception as exc:  # damaged: computed again below
                logger.warning("HOMER calibration %s unusable (%s): recomputing it", path, exc)
        if progress:
            progress("calibration", 0, 1)
        t0 = time.perf_counter()
        bias = lm.calibrate_homer()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_file({"bias": bias.contiguous()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        lm.homer_bias = bias
        logger.info("HOMER calibration of %s computed in %.1f s", lm.name, time.perf_counter() - t0)
        if progress:
            progress("calibration", 1, 1)
