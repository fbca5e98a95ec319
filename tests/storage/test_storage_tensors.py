"""Tensor store: exact round trips, memory mapping, damage detection, atomic writes, orphan cleanup."""

from __future__ import annotations

import os

import pytest
import torch

from storage import (
    TensorChecksumMismatch,
    TensorFileMissing,
    TensorFileTruncated,
    TensorStore,
    TensorStoreError,
)


@pytest.fixture
def store(tmp_path) -> TensorStore:
    return TensorStore(tmp_path / "trees")


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "level1.keys": torch.randn(3, 2, 5, 7, generator=g).to(torch.bfloat16),
        "level1.vectors": torch.randn(3, 2, 16, generator=g),
        "level1.positions": torch.arange(11, dtype=torch.int32),
        "tree.meta": torch.tensor([100, 64, 3]),
        "odd.half": torch.randn(5, generator=g).half(),
        "empty": torch.empty(0, 4),
        "doc.token_ids": torch.tensor([1, 2, 49151], dtype=torch.int32),
    }


def test_round_trip_is_exact_and_memory_mapped(store):
    tensors = _sample()
    stored = store.save(7, "abc123", tensors)
    assert stored.path == "7/abc123.safetensors" and stored.bytes == (store.root / stored.path).stat().st_size
    loaded = store.load(stored.path, stored.sha256)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert store.metadata(stored.path)["fingerprint"] == "abc123"
    # Memory-mapped: the bytes live in the file mapping, not in a fresh private allocation.
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert str((store.root / stored.path).resolve()) in maps


def test_context_tree_round_trip_exact(store, tiny_model):
    from model import ContextTree

    ids = tiny_model.tokenizer("The supplier shall pay 1,250 EUR within 30 days. " * 12,
                               add_special_tokens=False)["input_ids"]
    tree = tiny_model.encode_tree(ids)
    stored = store.save(1, tiny_model.fingerprint, tree.to_tensors())
    again = ContextTree.from_tensors(store.load(stored.path, stored.sha256))
    assert (again.n_tokens, again.n_chunks, again.chunk_len) == (tree.n_tokens, tree.n_chunks, tree.chunk_len)
    original, loaded = tree.to_tensors(), again.to_tensors()
    assert original.keys() == loaded.keys()
    for name in original:
        assert torch.equal(original[name], loaded[name]), name


def test_truncated_file_detected(store):
    stored = store.save(1, "f", _sample())
    path = store.root / stored.path
    data = path.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 20, 3, 0):
        path.write_bytes(data[:keep])
        with pytest.raises(TensorFileTruncated):
            store.load(stored.path, stored.sha256)


@pytest.mark.parametrize("where", ["data", "header"])
def test_bit_flip_detected(store, where):
    stored = store.save(1, "f", _sample())
    path = store.root / stored.path
    data = bytearray(path.read_bytes())
    index = len(data) - 5 if where == "data" else 30
    data[index] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(TensorStoreError) as info:
        store.load(stored.path, stored.sha256)
    assert isinstance(info.value, (TensorChecksumMismatch, TensorFileTruncated))
    if where == "data":
        assert isinstance(info.value, TensorChecksumMismatch)


def test_missing_file_detected(store):
    stored = store.save(1, "f", _sample())
    (store.root / stored.path).unlink()
    with pytest.raises(TensorFileMissing):
        store.verify(stored.path, stored.sha256)


def test_failed_write_leaves_nothing_and_keeps_old_file(store, monkeypatch):
    good = store.save(1, "f", _sample())
    with pytest.raises(Exception):
        store.save(1, "f", {"x": "not a tensor"})

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("storage.tensors.save_file", disk_full)
    with pytest.raises(OSError):
        store.save(1, "f", {"x": torch.zeros(3)})
    assert sorted(p.name for p in (store.root / "1").iterdir()) == ["f.safetensors"]
    store.verify(good.path, good.sha256)


def test_fingerprints_are_sanitised_and_paths_stay_inside(store):
    a = store.save(1, "../../etc/x", {"t": torch.ones(1)})
    b = store.save(1, "..-..-etc-x", {"t": torch.ones(1)})
    assert a.path != b.path and ".." not in a.path.split("/")
    with pytest.raises(ValueError):
        store.absolute("../outside.safetensors")


def test_cleanup_removes_orphans_and_temp_files(store):
    keep = store.save(1, "f", {"t": torch.ones(1)})
    orphan = store.save(2, "f", {"t": torch.ones(1)})
    (store.root / "1" / ".f.safetensors.123.tmp").write_bytes(b"half")
    removed = store.cleanup({keep.path})
    assert sorted(removed) == ["1/.f.safetensors.123.tmp", orphan.path]
    assert [p.relative_to(store.root).as_posix() for p in store.root.rglob("*")] == ["1", keep.path]


def test_verify_skips_rehashing_an_unchanged_settled_file_but_catches_any_write(tmp_path, monkeypatch):
    import os

    from storage import tensors as tensors_module

    store = TensorStore(tmp_path)
    stored = store.save(7, "fp", {"x": torch.arange(1000, dtype=torch.float32)})
    path = store.absolute(stored.path)
    old = path.stat().st_mtime_ns - 10 * 10**9
    os.utime(path, ns=(old, old))  # settled: written 10 s ago
    hashed = []
    real = tensors_module.file_sha256
    monkeypatch.setattr(tensors_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    store.verify(stored.path, stored.sha256)
    store.verify(stored.path, stored.sha256)
    assert len(hashed) == 1
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(data)
    os.utime(path, ns=(old, old))  # even with the old mtime put back, the ctime moved
    with pytest.raises(TensorChecksumMismatch):
        store.verify(stored.path, stored.sha256)
    assert len(hashed) == 2


def test_verify_rehashes_a_file_written_just_now(tmp_path, monkeypatch):
    from storage import tensors as tensors_module

    store = TensorStore(tmp_path)
    stored = store.save(7, "fp", {"x": torch.arange(10, dtype=torch.float32)})
    hashed = []
    real = tensors_module.file_sha256
    monkeypatch.setattr(tensors_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    store.verify(stored.path, stored.sha256)
    store.verify(stored.path, stored.sha256)
    assert len(hashed) == 2  # not settled: a write within the timestamp granularity could hide
