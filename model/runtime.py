"""`load_model` and `LoadedModel`: the one object the app holds — model, tokenizer, fingerprint,
and the per-turn operations (encode a tree, build the memory for a question, generate).

Device, dtype and attention kernel are decided here, once: CUDA + bfloat16 when a GPU is present,
else CPU + float32; flash-attn when installed on CUDA, else PyTorch SDPA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.actqkv import ActQKVRunner, BlockMemory
from model.actqkv_encode import encode_stream
from model.block_retrieval import ActQKVConfig
from model.block_state import BlockState
from model.homer import HomerConfig
from model.config import SharedLLMConfig
from model.generate import GenerationSettings, PrefixState, TextStream
from model.homer_memory import HomerMemory
from model.homer_state import HomerPrefix, HomerState, answer_prefix, encode_document
from model.catalog import BUNDLED, bundled
from model.loading import (
    ModelError,
    checkpoint_hash,
    load_tokenizer,
    load_transformer,
    model_display_name,
    read_model_config,
    resolve_checkpoint,
)
from model.memory import Memory
from model.threads import set_threads
from model.sharedllm import CONFIG_FILE, WEIGHTS_FILE, SharedLLM
from model.tree import ContextTree, Progress

log = logging.getLogger(__name__)

# the trained SharedLLM weights shipped for SmolLM2-135M (bench and training tools read them by path)
DEFAULT_WEIGHTS_DIR = BUNDLED["smollm2"].weights_dir


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    model: SharedLLM
    tokenizer: object
    name: str
    checkpoint_hash: str
    weights_trained: bool
    # said with every answer of the `sharedllm` engine when set: e.g. weights trained only at a small
    # scale (saved as "warning" in the weights' metadata by whoever trained them)
    weights_warning: str | None = None
    actqkv: ActQKVConfig = field(default_factory=ActQKVConfig)  # the training-free engine's knobs
    homer: HomerConfig = field(default_factory=HomerConfig)  # HOMER's knobs (resolved per model on use)
    homer_bias: torch.Tensor | None = field(default=None, repr=False)  # its calibration, once computed

    @property
    def config(self) -> SharedLLMConfig:
        return self.model.config

    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint(self.checkpoint_hash)

    @property
    def device(self) -> torch.device:
        return self.model.base.embed_tokens.weight.device

    @property
    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.prompt_ids(messages)[0]

    def prompt_ids(self, messages: list[dict], split_after: str | None = None) -> tuple[list[int], int]:
        """The chat-templated prompt's token ids and the length of its cacheable prefix.

        With `split_after` (a text the first user message starts with, e.g. `full`'s documents), the
        rendered prompt is tokenized in two pieces cut right after it, so the prefix's ids do not
        depend on what follows (the question, later turns) and its K/V can be persisted and reused
        (`PrefixState`). The prompt is these ids with or without a cache, so both decode the same."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not split_after or split_after not in text:
            return self.tokenize(text), 0
        cut = text.index(split_after) + len(split_after)
        head = self.tokenize(text[:cut])
        return head + self.tokenize(text[cut:]), len(head)

    @torch.no_grad()
    def prefix_states(self, prompt_ids: list[int]) -> list:
        """The base model's self-attention K/V of `prompt_ids` (a prompt prefix), as the filled
        per-layer caches `generate(..., on_prefix=...)` would hand over; for persisting ahead of a
        question (`KVCache.prefix()` gives the tensors)."""
        from model.generate import prefill

        base = self.model.base
        cache = base.new_cache(1, len(prompt_ids))
        prefill(base, torch.tensor([prompt_ids], device=self.device), None, cache)
        return cache

    def encode_tree(self, token_ids, progress: Progress | None = None) -> ContextTree:
        return self.model.encode_tree(token_ids, progress)

    def encode_blocks(self, stream_ids: list[int], doc_offset: int, progress: Progress | None = None) -> BlockState:
        """ActQKV's persisted state of one document stream (model/actqkv_encode.py, model/block_state.py)."""
        return encode_stream(self.model.base, stream_ids, self.actqkv, doc_offset, progress)

    def block_memory(self, states: list[BlockState], pinned: list[tuple[int, int]] | None = None) -> BlockMemory:
        """The question-time memory over `states`; `pinned` (document, block) pairs are read by every layer."""
        return BlockMemory(self.model.base, states, pinned)

    def actqkv_fingerprint(self, prompt_layout: str) -> str:
        """Identity of a stored ActQKV state: checkpoint, compute dtype, knobs, prompt layout."""
        dtype = str(self.model.base.embed_tokens.weight.dtype)
        return self.actqkv.fingerprint(f"{self.checkpoint_hash}:{dtype}", prompt_layout)

    # --- HOMER (model/homer.py) ------------------------------------------------------------------
    def homer_config(self) -> HomerConfig:
        return self.homer.resolve(self.model.base.config)

    def homer_fingerprint(self, prompt_layout: str) -> str:
        dtype = str(self.model.base.embed_tokens.weight.dtype)
        return self.homer_config().fingerprint(f"{self.checkpoint_hash}:{dtype}", prompt_layout)

    def homer_calibration_id(self) -> str:
        from model.homer_calibration import calibration_identity

        return calibration_identity(self.homer_config(), self.checkpoint_hash, str(self.model.base.embed_tokens.weight.dtype))

    def calibrate_homer(self) -> torch.Tensor:
        """HOMER's significance bias for this model (model/homer_calibration.py; seconds to a minute)."""
        from model.homer_calibration import CALIBRATION_TEXT, calibrate, calibration_windows

        cfg = self.homer_config()
        windows = calibration_windows(self.tokenize(CALIBRATION_TEXT.read_text()), cfg)
        return calibrate(self.model.base, windows, cfg.calibration_queries)

    def encode_homer(self, prefix_ids: list[int], token_ids: list[int], doc_offset: int,
                     progress: Progress | None = None) -> HomerState:
        """HOMER's persisted leaves of one document's context stream (model/homer_state.py)."""
        return encode_document(self.model.base, self.homer_config(), prefix_ids, token_ids, doc_offset, progress)

    def homer_prefix(self, states: list[HomerState], suffix_ids: list[int], progress: Progress | None = None,
                     protected: list[tuple[int, int]] | None = None) -> tuple[HomerPrefix, HomerMemory]:
        """One question's merged cache over the documents' leaves, and the memory that decodes it;
        `progress(merges done, merges)` as the merge tree is walked; the (document, block) pairs
        `protected` are kept through every reduction (`answer_prefix`)."""
        if self.homer_bias is None:
            self.homer_bias = self.calibrate_homer()
        result = answer_prefix(self.model.base, self.homer_config(), states, suffix_ids, self.homer_bias, progress,
                               protected)
        return result, HomerMemory(self.model.base, result.doc, result.tok, [st.doc_offset for st in states])

    def build_memory(self, trees: list[ContextTree], question: str | None,
                     top_k_chunks: int | None = None) -> Memory:
        query = None
        if question:
            query = self.model.query_vector(torch.tensor(self.tokenize(question)))
        return self.model.build_memory(trees, query, top_k_chunks)

    def generate(self, messages: list[dict], memory: Memory | None = None,
                 settings: GenerationSettings | None = None, retrieval_s: float = 0.0,
                 prompt_ids: list[int] | None = None, prefix: PrefixState | None = None,
                 on_prefix=None) -> TextStream:
        """Streams the answer to `messages` (or to ready `prompt_ids` from `prompt_ids()`); `prefix`
        and `on_prefix` reuse or capture persisted prompt-prefix states (see `generate_tokens`)."""
        settings = settings or GenerationSettings()
        ids = prompt_ids if prompt_ids is not None else self.chat_ids(messages)
        # an ActQKV memory is read by the base model's own attention, not by cross-attention
        if isinstance(memory, BlockMemory):
            runner = ActQKVRunner(self.model.base)
        elif isinstance(memory, HomerMemory):  # a merged cache read by the base model, mass tracked
            runner = memory.runner()
        else:
            runner = self.model
        return TextStream(runner, self.tokenizer, ids, memory, settings, self.eos_ids, retrieval_s,
                          prefix=prefix, on_prefix=on_prefix)


def load_model(model_path: str | Path | None = None, data_dir: str | Path = "data",
               device: str | None = "auto", dtype: str | None = None, weights: str | Path | bool | None = None,
               attention: str | None = None, threads: int | None = None, **config_overrides) -> LoadedModel:
    """Loads a checkpoint and its SharedLLM weights.

    `model_path`: None (the default bundled model), a bundled name (`model.catalog.BUNDLED`), a Hugging
    Face directory or a .gguf file. `weights`: a directory with xattn.safetensors +
    sharedllm_config.json; None means the trained weights shipped for a bundled model (if any), else
    a fresh initialisation; False means a fresh initialisation (`init_mode`) even where trained
    weights exist.
    """
    started = time.perf_counter()
    set_threads(threads)
    data_dir = Path(data_dir)
    checkpoint = resolve_checkpoint(model_path, data_dir)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    base = load_transformer(checkpoint, dev, dt, attention)
    tokenizer = load_tokenizer(checkpoint)
    entry = bundled(model_path)
    if weights is None and entry is not None and entry.weights_dir and (entry.weights_dir / WEIGHTS_FILE).is_file():
        weights = entry.weights_dir
    if weights is False:  # explicitly none (training from an initialisation)
        weights = None
    if weights is not None:
        weights = Path(weights)
        if not (weights / WEIGHTS_FILE).is_file() or not (weights / CONFIG_FILE).is_file():
            raise ModelError(f"SharedLLM weights not found: expected {weights}/{WEIGHTS_FILE} and {CONFIG_FILE}")
        model = SharedLLM.from_pretrained(base, weights, **config_overrides)
    else:
        log.warning("no trained SharedLLM weights: cross-attention starts from its '%s' initialisation",
                    config_overrides.get("init_mode", "copy"))
        model = SharedLLM(base, SharedLLMConfig.for_model(read_model_config(checkpoint), **config_overrides))
    model.eval()
    name = model_display_name(model_path)
    warning = SharedLLM.weights_info(weights).get("warning") if weights is not None else None
    loaded = LoadedModel(model, tokenizer, name, checkpoint_hash(checkpoint, data_dir), weights is not None, warning)
    log.info("model %s ready in %.1f s (fingerprint %s)", name, time.perf_counter() - started, loaded.fingerprint)
    return loaded
