"""The bundled model: converted once, later starts fast, tokenizer and chat template from it."""

from __future__ import annotations

import json
import time

from model import load_model
from model.loading import DEFAULT_MODEL_NAME, resolve_checkpoint


def test_default_model_is_cached_as_safetensors_and_reloads_fast(default_model, data_dir):
    checkpoint = resolve_checkpoint(None, data_dir)
    assert checkpoint == data_dir / "models" / DEFAULT_MODEL_NAME
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    source = json.loads((checkpoint / "source.json").read_text())
    assert len(source["sha256"]) == 64 and source["file"].endswith(".gguf")
    started = time.perf_counter()
    again = load_model(data_dir=data_dir, device="cpu")
    assert time.perf_counter() - started <= 3.0
    assert again.fingerprint == default_model.fingerprint


def test_tokenizer_and_chat_template_come_from_the_checkpoint(default_model):
    ids = default_model.chat_ids([{"role": "user", "content": "Hello"}])
    text = default_model.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert default_model.tokenizer.convert_tokens_to_ids("<|im_end|>") in default_model.eos_ids
    assert default_model.config.n_inject_layers == 15 and default_model.config.chunk_len == 512
