"""The shared tier of the chunk KV store: one Redis that every blend engine reads and writes, behind
each engine's own memory and disk tiers (`ChunkKVStore`: memory -> disk -> Redis).

Keys are `kvblend:<chunk_key>`, the content hash of the model id and the chunk's token ids: the
same chunk gives the same key on every engine, in any prompt, at any position. A value is

    b"KVB1" | 4-byte header length | JSON header {model, sha256, dtype, shape} | raw tensor bytes

and is served only when its header names our model and the SHA-256 of its bytes matches: a damaged
value is deleted and reported as a miss (the engine recomputes it). Redis never fails a request: when
it cannot be reached the engine says so once in its log, computes locally, and tries Redis again
after `retry_s` seconds (saying so again when it is back). A Redis that is full evicts (the managed
one runs `allkeys-lru`); one that refuses writes (`noeviction`) costs the shared copy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time

import torch

from .kvstore import checksum  # the disk files' checksum: one rule for both tiers

log = logging.getLogger(__name__)
MAGIC = b"KVB1"
PREFIX = "kvblend:"
FAILED = object()  # what `_call` returns when Redis did not answer


def encode(kv: torch.Tensor, model_id: str) -> bytes:
    kv = kv.contiguous()
    raw = kv.view(-1).view(torch.uint8).numpy().tobytes()
    header = json.dumps({"model": model_id, "sha256": checksum(kv),
                         "dtype": str(kv.dtype).removeprefix("torch."), "shape": list(kv.shape)}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + raw


def decode(blob: bytes, model_id: str) -> torch.Tensor:
    """The tensor in `blob`; ValueError (saying what is wrong) for anything damaged or foreign."""
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise ValueError("not a chunk KV value")
    (n,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(blob[8:8 + n])
        dtype, shape = getattr(torch, header["dtype"]), header["shape"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unreadable header ({type(e).__name__})") from e
    raw = blob[8 + n:]
    if header.get("model") != model_id:
        raise ValueError(f"made for model {header.get('model')!r}, not {model_id!r}")
    if hashlib.sha256(raw).hexdigest() != header.get("sha256"):
        raise ValueError("checksum mismatch")
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


class RedisTier:
    """get/put of chunk KV in one Redis at `url` (redis://HOST:PORT[/DB]); never raises."""

    def __init__(self, url: str, model_id: str, retry_s: float = 5.0, timeout_s: float = 2.0):
        import redis

        self.url, self.model_id, self.retry_s = url, model_id, retry_s
        self.client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._lock = threading.Lock()
        self.down_since: float | None = None  # when Redis last failed; None while it answers
        self.hits = self.misses = self.damaged = self.errors = self.writes = self.refused = 0

    def get(self, key: str) -> torch.Tensor | None:
        blob = self._call("read", self.client.get, PREFIX + key)
        if blob is None or blob is FAILED:
            self.misses += 1
            return None
        try:
            kv = decode(blob, self.model_id)
        except ValueError as e:
            log.warning("damaged chunk KV in Redis %s (key %s: %s): deleted, will recompute",
                        self.url, key, e)
            self.damaged += 1
            self._call("delete", self.client.delete, PREFIX + key)
            return None
        self.hits += 1
        return kv

    def put(self, key: str, kv: torch.Tensor) -> bool:
        """Store the chunk unless Redis holds it already; False when Redis did not take it."""
        out = self._call("write", self.client.set, PREFIX + key, encode(kv, self.model_id), nx=True)
        self.writes += out is True
        return out is not FAILED

    def _call(self, what: str, fn, *args, **kw):
        """fn(*args) against Redis, or FAILED when Redis is down (said once) or refuses (said once)."""
        import redis

        with self._lock:
            if self.down_since is not None and time.time() - self.down_since < self.retry_s:
                return FAILED
        try:
            out = fn(*args, **kw)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            with self._lock:
                if self.down_since is None:
                    log.warning("Redis chunk KV store %s unreachable (%s: %s): computing chunk KV locally; "
                                "start Redis again (or `./launch_engines.sh --kv-store ...` again) to share "
                                "it; retrying every %.0f s", self.url, type(e).__name__, e, self.retry_s)
                self.down_since = time.time()
                self.errors += 1
            return FAILED
        except redis.ResponseError as e:  # e.g. OOM under `noeviction`: the shared copy is lost only
            if not self.refused:
                log.warning("Redis %s refused a chunk KV %s (%s): serving from local memory; give it "
                            "more maxmemory or an LRU eviction policy", self.url, what, e)
            self.refused += 1
            return FAILED
        with self._lock:
            if self.down_since is not None:
                log.warning("Redis chunk KV store %s reachable again: sharing chunk KV", self.url)
                self.down_since = None
        return out

    def stats(self) -> dict:
        return {"remote_url": self.url, "remote_hits": self.hits, "remote_misses": self.misses,
                "remote_damaged": self.damaged, "remote_errors": self.errors, "remote_writes": self.writes,
                "remote_refused": self.refused, "remote_up": self.down_since is None}
