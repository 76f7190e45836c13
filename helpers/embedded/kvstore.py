"""A content-addressed store of per-chunk KV caches: in-memory LRU bounded in bytes, optionally
backed by a directory so a restarted engine starts warm.

An entry is one tensor `[layers, 2, kv_heads, tokens, head_dim]` holding, per layer, the chunk's K
*before* rotary embedding and its V, computed with the chunk alone at positions 0..n-1.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def chunk_key(model_id: str, token_ids: list[int]) -> str:
    """Content hash of (model, token ids): the same chunk text gives the same key in any prompt."""
    h = hashlib.sha256(model_id.encode())
    h.update(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


class ChunkKVStore:
    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | Path | None = None):
        self.max_bytes = int(max_bytes)
        self.disk_dir = Path(disk_dir) if disk_dir else None
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.disk_hits = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            kv = self._mem.get(key)
            if kv is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return kv
        path = self._path(key)
        if path is not None and path.exists():
            kv = load_file(path)["kv"]
            with self._lock:
                self.hits += 1
                self.disk_hits += 1
            self._put_mem(key, kv)
            return kv
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, kv: torch.Tensor) -> None:
        path = self._path(key)
        if path is not None and not path.exists():
            tmp = path.with_suffix(".tmp")
            save_file({"kv": kv.contiguous()}, tmp)
            tmp.rename(path)
        self._put_mem(key, kv)

    def __contains__(self, key: str) -> bool:
        path = self._path(key)
        return key in self._mem or (path is not None and path.exists())

    def clear(self) -> None:
        """Forget the in-memory entries (the disk directory, if any, is kept)."""
        with self._lock:
            self._mem.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._mem),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "disk_hits": self.disk_hits,
                "evictions": self.evictions,
                "disk_dir": str(self.disk_dir) if self.disk_dir else None,
            }

    def _put_mem(self, key: str, kv: torch.Tensor) -> None:
        size = kv.numel() * kv.element_size()
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            if size > self.max_bytes:
                return  # larger than the whole budget: keep it on disk only
            while self.bytes + size > self.max_bytes:
                _, old = self._mem.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evictions += 1
            self._mem[key] = kv
            self.bytes += size

    def _path(self, key: str) -> Path | None:
        return self.disk_dir / f"{key}.safetensors" if self.disk_dir else None
