"""Our decoder against transformers' own forward, through the production converter and loader."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from model.attention import ATTENTION_BACKENDS
from model.generate import GenerationSettings, generate_tokens
from model.loading import ModelError, load_transformer, resolve_checkpoint

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "llama-gqa-untied": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "llama-mha-tied": lambda: LlamaForCausalLM(
        LlamaConfig(**{**SMALL, "num_key_value_heads": 8}, tie_word_embeddings=True)),
    "llama3-rope-scaling": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=LLAMA3_ROPE)),
    "llama-attention-bias": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True)),
    "qwen2-biases-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; randomise everything so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)


@pytest.fixture(params=sorted(CASES))
def hf_checkpoint(request, tmp_path):
    torch.manual_seed(0)
    hf = CASES[request.param]().eval()
    _randomise(hf, seed=1)
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def test_decoder_parity_tiny_configs(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = load_transformer(resolve_checkpoint(path, path), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(2))  # > 64: llama3 scaling bites
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_backends_parity(hf_checkpoint, backend):
    hf, path = hf_checkpoint
    ours = load_transformer(path, torch.device("cpu"), torch.float32, attention=backend)
    assert ours.attention_backend == backend and ours.attn_fn is ATTENTION_BACKENDS[backend]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "smollm2"])
def test_decoder_parity_real_bundled_models(name, request, data_dir):
    """Both bundled models against transformers on the same converted weights: logits and 64 greedy
    tokens (the default, Qwen2: GQA 14/2, q/k/v biases, rope theta 1e6, tied embeddings)."""
    loaded = request.getfixturevalue("default_model" if name == "qwen2.5-0.5b" else "smollm2_model")
    checkpoint = resolve_checkpoint(name, data_dir)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ours = loaded.model.base
    tok = loaded.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-3
    prompt = loaded.chat_ids([{"role": "user", "content": "Write a short poem about the sea."}])
    settings = GenerationSettings(max_new_tokens=64)
    mine = list(generate_tokens(ours, prompt, None, settings))
    with torch.no_grad():
        # explicit attention mask: the pad id equals <|im_end|>, which the chat template contains
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                          eos_token_id=None,
                          pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    assert len(mine) == 64 and mine == ref


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="expected a directory with config.json"):
        resolve_checkpoint(tmp_path / "empty", tmp_path)


def test_unsupported_architecture_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="unsupported model_type 'gpt2'"):
        load_transformer(tmp_path, torch.device("cpu"), torch.float32)


def test_attention_backend_is_chosen_once_at_load_time(monkeypatch):
    from model import attention

    assert attention.choose_backend(torch.device("cpu"), torch.float32) == "sdpa"
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object())
    assert attention.choose_backend(torch.device("cuda"), torch.bfloat16) == "flash"
    assert attention.choose_backend(torch.device("cuda"), torch.float32) == "sdpa"
    assert attention.choose_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.choose_backend(torch.device("cpu"), torch.float32, "magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_parity_with_sdpa(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = load_transformer(path, torch.device("cuda"), torch.bfloat16)
    hf = hf.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1, 128), device="cuda")
    with torch.no_grad():
        assert (hf(ids).logits.float() - ours(ids).float()).abs().max().item() < 0.1
