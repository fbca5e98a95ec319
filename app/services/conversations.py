"""Conversations and their messages, always scoped to one owner."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.services.errors import NotFound
from storage import Conversation, Document, Message

logger = logging.getLogger(__name__)

TITLE_CHARS = 80


def title_from_question(question: str) -> str:
    title = " ".join(question.split())
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1] + "…"


def owned_conversation(session: Session, owner_id: int, conversation_id: int) -> Conversation:
    """The conversation if it belongs to owner_id, else NotFound (same error as a missing id)."""
    conv = session.scalar(
        select(Conversation).where(Conversation.id == conversation_id, Conversation.owner_id == owner_id)
    )
    if conv is None:
        raise NotFound(f"conversation {conversation_id} not found")
    return conv


def message_dict(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "role": message.role,
        "text": message.text,
        "citations": message.citations or [],
        "timings": message.timings or {},
        "notes": message.notes or {},
        "engine": message.engine,
        "created_at": message.created_at.isoformat() if message.created_at else None,
    }


def conversation_dict(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "document_ids": list(conv.document_ids or []),
        "engine": conv.engine,
        "created_at": conv.created_at.isoformat() if conv.created_at else None,
        "updated_at": conv.updated_at.isoformat() if conv.updated_at else None,
    }


class ConversationService:
    def __init__(self, session_factory: sessionmaker[Session]):
        self._sessions = session_factory

    def list(self, owner_id: int) -> list[dict[str, Any]]:
        """Newest first."""
        with self._sessions() as session:
            convs = session.scalars(
                select(Conversation)
                .where(Conversation.owner_id == owner_id)
                .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            )
            return [conversation_dict(c) for c in convs]

    def get(self, owner_id: int, conversation_id: int) -> dict[str, Any]:
        with self._sessions() as session:
            return conversation_dict(owned_conversation(session, owner_id, conversation_id))

    def messages(self, owner_id: int, conversation_id: int) -> list[dict[str, Any]]:
        with self._sessions() as session:
            conv = owned_conversation(session, owner_id, conversation_id)
            return [message_dict(m) for m in conv.messages]

    def create(self, owner_id: int, document_ids: list[int], engine: str, title: str = "") -> dict[str, Any]:
        with self._sessions.begin() as session:
            conv = Conversation(
                owner_id=owner_id, title=title, document_ids=list(document_ids), engine=engine
            )
            session.add(conv)
            session.flush()
            return conversation_dict(conv)

    def rename(self, owner_id: int, conversation_id: int, title: str) -> None:
        with self._sessions.begin() as session:
            owned_conversation(session, owner_id, conversation_id).title = title.strip()[:512]

    def delete(self, owner_id: int, conversation_id: int) -> None:
        with self._sessions.begin() as session:
            session.delete(owned_conversation(session, owner_id, conversation_id))
        logger.info("owner %s deleted conversation %s", owner_id, conversation_id)

    def transcript(self, owner_id: int, conversation_id: int) -> dict[str, Any]:
        """Everything an export needs. Documents deleted since are listed by id as '(deleted)'."""
        with self._sessions() as session:
            conv = owned_conversation(session, owner_id, conversation_id)
            ids = list(conv.document_ids or [])
            names = {
                d.id: d.name
                for d in session.scalars(
                    select(Document).where(Document.id.in_(ids), Document.owner_id == owner_id)
                )
            }
            out = conversation_dict(conv)
            out["documents"] = [{"id": i, "name": names.get(i, f"document {i} (deleted)")} for i in ids]
            out["messages"] = [message_dict(m) for m in conv.messages]
            return out
