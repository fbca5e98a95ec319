"""Fixtures for engine tests: tiny random checkpoints and the real default model (loaded once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.testing import make_shared, random_transformer, tiny_config



@pytest.fixture(scope="session")
def data_dir(model_data_dir) -> Path:
    """The shared test data dir, so the bundled models' one-off conversions are cached across runs."""
    return model_data_dir


@pytest.fixture
def tiny_base():
    return random_transformer(tiny_config(vocab_size=128), seed=0)


@pytest.fixture
def tiny_shared(tiny_base):
    return make_shared(tiny_base)
