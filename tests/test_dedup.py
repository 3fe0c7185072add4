"""Dedup on (source, id): the bounded in-memory window, and the Redis store shared by several pipelines
(against the machine's real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest

from tests.brokers import eventually
from tests.conftest import GatewayFactory, http_url
from tests.conftest_brokers import unique_name
from umcef.fabric import config as config_mod
from umcef.fabric.dedup import DedupWindow
from umcef.fabric.dedup_redis import RedisDedup
from umcef.fabric.event import Event
from umcef.fabric.limits import NO_LIMITS
from umcef.fabric.pipeline import Overloaded, Pipeline


def event(n: int, source: str = "/s") -> Event:
    return Event({"specversion": "1.0", "id": f"e{n}", "source": source, "type": "t"}, None)


class ToDefault:
    def route(self, event: Event) -> tuple[str, ...]:
        return ("default",)


class MemorySpool:
    """Records what was written; `gate` holds writes, `fail` makes them raise (a failed durable write)."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def write(self, events: Sequence[Event], destinations: Sequence[tuple[str, ...]]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        self.written.extend(e.id for e in events)


# -- the in-memory window ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_window_forgets_after_the_window_and_drops_whole_buckets() -> None:
    clock = Clock()
    window = DedupWindow(10.0, slices=10, clock=clock)
    for n in range(100):
        assert window.claim(("/s", f"e{n}")) is True
        window.commit(("/s", f"e{n}"))
        clock.now += 0.1  # 100 events over 10 s: one bucket per second
    assert window.claim(("/s", "e0")) is False  # 10 s old: the window is a minimum
    clock.now += 1.1  # e0..e9's bucket (started 1000.0) is now older than window + slice
    assert window.claim(("/s", "e0")) is True
    window.release(("/s", "e0"))
    window.commit(("/s", "new"))  # a commit in a new slice drops the expired buckets
    assert len(window) == 100 - 10 + 1
    assert window.claim(("/s", "e10")) is False


async def test_memory_window_stays_bounded_and_forgets_oldest_first() -> None:
    window = DedupWindow(600.0, max_entries=1000)
    for n in range(5000):
        assert window.claim(("/s", str(n))) is True
        window.commit(("/s", str(n)))
    assert len(window) == 1000
    assert window.evicted == 4000
    assert window.claim(("/s", "4999")) is False
    assert window.claim(("/s", "0")) is True  # forgotten: effectively-once does not hold past max_entries


async def test_memory_pipeline_release_on_failure_and_concurrent_duplicate_waits() -> None:
    spool = MemorySpool()
    pipeline = Pipeline(DedupWindow(60.0), ToDefault(), spool, NO_LIMITS)
    spool.fail = True
    with pytest.raises(OSError):
        await pipeline.publish([event(1)])
    spool.fail = False
    assert (await pipeline.publish([event(1)])).duplicates == []  # released: a retry is not a duplicate
    spool.gate = asyncio.Event()
    first = asyncio.create_task(pipeline.publish([event(2)]))
    second = asyncio.create_task(pipeline.publish([event(2), event(2)]))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()  # the duplicate waits for the first write's outcome
    spool.gate.set()
    assert (await first).duplicates == []
    assert (await second).duplicates == ["e2", "e2"]
    assert spool.written == ["e1", "e2"]


# -- Redis: several instances dedup together ---------------------------------------------------------------


@pytest.fixture
async def redis_dedups(redis_url: str) -> AsyncIterator[Callable[..., RedisDedup]]:
    prefix = unique_name("dedup") + ":"
    made: list[RedisDedup] = []

    def make(window_seconds: float = 60.0, **kw: float) -> RedisDedup:
        made.append(RedisDedup(redis_url, window_seconds, prefix=prefix, **kw))
        return made[-1]

    yield make
    if made:
        keys = [k async for k in made[0].client.scan_iter(match=prefix + "*")]
        if keys:
            await made[0].client.delete(*keys)
    for store in made:
        await store.close()


def two_pipelines(make: Callable[..., RedisDedup], **kw: float) -> tuple[Pipeline, Pipeline, MemorySpool,
                                                                          MemorySpool]:
    a, b = MemorySpool(), MemorySpool()
    return (Pipeline(make(**kw), ToDefault(), a, NO_LIMITS), Pipeline(make(**kw), ToDefault(), b, NO_LIMITS),
            a, b)


async def test_two_pipelines_sharing_redis_store_each_event_once(redis_dedups: Callable[..., RedisDedup]) -> None:
    p1, p2, s1, s2 = two_pipelines(redis_dedups)
    batch = [event(n) for n in range(200)]
    r1 = await p1.publish(batch[:150])
    r2 = await p2.publish(batch[50:])  # 100 overlap with what p1 stored
    assert r1.duplicates == []
    assert r2.duplicates == [e.id for e in batch[50:150]]
    assert r2.ids == [e.id for e in batch[50:]]  # same answer as the first publish: accepted
    assert sorted(s1.written + s2.written) == sorted(e.id for e in batch)
    # the same id from another source is a different event
    assert (await p2.publish([event(1, source="/other")])).duplicates == []


async def test_redis_window_expiry_lets_the_event_in_again(redis_dedups: Callable[..., RedisDedup]) -> None:
    p1, p2, s1, s2 = two_pipelines(redis_dedups, window_seconds=0.3)
    await p1.publish([event(1)])
    assert (await p2.publish([event(1)])).duplicates == ["e1"]
    deadline = time.monotonic() + 5
    while (await p2.publish([event(1)])).duplicates:
        assert time.monotonic() < deadline, "the Redis key never expired"
        await asyncio.sleep(0.05)
    assert s1.written == ["e1"] and s2.written == ["e1"]  # past the window: stored twice (documented)


async def test_redis_failed_write_deletes_its_claims(redis_dedups: Callable[..., RedisDedup]) -> None:
    p1, p2, s1, s2 = two_pipelines(redis_dedups)
    s1.fail = True
    with pytest.raises(OSError):
        await p1.publish([event(1), event(2)])
    store = p1.dedup
    assert isinstance(store, RedisDedup)
    assert await store.client.exists(store.redis_key(("/s", "e1")), store.redis_key(("/s", "e2"))) == 0
    assert (await p2.publish([event(1), event(2)])).duplicates == []
    assert s2.written == ["e1", "e2"]


async def test_redis_concurrent_publish_on_another_instance_waits_for_the_outcome(
        redis_dedups: Callable[..., RedisDedup]) -> None:
    p1, p2, s1, s2 = two_pipelines(redis_dedups)
    s1.gate = asyncio.Event()
    first = asyncio.create_task(p1.publish([event(1)]))
    await eventually(lambda: bool(p1.in_flight))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(p2.publish([event(1)]))
    await asyncio.sleep(0.1)
    assert not second.done()  # p2 saw p1's pending claim and polls for its outcome
    s1.gate.set()
    assert (await first).duplicates == [] and (await second).duplicates == ["e1"]

    s1.gate, s1.fail = asyncio.Event(), True
    first = asyncio.create_task(p1.publish([event(2)]))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(p2.publish([event(2)]))
    await asyncio.sleep(0.1)
    s1.gate.set()
    with pytest.raises(OSError):
        await first
    with pytest.raises(Overloaded):  # never a 202 for an event whose only write failed
        await second
    assert s2.written == []


async def test_redis_down_answers_overloaded_not_a_guess() -> None:
    pipeline = Pipeline(RedisDedup("redis://127.0.0.1:1/0"), ToDefault(), MemorySpool(), NO_LIMITS)
    try:
        with pytest.raises(Overloaded, match="unavailable"):
            await pipeline.publish([event(1)])
    finally:
        await pipeline.dedup.close()


async def test_two_gateways_configured_with_redis_dedup_together(make_gateway: GatewayFactory, redis_url: str) -> None:
    dedup = {"store": "redis", "url": redis_url, "window_seconds": 60}
    gateways = [await make_gateway(dedup=dedup), await make_gateway(dedup=dedup)]
    source = "/" + unique_name("gw")  # fresh ids: the gateways use the default key prefix
    body = orjson.dumps([{"specversion": "1.0", "id": str(n), "source": source, "type": "t"} for n in range(20)])
    headers = {"content-type": "application/cloudevents-batch+json"}
    async with httpx.AsyncClient() as client:
        answers = [await client.post(http_url(g) + "/v1/events", content=body, headers=headers) for g in gateways]
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["duplicates"] == []
    assert len(answers[1].json()["duplicates"]) == 20
    assert sum(g.store.topics().get("default", 0) for g in gateways) == 20


def test_dedup_config_is_validated() -> None:
    cfg = config_mod.from_mapping({"dedup": {"store": "redis", "url": "redis://h:6379/0", "window_seconds": 5}})
    assert (cfg.dedup.store, cfg.dedup.url, cfg.dedup.window_seconds) == ("redis", "redis://h:6379/0", 5.0)
    with pytest.raises(config_mod.ConfigError, match=r"test: dedup\.url: expected a redis://HOST:PORT/DB URL"):
        config_mod.from_mapping({"dedup": {"store": "redis"}}, "test")
    with pytest.raises(config_mod.ConfigError, match=r"dedup\.store: expected one of memory, redis, got 'disk'"):
        config_mod.from_mapping({"dedup": {"store": "disk"}})
    with pytest.raises(config_mod.ConfigError, match=r"dedup\.url: only used with store: redis"):
        config_mod.from_mapping({"dedup": {"url": "redis://h"}})


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_accepted_batch_looks_without_claiming(kind: str, redis_dedups: Callable[..., RedisDedup]) -> None:
    """What a refused batch asks (is every event of it accepted already?): committed keys only, and the look
    takes no claim, so a concurrent first publish of a new key is not made to wait."""
    store: Any = redis_dedups() if kind == "redis" else DedupWindow(60.0)
    done, writing, new = ("/s", "done"), ("/s", "writing"), ("/s", "new")
    assert await store.claim_batch([done, writing]) == [True, True]
    await store.commit_batch([done])
    assert await store.accepted_batch([done, writing, new]) == [True, False, False]
    assert await store.claim_batch([new]) == [True]  # the look left no claim behind
    await store.release_batch([writing, new])
