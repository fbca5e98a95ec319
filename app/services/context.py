"""The application context: settings, database, tensor store, services and the (lazily loaded) model.

Built once at an entry point (`sharedllm serve`, each CLI command, a test) and passed to the UI
pages and CLI commands; nothing else opens connections or loads models. Every service gets what it
needs through its constructor, in dependency order: ingestion (model, store, limits), the library
(store, tree cache, ingestion's re-encoding as its repair), QA (library, model, prompt cache).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.auth import AuthService
from app.config import Settings
from app.ingestion import IngestionService, ProgressFn
from app.services.conversations import ConversationService
from app.services.document_states import DocumentStateService
from app.services.documents import DocumentService
from app.services.language_model import LanguageModel
from app.services.prompt_cache import PromptCacheService
from app.services.qa import QAService
from app.throttle import LoginThrottle
from app.tree_cache import TreeCache
from storage import TensorStore, make_engine, make_session_factory, upgrade

logger = logging.getLogger(__name__)

TENSORS_SUBDIR = "trees"


class AppContext:
    def __init__(
        self,
        settings: Settings,
        model: LanguageModel | None = None,
        model_loader: Callable[[Settings], LanguageModel] | None = None,
    ):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._model = model
        self._model_loader = model_loader or _load_default
        self._model_lock = threading.Lock()
        self.db = make_engine(settings.resolved_database_url)
        upgrade(self.db)
        self.sessions = make_session_factory(self.db)
        self.tensors = TensorStore(settings.data_dir / TENSORS_SUBDIR)
        self.auth = AuthService(
            self.sessions, LoginThrottle(settings.login_max_failures, settings.login_window_s)
        )
        self.ingestion = IngestionService(
            self.sessions, self.tensors, self.model, uploads_dir=settings.uploads_dir,
            limits=settings.extraction_limits(),
            on_ready={"full": self._warm_full_prompt, "actqkv": self._warm_engine_state,
                      "homer": self._warm_engine_state}.get(settings.engine),
            encode_trees=settings.engine == "sharedllm",  # other engines' state: at ingestion or first use
        )
        trees = TreeCache(device_bytes=int(settings.gpu_tree_cache_gb * 2**30), device=lambda: self.model().device)
        self.documents = DocumentService(
            self.sessions, self.tensors, settings.uploads_dir, trees=trees, repair=self.ingestion.ensure_tree
        )
        self.conversations = ConversationService(self.sessions)
        self.prompt_cache = PromptCacheService(self.sessions, self.tensors)
        self.states = DocumentStateService(self.sessions, self.tensors)
        self.qa = QAService(
            self.sessions, self.documents, self.model, self.prompt_cache, self.states,
            max_new_tokens_limit=settings.max_new_tokens_limit, max_temperature=settings.max_temperature,
        )

    def model(self) -> LanguageModel:
        """The loaded model, loaded on first use (seconds), shared by every request."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self._model_loader(self.settings)
        return self._model

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def _warm_full_prompt(self, owner_id: int, document_id: int, progress: ProgressFn | None) -> None:
        """The server's engine `full` reads the whole document: its prompt prefix is prefilled once
        right after ingestion (the document is already `ready`), not on the first question. A failure
        only costs that question its prefill."""
        if progress:
            progress("prompt", 0, 1)
        try:
            self.qa.warm_prompt_cache(owner_id, document_id, "full")
        except Exception:
            logger.exception("could not prepare the full-text prompt cache of document %s", document_id)
        if progress:
            progress("prompt", 1, 1)

    def _warm_engine_state(self, owner_id: int, document_id: int, progress: ProgressFn | None) -> None:
        """The server's engine keeps a per-document state (actqkv's block K/V, homer's leaves): it is
        encoded right after ingestion (with progress), not on the first question. A failure only moves
        that work to the first question."""
        try:
            self.qa.warm_engine_state(owner_id, document_id, self.settings.engine, progress)
        except Exception:
            logger.exception("could not prepare the %s state of document %s", self.settings.engine, document_id)

    def close(self) -> None:
        self.db.dispose()


def _load_default(settings: Settings) -> LanguageModel:
    from model import load_model

    overrides = {"retrieval_vector": settings.retrieval_vector} if settings.retrieval_vector else {}
    lm = load_model(
        settings.model, data_dir=settings.data_dir, device=settings.device, weights=settings.weights,
        threads=settings.threads, **overrides,
    )
    lm.actqkv = settings.actqkv_config()
    lm.homer = settings.homer_config()
    return lm
