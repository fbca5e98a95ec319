"""The one weight converter: Hugging Face LLaMA-family state dict -> our `Transformer`.

Used by production loading and by the parity tests alike, so the tests exercise the real path.
Every key and shape is checked; a missing, unexpected or mis-shaped tensor is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.config import ModelConfig


class ConversionError(ValueError):
    """The checkpoint's tensors do not match the model configuration."""


def hf_to_ours(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Renames `model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`, drops
    rotary buffers and a tied `lm_head`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if "rotary_emb" in key:
            continue
        if key == "lm_head.weight":
            if config.tie_embeddings:
                continue
            out[key] = tensor
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = tensor
        else:
            raise ConversionError(f"unexpected tensor {key!r} in checkpoint")
    return out


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ConversionError(f"{key}: checkpoint shape {tuple(state[key].shape)} != model {tuple(shape)}")


def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> None:
    """Converts, checks and assigns weights (works on a meta-device model: `assign=True`)."""
    state = hf_to_ours(hf_state, model.config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state(state, expected)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
