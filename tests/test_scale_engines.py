"""Two blend replicas that share nothing but a managed Redis, behind vllm-router, as
`./launch_engines.sh --backend embedded --blend-replicas 2 --kv-store redis --no-disk-cache` starts
them (on free ports, a handful of short chunks instead of the corpus):

- after the chunks were computed through one replica, the other's first answer has no chunk miss,
  reuses >= 80% of its prompt tokens and gives the first replica's first tokens;
- with Redis stopped both still answer through the router (never a 5xx), recomputing what they
  miss, the same answer as with Redis, with one clear line in the log;
- a replica killed under load: the router routes around it and no request hangs past its timeout.
"""

import asyncio
import shutil
import time

import httpx
import pytest

from helpers import engines, library, runtime
from helpers.prompts import build_messages
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.engines,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed: `make setup` as root installs it "
                                        "(or apt-get install redis-server)")]
SHARED = ["ffprobe_overview", "filter_amix", "decoder_dvdsub"]  # the shortest chunks: ~1.1K tokens
QUESTION = "Which filter mixes several audio inputs into one?"
TIMEOUT = 120  # seconds a request may take on 2 busy cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The replicas, router and Redis in a run dir of their own: the session's live engines (named
    blend and full too) are not theirs to replace or stop."""
    from helpers import runtime

    mp = pytest.MonkeyPatch()
    own = tmp_path_factory.mktemp("scale-engines")
    mp.setattr(runtime, "RUN_DIR", own)
    mp.setenv("KVBLEND_RUN_DIR", str(own))
    blend_port, full_port = free_port(), free_port()
    try:
        started = engines.start("embedded", blend_port=blend_port, full_port=full_port, timeout=300,
                                progress=False, kv_dir=None, kv_store="redis", replicas={"blend": 2})
        by = {e.name: e for e in started}
        assert by["blend"].role == "router" and by["redis"].role == "redis"
        yield by
    finally:
        engines.stop()
        mp.undo()


def ask(e, chunks: list[str], question: str = QUESTION, max_tokens: int = 4) -> httpx.Response:
    texts = library.load(None).texts
    return httpx.post(e.url + "/v1/chat/completions", timeout=TIMEOUT, json={
        "model": "smollm2", "messages": build_messages([texts[n] for n in chunks], question),
        "max_tokens": max_tokens, "temperature": 0})


def test_a_chunk_computed_through_one_replica_is_a_hit_on_the_other(cluster):
    texts = library.load(None).texts
    one, two = cluster["blend-1"], cluster["blend-2"]
    pre = httpx.post(one.url + "/v1/kv/precompute", json={"texts": [texts[n] for n in SHARED]},
                     timeout=TIMEOUT).json()
    assert [r["cached"] for r in pre["results"]] == [False] * 3  # computed there, from nothing
    first = ask(one, SHARED).json()  # also caches the chat template's prefix segment
    second = ask(two, SHARED).json()
    info = second["x_blend"]
    assert info["chunk_misses"] == 0 and info["chunk_hits"] == 4, info
    assert info["n_cached"] / info["n_tokens"] >= 0.8, info
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    stats = httpx.get(two.url + "/v1/kv/stats").json()
    assert stats["remote_hits"] == 4 and stats["misses"] == 0


def test_with_redis_stopped_both_replicas_still_answer(cluster):
    before = ask(cluster["blend-2"], ["filter_palettegen", *SHARED]).json()["choices"][0]["message"]
    engines.stop_engine(runtime.read_pidfile("redis"))
    assert runtime.health(cluster["redis"]) is None
    other = ["ffmpeg_filtergraphs", "encoder_libsvtav1"]  # never computed anywhere: misses
    for e in (cluster["blend-1"], cluster["blend-2"], cluster["blend"], cluster["blend"]):
        r = ask(e, [*other, *SHARED])
        assert r.status_code == 200, r.text
        assert r.json()["x_blend"]["chunk_misses"] >= 1 or e is cluster["blend"]
    for name in ("blend-1", "blend-2"):
        log = cluster[name].log.read_text()
        assert log.count("unreachable") == 1 and "computing chunk KV locally" in log, name
    # blend-1 never held filter_palettegen: it recomputes it and answers as blend-2 did with Redis
    again = ask(cluster["blend-1"], ["filter_palettegen", *SHARED]).json()
    assert again["x_blend"]["chunk_misses"] == 1
    assert again["choices"][0]["message"]["content"] == before["content"]


async def _load(url: str, n: int, kill_after: float, victim) -> list:
    """n requests through the router, one every 0.5 s; `victim` is killed after `kill_after` s."""
    texts = library.load(None).texts
    body = {"model": "smollm2", "messages": build_messages([texts[n] for n in SHARED], QUESTION),
            "max_tokens": 2, "temperature": 0}

    async def one(client, i):
        await asyncio.sleep(0.5 * i)
        t0 = time.monotonic()
        try:
            r = await client.post(url + "/v1/chat/completions", json=body)
            return r.status_code, time.monotonic() - t0, 0.5 * i
        except httpx.HTTPError as err:
            return type(err).__name__, time.monotonic() - t0, 0.5 * i

    async def kill():
        await asyncio.sleep(kill_after)
        await asyncio.to_thread(engines.stop_engine, victim, 0)

    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        out = await asyncio.gather(kill(), *(one(client, i) for i in range(n)))
    return out[1:]


def test_a_replica_killed_under_load_is_routed_around(cluster):
    results = asyncio.run(_load(cluster["blend"].url, 20, 2.0, cluster["blend-2"]))
    assert not runtime.alive(cluster["blend-2"].pid)
    assert all(took < TIMEOUT for _, took, _ in results)  # nothing hangs
    late = [status for status, _, sent in results if sent >= 6.0]  # after the router's health checks
    assert late and all(s == 200 for s in late), results
    assert sum(s == 200 for s, _, _ in results) >= len(results) - 2, results
    # the control: asked directly, the killed replica answers nothing, so the late 200s above are the
    # router's doing (sending to the survivor), not a replica that outlived its kill
    with pytest.raises(httpx.ConnectError):
        ask(cluster["blend-2"], SHARED[:1])
