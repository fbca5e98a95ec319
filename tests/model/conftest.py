"""Fixtures for engine tests: tiny random checkpoints and the real default model (loaded once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.testing import make_shared, random_transformer, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data dir, so the default model's one-off GGUF conversion is cached across runs."""
    path = REPO / "data"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def default_model(data_dir):
    from model import load_model

    return load_model(data_dir=data_dir, device="cpu")


@pytest.fixture
def tiny_base():
    return random_transformer(tiny_config(vocab_size=128), seed=0)


@pytest.fixture
def tiny_shared(tiny_base):
    return make_shared(tiny_base)
