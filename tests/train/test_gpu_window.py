"""The GPU-window procedure end to end on CPU: pack here, stash and run "there" (a subprocess that
cannot import what the lent machine lacks), unpack the returned bf16 parts into a weights directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from model.testing import write_tiny_checkpoint as tiny_checkpoint
from train import gpu_window
from train.data.pack import write_shards

REPO = Path(__file__).resolve().parents[2]
# project dependencies the GPU machine does not have (it has torch, transformers, safetensors, numpy,
# matplotlib): the device side must never import them
NOT_THERE = ["app", "storage", "gradio", "gradio_client", "sqlalchemy", "alembic", "pypdf", "bm25s",
             "argon2", "fpdf"]
DEVICE_PYTHON = f"""
import runpy, sys
class NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_THERE!r}:
            raise ModuleNotFoundError(name + " is not installed on the GPU machine")
sys.meta_path.insert(0, NotOnTheGpuMachine())
sys.argv = ["train.gpu_window", *sys.argv[1:]]
runpy.run_module("train.gpu_window", run_name="__main__", alter_sys=True)
"""


def shard(path: Path, vocab: int, made_for: str, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    items = [{"context_ids": rng.integers(0, 1000, 700), "prompt_ids": np.array([], dtype=np.int64),
              "target_ids": rng.integers(0, 1000, 24), "task": "lm", "meta": {}} for _ in range(n)]
    write_shards(items, path, vocab_size=vocab, info={"tokenizer": made_for})
    return path


def test_pack_train_there_and_unpack_round_trip(tmp_path, model_data_dir):
    base = tiny_checkpoint(tmp_path / "tiny-llama", model_data_dir)
    train_dir = shard(tmp_path / "train", 49152, "tiny-llama", 8, 0)
    heldout = shard(tmp_path / "heldout", 49152, "tiny-llama", 2, 1)
    wheel = tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl"  # stands in for the gguf wheel
    wheel.parent.mkdir()
    import zipfile

    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "VALUE = 7\n")
        zf.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg\nVersion: 1.0\n")
    parts_dir = tmp_path / "gpuwin"
    gpu_window.main(["pack", "--base-model", str(base), "--train-data", str(train_dir), "--eval-data", str(heldout),
                     "--wheel", str(wheel), "--out", str(parts_dir), "--part-mib", "4", "--xz-preset", "0"])
    parts = sorted(p for p in parts_dir.iterdir() if p.name.startswith("part"))
    assert len(parts) >= 2 and all(sum(f.stat().st_size for f in p.iterdir()) < 4.1 * 2**20 for p in parts)

    env = {**os.environ, "SHAREDLLM_GPUWIN_STASH": str(tmp_path / "machine-tmp"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = tmp_path / "OUT"
    for part in parts[:-1]:
        subprocess.run([sys.executable, "-c", DEVICE_PYTHON, "stash", str(part)], env=env, check=True, cwd=REPO)
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_PYTHON, "run", str(parts[-1]), "--out", str(out), "--device", "cpu",
         "--budget-s", "120", "--reserve-s", "10", "--speed-items", "2", "--", "--steps", "3", "--batch-items", "2", "--grad-accum", "1",
         "--eval-items", "2", "--eval-every", "2", "--save-every", "1", "--lr", "1e-3", "--warmup", "1"],
        env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    returned = sorted(f.name for f in out.iterdir())
    assert len(returned) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in out.iterdir())
    assert {"loss.json", "result.json", "sharedllm_config.json", "xattn.000", "train_speed.json"} <= set(returned)
    assert [h["step"] for h in json.loads((out / "loss.json").read_text()) if "loss" in h] == [1, 2, 3]

    target = tmp_path / "assets" / "sharedllm-tiny"
    gpu_window.main(["unpack", str(out), "--to", str(target), "--run-dir", str(tmp_path / "runs"),
                     "--warning", "tiny test"])
    with safe_open(str(target / "xattn.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        extra = json.loads(f.metadata()["extra"])
    assert extra["warning"] == "tiny test" and extra["items"] == 3 * 2
    assert json.loads((target / "sharedllm_config.json").read_text())["key_rotation"] == "node_and_chunk"
    assert (tmp_path / "runs" / "loss.json").is_file()
    # a damaged part is refused
    (out / "xattn.000").write_bytes(b"broken")
    try:
        gpu_window.main(["unpack", str(out), "--to", str(tmp_path / "other")])
    except SystemExit as exc:
        assert "damaged" in str(exc)
    else:
        raise AssertionError("a damaged part was accepted")
