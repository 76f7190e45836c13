"""The engines under hostile or careless use (issue 14): a damaged chunk-KV cache, oversized and
malformed requests, abandoned clients, foreign web pages, racing launchers, frozen engines.

Most server checks run against the real app with a stand-in generator (no model: fast); the few
that need the real tokenizer or model use the session's live engines."""

import logging
import os

import pytest
import torch

from helpers.embedded.kvstore import ChunkKVStore


# ---------------------------------------------------------------- chunk KV on disk
def kv_file(d, key):
    return d / f"{key}.safetensors"


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "data flipped", "other model"])
def test_damaged_kv_file_is_deleted_and_never_served(tmp_path, caplog, damage):
    ChunkKVStore(disk_dir=tmp_path, model_id="m").put("k", torch.arange(1000, dtype=torch.float32))
    f = kv_file(tmp_path, "k")
    raw = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "random bytes":
        f.write_bytes(os.urandom(len(raw)))
    elif damage == "data flipped":  # the header stays valid: only the checksum can tell
        f.write_bytes(raw[:-100] + os.urandom(100))
    store = ChunkKVStore(disk_dir=tmp_path, model_id="other" if damage == "other model" else "m")
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None  # a miss: the caller recomputes
    assert not f.exists() and "damaged chunk KV file" in caplog.text
    assert store.stats()["damaged"] == 1 and store.stats()["misses"] == 1
    store.put("k", torch.ones(3))  # recomputed, written again, served from disk after a restart
    assert torch.equal(ChunkKVStore(disk_dir=tmp_path, model_id=store.model_id).get("k"), torch.ones(3))


def test_kv_files_are_written_atomically(tmp_path):
    store = ChunkKVStore(disk_dir=tmp_path, model_id="m")
    store.put("k", torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]  # no temp file left behind


def test_disk_budget_evicts_least_recently_used(tmp_path):
    one = torch.zeros(1000)  # ~4.1 KB on disk with its header
    store = ChunkKVStore(max_bytes=1, disk_dir=tmp_path, disk_bytes=10_000, model_id="m")
    for i, key in enumerate(["a", "b", "c"]):
        store.put(key, one.clone())
        os.utime(kv_file(tmp_path, key), (1000 + i, 1000 + i))  # a clear age order
    store.get("a")  # a is used again: b is now the oldest
    store.put("d", one.clone())
    left = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert left == ["a", "d"] and store.stats()["disk_evictions"] == 2
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 10_000
