"""Fixtures for ingestion tests: a migrated SQLite data dir and services on the fake or tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingestion_fakes import FakeModel, FakeTree  # noqa: E402

from app.extraction import ExtractionLimits  # noqa: E402
from app.ingestion import IngestionService  # noqa: E402
from app.services.documents import DocumentService  # noqa: E402
from storage import TensorStore, User, make_engine, make_session_factory, upgrade  # noqa: E402
from storage.db import sqlite_url  # noqa: E402


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def engine(data_dir):
    eng = make_engine(sqlite_url(data_dir))
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine):
    return make_session_factory(engine)


@pytest.fixture
def users(sessions) -> tuple[int, int]:
    with sessions.begin() as s:
        alice, bob = User(username="alice"), User(username="bob")
        s.add_all([alice, bob])
        s.flush()
        return alice.id, bob.id


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


def make_service(sessions, data_dir, model) -> IngestionService:
    """The production ingestion service on `model` (its limits as Settings builds them by default)."""
    return IngestionService(sessions, TensorStore(data_dir / "trees"), lambda: model,
                            uploads_dir=data_dir / "uploads", limits=ExtractionLimits())


def make_library(sessions, data_dir, service, tree_factory=FakeTree.from_tensors) -> DocumentService:
    """The production library over the same store, repairing trees with `service` as the app wires it."""
    return DocumentService(sessions, TensorStore(data_dir / "trees"), data_dir / "uploads",
                           repair=service.ensure_tree, tree_factory=tree_factory)


@pytest.fixture
def service(sessions, data_dir, fake_model) -> IngestionService:
    return make_service(sessions, data_dir, fake_model)


@pytest.fixture
def library(sessions, data_dir, service) -> DocumentService:
    return make_library(sessions, data_dir, service)
