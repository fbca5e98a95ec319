"""What the app's services need of a loaded model (`model.LoadedModel` is the implementation; the
fast test doubles in tests/ implement the same protocol), typed like `Engine` is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

ProgressFn = Callable[[int, int], None]  # (work done, total work)


class Tokenizer(Protocol):
    def __call__(self, text: str, add_special_tokens: bool = ...) -> dict[str, list[int]]: ...

    def decode(self, ids: Any, **kwargs: Any) -> str: ...


class ModelConfig(Protocol):
    chunk_len: int  # L: tokens per chunk (the tree's root)


class TextStream(Protocol):
    """Pieces of text as they are generated; `result` (text, new_tokens, tokens_per_s, attribution)
    once the stream is exhausted."""

    result: Any

    def __iter__(self) -> Iterator[str]: ...


class LanguageModel(Protocol):
    name: str
    tokenizer: Tokenizer
    # False: the SharedLLM cross-attention is untrained (its answers are not grounded: a warning says so)
    weights_trained: bool
    weights_warning: str | None  # said with every `sharedllm` answer when set
    actqkv: Any  # model.block_retrieval.ActQKVConfig: the `actqkv` engine's knobs
    homer: Any  # model.homer.HomerConfig: the `homer` engine's knobs (resolved per model by homer_config)
    homer_bias: Any  # HOMER's calibration once computed or loaded (None before)

    @property
    def config(self) -> ModelConfig: ...

    @property
    def fingerprint(self) -> str: ...  # decides whether a stored tree can be used

    @property
    def device(self) -> Any: ...

    def tokenize(self, text: str) -> list[int]: ...

    def encode_tree(self, token_ids: list[int], progress: ProgressFn | None = None) -> Any: ...

    def build_memory(self, trees: list[Any], question: str | None, top_k_chunks: int | None = None) -> Any: ...

    def encode_blocks(self, stream_ids: list[int], doc_offset: int, progress: ProgressFn | None = None) -> Any: ...

    def block_memory(self, states: list[Any]) -> Any: ...

    def actqkv_fingerprint(self, prompt_layout: str) -> str: ...

    def homer_config(self) -> Any: ...

    def homer_fingerprint(self, prompt_layout: str) -> str: ...

    def homer_calibration_id(self) -> str: ...

    def calibrate_homer(self) -> Any: ...

    def encode_homer(self, prefix_ids: list[int], token_ids: list[int], doc_offset: int,
                     progress: ProgressFn | None = None) -> Any: ...

    def homer_prefix(self, states: list[Any], suffix_ids: list[int],
                     progress: ProgressFn | None = None) -> tuple[Any, Any]: ...

    def prompt_ids(self, messages: list[dict], split_after: str | None = None) -> tuple[list[int], int]: ...

    def prefix_states(self, prompt_ids: list[int]) -> Any: ...

    def generate(self, messages: list[dict], memory: Any = None, settings: Any = None, retrieval_s: float = 0.0,
                 prompt_ids: list[int] | None = None, prefix: Any = None, on_prefix: Any = None) -> TextStream: ...
