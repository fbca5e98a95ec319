"""Question answering: one turn of a conversation, streamed, cited, timed and persisted.

`QAService.answer` is a generator: it yields one `Asked` once the question is stored (before the
model runs, so a crash mid-answer keeps it), `str` pieces of the answer as the model produces them,
then exactly one `Answer` (the final record). Ownership of the conversation and of every document is
checked before the model sees anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.services.conversations import owned_conversation, title_from_question
from app.services.document_states import DocumentStateService
from app.services.documents import DocumentService
from app.services.engines import get_engine
from app.services.errors import BadRequest
from app.services.language_model import LanguageModel
from app.services.prompt_cache import PromptCacheService
from model.config import ConfigError as ModelConfigError
from storage import Conversation, Message

logger = logging.getLogger(__name__)

UNTRAINED_WARNING = (
    "The SharedLLM cross-attention weights of this model are untrained, so this answer is not grounded "
    "in the documents: use the rag or full engine until trained weights are installed."
)
HISTORY_TURNS = 3  # earlier question/answer pairs given to the model as chat context
MAX_QUESTION_CHARS = 4000


@dataclass
class AnswerSettings:
    """Per-question decoding settings (the UI settings panel, `ask` flags)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_citations: int = 3

    def check(self, max_new_tokens_limit: int, max_temperature: float) -> None:
        """BadRequest unless every value is within the server's limits (before any work is done)."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise BadRequest(f"max_new_tokens must be in 1..{max_new_tokens_limit}, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= max_temperature:
            raise BadRequest(f"temperature must be in 0..{max_temperature:g}, got {self.temperature:g}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p:g}")
        if not 0 <= self.max_citations <= 20:
            raise BadRequest(f"max_citations must be in 0..20, got {self.max_citations}")

    def generation(self) -> Any:
        from model import GenerationSettings

        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=[],
        )


@dataclass(frozen=True)
class Asked:
    """The question is stored: in this conversation (new or continued), as this message."""

    conversation: int
    message_id: int


@dataclass
class Answer:
    answer: str
    engine: str
    conversation: int
    citations: list[dict[str, Any]]
    timings: dict[str, float]
    message_id: int
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `ask --json` document (DESIGN section 6)."""
        out = asdict(self)
        out.pop("message_id")
        notes = out.pop("notes")
        if notes.get("warning"):  # e.g. untrained or small-scale SharedLLM weights
            out["warning"] = notes["warning"]
        return out


def stored_notes(notes: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of an engine's notes, persisted with the answer."""
    return {k: v for k, v in notes.items() if isinstance(v, (str, int, float, bool)) and v not in ("", False)}


def answered_turns(messages: list[Message]) -> list[Message]:
    """Question/answer pairs in order; a question whose answer never came (a crash) is left out."""
    out = []
    for question, reply in zip(messages, messages[1:]):
        if question.role == "user" and reply.role == "assistant":
            out += [question, reply]
    return out


class QAService:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        documents: DocumentService,
        model_provider: Callable[[], LanguageModel],
        prompt_cache: PromptCacheService | None = None,
        states: DocumentStateService | None = None,
        max_new_tokens_limit: int = 1024,
        max_temperature: float = 2.0,
    ):
        self._limits = (max_new_tokens_limit, max_temperature)
        self._sessions = session_factory
        self._documents = documents
        self._model = model_provider  # returns the LoadedModel, loading it on first use
        self._prompt_cache = prompt_cache
        self._states = states

    def answer(
        self,
        owner_id: int,
        question: str,
        document_ids: list[int],
        conversation_id: int | None,
        engine: str,
        settings: AnswerSettings,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Iterator[Asked | str | Answer]:
        """`progress(stage, done, total)` reports work done before the first token: an engine's
        per-document state built on first use (stage: the state's kind, or "calibration"), and homer's
        merge levels ("merge")."""
        t_start = time.perf_counter()
        question = question.strip()
        if not question:
            raise BadRequest("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise BadRequest(f"the question is too long (over {MAX_QUESTION_CHARS} characters)")
        settings.check(*self._limits)
        impl = get_engine(engine)

        history, document_ids = self._conversation_context(owner_id, conversation_id, document_ids)
        if not document_ids:
            raise BadRequest("select at least one document to ask about")
        lm = self._model()
        docs = self._documents.load_for_qa(
            owner_id, document_ids, lm.fingerprint if impl.needs_tree else None
        )
        asked = self._store_question(owner_id, conversation_id, document_ids, engine, question)
        yield asked

        kind = getattr(impl, "state_kind", None)  # optional member: engines with per-document state
        try:
            if kind and self._states is not None:
                self._states.ensure(kind, lm, docs, progress)  # built and persisted on first use
            merging = (lambda done, total: progress("merge", done, total)) if progress else None
            prepared = impl.prepare(lm, question, docs, history, merging)
        except ModelConfigError as exc:  # e.g. documents beyond what the engine's settings can read
            raise BadRequest(f"{engine} cannot read these documents: {exc}") from None
        if impl.needs_tree and not lm.weights_trained:
            prepared.notes["warning"] = UNTRAINED_WARNING
            logger.warning(UNTRAINED_WARNING)
        elif impl.needs_tree and lm.weights_warning:
            prepared.notes["warning"] = lm.weights_warning
        prompt_ids, key = self._prompt_and_prefix_key(lm, prepared, docs[0].id)
        prefix = self._prompt_cache.load(key) if key is not None else prepared.prefix
        captured: list[Any] = []
        stream = lm.generate(
            prepared.messages, memory=prepared.memory, settings=settings.generation(), prompt_ids=prompt_ids,
            prefix=prefix, on_prefix=captured.append if key is not None and prefix is None else None,
        )
        ttft_s = None
        pieces = []
        for piece in stream:
            if ttft_s is None:
                ttft_s = time.perf_counter() - t_start
            pieces.append(piece)
            yield piece
        result = stream.result
        total_s = time.perf_counter() - t_start
        if captured:  # after the answer streamed: persisting costs the user no waiting for the first token
            try:
                self._prompt_cache.save(key, captured[0])
            except Exception:  # a cache that cannot be written only costs the next question its prefill
                logger.exception("could not persist the prompt cache of document %s", key.document_id)
        text = result.text if result.text else "".join(pieces)
        citations = impl.citations(lm, docs, prepared, result, settings.max_citations)
        timings = {
            "retrieval_s": round(prepared.retrieval_s, 4),
            "ttft_s": round(ttft_s if ttft_s is not None else total_s, 4),
            "total_s": round(total_s, 4),
            "new_tokens": int(result.new_tokens),
            "tokens_per_s": round(float(result.tokens_per_s), 2),
            "prompt_tokens": len(prompt_ids),
            "cached_prompt_tokens": prefix.length if prefix is not None else 0,
        }
        conv_id = asked.conversation
        message_id = self._store_answer(conv_id, engine, text, citations, timings, stored_notes(prepared.notes))
        logger.info(
            "owner %s conversation %s: %s answered in %.2f s (%d tokens)",
            owner_id,
            conv_id,
            engine,
            total_s,
            timings["new_tokens"],
        )
        yield Answer(text, engine, conv_id, citations, timings, message_id, prepared.notes)

    def warm_prompt_cache(self, owner_id: int, document_id: int, engine: str = "full") -> int:
        """Computes and persists `engine`'s prompt prefix for one document ahead of any question (after
        ingestion), so even the first question prefills only itself. Returns the cached token count
        (0 when the engine has no cacheable prefix, it is too short, or it was already stored)."""
        impl = get_engine(engine)
        if self._prompt_cache is None or impl.needs_tree:
            return 0
        lm = self._model()
        docs = self._documents.load_for_qa(owner_id, [document_id], None)
        _, key = self._prompt_and_prefix_key(lm, impl.prepare(lm, "?", docs, []), document_id)
        if key is None or self._prompt_cache.has(key):
            return 0
        t0 = time.perf_counter()
        self._prompt_cache.save(key, lm.prefix_states(list(key.token_ids)))
        logger.info("document %s: %s prompt prefix of %d tokens cached in %.1f s", document_id, engine,
                    len(key.token_ids), time.perf_counter() - t0)
        return len(key.token_ids)

    def warm_engine_state(self, owner_id: int, document_id: int, engine: str,
                          progress: Callable[[str, int, int], None] | None = None) -> int:
        """Builds and persists `engine`'s per-document state (actqkv, homer) of one document ahead of
        any question (after ingestion, when it is the server's engine); returns 1 if it was encoded,
        0 if already stored or the engine keeps none."""
        kind = getattr(get_engine(engine), "state_kind", None)
        if self._states is None or not kind:
            return 0
        lm = self._model()
        docs = self._documents.load_for_qa(owner_id, [document_id], None)
        return self._states.ensure(kind, lm, docs, progress)

    def _prompt_and_prefix_key(self, lm: Any, prepared: Any, document_id: int) -> tuple[list[int], Any]:
        """The prompt's token ids and the cache key of its persistable prefix (None: nothing to cache)."""
        if prepared.prompt_ids is not None:  # assembled by the engine, its prefix already persisted
            return prepared.prompt_ids, None
        prompt_ids, prefix_len = lm.prompt_ids(prepared.messages, prepared.cache_prefix)
        if not prefix_len or self._prompt_cache is None or prepared.memory is not None:
            return prompt_ids, None
        return prompt_ids, self._prompt_cache.key(lm, document_id, prompt_ids[:prefix_len])

    def answer_all(self, *args: Any, **kwargs: Any) -> Answer:
        """Non-streaming convenience: the final record."""
        final = None
        for item in self.answer(*args, **kwargs):
            if isinstance(item, Answer):
                final = item
        assert final is not None
        return final

    def _conversation_context(
        self, owner_id: int, conversation_id: int | None, document_ids: list[int]
    ) -> tuple[list[dict[str, str]], list[int]]:
        """Earlier turns (as chat messages) and the document selection; an existing conversation keeps
        its documents unless the caller selects others."""
        if conversation_id is None:
            return [], list(dict.fromkeys(document_ids))
        with self._sessions() as session:
            conv = owned_conversation(session, owner_id, conversation_id)
            turns = answered_turns(conv.messages)[-2 * HISTORY_TURNS :]
            history = [{"role": m.role, "content": m.text} for m in turns]
            ids = list(dict.fromkeys(document_ids)) or list(conv.document_ids or [])
            return history, ids

    def _store_question(
        self, owner_id: int, conversation_id: int | None, document_ids: list[int], engine: str, question: str
    ) -> Asked:
        with self._sessions.begin() as session:
            if conversation_id is None:
                conv = Conversation(
                    owner_id=owner_id, title=title_from_question(question), document_ids=document_ids, engine=engine
                )
                session.add(conv)
                session.flush()
            else:
                conv = owned_conversation(session, owner_id, conversation_id)
                conv.document_ids = document_ids
                conv.engine = engine
                if not conv.title:
                    conv.title = title_from_question(question)
            message = Message(conversation_id=conv.id, role="user", text=question, engine=engine)
            session.add(message)
            session.flush()
            return Asked(conv.id, message.id)

    def _store_answer(
        self,
        conversation_id: int,
        engine: str,
        text: str,
        citations: list[dict[str, Any]],
        timings: dict[str, float],
        notes: dict[str, Any],
    ) -> int:
        with self._sessions.begin() as session:
            reply = Message(
                conversation_id=conversation_id, role="assistant", text=text, citations=citations,
                timings=timings, notes=notes, engine=engine,
            )
            session.add(reply)
            session.flush()
            return reply.id
