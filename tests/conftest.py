"""Shared fixtures. Add fixtures here; do not remove others' (several packages rely on this file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_data_dir() -> Path:
    """A data dir kept across runs (build/ is git-ignored) so the default GGUF is converted once.

    Override with SHAREDLLM_TEST_DATA_DIR.
    """
    path = Path(os.environ.get("SHAREDLLM_TEST_DATA_DIR", REPO / "build" / "test-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(model_data_dir):
    """A tiny random LLaMA with the default model's real tokenizer (fast; answers are gibberish)."""
    from model.testing import tiny_loaded_model

    return tiny_loaded_model(model_data_dir)


@pytest.fixture(scope="session")
def default_model(model_data_dir):
    """The real default model (Qwen2.5-Coder-0.5B-Instruct), loaded once per session."""
    from model import load_model

    return load_model(None, data_dir=model_data_dir, device="cpu")


@pytest.fixture(scope="session")
def smollm2_model(model_data_dir):
    """The real small bundled model (SmolLM2-135M-Instruct) with its trained SharedLLM weights."""
    from model import load_model

    return load_model("smollm2", data_dir=model_data_dir, device="cpu")
