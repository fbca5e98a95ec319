"""Fixtures for the application layer: an AppContext on a temporary data dir, users, and ready
documents made from page texts by the real ingestion steps (without a PDF to extract)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from app_testkit import CONTRACT_PAGES, make_ready_document, write_pdf

from app.config import Settings
from app.services.context import AppContext


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.load({"data_dir": tmp_path / "data"}, environ={})


@pytest.fixture
def ctx(settings, tiny_model):
    context = AppContext(settings, model=tiny_model)
    yield context
    context.close()


@pytest.fixture
def make_doc(ctx) -> Callable[..., int]:
    def make(owner_id: int, name: str = "report.pdf", pages: list[str] | None = None) -> int:
        pages = pages or [
            "Page one. The contract starts on 1 March 2024 between Acme Ltd and Beta GmbH.",
            "Page two. The annual fee is 12,500 euros, payable in advance each January.",
            "Page three. Either party may terminate with ninety days written notice.",
        ]
        return make_ready_document(ctx, owner_id, name, pages)

    return make


@pytest.fixture
def two_users(ctx):
    alice = ctx.auth.add_user("alice", "alice-password-1")
    bob = ctx.auth.add_user("bob", "bob-password-22")
    return alice, bob


@pytest.fixture
def contract_pdf(tmp_path) -> Path:
    return write_pdf(tmp_path / "contract.pdf", CONTRACT_PAGES)
