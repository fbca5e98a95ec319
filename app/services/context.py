"""The application context: settings, database, tensor store, services and the (lazily loaded) model.

Built once at an entry point (`sharedllm serve`, each CLI command, a test) and passed to the UI
pages and CLI commands; nothing else opens connections or loads models.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.auth import AuthService
from app.config import Settings
from app.throttle import LoginThrottle
from app.services.conversations import ConversationService
from app.services.documents import DocumentService
from app.services.prompt_cache import PromptCacheService
from app.services.qa import QAService
from storage import TensorStore, make_engine, make_session_factory, upgrade

logger = logging.getLogger(__name__)

TENSORS_SUBDIR = "trees"


class AppContext:
    def __init__(
        self,
        settings: Settings,
        model: Any | None = None,
        model_loader: Callable[[Settings], Any] | None = None,
    ):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = make_engine(settings.resolved_database_url)
        upgrade(self.db)
        self.sessions = make_session_factory(self.db)
        self.tensors = TensorStore(settings.data_dir / TENSORS_SUBDIR)
        self.auth = AuthService(
            self.sessions, LoginThrottle(settings.login_max_failures, settings.login_window_s)
        )
        self.documents = DocumentService(self.sessions, self.tensors, settings.uploads_dir)
        self.documents.ensure_tree = lambda owner_id, doc_id: self.ingestion.ensure_tree(owner_id, doc_id)
        self.conversations = ConversationService(self.sessions)
        self.prompt_cache = PromptCacheService(self.sessions, self.tensors)
        self.qa = QAService(
            self.sessions, self.documents, self.model, self.prompt_cache,
            max_new_tokens_limit=settings.max_new_tokens_limit, max_temperature=settings.max_temperature,
        )
        self._model = model
        self._model_loader = model_loader or _load_default
        self._model_lock = threading.Lock()
        self._ingestion: Any | None = None
        if model is not None:
            self._attach_device_trees()

    def model(self) -> Any:
        """The LoadedModel, loaded on first use (seconds), shared by every request."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._model_loader(self.settings)
                    self._attach_device_trees()
        return self._model

    def _attach_device_trees(self) -> None:
        """On CUDA, questions read trees kept on the GPU (settings.gpu_tree_cache_gb)."""
        from app.tree_cache import DeviceTreeCache

        self.documents.device_trees = DeviceTreeCache.for_model(self._model, self.settings.gpu_tree_cache_gb)

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def ingestion(self) -> Any:
        from app.services.ingest import Ingestion

        if self._ingestion is None:
            self._ingestion = Ingestion(self)
        return self._ingestion

    def close(self) -> None:
        self.db.dispose()


def _load_default(settings: Settings) -> Any:
    from model import load_model

    overrides = {"retrieval_vector": settings.retrieval_vector} if settings.retrieval_vector else {}
    return load_model(
        settings.model, data_dir=settings.data_dir, device=settings.device, weights=settings.weights,
        threads=settings.threads, **overrides,
    )
