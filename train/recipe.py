"""The training recipe: every choice that decides whether the cross-attention can learn to read.

One validated, serialisable dataclass (saved as `recipe.json` in the run directory and inside the
trainer's checkpoint). The model-side choices become `SharedLLMConfig` overrides, so the weights
carry them; the data-side choices (the dense LM stage, the second stage's tasks) drive the loop.

Why these defaults (none is measured at scale yet, docs/training.md section 5):
- `key_rotation="node_and_chunk"`: the authors cache post-RoPE keys and add the chunk rotation on
  top; `chunk` leaves every key of a chunk at one relative distance (no order inside a chunk).
- `keep_rates=(1/16, 1/8, 1)`: a digit is one token, and at 1/4 a 10-digit pass key keeps 0-3
  digits; at leaf rate 1 the two selected leaves are full resolution. Cost: see `storage`.
- `layout="project"`: M = N/2 injected layers over 512-token chunks; `paper` is the authors'
  M = 4 over 1,024-token chunks (their Llama-2-7B configuration).
- `init_mode="zero"`: the untrained model equals the base model exactly, so any step that lowers
  the loss is progress; `none` is the authors' random start; `copy` fails by magnitude.
- `lm_stage_items`: dense LM items first (context -> 2-4K running tokens, loss on every token: the
  authors' first stage), then the data's QA/needle mix (`stage2_tasks` to restrict it).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.config import ConfigError, ModelConfig, SharedLLMConfig

Layout = Literal["project", "paper"]
LAYOUTS = ("project", "paper")


@dataclass(frozen=True)
class Recipe:
    layout: Layout = "project"  # project: M = N/2, L = 512; paper: M = 4, L = 1024
    key_rotation: str = "node_and_chunk"
    keep_rates: tuple[float, ...] = (1 / 16, 1 / 8, 1.0)
    init_mode: str = "zero"  # zero | none | copy
    retrieval_vector: str = "mean"  # the retrieval probe's choice (docs/benchmarks.md)
    lm_stage_items: int = 0  # the first items of the run are dense LM views of the data
    lm_running_tokens: tuple[int, int] = (2048, 4096)  # running-text length range of those items
    stage2_tasks: tuple[str, ...] | None = None  # None: every task of the data after the LM stage

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_rates", tuple(float(r) for r in self.keep_rates))
        object.__setattr__(self, "lm_running_tokens", tuple(int(n) for n in self.lm_running_tokens))
        if self.stage2_tasks is not None:
            object.__setattr__(self, "stage2_tasks", tuple(self.stage2_tasks))
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.lm_stage_items < 0:
            raise ConfigError("lm_stage_items must be >= 0")
        low, high = self.lm_running_tokens
        if not 16 <= low <= high:
            raise ConfigError(f"lm_running_tokens must be a range 16 <= low <= high, got {self.lm_running_tokens}")
        if self.stage2_tasks is not None and not self.stage2_tasks:
            raise ConfigError("stage2_tasks must name at least one task (or be None)")
        self.shared_config(ModelConfig(vocab_size=8, n_layer=8, n_head=1, n_kv_head=1, dim=8,
                                       intermediate_size=8, head_dim=8))  # validates the model-side fields

    def shared_config(self, model: ModelConfig) -> SharedLLMConfig:
        """The SharedLLM configuration this recipe trains for `model`."""
        return SharedLLMConfig.for_model(model, **self.model_overrides(model))

    def model_overrides(self, model: ModelConfig) -> dict[str, Any]:
        m, chunk = (max(1, model.n_layer // 2), 512) if self.layout == "project" else (min(4, model.n_layer), 1024)
        return {"n_inject_layers": m, "chunk_len": chunk, "keep_rates": self.keep_rates,
                "key_rotation": self.key_rotation, "init_mode": self.init_mode,
                "retrieval_vector": self.retrieval_vector}

    def storage(self, model: ModelConfig, dtype_bytes: int = 2) -> dict[str, float]:
        """What the tree costs: stored K/V positions per document token, bytes per token, memory
        positions per chunk after the search, and the compression of the memory (L / positions)."""
        cfg = self.shared_config(model)
        stored = sum(2**lv * cfg.slots(lv) for lv in range(1, cfg.tree_height + 1)) / cfg.chunk_len
        per_position = 2 * cfg.n_inject_layers * model.n_kv_head * model.head_dim * dtype_bytes
        memory = cfg.memory_slots_per_chunk()
        return {"stored_positions_per_token": stored, "bytes_per_token": stored * per_position,
                "memory_positions_per_chunk": memory, "compression": cfg.chunk_len / memory}

    # --- the dense LM stage ------------------------------------------------------------------------
    def dense_lm_view(self, item: dict, rng: random.Random, chunk_len: int) -> dict:
        """An LM item from any item's text: the last 2-4K tokens (`lm_running_tokens`) become the
        running text with loss on every token, what precedes them the memory (at least one chunk)."""
        ids = np.asarray(item["context_ids"])
        if item.get("task") == "lm":  # an LM item's target continues its context
            ids = np.concatenate([ids, np.asarray(item["target_ids"])])
        running = min(rng.randint(*self.lm_running_tokens), len(ids) - chunk_len)
        if running < 16:
            return item
        return {"context_ids": ids[:-running], "prompt_ids": ids[:0], "target_ids": ids[-running:], "task": "lm-dense"}

    # --- persistence -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown recipe keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())
