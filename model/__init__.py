"""SharedLLM engine: checkpoints, our compact LLaMA-family decoder, context trees, query-aware
search, cross-attention decoding, generation and citations. No database, no web.

The app uses `load_model` -> `LoadedModel` (see docs/model.md and docs/contracts.md).
"""

from model.threads import prefer_passive_wait

prefer_passive_wait()  # before torch is imported below: OpenMP reads it once (model/threads.py)

# ruff: noqa: E402

from model.attribution import Attribution
from model.config import ConfigError, ModelConfig, SharedLLMConfig
from model.decoder import Transformer
from model.generate import GenerationResult, GenerationSettings, TextStream
from model.loading import ModelError
from model.memory import Memory
from model.runtime import LoadedModel, load_model
from model.sharedllm import SharedLLM
from model.tree import ContextTree

__all__ = [
    "Attribution",
    "ConfigError",
    "ContextTree",
    "GenerationResult",
    "GenerationSettings",
    "LoadedModel",
    "Memory",
    "ModelConfig",
    "ModelError",
    "SharedLLM",
    "SharedLLMConfig",
    "TextStream",
    "Transformer",
    "load_model",
]
