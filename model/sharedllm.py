"""SharedLLM: one base model in two roles plus M cross-attention blocks.

- Lower model (compressor): the first M layers of `self.base` itself — the same module instances,
  so there is exactly one copy of the base weights (`model.tree.lower_forward`).
- Upper model (decoder): the whole `self.base`, with `self.xattn[i]` injected after the
  self-attention of layer i < M, reading that layer's own lower-model K/V (self-injection).
Only `xattn` holds new parameters; `save_pretrained` writes just those plus the config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import SharedLLMConfig
from model.cross_attention import CrossAttention
from model.decoder import Transformer
from model.memory import Memory, build_memory
from model.rope import rope_angles
from model.tree import ContextTree, Progress, encode_tree, node_vector

log = logging.getLogger(__name__)

WEIGHTS_FILE = "xattn.safetensors"
CONFIG_FILE = "sharedllm_config.json"


class SharedLLM(nn.Module):
    def __init__(self, base: Transformer, config: SharedLLMConfig) -> None:
        super().__init__()
        config.validate_for(base.config)
        self.base = base
        self.config = config
        ref = base.embed_tokens.weight
        self.xattn = nn.ModuleList(CrossAttention(base.config) for _ in range(config.n_inject_layers))
        self.xattn.to(device=ref.device, dtype=ref.dtype)
        self.initialise(config.init_mode)

    def initialise(self, mode: str) -> None:
        for block, layer in zip(self.xattn, self.base.layers):
            block.initialise(layer, mode)

    # --- context side ------------------------------------------------------------------------
    def encode_tree(self, token_ids, progress: Progress | None = None, noise: float = 0.0,
                    generator: torch.Generator | None = None) -> ContextTree:
        return encode_tree(self.base, token_ids, self.config, progress, noise, generator)

    @torch.no_grad()
    def query_vector(self, question_ids: torch.Tensor) -> torch.Tensor:
        """The upper model's hidden state after its first layer at the question's last token
        (question tokens alone, positions from 0, like a tree node) -> (D,) float32."""
        ids = question_ids.reshape(1, -1).to(self.base.embed_tokens.weight.device)
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rope(torch.arange(ids.shape[1], device=ids.device), x.dtype)
        x = self.base.layers[0](x, cos, sin, self.base.attn_fn)
        return node_vector(x[0], ids.shape[1], self.config.retrieval_vector).cpu()

    def build_memory(self, trees: list[ContextTree], query: torch.Tensor | None,
                     top_k_chunks: int | None = None) -> Memory:
        ref = self.base.embed_tokens.weight
        return build_memory(trees, query, self.config, self.base.inv_freq, ref.device, ref.dtype, top_k_chunks)

    # --- running text ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                memory: Memory | None = None, cache=None, last_only: bool = False,
                attention_mass: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with a memory, cross-attends to it in layers < M.
        `input_pos` + `cache` (from `self.base.new_cache`) for incremental decoding.
        `attention_mass` (P,) float32, owned by the caller (one per generation, so a memory can be
        read by several at once): the last injected layer adds the newest position's cross-attention
        weights to it, averaged over heads (citations)."""
        injections = None if memory is None else self._injections(memory, input_ids.shape[0], attention_mass)
        return self.base(input_ids, input_pos, injections, cache, last_only)

    def _injections(self, memory: Memory, batch: int, attention_mass: torch.Tensor | None):
        dtype = self.base.embed_tokens.weight.dtype
        position = torch.tensor([memory.n_chunks], device=memory.keys.device)
        cos, sin = rope_angles(self.base.inv_freq, position, dtype)  # (1, hd): every query sits at n
        attn_fn = self.base.attn_fn
        tracked = self.config.n_inject_layers - 1

        def make(i: int):
            block = self.xattn[i]
            keys = memory.keys[i].expand(batch, -1, -1, -1)  # (B, nkv, P, hd)
            values = memory.values[i].expand(batch, -1, -1, -1)

            def inject(x: torch.Tensor) -> torch.Tensor:
                if attention_mass is not None and i == tracked:
                    q = block.queries(x[:, -1:], cos, sin)  # (B, nh, 1, hd) last row only
                    weights = CrossAttention.attention_weights(q, keys, memory.mask)  # (B, nh, 1, P)
                    attention_mass.add_(weights.sum(dim=(0, 1, 2)).cpu() / weights.shape[1])
                return block(x, keys, values, cos, sin, attn_fn, memory.mask)

            return inject

        return {i: make(i) for i in range(self.config.n_inject_layers)}

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: Path, extra: dict | None = None) -> None:
        """Writes only the new parameters (safetensors) and the config (JSON); never pickle."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.xattn.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"extra": json.dumps(extra or {})})
        self.config.save(directory / CONFIG_FILE)

    @staticmethod
    def weights_info(directory: Path) -> dict:
        """The `extra` dict saved with the weights (training steps, data, an optional "warning")."""
        from safetensors import safe_open

        with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("extra", "{}"))

    def load_cross_attention(self, directory: Path) -> None:
        state = load_file(str(Path(directory) / WEIGHTS_FILE))
        expected = self.xattn.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"cross-attention weights in {directory} do not fit this model")
        ref = self.base.embed_tokens.weight
        self.xattn.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()})

    @classmethod
    def from_pretrained(cls, base: Transformer, directory: Path, **overrides) -> SharedLLM:
        config = SharedLLMConfig.load(Path(directory) / CONFIG_FILE)
        if overrides:
            config = config.replace(**overrides)
        model = cls(base, config)
        model.load_cross_attention(directory)
        return model
