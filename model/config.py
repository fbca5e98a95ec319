"""Typed, validated configuration of the base decoder and of the SharedLLM extension.

`ModelConfig` describes a LLaMA-family checkpoint (read from its Hugging Face `config.json`);
`SharedLLMConfig` holds every SharedLLM knob (M, L, h, keep-rates, init mode, dtypes) and is saved
next to the cross-attention weights. Its `fingerprint` tells the store whether a persisted context
tree was made by the same lower model and tree shape, so trees are never silently mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
TREE_FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is invalid or unsupported."""


class KnobSet:
    """A frozen dataclass of an engine's knobs, read from and written to JSON-able dicts (the app's
    `SHAREDLLM_ACTQKV` / `SHAREDLLM_HOMER`, a stored state's metadata); `knob_name` names it in errors."""

    knob_name = "engine"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown {cls.knob_name} settings: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    dim: int
    intermediate_size: int
    head_dim: int
    rope_theta: float = 10000.0
    # None for plain RoPE, else {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    attn_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    attn_out_bias: bool = False  # o_proj bias (Llama with attention_bias; never Qwen2)
    tie_embeddings: bool = False
    max_position: int = 4096
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Reads a Hugging Face `config.json` dict (transformers v4 or v5 layout)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("mlp_bias"):
            raise ConfigError("checkpoints with MLP biases are not supported")
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = hf.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
            scaling.pop("type", None)
            if scaling["rope_type"] == "default":
                scaling = None
        n_head = int(hf["num_attention_heads"])
        dim = int(hf["hidden_size"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(hf.get("num_key_value_heads") or n_head),
            dim=dim,
            intermediate_size=int(hf["intermediate_size"]),
            head_dim=int(hf.get("head_dim") or dim // n_head),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            attn_bias=bool(hf.get("attention_bias", False)) or model_type == "qwen2",
            attn_out_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position=int(hf.get("max_position_embeddings", 4096)),
            model_type=model_type,
        )


InitMode = Literal["copy", "zero", "none"]
KeyRotation = Literal["chunk", "node_and_chunk"]
RetrievalVector = Literal["last", "mean"]


@dataclass(frozen=True)
class SharedLLMConfig:
    """Every SharedLLM knob, validated; saved as JSON next to the cross-attention weights.

    Defaults follow the paper: L = 512 tokens per chunk, a binary tree of height 3 whose levels
    keep 1/16, 1/8 and 1/4 of their positions, so every node of a full chunk stores L/32 positions
    and the query-aware search hands L/8 positions per chunk to the decoder (compression 8).
    """

    n_inject_layers: int  # M: the lower model is the first M layers; cross-attention in those M layers
    chunk_len: int = 512  # L: tokens per chunk (the root of one tree)
    tree_height: int = 3  # h: levels 1..h are encoded and stored
    keep_rates: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4)  # per level, top to bottom
    # how untrained cross-attention starts: "zero" equals the base model exactly, "copy" takes the
    # layer's self-attention, "none" is random (normal, std 0.02: the authors' `init_mode none`)
    init_mode: InitMode = "copy"
    tree_dtype: str = "bfloat16"  # dtype of stored K/V (vectors are always float32)
    # precision of the lower model while encoding trees: "bfloat16" runs it under autocast (2x faster
    # on CPUs with AVX512-BF16, no weight copy; the stored K/V are bf16 anyway), "float32" is exact
    encode_dtype: str = "bfloat16"
    split_noise: float = 0.1  # training only: child length offset e ~ N(0, (split_noise * l)^2)
    # "chunk": keys are stored before RoPE and rotated only by their chunk index (the paper's
    # chunk-level positions); "node_and_chunk": keys keep their intra-node rotation underneath.
    key_rotation: KeyRotation = "chunk"
    # "last": the hidden state after layer 1 at the node's last token (the paper); "mean": its mean.
    retrieval_vector: RetrievalVector = "last"
    encode_batch_tokens: int = 16384  # tokens per batch when encoding a tree (speed/memory only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_rates", tuple(float(r) for r in self.keep_rates))
        if self.n_inject_layers < 1:
            raise ConfigError("n_inject_layers (M) must be >= 1")
        if self.tree_height < 1:
            raise ConfigError("tree_height (h) must be >= 1")
        if len(self.keep_rates) != self.tree_height:
            raise ConfigError(f"keep_rates needs {self.tree_height} values, got {len(self.keep_rates)}")
        if self.chunk_len % (2**self.tree_height):
            raise ConfigError(f"chunk_len {self.chunk_len} must be divisible by 2**h = {2**self.tree_height}")
        for level, rate in enumerate(self.keep_rates, start=1):
            if not 0 < rate <= 1:
                raise ConfigError(f"keep rate of level {level} must be in (0, 1], got {rate}")
            slots = self.chunk_len / 2**level * rate
            if slots != int(slots) or slots < 1:
                raise ConfigError(f"level {level}: L/2^l * keep_rate = {slots} must be a whole number >= 1")
        if self.init_mode not in ("copy", "zero", "none"):
            raise ConfigError(f"init_mode must be 'copy', 'zero' or 'none', got {self.init_mode!r}")
        if self.key_rotation not in ("chunk", "node_and_chunk"):
            raise ConfigError(f"key_rotation must be 'chunk' or 'node_and_chunk', got {self.key_rotation!r}")
        if self.retrieval_vector not in ("last", "mean"):
            raise ConfigError(f"retrieval_vector must be 'last' or 'mean', got {self.retrieval_vector!r}")
        if self.encode_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"encode_dtype must be float32 or bfloat16, got {self.encode_dtype!r}")
        if self.tree_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"tree_dtype must be float32, bfloat16 or float16, got {self.tree_dtype!r}")

    @classmethod
    def for_model(cls, model: ModelConfig, **overrides: Any) -> SharedLLMConfig:
        """The default for a base model: M = N // 2 (QA default from DESIGN)."""
        overrides.setdefault("n_inject_layers", max(1, model.n_layer // 2))
        return cls(**overrides)

    def validate_for(self, model: ModelConfig) -> None:
        if self.n_inject_layers > model.n_layer:
            raise ConfigError(f"M = {self.n_inject_layers} exceeds the model's {model.n_layer} layers")

    def slots(self, level: int) -> int:
        """Stored positions per node of a full chunk at `level` (1-based)."""
        return int(self.chunk_len / 2**level * self.keep_rates[level - 1])

    def memory_slots_per_chunk(self) -> int:
        """Positions per chunk after the search: one preserved node per level, both at the last."""
        return sum(self.slots(level) for level in range(1, self.tree_height)) + 2 * self.slots(self.tree_height)

    def fingerprint(self, checkpoint_hash: str) -> str:
        """Identity of a stored tree: what produced it (lower model + tree shape), not how it is read."""
        ident = {
            "format": TREE_FORMAT_VERSION,
            "checkpoint": checkpoint_hash,
            "M": self.n_inject_layers,
            "L": self.chunk_len,
            "h": self.tree_height,
            "keep_rates": list(self.keep_rates),
            "dtype": self.tree_dtype,
            "encode_dtype": self.encode_dtype,
            "vector": self.retrieval_vector,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SharedLLMConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown SharedLLM config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> SharedLLMConfig:
        return cls.from_json(path.read_text())

    def replace(self, **changes: Any) -> SharedLLMConfig:
        return dataclasses.replace(self, **changes)


