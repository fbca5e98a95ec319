"""Typed settings for the application layer.

One object, built once at the entry point (CLI or server) from flags, then environment variables,
then defaults, and passed down. Nothing below the entry point reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.extraction import ExtractionLimits

# The engine questions use unless the user picks another (SHAREDLLM_ENGINE, the Settings tab, --engine):
# the best engine for the default model on the project's own quality benchmark (real-PDF QA, the
# `quality-qwen2.5-0.5b` section of docs/benchmarks.md), until trained SharedLLM weights for that model
# pass their quality gate (the training issue). The Settings tab shows the reason to users.
DEFAULT_ENGINE = "rag"
DEFAULT_ENGINE_REASON = (
    "best on the project's real-PDF QA benchmark with the default model (Qwen2.5-Coder-0.5B-Instruct, "
    "2026-12-01: rag 26/35, full 18/35, sharedllm 1/35 questions answered; with actqkv in the same run "
    "on 16 of them: rag 12, full 12, actqkv 10, sharedllm 0; docs/benchmarks.md). "
    "full reads the whole document instead (up to 32K tokens; its prompt is cached after the first "
    "question); actqkv reads whole documents of any length from stored block K/V, the blocks matching "
    "the question's words first, and answers about a second after the question: as many of 67 real-PDF "
    "questions as rag in one run per PDF set (49 each; 13 against 11 of 16 on a 92.6K-token manual), but "
    "its state takes 60-100 tokens/s to build on a CPU (minutes per long PDF); homer merges whole documents per "
    "question (8/12 in a five-engine run where rag answered 8, full 9) but confuses facts past 16K "
    "tokens and takes minutes per question there on a CPU; sharedllm has no trained "
    "cross-attention for this model yet, so its answers are not grounded in the documents"
)
ENV_PREFIX = "SHAREDLLM_"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    """Application settings. Every field can be set by `SHAREDLLM_<FIELD>` (upper case)."""

    # Where the SQLite database, the tensor files and the private copies of uploads live.
    data_dir: Path = Path("data")
    # SQLAlchemy URL; None means SQLite in data_dir (`sqlite:///<data_dir>/sharedllm.db`).
    database_url: str | None = None
    # A bundled model by name ("qwen2.5-0.5b", "smollm2"), or a Hugging Face checkpoint directory or
    # .gguf file of a LLaMA-family model; None means the default, Qwen2.5-Coder-0.5B-Instruct.
    model: str | None = None
    # SharedLLM weights directory (xattn.safetensors + sharedllm_config.json); None means the trained
    # weights bundled in assets/ for the default model, if present.
    weights: str | None = None
    # Retrieval vector of tree nodes and questions: "last" (the paper) or "mean" (see docs/benchmarks.md,
    # "Retrieval probe"). None means what the SharedLLM weights were trained with (the bundled weights:
    # "mean"; fresh, untrained cross-attention: "last"). Part of the tree fingerprint: changing it
    # re-encodes documents on demand.
    retrieval_vector: str | None = None
    # ActQKV knobs as JSON overriding model.block_retrieval.ActQKVConfig, e.g. '{"budget": 32}' (part of
    # the stored states' fingerprint: documents are re-encoded for the `actqkv` engine on demand).
    actqkv: str | None = None
    # HOMER's knobs as a JSON object (model.homer.HomerConfig fields), e.g. '{"chunk_tokens": 8192}';
    # the per-document ones are part of the stored leaves' fingerprint
    homer: str | None = None
    # "auto" picks CUDA when available, else CPU.
    device: str = "auto"
    # torch's CPU threads; None keeps torch's default (one per core). OMP_WAIT_POLICY is set to PASSIVE
    # before torch loads unless you set it (model/threads.py: 6.5x faster decoding on shared cores).
    threads: int | None = None
    # GPU memory (GiB) for the trees of recently asked documents (CUDA only; 0 disables): a question
    # on a cached document gathers its memory on the GPU instead of copying it from the store.
    gpu_tree_cache_gb: float = 8.0
    # Web server bind address. 127.0.0.1 by default: expose it deliberately (docker sets 0.0.0.0).
    host: str = "127.0.0.1"
    port: int = 7860
    # Largest accepted upload, per file. Enforced by Gradio (max_file_size) and by ingestion, whose
    # extraction limits are built from these settings (`extraction_limits`): one number everywhere.
    max_upload_mb: int = 200
    # PDF extraction in its child process: pages, wall clock and address space.
    max_pages: int = 5000
    extraction_timeout_s: float = 300.0
    extraction_memory_mb: int = 2048
    # Gradio queue: events running at once per handler (one model, so generation is serialised) and
    # how many may wait before new ones are refused with a "queue full" message.
    concurrency_limit: int = 1
    queue_max_size: int = 32
    # Answer defaults (the UI settings panel and `ask` flags override them per question).
    engine: str = DEFAULT_ENGINE
    max_new_tokens: int = 256
    temperature: float = 0.0
    # The most any request may ask for (the UI slider's end; the API and the CLI are held to it too).
    max_new_tokens_limit: int = 1024
    max_temperature: float = 2.0
    # Logins: an account is locked after this many failed attempts within the window (until the
    # oldest leaves it); one client address is refused (HTTP 429) after the per-client count.
    login_max_failures: int = 5
    login_max_failures_per_client: int = 20
    login_window_s: float = 900.0
    # Passages cited under each answer.
    max_citations: int = 3
    # First-run admin account (docker): created at start-up when no account exists yet.
    admin_user: str = "admin"
    admin_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from app.services.engines import ENGINES  # the one registry of engines

        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.retrieval_vector not in (None, "last", "mean"):
            raise ConfigError(f"retrieval_vector must be 'last' or 'mean', got {self.retrieval_vector!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        for name in (
            "max_upload_mb",
            "max_pages",
            "extraction_memory_mb",
            "concurrency_limit",
            "queue_max_size",
            "max_new_tokens",
            "max_new_tokens_limit",
            "max_citations",
            "login_max_failures",
            "login_max_failures_per_client",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actqkv is not None:
            self.actqkv_config()  # validated here: a bad value fails at start-up, naming the setting
        if self.homer is not None:
            self.homer_config()
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.gpu_tree_cache_gb < 0:
            raise ConfigError(f"gpu_tree_cache_gb must be >= 0, got {self.gpu_tree_cache_gb}")
        if not 0 <= self.temperature <= self.max_temperature:
            raise ConfigError(f"temperature must be in 0..{self.max_temperature}, got {self.temperature}")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(
                f"max_new_tokens ({self.max_new_tokens}) is over max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if self.login_window_s <= 0:
            raise ConfigError(f"login_window_s must be > 0, got {self.login_window_s}")

    def actqkv_config(self) -> Any:
        """The ActQKV configuration these settings ask for (defaults when `actqkv` is unset)."""
        from model.block_retrieval import ActQKVConfig

        return _knobs(ActQKVConfig, self.actqkv, "ACTQKV", "ActQKV")

    def homer_config(self) -> Any:
        """The HOMER configuration these settings ask for (defaults when `homer` is unset)."""
        from model.homer import HomerConfig

        return _knobs(HomerConfig, self.homer, "HOMER", "HOMER")

    @property
    def resolved_database_url(self) -> str:
        """database_url, else SQLite in data_dir (storage's one definition of that URL)."""
        from storage.db import sqlite_url

        return self.database_url or sqlite_url(self.data_dir)

    def extraction_limits(self) -> ExtractionLimits:
        """The bounds of one PDF extraction, from these settings (the upload limit included)."""
        from app.extraction import ExtractionLimits

        return ExtractionLimits(
            timeout_s=self.extraction_timeout_s,
            memory_bytes=self.extraction_memory_mb * 2**20,
            max_file_bytes=self.max_upload_bytes,
            max_pages=self.max_pages,
        )

    @property
    def uploads_dir(self) -> Path:
        """Private copies of uploaded PDFs (never served from Gradio's cache)."""
        return self.data_dir / "uploads"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Flags (overrides, None values ignored) win over environment variables, which win over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw not in (None, ""):
                values[f.name] = _parse(f.name, f.type, raw)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view, without secrets."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        out.pop("admin_password")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _parse(name: str, type_name: Any, raw: str) -> Any:
    type_name = str(type_name)
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a number, got {raw!r}") from None
    if type_name == "Path":
        return Path(raw)
    return raw


def _knobs(cls: Any, raw: str | None, variable: str, what: str) -> Any:
    """An engine's knobs (a `model.config.KnobSet`) from its JSON setting; a clear error naming it."""
    from model.config import ConfigError as ModelConfigError

    if not raw:
        return cls()
    try:
        values = json.loads(raw)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return cls.from_dict(values)
    except (ValueError, TypeError, ModelConfigError) as exc:
        raise ConfigError(f"{ENV_PREFIX}{variable} must be a JSON object of {what} settings: {exc}") from None
