"""Small real models for fast tests of code that uses the engine (store, app, benchmarks).

`tiny_loaded_model` pairs SmolLM2's real tokenizer (the small bundled model: its 49K vocabulary
keeps the tiny embedding small) with a tiny randomly initialised LLaMA (4 layers, d=64), so tests
run the production code paths in milliseconds per call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig, SharedLLMConfig
from model.decoder import Transformer
from model.loading import load_tokenizer, resolve_checkpoint
from model.runtime import LoadedModel
from model.sharedllm import SharedLLM


TINY_TOKENIZER_MODEL = "smollm2"


def tiny_config(vocab_size: int = 49152, **overrides) -> ModelConfig:
    values = dict(vocab_size=vocab_size, n_layer=4, n_head=4, n_kv_head=2, dim=64, intermediate_size=128,
                  head_dim=16, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_position=8192)
    values.update(overrides)
    return ModelConfig(**values)


def random_transformer(config: ModelConfig, seed: int = 0, std: float = 0.1) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model.eval()


def tiny_loaded_model(data_dir: str | Path, chunk_len: int = 64, seed: int = 0, **config_overrides) -> LoadedModel:
    tokenizer = load_tokenizer(resolve_checkpoint(TINY_TOKENIZER_MODEL, Path(data_dir)))
    base = random_transformer(tiny_config(), seed)
    cfg = SharedLLMConfig(n_inject_layers=2, chunk_len=chunk_len, tree_dtype="float32", encode_dtype="float32",
                          **config_overrides)
    return LoadedModel(SharedLLM(base, cfg).eval(), tokenizer, "tiny-random", f"tiny-random-{seed}", False)


def make_shared(base: Transformer, **overrides) -> SharedLLM:
    """A SharedLLM over `base` with small-test defaults (M=2, L=64, float32 trees)."""
    values = dict(n_inject_layers=2, chunk_len=64, tree_dtype="float32", encode_dtype="float32")
    values.update(overrides)
    return SharedLLM(base, SharedLLMConfig(**values)).eval()


def random_ids(n: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def write_tiny_checkpoint(path: str | Path, data_dir: str | Path | None = None, seed: int = 0) -> Path:
    """A Hugging Face-layout directory (config.json, model.safetensors, tokenizer) of a tiny random
    LLaMA with SmolLM2's tokenizer: what `load_model(path)` reads, for tests of whole commands."""
    import json
    import shutil

    from safetensors.torch import save_file

    path = Path(path)
    cfg = tiny_config()
    model = random_transformer(cfg, seed)
    path.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": True, "max_position_embeddings": cfg.max_position}))
    tokenizer = resolve_checkpoint(TINY_TOKENIZER_MODEL, Path(data_dir or Path(__file__).parent.parent / "build" / "test-data"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, path / name)
    return path
