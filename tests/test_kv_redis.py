"""The shared Redis tier of the chunk KV store, against a real `redis-server` (Debian's package;
`make setup` installs it as root): a chunk one store computed is served to another, a damaged or
foreign value is deleted and never served, a Redis that is down or full never raises."""

import logging
import shutil
import subprocess
import time

import pytest
import torch

from helpers.embedded import remote
from helpers.embedded.kvstore import ChunkKVStore, chunk_key
from helpers.embedded.remote import RedisTier, decode, encode
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed: `make setup` as root installs it "
                                       "(or apt-get install redis-server)")
MODEL = "test-model"


def start_redis(tmp_path, *extra: str):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture
def redis_url(tmp_path):
    proc, url = start_redis(tmp_path)
    yield url
    proc.kill()
    proc.wait()


def kv(seed: int, tokens: int = 8) -> torch.Tensor:
    return torch.randn(2, 2, 1, tokens, 4, generator=torch.Generator().manual_seed(seed))


def store(url: str, **kw) -> ChunkKVStore:
    return ChunkKVStore(1 << 20, model_id=MODEL, remote=RedisTier(url, MODEL, **kw))


def test_a_chunk_one_store_computed_is_served_to_another(redis_url):
    key = chunk_key(MODEL, [1, 2, 3])
    a, b = store(redis_url), store(redis_url)
    a.put(key, kv(0))
    got = b.get(key)
    assert got is not None and torch.equal(got, kv(0))
    assert b.stats()["remote_hits"] == 1 and b.stats()["misses"] == 0
    assert store(redis_url).get(chunk_key(MODEL, [1, 2, 4])) is None  # other ids, other key


def test_values_are_checked_bit_for_bit():
    blob = encode(kv(1), MODEL)
    assert torch.equal(decode(blob, MODEL), kv(1))
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        decode(bytes(flipped), MODEL)
    with pytest.raises(ValueError, match="model"):
        decode(blob, "another-model")
    with pytest.raises(ValueError):
        decode(b"garbage", MODEL)


def test_a_damaged_value_is_deleted_and_never_served(redis_url, caplog):
    import redis

    key = chunk_key(MODEL, [5, 6])
    store(redis_url).put(key, kv(2))
    r = redis.Redis.from_url(redis_url)
    blob = bytearray(r.get(remote.PREFIX + key))
    blob[-1] ^= 0xFF  # one bit of the tensor's bytes
    r.set(remote.PREFIX + key, bytes(blob))
    b = store(redis_url)
    with caplog.at_level(logging.WARNING, logger=remote.__name__):
        assert b.get(key) is None  # a miss: the engine recomputes it
    assert "checksum mismatch" in caplog.text and b.stats()["remote_damaged"] == 1
    assert r.get(remote.PREFIX + key) is None  # deleted, so the recomputed copy can take its place
    b.put(key, kv(2))
    assert torch.equal(store(redis_url).get(key), kv(2))


def test_redis_down_is_said_once_and_never_raises(tmp_path, caplog):
    proc, url = start_redis(tmp_path)
    key = chunk_key(MODEL, [7])
    a = store(url, retry_s=0.2)
    a.put(key, kv(3))
    proc.kill()
    proc.wait()
    b = store(url, retry_s=0.2)
    with caplog.at_level(logging.WARNING, logger=remote.__name__):
        t0 = time.time()
        for _ in range(5):
            assert b.get(key) is None
            b.put(chunk_key(MODEL, [8]), kv(4))  # kept in memory, never an error
        assert time.time() - t0 < 5
    assert caplog.text.count("unreachable") == 1, caplog.text
    assert "computing chunk KV locally" in caplog.text
    assert torch.equal(b.get(chunk_key(MODEL, [8])), kv(4))  # the local tier still serves
    assert b.stats()["remote_up"] is False


def test_redis_back_is_used_again(tmp_path, caplog):
    proc, url = start_redis(tmp_path)
    port = url.rsplit(":", 1)[1]
    proc.kill()
    proc.wait()
    a = store(url, retry_s=0.1)
    assert a.get(chunk_key(MODEL, [9])) is None
    proc2 = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", port, "--save", ""],
                             stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        time.sleep(0.5)
        with caplog.at_level(logging.WARNING, logger=remote.__name__):
            a.put(chunk_key(MODEL, [10]), kv(5))
        assert "reachable again" in caplog.text
        assert torch.equal(store(url).get(chunk_key(MODEL, [10])), kv(5))
    finally:
        proc2.kill()
        proc2.wait()


def test_a_full_redis_evicts_without_an_error(tmp_path):
    proc, url = start_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    try:
        a = store(url)
        keys = [chunk_key(MODEL, [i]) for i in range(40)]
        for i, key in enumerate(keys):
            a.put(key, kv(i, tokens=2000))  # 128 KB each: 5 MB in all into 2 MB
        b = store(url)
        served = [i for i, key in enumerate(keys) if b.get(key) is not None]
        assert 0 < len(served) < len(keys)  # some evicted, the rest served
        assert all(torch.equal(b.get(keys[i]), kv(i, tokens=2000)) for i in served)
        assert b.stats()["remote_damaged"] == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_redis_that_refuses_writes_costs_the_shared_copy_only(tmp_path, caplog):
    proc, url = start_redis(tmp_path, "--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    try:
        a = store(url)
        with caplog.at_level(logging.WARNING, logger=remote.__name__):
            for i in range(20):
                a.put(chunk_key(MODEL, [i]), kv(i, tokens=2000))
        assert caplog.text.count("refused") == 1 and a.stats()["remote_refused"] > 1
        assert torch.equal(a.get(chunk_key(MODEL, [19])), kv(19, tokens=2000))  # from local memory
    finally:
        proc.kill()
        proc.wait()
