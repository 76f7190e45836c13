"""A content-addressed store of per-chunk KV caches: in-memory LRU bounded in bytes, optionally
backed by a directory so a restarted engine starts warm, and by a Redis shared by every engine
(`remote.py`): memory -> disk -> Redis, the first that holds a chunk serves it.

An entry is one tensor `[layers, 2, kv_heads, tokens, head_dim]` holding, per layer, the chunk's K
*before* rotary embedding and its V, computed with the chunk alone at positions 0..n-1.

On disk each entry is a safetensors file written atomically (temp file, then rename) whose metadata
holds the model id and a SHA-256 of the tensor: a file that is truncated, damaged or from another
model is deleted (with a warning in the log) and recomputed, never served. The directory has a byte
budget of its own; the least recently used files go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)


def chunk_key(model_id: str, token_ids: list[int]) -> str:
    """Content hash of (model, token ids): the same chunk text gives the same key in any prompt."""
    h = hashlib.sha256(model_id.encode())
    h.update(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def checksum(kv: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes (any dtype: viewed as raw bytes)."""
    return hashlib.sha256(kv.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


class ChunkKVStore:
    def __init__(self, max_bytes: int = 2 << 30, disk_dir: str | Path | None = None,
                 disk_bytes: int = 8 << 30, model_id: str = "model", remote=None):
        self.max_bytes = int(max_bytes)
        self.disk_bytes = int(disk_bytes)
        self.model_id = model_id
        self.disk_dir = Path(disk_dir) if disk_dir else None
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.remote = remote  # a RedisTier (or anything with get/put/stats), or None
        self._published: set[str] = set()
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.disk_hits = 0
        self.disk_evictions = self.damaged = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            kv = self._mem.get(key)
            if kv is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return kv
        path = self._path(key)
        kv = self._load(path) if path is not None and path.exists() else None
        if kv is not None:
            with self._lock:
                self.hits += 1
                self.disk_hits += 1
            self._put_mem(key, kv)
            self._publish(key, kv)
            return kv
        kv = self.remote.get(key) if self.remote is not None else None
        if kv is not None:  # another engine computed it: keep a local copy in front of Redis
            with self._lock:
                self.hits += 1
            if path is not None and not path.exists():
                self._save(path, kv)
            self._put_mem(key, kv)
            self._published.add(key)
            return kv
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, kv: torch.Tensor) -> None:
        path = self._path(key)
        if path is not None and not path.exists():
            self._save(path, kv)
        self._put_mem(key, kv)
        self._publish(key, kv)

    def _publish(self, key: str, kv: torch.Tensor) -> None:
        """Offer the chunk to the shared tier once per process (Redis keeps the first copy)."""
        if self.remote is not None and key not in self._published and self.remote.put(key, kv):
            self._published.add(key)

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
                "disk_evictions": self.disk_evictions,
                "damaged": self.damaged,
                "disk_max_bytes": self.disk_bytes if self.disk_dir else None,
                "disk_dir": str(self.disk_dir) if self.disk_dir else None,
                **(self.remote.stats() if self.remote is not None else {}),
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

    # ------------------------------------------------------------- disk
    def _save(self, path: Path, kv: torch.Tensor) -> None:
        """Write to a temp file of our own, then rename: a reader never sees half a file."""
        kv = kv.contiguous()
        meta = {"model": self.model_id, "sha256": checksum(kv)}
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_file({"kv": kv}, tmp, metadata=meta)
            os.replace(tmp, path)
        except OSError as e:  # a full disk loses the disk copy only; the entry stays in memory
            log.warning("chunk KV not written to %s: %s", path, e)
            tmp.unlink(missing_ok=True)
            return
        self._evict_disk(keep=path)

    def _load(self, path: Path) -> torch.Tensor | None:
        """The file's tensor if its metadata names our model and its checksum matches; else delete it."""
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                kv = f.get_tensor("kv")
            if meta.get("model") != self.model_id:
                problem = f"made for model {meta.get('model')!r}, not {self.model_id!r}"
            elif meta.get("sha256") != checksum(kv):
                problem = "checksum mismatch"
            else:
                os.utime(path)  # its mtime is its last use: the disk LRU order
                return kv
        except Exception as e:  # noqa: BLE001 - truncated or random bytes: any parse error
            problem = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
        log.warning("damaged chunk KV file %s (%s): deleted, will recompute", path, problem)
        with self._lock:
            self.damaged += 1
        path.unlink(missing_ok=True)
        return None

    def _evict_disk(self, keep: Path) -> None:
        """Delete the least recently used files until the directory fits its budget."""
        files = []
        for p in self.disk_dir.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another engine evicted it meanwhile
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.disk_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size
                with self._lock:
                    self.disk_evictions += 1
