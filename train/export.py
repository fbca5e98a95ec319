"""`python -m train.export SRC DST [--dtype bfloat16] [--warning TEXT]`: ship trained weights.

Copies a weights directory (xattn.safetensors + sharedllm_config.json, as `sharedllm train` writes
it) to DST with the tensors cast to `--dtype` (bf16 halves the file: 20 MB for SmolLM2 at M = 15,
under the 30 MB budget of assets/) and the saved metadata kept; `--warning` adds a sentence the app
says with every `sharedllm` answer (for weights trained at a small scale).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.sharedllm import CONFIG_FILE, WEIGHTS_FILE


def export_weights(src: Path, dst: Path, dtype: str = "bfloat16", warning: str | None = None) -> Path:
    src, dst = Path(src), Path(dst)
    with safe_open(str(src / WEIGHTS_FILE), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k).to(getattr(torch, dtype)).contiguous() for k in f.keys()}
    extra = json.loads(metadata.get("extra", "{}"))
    if warning:
        extra["warning"] = warning
    else:
        extra.pop("warning", None)
    metadata["extra"] = json.dumps(extra)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(dst / WEIGHTS_FILE)
    shutil.copyfile(src / CONFIG_FILE, dst / CONFIG_FILE)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warning", default=None)
    args = parser.parse_args(argv)
    out = export_weights(args.src, args.dst, args.dtype, args.warning)
    print(f"{out / WEIGHTS_FILE}: {(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
